"""Attention over sequence shards: the `context` mesh axis.

Where the logical axis "length" maps onto mesh axes of C > 1 devices (the
"context" axis of sharding.py's rules), every activation holds T/C positions
of each window on a device, so a window's activations need not fit one chip.
Everything but attention is per position; attention is done here.

Layout (`to_layout`, `from_layout`). Causal work grows with position: split
naturally, shard i of C holds positions [i*T/C, (i+1)*T/C) and the last shard
does 2C-1 times the first one's work. Load-balanced (the config's
mesh.context_load_balance), the window is cut into 2C chunks and shard i
holds chunks i and 2C-1-i (4 shards: 0,7 | 1,6 | 2,5 | 3,4), the same work
everywhere. `llama.Llama` puts its inputs (tokens, positions, segment ids)
into the layout on entry and its logits back into window order on exit, so
targets, loss mask and loss never see the layout, and every caller (train,
eval, compile, benchmarks) gets it without knowing. RoPE reads the true
positions; the masks here come from each query's true window index and each
row's segment ids, never from local indices.

Attention by all-gathered K/V: each device all-gathers K, V (and the segment
ids) over the axis, puts them back in window order (a local reshuffle) and
attends its T/C queries to all T keys. Per layer and device the forward pass
receives (C-1)/C of the layer's K and V, 2 * b * T * K * F * (C-1)/C
elements (b rows and K KV heads of the device; again where remat recomputes
the layer); the backward pass sends dK, dV back by a reduce-scatter of the
same size. A ring (K/V passed around the axis) is not built: it moves the
same bytes, overlapped with compute, and holds one block instead of all T. Kernels: splash on TPU (its
causal mask reads the queries' true positions and the block sparsity follows
them, so load balancing saves work there); elsewhere a dense mask (XLA) or
the tiled loop (CPU) over all T keys.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import NamedSharding, PartitionSpec

from codeclm.model import attention


def length_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) the current rules split "length" over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  entry = nn.logical_to_mesh_axes(("length",))[0]
  axes = () if entry is None else (
      (entry,) if isinstance(entry, str) else tuple(entry))
  return tuple(a for a in axes if mesh.shape[a] > 1)


def num_shards() -> int:
  """How many devices split a window's length (1: no context parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in length_axes())


def check_length(t: int, shards: int, balance: bool) -> None:
  parts = 2 * shards if balance else shards
  if t % parts:
    raise ValueError(
        f"{t} tokens do not split into {parts} equal chunks for {shards} "
        f"context shards{' (load-balanced: 2 per shard)' if balance else ''}; "
        "make seq_len a multiple of that or change the context entry of "
        "mesh.shape.")


def to_layout(x: jax.Array, shards: int, balance: bool, axis: int = 1):
  """Window order -> the context layout along `axis` (see the docstring)."""
  if not balance or shards == 1:
    return x
  t = x.shape[axis]
  x = jnp.reshape(x, (*x.shape[:axis], 2 * shards, t // (2 * shards),
                      *x.shape[axis + 1:]))
  lo = jax.lax.slice_in_dim(x, 0, shards, axis=axis)
  hi = jnp.flip(jax.lax.slice_in_dim(x, shards, 2 * shards, axis=axis), axis)
  x = jnp.stack([lo, hi], axis=axis + 1)          # [..., C, 2, chunk, ...]
  return jnp.reshape(x, (*x.shape[:axis], t, *x.shape[axis + 3:]))


def from_layout(x: jax.Array, shards: int, balance: bool, axis: int = 1):
  """The context layout -> window order along `axis` (`to_layout`'s inverse)."""
  if not balance or shards == 1:
    return x
  t = x.shape[axis]
  x = jnp.reshape(x, (*x.shape[:axis], shards, 2, t // (2 * shards),
                      *x.shape[axis + 1:]))
  lo = jnp.take(x, 0, axis=axis + 1)
  hi = jnp.flip(jnp.take(x, 1, axis=axis + 1), axis)
  x = jnp.concatenate([lo, hi], axis=axis)        # [..., 2C, chunk, ...]
  return jnp.reshape(x, (*x.shape[:axis], t, *x.shape[axis + 2:]))


