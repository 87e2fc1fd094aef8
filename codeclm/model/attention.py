"""Attention kernels, and the one place that picks among them.

`model.attention_impl`:

  "auto"    the fastest kernel for where the model runs: Pallas splash
            attention on TPU, cuDNN flash attention on GPU (16-bit compute
            dtypes; fp32 falls back to XLA); on CPU, "tiled" for a sampler's
            prefill and dense XLA otherwise (training keeps the kernel its
            speed and numerics were measured with).
  "splash"  `jax.experimental.pallas.ops.tpu.splash_attention`; off TPU it
            runs in Pallas interpret mode (slow; for tests).
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")` (GPU).
  "xla"     dense attention: materialises the [B, H, T, S] logits.
  "tiled"   causal attention one (row, KV head) at a time, in blocks of
            TILE queries against only the keys at or before them: a block's
            logits stay in cache and the masked half is never computed.
            Written for XLA's CPU backend, where the dense path spends most
            of its time writing and rereading [B, H, T, T] logits (at batch 8
            x 512 tokens, 12 heads: 0.27-0.35 s per layer against torch's
            fused kernel's 0.08-0.10 s; tiled 0.12-0.16 s).
  None      jax.nn.dot_product_attention's own choice.

"Where the model runs" is the platform of the mesh in context (`jax.set_mesh`),
so compiling for a TPU topology on a CPU host resolves "auto" to splash.
Splash tiles the sequence in blocks of 128-512, so it applies to causal
self-attention over T % 128 == 0 tokens (training windows, sampler prefills of
such lengths); the rest (decode steps, short or odd prompts, attention over a
cache with a dense mask) use XLA, where T is small.

Splash and tiled run inside `jax.shard_map` over the whole mesh: each device attends
over its own batch rows and heads, split as the logical rules place
"batch" and "heads" / "kv_heads" (data+fsdp and tensor by default), so no
collective is needed. Grouped KV heads go to the kernel as they are (it maps
each query head to its KV head); packed rows pass their segment ids.
Over a context mesh axis (the length split) the model attends through
context_attention.py instead, which gathers K/V over that axis.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from codeclm.model import sharding

IMPLS = ("auto", "xla", "cudnn", "splash", "tiled", None)
SPLASH_BLOCKS = (512, 256, 128)  # The largest dividing T is used.
# Queries per block of the tiled kernel: 128 x 512 fp32 logits (256 KiB) stay
# in L2; 64 and 256 measured slower at batch 8 x 512 on the 2-core sandbox.
TILE = 128


def platform() -> str:
  """The platform the current mesh's devices are (default: JAX's backend)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve(impl: str | None, where: str, dtype, q_len: int,
            dense_mask: bool, prefill: bool = False) -> str | None:
  """The kernel one attention call uses (see the module docstring).

  where: the platform ("tpu", "gpu", "cuda", "rocm", "cpu"); dense_mask: the
  call attends through an explicit [B, 1, T, S] mask (a cache being read);
  prefill: a sampler's prompt pass (no gradient follows).
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
      impl = "tiled" if prefill else "xla"
  if impl == "splash" and (dense_mask or q_len % SPLASH_BLOCKS[-1]):
    return "xla"
  if impl == "tiled" and dense_mask:
    return "xla"
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str | None,
           segment_ids: jax.Array | None, mask: jax.Array | None,
           is_causal: bool, prefill: bool = False) -> jax.Array:
  """Softmax attention, [B, T, H, F] x [B, S, K, F] -> [B, T, H, F].

  Causal within `segment_ids` (when given) or through `mask` (when given,
  built by the caller); `impl` is resolved with `resolve` first.
  """
  impl = resolve(impl, platform(), q.dtype, q.shape[1], mask is not None,
                 prefill)
  if impl == "splash":
    rows = functools.partial(_splash_rows, interpret=platform() != "tpu")
    return per_device(rows, q, k, v, segment_ids)
  if impl == "tiled":
    return per_device(_tiled_rows, q, k, v, segment_ids)
  if segment_ids is not None and mask is None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation=impl)


def splash_block(t: int) -> int:
  """The largest of SPLASH_BLOCKS dividing t."""
  return next(b for b in SPLASH_BLOCKS if t % b == 0)


def splash_block_sizes(t: int) -> splash_lib.BlockSizes:
  """Splash's block sizes for t query positions per device: one square
  block (`splash_block`) for the forward pass and both backward passes."""
  block = splash_block(t)
  return splash_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)


def _splash_rows(q, k, v, segment_ids, *, interpret: bool):
  """One device's rows: q [b, H, T, F] (pre-scaled), k, v [b, K, T, F]."""
  _, h, t, _ = q.shape
  mask = splash_lib.MultiHeadMask([splash_lib.CausalMask((t, t))] * h)
  kernel = splash_lib.make_splash_mha(
      mask, block_sizes=splash_block_sizes(t), head_shards=1, q_seq_shards=1,
      interpret=interpret)
  if segment_ids is None:
    return jax.vmap(kernel)(q, k, v)
  ids = splash_lib.SegmentIds(q=segment_ids, kv=segment_ids)
  return jax.vmap(kernel)(q, k, v, ids)


