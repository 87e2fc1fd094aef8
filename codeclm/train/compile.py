r"""--mode=compile: does a config fit a TPU slice, and what does it communicate?

Compiles, on a machine with no accelerator, the train step, the eval step and
the sampler's prefill and decode steps for a named Cloud TPU topology
(libtpu's topology descriptions give the slice's devices), then reports per
chip: argument / output / temporary / code bytes against the chip's HBM with a
verdict (and, when it does not fit, the knobs to turn); XLA's FLOPs next to
the model FLOPs; and the collectives in the compiled HLO with their bytes per
step. Written to <workdir>/compile_report.json and printed as a table; each
program's compiled HLO is kept next to it (train_step.hlo.gz, ...).

  python -m codeclm.main --config=configs/jpeg_lm.py:7b --workdir=/tmp/aot \
      --mode=compile --config.compile.topology=v5p-128 \
      --config.mesh.shape='(1,-1,1)'

Needs libtpu (`pip install -e '.[tpu]'`). GPU targets are out of scope (XLA
needs CUDA to compile for them). The slice names and devices are in
tpu_topology.py, the collectives count in hlo_stats.py, the per-program
numbers, knobs and table in compile_report.py; this module builds the
programs, compiles them and writes the report.
"""

from __future__ import annotations

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
from codeclm.model import kv_cache
from codeclm.model import sharding
from codeclm.train import checkpoint
from codeclm.train import compile_report
from codeclm.train import hlo_stats
from codeclm.train import loop
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


def _sampler_steps(sc, compile_cfg, setup, *, seq_len: int):
  """The sampler's two programs, built from codeclm/model alone: prefill of a
  prompt into a fresh cache, and one decode step over that cache. `sc` and
  `compile_cfg`: the config's sample and compile sections."""
  model = setup.model
  spec = nn.logical_to_mesh_axes(("batch",), setup.rules)[0]
  axes = spec if isinstance(spec, tuple) else (() if spec is None else (spec,))
  multiple = math.prod(setup.mesh.shape[a] for a in axes)
  rows = -(-sc.batch_size // multiple) * multiple
  cache_len = seq_len
  prompt_len = compile_cfg.sample_prompt_len or cache_len // 2
  cache_dtype = jnp.dtype(sc.cache_dtype)

  def prefill(params, prompts):
    cache = kv_cache.init_cache(model.config, rows, cache_len, cache_dtype)
    logits, cache = model.apply({"params": params}, prompts, cache=cache)
    return logits[:, -1], cache

  def decode(params, tokens, positions, cache):
    logits, cache = model.apply({"params": params}, tokens, positions,
                                cache=cache)
    return logits[:, 0], cache

  with setup.context():
    data = jax.sharding.NamedSharding(
        setup.mesh, nn.logical_to_mesh_axes(("batch", "length"), setup.rules))
    cache_shape = jax.eval_shape(
        lambda: kv_cache.init_cache(model.config, rows, cache_len, cache_dtype))
    cache_sharding = jax.sharding.NamedSharding(
        setup.mesh, sharding._fit(  # pylint: disable=protected-access
            nn.logical_to_mesh_axes(kv_cache.CACHE_AXES, setup.rules),
            cache_shape.k.shape, setup.mesh))
  params = checkpoint.abstract_with_shardings(setup.abstract_state.params,
                                              setup.state_shardings.params)
  ints = lambda t: jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=data)
  cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=cache_sharding), cache_shape)
  return [
      (f"sample prefill ({rows}x{prompt_len})", jax.jit(prefill),
       (params, ints(prompt_len))),
      (f"sample decode ({rows} rows, cache {cache_len})",
       jax.jit(decode, donate_argnums=(3,)),
       (params, ints(1), ints(1), cache)),
  ]


def run(config, workdir: str) -> dict:
  """Compiles every step for config.compile.topology; writes the report."""
  topology = tpu_topology.parse_topology(config.compile.topology)
  tpu_topology.check_mesh(config.mesh.shape, topology)
  devices = tpu_topology.topology_devices(topology)
  vocab = config.data.vocab_size + 2  # BPE entries + BOS/EOS.
  setup = loop.build(config, vocab, np.ones(vocab, np.float32), devices)
  impl = attention.resolve(config.model.attention_impl, "tpu",
                           config.model.dtype, config.seq_len, False)
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
  programs = []
  if "train" in steps:
    programs.append(("train step", setup.step_fn, (state, batch)))
  if "eval" in steps:
    programs.append(("eval step", setup.eval_fn, (state.params, batch)))
  if "sample" in steps:
    programs += _sampler_steps(config.sample, config.compile, setup,
                               seq_len=config.seq_len)

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
                  attention_resolved=impl, dtype=config.model.dtype),
      programs=results,
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
  return report