def window_index(t: int, shards: int, balance: bool) -> np.ndarray:
  """int32 [T]: the window position held at each slot of the layout."""
  if not balance or shards == 1:
    return np.arange(t, dtype=np.int32)
  chunks = np.arange(t, dtype=np.int32).reshape(2 * shards, -1)
  return np.stack([chunks[:shards], chunks[shards:][::-1]], 1).reshape(t)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           segment_ids: jax.Array | None, *, impl: str | None,
           balance: bool) -> jax.Array:
  """Causal attention of queries and keys in the context layout.

  q [B, T, H, F], k, v [B, T, K, F], segment_ids [B, T] or None, all in the
  layout (`to_layout`) and split over the context axes; returns [B, T, H, F]
  in the same layout. Packed rows attend within their segment, padding (0)
  to padding, as `attention.attend` does.
  """
  axes, shards = length_axes(), num_shards()
  b, t, h, f = q.shape
  check_length(t, shards, balance)
  where = attention.platform()
  impl = attention.resolve(impl, where, q.dtype, t // shards, False)
  if impl not in ("splash", "tiled"):
    impl = "xla"  # cuDNN's fused kernel takes no mask of this kind.
  scale = f ** -0.5
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  q = heads_first(q * jnp.asarray(scale, q.dtype))
  k, v = heads_first(k), heads_first(v)
  k, v, q_spec, kv_spec, batch = attention.device_specs(q, k, v)
  length = axes[0] if len(axes) == 1 else axes
  q_spec = PartitionSpec(*q_spec[:2], length)
  kv_spec = PartitionSpec(*kv_spec[:2], length)
  seg_spec = PartitionSpec(batch, length)
  index = jnp.asarray(window_index(t, shards, balance))

  def gather(x, axis):
    """All of the window, back in window order."""
    x = jax.lax.all_gather(x, axes, axis=axis, tiled=True)
    return from_layout(x, shards, balance, axis=axis)

  def local(a):
    k, v = gather(a["k"], 2), gather(a["v"], 2)
    seg = a.get("seg")
    seg_kv = None if seg is None else gather(seg, 1)
    if impl == "splash":
      return _splash_local(a["kernel"], a["q"], k, v, seg, seg_kv)
    rows = _tiled_local if impl == "tiled" else _dense_local
    return rows(a["q"], k, v, a["index"], seg, seg_kv)

  args = dict(q=q, k=k, v=v, index=index)
  specs = dict(q=q_spec, k=kv_spec, v=kv_spec, index=PartitionSpec(length))
  if segment_ids is not None:
    args["seg"], specs["seg"] = segment_ids, seg_spec
  if impl == "splash":
    # A pytree whose mask info (block sparsity, query positions) splits over
    # the query shards: each device gets its own chunks' part.
    mesh = jax.sharding.get_abstract_mesh()
    heads = q.shape[1] // _size(mesh, q_spec[1])
    args["kernel"] = _splash_kernel(t, heads, shards, balance,
                                    interpret=where != "tpu")
    specs["kernel"] = args["kernel"].manual_sharding_spec(
        NamedSharding(mesh, PartitionSpec(None, length)))
  out = jax.shard_map(local, in_specs=(specs,), out_specs=q_spec,
                      check_vma=False)(args)
  return heads_first(out)


def _size(mesh, entry) -> int:
  """Devices a PartitionSpec entry (None, an axis or axes) splits over."""
  if entry is None:
    return 1
  return math.prod(mesh.shape[a] for a in (
      (entry,) if isinstance(entry, str) else entry))


def _splash_kernel(t: int, heads: int, shards: int, balance: bool, *,
                   interpret: bool):
  """Splash over [T, T] with the queries in the layout, the keys in window
  order: its causal mask and block sparsity read the queries' true
  positions (the mask's q_sequence), split over `shards` query shards."""
  mask = splash_lib.CausalMask((t, t))
  mask.q_sequence = window_index(t, shards, balance)
  return splash_lib.make_splash_mha(
      splash_lib.MultiHeadMask([mask] * heads),
      block_sizes=attention.splash_block_sizes(t // shards), head_shards=1,
      q_seq_shards=shards, interpret=interpret)


def _splash_local(kernel, q, k, v, seg_q, seg_kv):
  """q [b, H, T/C, F] (pre-scaled) against k, v [b, K, T, F]."""
  if seg_q is None:
    return jax.vmap(kernel)(q, k, v)
  return jax.vmap(kernel)(q, k, v, splash_lib.SegmentIds(q=seg_q, kv=seg_kv))


def _mask(q_index, seg_q, seg_kv, t: int):
  """bool [b or 1, Tq, T]: causal by true position, within the segment."""
  seen = (jnp.arange(t)[None, :] <= q_index[:, None])[None]
  if seg_q is not None:
    seen = seen & (seg_q[:, :, None] == seg_kv[:, None, :])
  return seen


def _dense_local(q, k, v, q_index, seg_q, seg_kv):
  """XLA attention: [b, H, Tq, F] against [b, K, T, F], dense mask."""
  t = k.shape[2]
  mask = _mask(q_index, seg_q, seg_kv, t)[:, None]      # [b, 1, Tq, T]
  swap = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=mask,
                                     scale=1.0, implementation="xla")
  return swap(out)


def _tiled_local(q, k, v, q_index, seg_q, seg_kv):
  """The tiled loop of attention.py over all T keys with the mask above:
  one (row, KV head) pair at a time, TILE queries at once, fp32 softmax."""
  b, h, tq, f = q.shape
  kv, t = k.shape[1], k.shape[2]
  pairs = b * kv
  q = q.reshape(pairs, h // kv, tq, f)
  k, v = k.reshape(pairs, t, f), v.reshape(pairs, t, f)
  seg_q = (jnp.zeros((b, tq), jnp.int32) if seg_q is None else seg_q)
  seg_kv = (jnp.zeros((b, t), jnp.int32) if seg_kv is None else seg_kv)
  seg_q, seg_kv = (jnp.repeat(x, kv, axis=0) for x in (seg_q, seg_kv))

  def one_head(qh, kh, vh, sq, skv):
    blocks = []
    for start in range(0, tq, attention.TILE):
      end = min(start + attention.TILE, tq)
      seen = _mask(q_index[start:end], sq[None, start:end], skv[None], t)[0]
      blocks.append(attention.masked_block(qh[start:end], kh, vh, seen))
    return jnp.concatenate(blocks)

  group = jax.vmap(one_head, in_axes=(0, None, None, None, None))
  out = jax.lax.map(lambda a: group(*a), (q, k, v, seg_q, seg_kv))
  return out.reshape(b, h, tq, f)
