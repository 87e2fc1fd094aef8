r"""Times the jitted train step: tokens/s and MFU for a config and mesh.

  python benchmarks/train_step.py --config=configs/jpeg_lm.py:demo
  python benchmarks/train_step.py --config=configs/jpeg_lm.py:1b \
      --config.batch_size=8 --config.model.attention_impl=cudnn

Random tokens stand in for data (the loader is measured separately in
data_throughput.py), so this is the model's speed alone. MFU uses the peak
bf16 FLOP/s table in codeclm/train/mfu.py; on CPUs, where no peak is known, it
measures one: the best of a few large fp32 matmuls.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from codeclm.train import loop
from codeclm.train import mfu
from codeclm.train import planner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_VOCAB = flags.DEFINE_integer("vocab_size", 322, "320 BPE entries + BOS/EOS.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up).")


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Measured FLOP/s of a large matmul: the practical peak of a CPU."""
  dtype = jnp.float32
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(reps))
  return 2 * n**3 / best


def _time(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main(_):
  config = planner.resolve_for_devices(_CONFIG.value)  # 1B, 7B: "auto"
  setup = loop.build(config, _VOCAB.value, np.ones(_VOCAB.value, np.float32))
  loop.report(setup, config.batch_size, batch_size=config.batch_size,
              seq_len=config.seq_len)
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.seq_len)
  local = dict(
      inputs=rng.integers(0, _VOCAB.value, shape, dtype=np.int32),
      targets=rng.integers(0, _VOCAB.value, shape, dtype=np.int32),
      segment_ids=np.ones(shape, np.int32),
      positions=np.broadcast_to(np.arange(config.seq_len, dtype=np.int32),
                                shape).copy(),
      loss_mask=np.ones(shape, np.float32))
  batch = loop.global_batch(local, setup.data_sharding,
                             list(range(config.batch_size)), config.batch_size)
  with setup.context():
    state = setup.init_fn(jax.random.key(0))
    t = time.perf_counter()
    state, metrics = setup.step_fn(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    state, metrics = setup.step_fn(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = setup.step_fn(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / _STEPS.value
  tokens_per_s = config.batch_size * config.seq_len / step_s
  peak, peak_kind = mfu.peak_flops(), "data sheet bf16"
  if peak is None:
    peak, peak_kind = matmul_peak() / setup.mesh.size, "measured fp32 matmul"
  util = mfu.mfu(setup.flops_per_token, tokens_per_s, setup.mesh.size, peak)
  print(f"| {config.size} | {jax.devices()[0].device_kind} x{setup.mesh.size} "
        f"| {dict(setup.mesh.shape)} | {config.batch_size}x{config.seq_len} "
        f"| {config.model.dtype} | {compile_s:.1f} | {step_s * 1e3:.1f} "
        f"| {tokens_per_s:,.0f} | {util:.1%} of {peak / 1e12:.2f} TFLOP/s "
        f"({peak_kind}) |")


if __name__ == "__main__":
  app.run(main)