def _tiled_rows(q, k, v, segment_ids):
  """One device's rows: q [b, H, T, F] (pre-scaled), k, v [b, K, T, F].

  A loop over (row, KV head) pairs, split in up to 4 independent loops that
  XLA's CPU runtime runs side by side; each pair's query heads are vmapped
  and its queries taken TILE at a time, against the keys up to the block's
  last query. Softmax in fp32 over the block's full key range.
  """
  b, h, t, f = q.shape
  kv = k.shape[1]
  pairs = b * kv
  q = q.reshape(pairs, h // kv, t, f)
  k, v = k.reshape(pairs, t, f), v.reshape(pairs, t, f)
  ids = (None if segment_ids is None
         else jnp.repeat(segment_ids, kv, axis=0))         # [pairs, T]

  def one_head(qh, kh, vh, idh):
    """[T, F] queries of one head against its KV head's [T, F]."""
    blocks = []
    for start in range(0, t, TILE):
      end = min(start + TILE, t)
      seen = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
      if idh is not None:  # Packed rows: within the segment too.
        seen &= idh[start:end, None] == idh[None, :end]
      blocks.append(masked_block(qh[start:end], kh[:end], vh[:end], seen))
    return jnp.concatenate(blocks)

  group = jax.vmap(one_head, in_axes=(0, None, None, None))
  parts = next(p for p in (4, 2, 1) if pairs % p == 0)
  split = lambda x: x.reshape(parts, pairs // parts, *x.shape[1:])
  q, k, v = map(split, (q, k, v))
  ids = None if ids is None else split(ids)
  out = [jax.lax.map(lambda a: group(*a),
                     (q[i], k[i], v[i], None if ids is None else ids[i]))
         for i in range(parts)]
  return jnp.stack(out).reshape(b, h, t, f)


def masked_block(q, k, v, seen) -> jax.Array:
  """Attention of a block of queries q [Tq, F] (pre-scaled) to k, v [Tk, F]
  where `seen` [Tq, Tk] allows (each query sees at least itself): fp32
  logits and softmax, the output in q's dtype."""
  logits = jnp.einsum("qf,kf->qk", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(seen, logits, -jnp.inf)
  weights = jnp.exp(logits - logits.max(-1, keepdims=True))
  out = jnp.einsum("qk,kf->qf", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(-1, keepdims=True)).astype(q.dtype)


def per_device(rows, q: jax.Array, k: jax.Array, v: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
  """Causal attention by `rows` (splash or tiled), on each device's share.

  q [B, T, H, F], k, v [B, T, K, F], segment_ids [B, T] or None (packed rows;
  0 is padding, which attends to padding as in the XLA path). `rows` gets
  q [b, H, T, F] pre-scaled and k, v [b, K, T, F]: the rows and heads of one
  device of the mesh in context (the whole arrays when there is none).
  """
  scale = q.shape[-1] ** -0.5
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  q = heads_first(q * jnp.asarray(scale, q.dtype))
  k, v = heads_first(k), heads_first(v)
  if jax.sharding.get_abstract_mesh().empty:
    out = rows(q, k, v, segment_ids)
  else:
    k, v, q_spec, kv_spec, batch = device_specs(q, k, v)
    in_specs = (q_spec, kv_spec, kv_spec)
    args = (q, k, v)
    if segment_ids is not None:
      in_specs += (sharding._fit(  # pylint: disable=protected-access
          jax.sharding.PartitionSpec(batch), segment_ids.shape,
          jax.sharding.get_abstract_mesh()),)
      args += (segment_ids,)
    else:
      rows = functools.partial(rows, segment_ids=None)
    out = jax.shard_map(rows, in_specs=in_specs, out_specs=in_specs[0],
                        check_vma=False)(*args)
  return heads_first(out)


def device_specs(q: jax.Array, k: jax.Array, v: jax.Array):
  """(k, v, q spec, k/v spec, batch axes) for a shard_map over the mesh in
  context: q [B, H, T, F], k, v [B, K, T, F] split by the logical rules'
  "batch" and "heads" / "kv_heads" (mesh axes that do not divide a dim, as
  one row at init, are dropped). Where the query heads split but the KV heads
  cannot, K and V come back with one KV head per query head, which keeps each
  device's grouping right.
  """
  batch, _, heads, _ = nn.logical_to_mesh_axes(
      ("batch", "length", "heads", "head_dim"))
  kv_heads = nn.logical_to_mesh_axes(
      ("batch", "length", "kv_heads", "head_dim"))[2]
  mesh = jax.sharding.get_abstract_mesh()
  spec = lambda x, *axes: sharding._fit(  # pylint: disable=protected-access
      jax.sharding.PartitionSpec(*axes), x.shape, mesh)
  if (k.shape[1] > 1 and spec(q, batch, heads)[1] is not None
      and spec(k, batch, kv_heads)[1] is None):
    k, v = (jnp.repeat(x, q.shape[1] // k.shape[1], axis=1) for x in (k, v))
  q_spec = spec(q, batch, heads)
  return k, v, q_spec, spec(k, batch, kv_heads), q_spec[0]
