"""The trainer: one loop for every config, read top to bottom.

Sections: devices and mesh, data, model and optimizer, shapes by eval_shape,
sharded init by jit, donated train step, resume, loop (metrics, eval,
checkpoints, preemption, non-finite checks).

Below `train`, functions take the config's sections, never the whole config:
`data_dir_of(data, workdir)`, `ensure_data(data, codec, data_dir, *, seed)`,
`check_config(model_cfg, tc, mesh, *, batch_size)`, `report(setup, rows, *,
batch_size, seq_len)`, `evaluate(data, tc, data_dir, ..., *, seq_len,
batch_size)`, `placement(tc, ...)`; the steps are in step.py;
`build(config, ...)` alone takes the config (it reads mesh, model, train,
data, seq_len and batch_size).
"""

import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codeclm import codecs
from codeclm import config_base
from codeclm.data import loader
from codeclm.data import prepare
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import sharding
from codeclm.runtime import console
from codeclm.runtime import storage
from codeclm.sampling import tensorboard
from codeclm.tokenizer import ByteBPE
from codeclm.train import checkpoint
from codeclm.train import mfu
from codeclm.train import optimizer
from codeclm.train import params_io
from codeclm.train import planner
from codeclm.train import preemption
from codeclm.train import step as step_lib

class NonFiniteLossError(RuntimeError):
  pass


def token_byte_lengths(tokenizer: ByteBPE) -> np.ndarray:
  """Codec bytes per token id (0 for specials): turns nats into bits/byte."""
  return np.array([len(tokenizer.decode([i])) for i in range(
      tokenizer.vocab_size)], np.float32)


def batch_rows(data_sharding, batch_size: int) -> dict[int, list[int]]:
  """process -> the global batch rows its devices hold, from the sharding.

  Not batch_size / process_count: where a mesh axis the batch is not split
  over (tensor, say) spans processes, several processes hold the same rows
  and must feed the same data.
  """
  rows = {}
  shape = (batch_size, data_sharding.mesh.size)  # A length any axis splits.
  for device, index in data_sharding.devices_indices_map(shape).items():
    rows.setdefault(device.process_index, set()).update(
        range(*index[0].indices(batch_size)))
  return {p: sorted(r) for p, r in rows.items()}


def global_batch(local: dict, data_sharding, rows: list[int],
                 batch_size: int) -> dict:
  """This process's `rows` (in that order) -> one global jax.Array per field.

  Each addressable device gets the rows of its shard; `rows` must be the
  ones batch_rows gives this process.
  """
  where = {r: i for i, r in enumerate(rows)}

  def one(x):
    def shard(index):
      picked = [where[r] for r in range(*index[0].indices(batch_size))]
      return x[picked][(slice(None), *index[1:])]
    return jax.make_array_from_callback((batch_size, *x.shape[1:]),
                                        data_sharding, shard)
  return {k: one(local[k]) for k in loader.BATCH_KEYS}


def check_config(model_cfg, tc, mesh, *, batch_size: int) -> None:
  """Shapes the mesh cannot hold fail here, with what to change; `model_cfg`
  and `tc` are the config's model and train sections."""
  if tc.weight_gather not in step_lib.WEIGHT_GATHERS:
    raise ValueError(
        f"train.weight_gather={tc.weight_gather!r}: use one of "
        f"{step_lib.WEIGHT_GATHERS} ('auto' must be resolved by the layout "
        "planner first).")
  if tc.weight_gather == "per_step" and mesh.shape["context"] > 1:
    raise ValueError(
        "train.weight_gather='per_step' needs mesh context 1 (now "
        f"{mesh.shape['context']}): each micro-batch would still reduce its "
        "gradients over context, moving more than 'per_micro_batch'. Use "
        "'per_micro_batch' or a mesh.shape with context 1.")
  for knob in ("optimizer_offload", "param_offload"):
    if not isinstance(tc.get(knob, False), bool):
      raise ValueError(
          f"train.{knob}={tc[knob]!r}: use True or False ('auto' must be "
          "resolved by the layout planner first).")
  if tc.get("param_offload") and tc.weight_gather != "per_micro_batch":
    raise ValueError(
        "train.param_offload=True keeps the weights in host memory and "
        "works with train.weight_gather='per_micro_batch' (now "
        f"{tc.weight_gather!r}); 'per_step' gathers a device copy anyway.")
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % (data_ways * tc.grad_accum):
    raise ValueError(
        f"config.batch_size={batch_size} must divide by data*fsdp "
        f"mesh size ({data_ways}) times train.grad_accum ({tc.grad_accum}); "
        "change --config.batch_size or --config.mesh.shape.")
  m = model_cfg
  if m.num_heads % mesh.shape["tensor"] or m.num_kv_heads % mesh.shape["tensor"]:
    raise ValueError(
        f"Heads ({m.num_heads}, kv {m.num_kv_heads}) must divide by the "
        f"tensor mesh axis ({mesh.shape['tensor']}); change "
        "--config.mesh.shape.")


