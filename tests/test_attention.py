"""Splash attention (Pallas, interpret mode on CPU) and the tiled CPU kernel
against dense XLA attention.

Tolerance: both paths compute in fp32 from the same inputs; splash takes the
softmax online over key blocks of 128 (running max and rescaled sums) and XLA
over the whole row, so they differ only by fp32 rounding in a different
summation order. With unit-scale inputs the outputs are O(1) and each sums
256 terms: a few ulps of 1.2e-7 each gives ~1e-6; we allow 2e-5 (the measured
worst case is below 2e-6), far below any masking error (a key leaking across
a segment or the causal boundary moves outputs by ~1e-1). The tiled kernel
takes each block's softmax over its whole key range, in the same fp32.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codeclm.model import attention
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import sharding

T, H, K, F = 256, 4, 2, 64  # Grouped KV heads: 2 query heads per KV head.
TOL = 2e-5


def packed_ids(batch: int, t: int, seed: int = 0) -> np.ndarray:
  """Rows of 1-4 segments with padding (id 0) at the end of some rows."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, t - 16), rng.integers(0, 4),
                              replace=False))
    ids = np.searchsorted(cuts, np.arange(t), side="right") + 1
    pad = int(rng.integers(0, 40))
    if pad:
      ids[-pad:] = 0
    rows.append(ids)
  return np.stack(rows).astype(np.int32)


@pytest.fixture(scope="module")
def mesh():
  # data=2, fsdp=2, tensor=2: batch rows over 4 ways, heads over 2.
  return sharding.make_mesh((2, 2, 1, 2), jax.devices()[:8])


def _run(mesh, impl, q, k, v, ids, cotangent):
  def loss(q, k, v):
    out = attention.attend(q, k, v, impl=impl, segment_ids=ids, mask=None,
                           is_causal=True)
    return jnp.sum(out * cotangent), out
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(q, k, v)
  return out, grads


@pytest.mark.parametrize("packed", [False, True], ids=["concat", "packed"])
@pytest.mark.parametrize("impl", ["splash", "tiled"])
def test_kernel_equals_xla_output_and_gradients(mesh, impl, packed):
  rng = np.random.default_rng(1)
  b = 4
  q, cotangent = (jnp.asarray(rng.normal(size=(b, T, H, F)), jnp.float32)
                  for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, T, K, F)), jnp.float32)
          for _ in range(2))
  ids = jnp.asarray(packed_ids(b, T)) if packed else None
  out_s, grads_s = _run(mesh, impl, q, k, v, ids, cotangent)
  out_x, grads_x = _run(mesh, "xla", q, k, v, ids, cotangent)
  np.testing.assert_allclose(out_s, out_x, atol=TOL, rtol=0)
  for name, gs, gx in zip("qkv", grads_s, grads_x):
    np.testing.assert_allclose(gs, gx, atol=TOL, rtol=0, err_msg=f"d{name}")
  # The comparison can fail: dropping the segments changes the output.
  if packed:
    out_plain, _ = _run(mesh, "xla", q, k, v, None, cotangent)
    assert np.max(np.abs(np.asarray(out_plain) - np.asarray(out_x))) > 0.1


@pytest.mark.parametrize("t, kv, tensor", [(200, 2, 2), (256, 2, 4),
                                           (96, 1, 2)])
def test_tiled_odd_lengths_and_head_splits(t, kv, tensor):
  """A last block shorter than TILE (200, 96), KV heads the tensor axis does
  not divide (2 on 4: each device's query heads must still meet their own KV
  head), one KV head for all; packed rows, against XLA."""
  rng = np.random.default_rng(t)
  b = 4
  mesh = sharding.make_mesh((1, 2, 1, tensor), jax.devices()[:2 * tensor])
  q, cotangent = (jnp.asarray(rng.normal(size=(b, t, H, F)), jnp.float32)
                  for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, t, kv, F)), jnp.float32)
          for _ in range(2))
  ids = jnp.asarray(packed_ids(b, t, seed=t))
  out_t, grads_t = _run(mesh, "tiled", q, k, v, ids, cotangent)
  out_x, grads_x = _run(mesh, "xla", q, k, v, ids, cotangent)
  np.testing.assert_allclose(out_t, out_x, atol=TOL, rtol=0)
  for name, gt, gx in zip("qkv", grads_t, grads_x):
    np.testing.assert_allclose(gt, gx, atol=TOL, rtol=0, err_msg=f"d{name}")


def test_splash_in_the_model_matches_xla(mesh):
  """Whole model on the mesh (scanned, rematerialised layers), packed rows:
  logits and parameter gradients of the two kernels agree."""
  t = 128  # One splash block: the kernel's tiling is covered above.
  base = llama_config.LlamaConfig(vocab_size=64, num_layers=2, emb_dim=128,
                                  num_heads=H, num_kv_heads=K, mlp_dim=128,
                                  max_len=t, dtype="float32",
                                  remat_policy="full", attention_impl="xla")
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, 64, (4, t)), jnp.int32)
  ids = packed_ids(4, t, seed=3)
  positions = np.zeros((4, t), np.int32)  # Restarting at each segment.
  for i in range(1, t):
    positions[:, i] = np.where(ids[:, i] == ids[:, i - 1],
                               positions[:, i - 1] + 1, 0)
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    params = nn.meta.unbox(jax.jit(llama.Llama(base).init)(
        jax.random.key(0), tokens))
    for impl in ("splash", "xla"):
      model = llama.Llama(dataclasses.replace(base, attention_impl=impl))
      loss = lambda p, m=model: jnp.mean(m.apply(p, tokens, positions, ids)
                                         ** 2)
      results[impl] = jax.jit(jax.value_and_grad(loss))(params)
  (loss_s, grads_s), (loss_x, grads_x) = results["splash"], results["xla"]
  np.testing.assert_allclose(loss_s, loss_x, rtol=1e-5)
  for gs, gx in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(gs, gx, atol=1e-5,
                               rtol=1e-3 * float(np.max(np.abs(gx))))


def test_auto_resolves_per_platform():
  r = attention.resolve
  assert r("auto", "tpu", jnp.bfloat16, 4096, False) == "splash"
  assert r("auto", "gpu", jnp.bfloat16, 4096, False) == "cudnn"
  assert r("auto", "cuda", jnp.float32, 4096, False) == "xla"  # cuDNN: 16-bit
  assert r("auto", "cpu", jnp.bfloat16, 4096, False) == "xla"  # training
  assert r("auto", "cpu", jnp.float32, 512, False, prefill=True) == "tiled"
  assert r("auto", "tpu", jnp.float32, 512, False, prefill=True) == "splash"
  assert r("tiled", "cpu", jnp.float32, 512, True) == "xla"    # dense mask
  assert r("auto", "tpu", jnp.bfloat16, 1, True) == "xla"      # decode step
  assert r("splash", "tpu", jnp.bfloat16, 100, False) == "xla"  # T % 128
  assert r("splash", "tpu", jnp.bfloat16, 256, True) == "xla"   # dense mask
  assert r("xla", "tpu", jnp.bfloat16, 4096, False) == "xla"
  with pytest.raises(ValueError, match="splash"):
    r("flash", "tpu", jnp.bfloat16, 4096, False)
