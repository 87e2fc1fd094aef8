r"""--mode=compile: does a config fit a TPU slice, and what does it communicate?

Compiles, on a machine with no accelerator, the train step, the eval step and
the sampler's programs for a named Cloud TPU topology (libtpu's topology
descriptions give the slice's devices), then reports per
chip: argument / output / temporary / code bytes against the chip's HBM with a
verdict (and, when it does not fit, the knobs to turn); XLA's FLOPs next to
the model FLOPs; and the collectives in the compiled HLO with their bytes per
step. Written to <workdir>/compile_report.json and printed as a table; each
program's compiled HLO is kept next to it (train_step.hlo.gz, ...).

The sampler's programs are the ones sampling runs, on the weights' layout it
would choose on this slice (sampler.choose_reshard with the chip's HBM):
by default a copy in the model dtype replicated over data/fsdp, made by the
prepare step and taken by prefill and decode, so their arguments hold it.

  python -m codeclm.main --config=configs/jpeg_lm.py:7b --workdir=/tmp/aot \
      --mode=compile --config.compile.topology=v5p-128 \
      --config.mesh.shape='(1,-1,1,1)'

Needs libtpu (`pip install -e '.[tpu]'`). GPU targets are out of scope (XLA
needs CUDA to compile for them). The slice names and devices are in
tpu_topology.py, the collectives count in hlo_stats.py, the per-program
numbers, knobs and table in compile_report.py; this module builds the
programs, compiles them and writes the report.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
import time

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codeclm.data import loader
from codeclm.model import attention
from codeclm.model import context_attention
from codeclm.model import kv_cache
from codeclm.model import sharding
from codeclm.sampling import decode_loop
from codeclm.sampling import sampler as sampler_lib
from codeclm.train import checkpoint
from codeclm.train import compile_report
from codeclm.train import hlo_stats
from codeclm.train import loop
from codeclm.train import planner
from codeclm.train import tpu_topology


def _compile(name: str, fn, args, context, hlo_dir: epath.Path) -> dict:
  """Compiles fn(*args); RESOURCE_EXHAUSTED becomes a result, not a crash.

  The compiled HLO is kept in hlo_dir (gzipped text, one file per program):
  the collectives can be read there, or recounted without recompiling.
  """
  t = time.perf_counter()
  with context():
    lowered = fn.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(name=name, fits=False, error=str(e).splitlines()[0][:500],
                memory=compile_report.exhausted_numbers(str(e)),
                compile_s=time.perf_counter() - t)
  hlo = compiled.as_text()
  hlo_file = hlo_dir / (re.sub(r"\W+", "_", name.split(" (")[0]) + ".hlo.gz")
  hlo_dir.mkdir(parents=True, exist_ok=True)
  hlo_file.write_bytes(gzip.compress(hlo.encode()))
  return dict(name=name, fits=True, memory=compile_report.memory(compiled),
              xla_flops=compile_report.xla_flops(compiled),
              collectives=hlo_stats.collectives(hlo), hlo=hlo_file.name,
              compile_s=time.perf_counter() - t)


def _sampler_steps(sc, compile_cfg, setup, *, seq_len: int,
                   hbm_bytes: int) -> tuple[list, dict]:
  """The sampler's programs as sampling runs them (decode_loop.py), and the
  weights' layout they run on.

  The layout is the Sampler's choice (sampler.choose_reshard) with the
  slice's HBM per chip: with reshard_params, the prepare step that casts
  the trained weights and replicates them over the batch axes, then prefill
  of a prompt into a fresh cache and one decode step taking that copy;
  else those two on the weights as trained. `sc` and `compile_cfg`: the
  config's sample and compile sections.
  """
  model, mesh, rules = setup.model, setup.mesh, setup.rules
  reshard, why = sampler_lib.choose_reshard(
      sc.reshard_params, model, mesh, rules, memory=hbm_bytes,
      max_fraction=sc.max_copy_fraction)
  cache_dtype = jnp.dtype(sc.cache_dtype)
  _, _, prepare = decode_loop.loop_for(model, mesh, rules, cache_dtype,
                                       reshard, bool(sc.unroll_layers))
  # Sampling reads the weights from device memory even where training keeps
  # them in host memory (train.param_offload).
  trained = checkpoint.abstract_with_shardings(
      setup.abstract_state.params,
      sharding.in_memory(setup.state_shardings.params, "device"))
  programs = []
  if reshard:
    axes = ",".join(sharding.batch_axes(rules)) or "none"
    layout = f"{model.config.dtype} replicated over {axes}"
    with setup.context():
      shapes = jax.eval_shape(prepare, trained)
    shardings = decode_loop.prepared_shardings(
        model, mesh, rules, unroll_layers=bool(sc.unroll_layers))
    params = decode_loop.DecodeParams(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes.tree, shardings), shapes.model)
    programs.append((f"sample prepare ({layout})", prepare, (trained,)))
  else:
    layout = f"{model.config.param_dtype} sharded as trained"
    params = decode_loop.DecodeParams(trained, model)

  multiple = math.prod(mesh.shape[a] for a in sharding.batch_axes(rules))
  rows = -(-sc.batch_size // multiple) * multiple
  cache_len = seq_len
  prompt_len = compile_cfg.sample_prompt_len or cache_len // 2

  def prefill(params, prompts, lengths):
    logits, cache = decode_loop.prefill(params, prompts, lengths,
                                        cache_len=cache_len,
                                        cache_dtype=cache_dtype)
    return logits[:, 0], cache

  def decode(params, tokens, positions, cache):
    logits, cache = decode_loop.decode_step(params, tokens, positions, cache)
    return logits[:, 0], cache

  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  with setup.context():
    data = named(nn.logical_to_mesh_axes(("batch", "length"), rules))
    cache_shape = jax.eval_shape(lambda: kv_cache.init_cache(
        params.model.config, rows, cache_len, cache_dtype,
        per_layer=not params.model.config.scan_layers))
    fit = sharding._fit  # pylint: disable=protected-access
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=named(fit(
            nn.logical_to_mesh_axes(kv_cache.CACHE_AXES[-x.ndim:], rules),
            x.shape, mesh))), cache_shape)
  ints = lambda *shape: jax.ShapeDtypeStruct(
      (rows, *shape), jnp.int32,
      sharding=named(fit(jax.sharding.PartitionSpec(  # 1 token: not split.
          *data.spec[:len(shape) + 1]), (rows, *shape), mesh)))
  programs += [
      (f"sample prefill ({rows}x{prompt_len}, {layout})", jax.jit(prefill),
       (params, ints(prompt_len), ints())),
      (f"sample decode ({rows} rows, cache {cache_len}, {layout})",
       jax.jit(decode, donate_argnums=(3,)),
       (params, ints(1), ints(1), cache)),
  ]
  info = dict(reshard_params=reshard, setting=str(sc.reshard_params),
              why=why, layout=layout, rows=rows, batch_multiple=multiple,
              weights_bytes_per_chip=sharding.bytes_per_device(
                  params.tree, jax.tree.map(lambda x: x.sharding, params.tree)),
              max_copy_fraction=sc.max_copy_fraction)
  return programs, info


def _attention_label(mesh_cfg, impl: str, context: int) -> str:
  """The attention the train step runs: the kernel, or over a context axis
  (of `context` devices) by a ring, the ring's block kernel; `mesh_cfg`:
  the config's mesh section."""
  if mesh_cfg.get("context_strategy", "all_gather") == "ring" and (
      context > 1):
    return f"ring of {context_attention.ring_kernel(impl)} blocks"
  return impl