def ensure_data(data, codec, data_dir: str, *, seed: int) -> None:
  """Prepares synthetic data on first use; other sources must be prepared.
  `data` and `codec` are the config's sections, as prepare.run takes them."""
  prepare.require_local(data_dir)
  if (storage.path(data_dir) / "manifest.json").exists():
    return
  if data.source not in ("synthetic", "synthetic_classes"):
    raise FileNotFoundError(
        f"No prepared data in {data_dir} for source {data.source!r}. "
        "Run --mode=prepare with the same config (or set --config.data.dir).")
  logging.info("No data in %s: preparing the synthetic set.", data_dir)
  prepare.run(data, codec, data_dir, seed=seed)


def data_dir_of(data, workdir: str) -> str:
  """data.dir, else <workdir>/data; `data` is the config's data section."""
  return data.dir or os.fspath(storage.path(workdir) / "data")


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything compiled for one config on one mesh (train, benchmarks)."""
  mesh: jax.sharding.Mesh
  rules: tuple
  model: llama.Llama
  abstract_state: step_lib.TrainState
  state_shardings: step_lib.TrainState
  data_sharding: jax.sharding.NamedSharding
  init_fn: Any        # rng -> sharded TrainState
  step_fn: Any        # (state, global batch) -> (state, metrics); donates state
  eval_fn: Any        # (params, global batch) -> loss sums
  flops_per_token: float
  placement: step_lib.Placement  # Where the step keeps weights, opt state.

  def context(self):
    """The mesh and logical rules that tracing the model needs."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack


def build(config, vocab_size: int, token_bytes: np.ndarray,
          devices=None) -> Setup:
  """Mesh, shapes by eval_shape, shardings, and the jitted functions.

  Nothing concrete is made here (token_bytes stays numpy and becomes a
  constant when traced): `devices` may be a TPU topology's unattached devices
  (codeclm/train/compile.py), where no array can be placed.
  """
  planner.check_resolved(config)  # "auto" fields: main/compile resolve.
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  check_config(config.model, config.train, mesh,
               batch_size=config.batch_size)
  model = llama.Llama(config_base.model_config(config, vocab_size))
  token_bytes = np.asarray(token_bytes, np.float32)
  rng_shape = jax.eval_shape(lambda: jax.random.key(0))
  init_params = lambda rng: model.init(
      rng, jnp.zeros((1, config.seq_len), jnp.int32))["params"]

  def init_state(rng):
    params = init_params(rng)
    return step_lib.TrainState(jnp.zeros((), jnp.int32), params,
                               tx.init(params))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tx, schedule = optimizer.make_optimizer(config.train, optimizer.decay_mask(
        jax.eval_shape(init_params, rng_shape)))
    boxed = jax.eval_shape(init_state, rng_shape)
    state_shardings = sharding.logical_shardings(boxed, mesh, rules)
    on_device = state_shardings
    if config.train.optimizer_offload:  # Pinned host memory between steps.
      state_shardings = state_shardings.replace(opt_state=sharding.in_memory(
          state_shardings.opt_state, "pinned_host"))
    if config.train.get("param_offload"):
      state_shardings = state_shardings.replace(params=sharding.in_memory(
          state_shardings.params, "pinned_host"))
    place = placement(config.train, boxed.params, on_device, rules)
    data_sharding = jax.sharding.NamedSharding(
        mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))
    batch_shardings = {k: data_sharding for k in loader.BATCH_KEYS}
    init_fn = jax.jit(lambda r: nn.meta.unbox(init_state(r)),
                      out_shardings=state_shardings)
    step_fn = jax.jit(
        functools.partial(step_lib.train_step, model=model, tx=tx,
                          schedule=schedule, tc=config.train,
                          data=config.data, token_bytes=token_bytes,
                          placement=place),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,))
    eval_fn = jax.jit(
        functools.partial(step_lib.eval_step, model=model, data=config.data,
                          token_bytes=token_bytes,
                          micro_batches_per_step=config.train.grad_accum,
                          placement=place),
        in_shardings=(state_shardings.params, batch_shardings))
  abstract_state = nn.meta.unbox(boxed)
  sharding.check_large_params_sharded(state_shardings.params, mesh,
                                      shapes=abstract_state.params)
  sharding.check_state_fits(
      sharding.bytes_by_memory_kind(abstract_state,
                                    state_shardings)["device"], mesh,
      config.mesh.max_state_fraction, sharding.device_memory(mesh),
      gathered_bytes(place, abstract_state.params, config.model.dtype))
  return Setup(mesh, rules, model, abstract_state, state_shardings,
               data_sharding, init_fn, step_fn, eval_fn,
               llama_config.flops_per_token(model.config, config.seq_len),
               place)


