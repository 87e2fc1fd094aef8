"""Attention kernels, and the one place that picks among them.

`model.attention_impl`:

  "auto"    the fastest kernel for where the model runs: Pallas splash
            attention on TPU, cuDNN flash attention on GPU (16-bit compute
            dtypes; fp32 falls back to XLA), dense XLA on CPU.
  "splash"  `jax.experimental.pallas.ops.tpu.splash_attention`; off TPU it
            runs in Pallas interpret mode (slow; for tests).
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")` (GPU).
  "xla"     dense attention: materialises the [B, H, T, S] logits.
  None      jax.nn.dot_product_attention's own choice.

"Where the model runs" is the platform of the mesh in context (`jax.set_mesh`),
so compiling for a TPU topology on a CPU host resolves "auto" to splash.
Splash tiles the sequence in blocks of 128-512, so it applies to causal
self-attention over T % 128 == 0 tokens (training windows, sampler prefills of
such lengths); the rest (decode steps, short or odd prompts, attention over a
cache with a dense mask) use XLA, where T is small.

Splash runs inside `jax.shard_map` over the whole mesh: each device attends
over its own batch rows and heads, split as the logical rules place
"batch" and "heads" / "kv_heads" (data+fsdp and tensor by default), so no
collective is needed. Grouped KV heads go to the kernel as they are (it maps
each query head to its KV head); packed rows pass their segment ids.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from codeclm.model import sharding

IMPLS = ("auto", "xla", "cudnn", "splash", None)
SPLASH_BLOCKS = (512, 256, 128)  # The largest dividing T is used.


def platform() -> str:
  """The platform the current mesh's devices are (default: JAX's backend)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve(impl: str | None, where: str, dtype, q_len: int,
            dense_mask: bool) -> str | None:
  """The kernel one attention call uses (see the module docstring).

  where: the platform ("tpu", "gpu", "cuda", "rocm", "cpu"); dense_mask: the
  call attends through an explicit [B, 1, T, S] mask (a cache being read).
  """
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention_impl={impl!r}; use one of "
                     f"{[i for i in IMPLS if i]} or None (JAX's choice).")
  if q_len == 1:
    return "xla"  # One query per row: nothing for a flash kernel to tile.
  if impl == "auto":
    if where == "tpu":
      impl = "splash"
    elif where in ("gpu", "cuda", "rocm") and jnp.dtype(dtype).itemsize == 2:
      impl = "cudnn"
    else:
      impl = "xla"
  if impl == "splash" and (dense_mask or q_len % SPLASH_BLOCKS[-1]):
    return "xla"
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str | None,
           segment_ids: jax.Array | None, mask: jax.Array | None,
           is_causal: bool) -> jax.Array:
  """Softmax attention, [B, T, H, F] x [B, S, K, F] -> [B, T, H, F].

  Causal within `segment_ids` (when given) or through `mask` (when given,
  built by the caller); `impl` is resolved with `resolve` first.
  """
  impl = resolve(impl, platform(), q.dtype, q.shape[1], mask is not None)
  if impl == "splash":
    return splash(q, k, v, segment_ids, interpret=platform() != "tpu")
  if segment_ids is not None and mask is None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation=impl)


def _block(t: int) -> int:
  return next(b for b in SPLASH_BLOCKS if t % b == 0)


def _splash_rows(q, k, v, segment_ids, *, interpret: bool):
  """One device's rows: q [b, H, T, F] (pre-scaled), k, v [b, K, T, F]."""
  _, h, t, _ = q.shape
  block = _block(t)
  sizes = splash_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  mask = splash_lib.MultiHeadMask([splash_lib.CausalMask((t, t))] * h)
  kernel = splash_lib.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
      interpret=interpret)
  if segment_ids is None:
    return jax.vmap(kernel)(q, k, v)
  ids = splash_lib.SegmentIds(q=segment_ids, kv=segment_ids)
  return jax.vmap(kernel)(q, k, v, ids)


def splash(q: jax.Array, k: jax.Array, v: jax.Array,
           segment_ids: jax.Array | None, *, interpret: bool) -> jax.Array:
  """Causal splash attention, sharded over the mesh in context (if any).

  q [B, T, H, F], k, v [B, T, K, F], segment_ids [B, T] or None (packed rows;
  0 is padding, which attends to padding as in the XLA path).
  """
  scale = q.shape[-1] ** -0.5
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  q = heads_first(q * jnp.asarray(scale, q.dtype))
  k, v = heads_first(k), heads_first(v)
  rows = functools.partial(_splash_rows, interpret=interpret)
  if jax.sharding.get_abstract_mesh().empty:
    out = rows(q, k, v, segment_ids)
  else:
    batch, _, heads, _ = nn.logical_to_mesh_axes(
        ("batch", "length", "heads", "head_dim"))
    kv_heads = nn.logical_to_mesh_axes(
        ("batch", "length", "kv_heads", "head_dim"))[2]
    # Mesh axes that do not divide a dim (one row at init) are dropped.
    mesh = jax.sharding.get_abstract_mesh()
    spec = lambda x, *axes: sharding._fit(  # pylint: disable=protected-access
        jax.sharding.PartitionSpec(*axes), x.shape, mesh)
    in_specs = (spec(q, batch, heads), spec(k, batch, kv_heads),
                spec(v, batch, kv_heads))
    args = (q, k, v)
    if segment_ids is not None:
      in_specs += (spec(segment_ids, batch),)
      args += (segment_ids,)
    else:
      rows = functools.partial(rows, segment_ids=None)
    out = jax.shard_map(rows, in_specs=in_specs, out_specs=in_specs[0],
                        check_vma=False)(*args)
  return heads_first(out)