def run(config, workdir: str) -> dict:
  """Compiles every step for config.compile.topology; writes the report."""
  topology = tpu_topology.parse_topology(config.compile.topology)
  impl = attention.resolve(config.model.attention_impl, "tpu",
                           config.model.dtype, config.seq_len, False)
  auto = planner.auto_fields(config)
  config, planned = planner.resolve(
      config, topology.chips, topology.hbm_bytes, attention=impl,
      host_bytes=planner.HOST_BYTES_PER_CHIP[topology.generation])
  tpu_topology.check_mesh(config.mesh.shape, topology)
  layout = planner.layout_of(config, topology.chips)
  plan = planned or planner.estimate(planner.config_shape(config, impl),
                                     layout)  # Nothing auto: as set.
  logging.info("Layout%s: %s; estimate %s.", " (planned)" * bool(auto),
               layout, plan.describe())
  devices = tpu_topology.topology_devices(topology)
  vocab = config.data.vocab_size + 2  # BPE entries + BOS/EOS.
  setup = loop.build(config, vocab, np.ones(vocab, np.float32), devices)
  batch = {k: jax.ShapeDtypeStruct(
      (config.batch_size, config.seq_len),
      np.float32 if k == "loss_mask" else np.int32,
      sharding=setup.data_sharding) for k in loader.BATCH_KEYS}
  state = checkpoint.abstract_with_shardings(setup.abstract_state,
                                             setup.state_shardings)
  steps = tuple(config.compile.steps)
  unknown = set(steps) - {"train", "eval", "sample"}
  if unknown or not steps:
    raise ValueError(f"compile.steps={steps}: use some of 'train', 'eval', "
                     "'sample'.")
  programs, sample = [], None
  if "train" in steps:
    programs.append(("train step", setup.step_fn, (state, batch)))
  if "eval" in steps:
    programs.append(("eval step", setup.eval_fn, (state.params, batch)))
  if "sample" in steps:
    sampler_programs, sample = _sampler_steps(
        config.sample, config.compile, setup, seq_len=config.seq_len,
        hbm_bytes=topology.hbm_bytes)
    logging.info("Sampling layout: %s (%s).", sample["layout"],
                 sample["why"])
    programs += sampler_programs

  out = epath.Path(workdir)
  results = []
  for name, fn, args in programs:
    logging.info("Compiling the %s for %s ...", name, topology.name)
    results.append(_compile(name, fn, args, setup.context, out))

  hbm = topology.hbm_bytes
  train_result = results[0] if "train" in steps else {}
  model_flops = setup.flops_per_token * config.batch_size * config.seq_len
  worst = max(results, key=lambda r: r["memory"].get("total", 0))
  need = worst["memory"].get("total", 0)
  fits = all(r["fits"] and r["memory"]["total"] <= hbm for r in results)
  verdict = dict(fits=fits, worst=worst["name"], need_bytes=need,
                 hbm_bytes=hbm)
  if not fits:
    available = worst["memory"].get("available", hbm)
    verdict["over_bytes"] = max(need - available, 0)
    if worst["name"].startswith("sample"):
      verdict["knobs"] = compile_report.sample_knobs(sample,
                                                     verdict["over_bytes"])
    else:
      verdict["knobs"] = compile_report.knobs(
          config.model, config.train, setup, impl, verdict["over_bytes"],
          batch_size=config.batch_size, seq_len=config.seq_len)
  report = dict(
      topology=topology.name, libtpu_topology=topology.libtpu_name,
      chips=topology.chips, device_kind=devices[0].device_kind,
      hbm_bytes_per_chip=hbm, mesh=dict(setup.mesh.shape),
      config=dict(size=config.size, seq_len=config.seq_len,
                  batch_size=config.batch_size,
                  grad_accum=config.train.grad_accum,
                  remat_policy=config.model.remat_policy,
                  attention_impl=config.model.attention_impl,
                  attention_resolved=_attention_label(config.mesh, impl,
                                                        layout.mesh[2]),
                  dtype=config.model.dtype),
      programs=results,
      planner=dict(auto=auto, layout=dataclasses.asdict(layout),
                   hbm_bytes=plan.hbm_bytes, host_bytes=plan.host_bytes,
                   collective_bytes=plan.collective_bytes,
                   parts=plan.parts),
      sample=sample,
      flops=dict(
          model_per_chip=model_flops / topology.chips,
          xla_per_chip=train_result.get("xla_flops"),
          note=("XLA's cost analysis counts a while loop's body once: with "
                "scan_layers one of num_layers layers (and its remat "
                "recomputation); model FLOPs are 6N + attention per token, "
                "no remat (as for MFU)." if config.model.scan_layers else
                "XLA's count includes remat recomputation; model FLOPs "
                "do not.")),
      verdict=verdict)
  out.mkdir(parents=True, exist_ok=True)
  (out / "compile_report.json").write_text(json.dumps(report, indent=1))
  print(compile_report.table(report))
  print(_planner_line(report["planner"], train_result))
  return report


def _planner_line(plan: dict, train: dict) -> str:
  """The planner's layout and estimate beside XLA's train-step numbers."""
  chosen = (f"chose {', '.join(plan['auto'])}" if plan["auto"]
            else "nothing auto")
  xla = train.get("memory", {}).get("total")
  collectives = (compile_report.collective_bytes(train)
                 if "collectives" in train else None)
  gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
  return (f"Planner ({chosen}): {plan['layout']}. Train step per chip: "
          f"estimate {gib(plan['hbm_bytes'])} HBM (+{gib(plan['host_bytes'])}"
          f" host), XLA {gib(xla)}; collectives per step estimate "
          f"{gib(plan['collective_bytes'])}, XLA {gib(collectives)}.")