def placement(tc, boxed_params, shardings, rules) -> step_lib.Placement:
  """Where the train step keeps weights and optimizer state (step.py); `tc`:
  the config's train section, `shardings`: the state's device shardings."""
  opt_device = shardings.opt_state if tc.optimizer_offload else None
  # The weights the model casts to its compute dtype (the matrices; norm
  # scales stay fp32): decay_mask's rule, two axes besides "layers".
  cast = optimizer.decay_mask(boxed_params)
  if tc.weight_gather == "per_micro_batch":
    if tc.get("param_offload"):
      return step_lib.Placement(cast=cast, opt_device=opt_device,
                                params_device=shardings.params)
    return step_lib.Placement(opt_device=opt_device)
  axes = sharding.batch_axes(rules)
  return step_lib.Placement(
      gathered=sharding.without_axes(shardings.params, axes),
      sharded=shardings.params, cast=cast, batch_axes=axes,
      inner_rules=sharding.rules_without(rules, axes), opt_device=opt_device)


def gathered_bytes(place: step_lib.Placement, params, dtype) -> int:
  """Bytes per device of the "per_step" copy of the weights (the matrices in
  `dtype`) and of its gradient accumulator (in the params' dtype)."""
  if place.gathered is None:
    return 0
  copy = jax.tree.map(
      lambda x, cast: jax.ShapeDtypeStruct(x.shape, dtype if cast
                                           else x.dtype),
      params, place.cast)
  return (sharding.bytes_per_device(copy, place.gathered)
          + sharding.bytes_per_device(params, place.gathered))


def report(setup: Setup, rows: int, *, batch_size: int, seq_len: int) -> None:
  """The start-up facts a user checks before waiting for a compile; `rows`:
  the batch rows this process feeds; `batch_size` and `seq_len`: the
  config's."""
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  state_bytes = sharding.bytes_by_memory_kind(setup.abstract_state,
                                              setup.state_shardings)
  logging.info(
      "Mesh %s over %d devices (%s), %d processes. Model %.2fM params, "
      "%.3g FLOPs/token. Batch %d x %d = %d tokens/step (%d rows per "
      "process, %d per device). Params+optimizer ~%.3g GiB per device%s.",
      dict(setup.mesh.shape), setup.mesh.size, jax.devices()[0].device_kind,
      jax.process_count(), n_params / 1e6, setup.flops_per_token,
      batch_size, seq_len, batch_size * seq_len,
      rows,
      max(1, batch_size // setup.mesh.size),
      state_bytes["device"] / 2**30, extra_state(setup, state_bytes["host"]))


def extra_state(setup: Setup, host_bytes: int) -> str:
  """The report's words for the state the placement adds or moves."""
  gathered = gathered_bytes(setup.placement, setup.abstract_state.params,
                            setup.model.config.dtype)
  out = ""
  if gathered:
    out += (f" (+ {gathered / 2**30:.3g} GiB per device for the weights "
            "gathered once per step and their gradient accumulator)")
  if host_bytes:
    what = " and ".join(name for name, there in (
        ("weights", setup.placement.params_device is not None),
        ("optimizer state", setup.placement.opt_device is not None)) if there)
    out += f" (+ {host_bytes / 2**30:.3g} GiB of {what} in host memory)"
  return out


def train(config: ml_collections.ConfigDict, workdir: str,
          devices=None) -> dict:
  """Trains to config.train.steps (resuming if possible); returns last metrics.

  `devices` defaults to all devices (tests pass a subset).
  """
  tc = config.train
  workdir = storage.check_writable(workdir)  # Fails here, before compiling.

  # Restarts and resumes skip the compile; a JAX_COMPILATION_CACHE_DIR set by
  # the user (one cache shared by many runs, as the tests do) wins.
  if tc.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.fspath(workdir / "jax_cache"))

  # -- Data. -------------------------------------------------------------------
  data_dir = data_dir_of(config.data, workdir)
  ensure_data(config.data, config.codec, data_dir, seed=config.seed)
  tokenizer = ByteBPE.load(storage.path(data_dir) / "tokenizer.json")
  checkpoint.write_run_files(workdir, config, data_dir)

  # -- Mesh, model, shapes, shardings and jitted functions. --------------------
  setup = build(config, tokenizer.vocab_size, token_byte_lengths(tokenizer),
                devices)
  mesh, data_sharding = setup.mesh, setup.data_sharding

  # -- This process's rows of each global batch, as the sharding places them. -
  rows_by_process = batch_rows(data_sharding, config.batch_size)
  me = jax.process_index()
  rows = rows_by_process[me]
  writers = loader.stream_writers(config.data, rows_by_process,
                                  batch_size=config.batch_size)
  train_iter = loader.TrainBatches(
      config.data, data_dir, tokenizer, seq_len=config.seq_len,
      batch_size=config.batch_size, seed=config.seed, rows=rows,
      writes=[j for j, p in writers.items() if p == me],
      label_dropout=tc.label_dropout)
  feed = lambda local: global_batch(local, data_sharding, rows,
                                    config.batch_size)
  report(setup, len(rows), batch_size=config.batch_size,
         seq_len=config.seq_len)
  tokens_per_step = config.batch_size * config.seq_len
  rng = jax.random.key(config.seed)

  # -- Initialise or resume. ---------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, tc)
  # The newest step that restores; RestoreError if steps exist and none
  # does (unless train.restart_from_scratch), never a silent step 0.
  with setup.context():
    state, start = ckpt.restore_latest(checkpoint.abstract_with_shardings(
        setup.abstract_state, setup.state_shardings), train_iter)
    if state is None:
      state, start = setup.init_fn(rng), 0
      if tc.init_from:  # Params only: the optimizer and data start afresh.
        state = state.replace(params=params_io.init_params_from(
            config.model, tc.init_from, state.params, tokenizer.vocab_size,
            seq_len=config.seq_len))
    else:
      logging.info("Resuming from step %d.", start)

  # -- Loop. -------------------------------------------------------------------
  writer = storage.MirroredWriter(  # TensorBoard events, on any store.
      workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  # Here, not at the top: clu's writers import TensorFlow (seconds), which
  # prepare and compile, importing this module, do not need.
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  hooks = [periodic_actions.ReportProgress(num_train_steps=tc.steps,
                                           writer=writer)]
  if tc.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=os.fspath(workdir),
                                          num_profile_steps=5,
                                          first_profile=start + 10))
  preempt = preemption.PreemptionWatch()
  peak = mfu.peak_flops()
  tb_samples = None
  if config.sample.tb_every:  # Every process joins: params are sharded.
    tb_samples = tensorboard.TensorBoardSampler(
        config.sample, setup.model, mesh, setup.rules, tokenizer,
        codecs.from_config(config.codec), data_dir)
  last, pending, t0, t_step = {}, None, time.perf_counter(), start
  paused = 0.0  # Seconds of eval and sampling since t0: not step time.

  def check_finite(step, metrics):
    if not np.isfinite(metrics["loss"]) or not np.isfinite(
        metrics["grad_norm"]):
      raise NonFiniteLossError(
          f"Non-finite loss {metrics['loss']} / grad norm "
          f"{metrics['grad_norm']} at step {step}; stopping. The last good "
          f"checkpoint is step {ckpt.latest_step()}. Lower train.lr, raise "
          "train.warmup_steps or enable train.z_loss.")

  try:
    for step in range(start + 1, tc.steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = feed(next(train_iter))
        with setup.context():
          state, metrics = setup.step_fn(state, batch)
      if step == start + 1:
        logging.info("First step compiled and ran in %.1fs.",
                     time.perf_counter() - t0)
      # Check the previous step while this one runs (no pipeline stall).
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      for hook in hooks:
        hook(step)

      if step % tc.log_every == 0 or step == tc.steps:
        last = jax.device_get(metrics)
        check_finite(step, last)
        dt = time.perf_counter() - t0 - paused
        tokens_per_s = tokens_per_step * (step - t_step) / dt
        last.update(tokens_per_s=tokens_per_s,
                    step_time=dt / (step - t_step))
        util = mfu.mfu(setup.flops_per_token, tokens_per_s, mesh.size, peak)
        if util is not None:
          last["mfu"] = util
        writer.write_scalars(step, {k: float(v) for k, v in last.items()})
        logging.info("%s", console.step_line(step, tc.steps, last))
        t0, t_step, paused = time.perf_counter(), step, 0.0

      t_aside = time.perf_counter()
      if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
        with setup.context():
          scores = evaluate(config.data, tc, data_dir, tokenizer,
                            setup.eval_fn, state.params, rows, feed,
                            seq_len=config.seq_len,
                            batch_size=config.batch_size)
        writer.write_scalars(step, {f"eval_{k}": v for k, v in scores.items()})
        logging.info("[%d] eval: %s", step, ", ".join(
            f"{k}={v:.6g}" for k, v in sorted(scores.items())))
      if tb_samples is not None and tb_samples.due(step):
        writer.write_images(step, tb_samples(device_params(setup, state)))
      paused += time.perf_counter() - t_aside

      stop = preempt.reached(step)  # The same step on every process.
      if step % tc.ckpt_every == 0 or step == tc.steps or stop:
        check_finite(step, jax.device_get(metrics))
        ckpt.save(step, state, train_iter, force=True)
        logging.info("[%d] checkpoint -> %s", step, ckpt.directory / str(step))
      if stop:
        logging.warning("Preempted at step %d: saved, exiting.", step)
        break
      if tc.fault_kill_at_step and step == tc.fault_kill_at_step:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)  # Tests: a hard crash.
    if pending is not None:
      check_finite(*pending)
  finally:
    preempt.close()
    ckpt.close()  # Never exit before async saves finish.
    train_iter.close()
    writer.close()  # Flushes; a gs:// workdir's events are then uploaded.
  return last


def device_params(setup: Setup, state: step_lib.TrainState):
  """The params on the devices (a copy when param_offload keeps them in host
  memory), for code outside the step such as the sampler."""
  if setup.placement.params_device is None:
    return state.params
  return jax.device_put(state.params, setup.placement.params_device)


def evaluate(data, tc, data_dir, tokenizer, eval_fn, params, rows, feed, *,
             seq_len: int, batch_size: int) -> dict:
  """Loss and bits per codec byte on the held-out split; `rows` of each
  global batch are this process's, `feed` makes them a global batch.
  `data` and `tc`: the config's data and train sections."""
  totals = dict(nll=0.0, tokens=0.0, bytes=0.0)
  for i, batch in enumerate(loader.eval_batches(
      data, data_dir, tokenizer, seq_len=seq_len,
      batch_size=batch_size, rows=rows)):
    if tc.eval_batches and i >= tc.eval_batches:
      break
    sums = jax.device_get(eval_fn(params, feed(batch)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  if not totals["tokens"]:
    return {}
  return {k: float(v) for k, v in step_lib.summarize(totals).items()}
