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

Attention by all-gathered K/V (mesh.context_strategy "all_gather", the
default): each device all-gathers K, V (and the segment ids) over the axis,
puts them back in window order (a local reshuffle) and attends its T/C
queries to all T keys. Per layer and device the forward pass receives
(C-1)/C of the layer's K and V, 2 * b * T * K * F * (C-1)/C elements (b rows
and K KV heads of the device; again where remat recomputes the layer); the
backward pass sends dK, dV back by a reduce-scatter of the same size.
Kernels: splash on TPU (its causal mask reads the queries' true positions
and the block sparsity follows them, so load balancing saves work there);
elsewhere a dense mask (XLA) or the tiled loop (CPU) over all T keys.

The ring ("ring"): K, V, their slots' window positions and segment ids go
around the axis by collective-permutes (`jax.lax.ppermute`), C-1 hops; at
each step the local queries attend to the visiting block, masked by true
positions (so load balancing works unchanged) and segments, and the blocks'
outputs merge by their log-sum-exp in fp32. Wholly masked blocks (keys all
after the queries; the natural split) are computed and masked, not skipped;
a masked logit is finite (_MASKED), so no row gives NaN. The backward pass
is a custom VJP that runs the ring again: each block travels with its fp32
dK, dV, which every device adds its queries' share to, and one last hop
takes them home. Forward bytes equal the all-gather's; backward, K and V
again ((C-1)/C) plus dK, dV in fp32 for C hops, about 3x the reduce-scatter
of bf16 dK, dV. In return a device holds one visiting block and the one
arriving (the middle steps are a loop), fp32 accumulators the size of its
own queries, and keeps for the backward pass only its own q, k, v, output
and log-sum-exp: nothing of size T. Kernels, per block returning (output,
log-sum-exp): "tiled" (a loop over (row, KV head) pairs and over TILE
queries at a time) or dense XLA, which materialises [b, H, T/C, T/C] fp32
logits per step. Splash is not used: its log-sum-exp comes out only with
save_residuals=True, whose VJP is not implemented, and its mask is fixed
per kernel while the ring's changes with the step and device. So on TPU
"auto" and "splash" run the tiled loop (`ring_kernel`; its speed on TPU is
not measured); "xla" the dense block. The ring is the better choice where
all T keys (2 * b * T * K * F per layer, and their fp32 gradients) are what
does not fit: many or wide KV heads, long windows over many devices. Where
they fit, the all-gather with splash keeps splash's speed and small
temporaries and stays the default.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import NamedSharding, PartitionSpec

from codeclm.model import attention

STRATEGIES = ("all_gather", "ring")  # The config's mesh.context_strategy.
# The ring's masked logits: finite, so a block that hides all of a row's keys
# adds exp(_MASKED - lse) = 0 to it, never NaN.
_MASKED = -1e30


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


def ring_kernel(impl: str) -> str:
  """The ring's per-block kernel for a resolved attention_impl: splash gives
  its log-sum-exp only without a gradient, so the ring runs the tiled loop
  in its place (a ring is chosen to save memory: on v5e-8 at 32,768 tokens
  its gradient takes 148 MiB of temporaries tiled, 1,123 MiB with the dense
  block); "xla" (and cuDNN's, which takes no such mask) the dense block."""
  return "tiled" if impl in ("splash", "tiled") else "xla"


def check_strategy(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown mesh.context_strategy={strategy!r}; use "
                     f"{STRATEGIES[0]!r} or {STRATEGIES[1]!r} (see "
                     "codeclm/model/context_attention.py).")


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           segment_ids: jax.Array | None, *, impl: str | None,
           balance: bool, strategy: str = "all_gather") -> jax.Array:
  """Causal attention of queries and keys in the context layout.

  q [B, T, H, F], k, v [B, T, K, F], segment_ids [B, T] or None, all in the
  layout (`to_layout`) and split over the context axes; returns [B, T, H, F]
  in the same layout. Packed rows attend within their segment, padding (0)
  to padding, as `attention.attend` does. strategy: one of STRATEGIES.
  """
  check_strategy(strategy)
  axes, shards = length_axes(), num_shards()
  b, t, h, f = q.shape
  check_length(t, shards, balance)
  where = attention.platform()
  impl = attention.resolve(impl, where, q.dtype, t // shards, False)
  if strategy == "ring":
    impl = ring_kernel(impl)
  elif impl not in ("splash", "tiled"):
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
    if strategy == "ring":
      q_rows, seg = a["q"], a.get("seg")
      if seg is None:
        seg = jnp.zeros((q_rows.shape[0], q_rows.shape[2]), jnp.int32)
      return _ring(q_rows, a["k"], a["v"], a["index"], seg,
                   length, shards, impl)
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


def _mask(q_index, kv_index, seg_q, seg_kv):
  """bool [b or 1, Tq, Tk]: causal by true position (the queries' and keys'
  window indices), within the segment (seg_q [b, Tq], seg_kv [b, Tk], or
  None)."""
  seen = (kv_index[None, :] <= q_index[:, None])[None]
  if seg_q is not None:
    seen = seen & (seg_q[:, :, None] == seg_kv[:, None, :])
  return seen


def _dense_local(q, k, v, q_index, seg_q, seg_kv):
  """XLA attention: [b, H, Tq, F] against [b, K, T, F], dense mask."""
  t = k.shape[2]
  mask = _mask(q_index, jnp.arange(t), seg_q, seg_kv)[:, None]  # [b, 1, Tq, T]
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
      seen = _mask(q_index[start:end], jnp.arange(t), sq[None, start:end],
                   skv[None])[0]
      blocks.append(attention.masked_block(qh[start:end], kh, vh, seen))
    return jnp.concatenate(blocks)

  group = jax.vmap(one_head, in_axes=(0, None, None, None, None))
  out = jax.lax.map(lambda a: group(*a), (q, k, v, seg_q, seg_kv))
  return out.reshape(b, h, tq, f)


# The ring. Each device's blocks: q [b, H, Tq, F] (pre-scaled), k, v
# [b, K, Tq, F], the window positions of its slots (index [Tq]) and the
# segment ids [b, Tq]; K/V, their positions and ids travel together.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, index, seg, axes, shards: int, impl: str):
  """Attention of the local queries to every device's K/V, passed around."""
  return _ring_fwd(q, k, v, index, seg, axes, shards, impl)[0]


def _rotate(x, axes, shards: int):
  """Each device's x to the next one along the context axes (a cycle)."""
  perm = [(i, (i + 1) % shards) for i in range(shards)]
  return jax.tree.map(lambda a: jax.lax.ppermute(a, axes, perm), x)


def _ring_fwd(q, k, v, index, seg, axes, shards, impl):
  """C blocks (own first), merged by their log-sum-exp in fp32; keeps the
  local q, k, v, output and log-sum-exp for the backward pass."""
  block = functools.partial(_blocks, _pair_fwd, impl, q, index, seg)

  def merge(visiting, out, lse):
    part, part_lse = block(*visiting)
    merged = jnp.logaddexp(lse, part_lse)
    return (out * jnp.exp(lse - merged)[..., None]
            + part * jnp.exp(part_lse - merged)[..., None]), merged

  own = (k, v, index, seg)
  out, lse = block(*own)
  if shards > 1:
    out, lse = merge(*_ring_loop(own, (out, lse), merge, axes, shards))
  out = out.astype(q.dtype)
  return out, (q, k, v, index, seg, out, lse)


def _ring_bwd(axes, shards, impl, residuals, d_out):
  """The ring again: K/V travel with their fp32 dK, dV, which each device
  adds its queries' share to; one more hop takes dK, dV home."""
  q, k, v, index, seg, out, lse = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  block = functools.partial(_blocks, _pair_bwd, impl, q, index, seg)

  def add(visiting, d_q, d_k, d_v):
    d_k, d_v = _rotate((d_k, d_v), axes, shards)  # Over the compute.
    dq, dk, dv = block(*visiting, d_out, lse, delta)
    return d_q + dq, d_k + dk, d_v + dv

  own = (k, v, index, seg)
  grads = block(*own, d_out, lse, delta)
  if shards > 1:
    grads = add(*_ring_loop(own, grads, add, axes, shards))
  d_q, *d_kv = grads
  dk, dv = _rotate(d_kv, axes, shards)
  return (d_q.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None, None)


def _ring_loop(own, acc, fold, axes, shards: int):
  """The middle C-2 steps of a ring: each hands the block it folds into
  `acc` on while folding it (a loop, so a device holds the block it works
  on and the one arriving). Returns (the last block, acc) for the caller
  to fold, so no hop is wasted."""
  def step(_, carry):
    visiting, acc = carry
    return _rotate(visiting, axes, shards), fold(visiting, *acc)
  visiting = _rotate(own, axes, shards)
  visiting, acc = jax.lax.fori_loop(0, shards - 2, step, (visiting, acc))
  return visiting, *acc


_ring.defvjp(_ring_fwd, _ring_bwd)


def _blocks(pair_fn, impl, q, q_index, seg_q, k, v, kv_index, seg_kv, *rest):
  """pair_fn over (row, KV head) pairs: q-shaped arrays ([b, H, Tq, ...]:
  q and `rest`) go in as [G, Tq, ...] per pair, K/V as [Tk, F]; its outputs
  [G or 1, ...] per pair come back as [b, H or K, ...]. "xla":
  vmapped, all queries at once; "tiled": one pair at a time (lax.map),
  TILE queries at a time where they divide T/C (else all at once)."""
  b, h, tq = q.shape[:3]
  kv = k.shape[1]
  grouped = lambda x: x.reshape(b * kv, h // kv, *x.shape[2:])
  per_kv = lambda x: x.reshape(b * kv, *x.shape[2:])
  rows = lambda x: jnp.repeat(x, kv, axis=0)
  tiled = impl == "tiled" and tq % attention.TILE == 0
  fn = functools.partial(pair_fn, q_index=q_index, kv_index=kv_index,
                         tile=attention.TILE if tiled else tq)
  args = (grouped(q), rows(seg_q), per_kv(k), per_kv(v), rows(seg_kv),
          *map(grouped, rest))
  if impl == "tiled":
    outs = jax.lax.map(lambda a: fn(*a), args)
  else:
    outs = jax.vmap(fn)(*args)
  return tuple(x.reshape(b, -1, *x.shape[2:]) for x in outs)


def _logits(q, k, q_index, seg_q, kv_index, seg_kv):
  """fp32 [G, tq, Tk]; _MASKED where the key is after the query (by true
  position) or in another segment."""
  seen = _mask(q_index, kv_index, seg_q[None], seg_kv[None])[0]
  logits = jnp.einsum("gqf,kf->gqk", q, k, preferred_element_type=jnp.float32)
  return jnp.where(seen, logits, _MASKED)


def _tiles(x, tile: int):
  """[G, Tq, ...] -> [Tq / tile, G, tile, ...]: a loop's worth of tiles."""
  x = x.reshape(x.shape[0], -1, tile, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _untiled(x):
  """`_tiles`' inverse."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _pair_fwd(q, seg_q, k, v, seg_kv, *, q_index, kv_index, tile):
  """One pair's block: (output, log-sum-exp), fp32 [G, Tq, F], [G, Tq].
  Tiles of queries in a loop, so only one tile's logits exist at a time."""
  def one(args):
    qt, q_at, seg_at = args
    logits = _logits(qt, k, q_at, seg_at, kv_index, seg_kv)
    top = logits.max(-1, keepdims=True)
    weights = jnp.exp(logits - top)
    total = weights.sum(-1, keepdims=True)
    out = jnp.einsum("gqk,kf->gqf", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    return out, (top + jnp.log(total))[..., 0]

  out, lse = jax.lax.map(one, (_tiles(q, tile), q_index.reshape(-1, tile),
                               seg_q.reshape(-1, tile)))
  return _untiled(out), _untiled(lse)


def _pair_bwd(q, seg_q, k, v, seg_kv, d_out, lse, delta, *, q_index,
              kv_index, tile):
  """One pair's block's share of dq [G, Tq, F] and dk, dv [1, Tk, F] (its
  one KV head), fp32, from the merged log-sum-exp and delta = sum(d_out *
  out) over features; a loop over tiles of queries as `_pair_fwd`."""
  f32 = jnp.float32

  def one(d_kv, args):
    qt, d_at, lse_at, delta_at, q_at, seg_at = args
    logits = _logits(qt, k, q_at, seg_at, kv_index, seg_kv)
    probs = jnp.exp(logits - lse_at[..., None])
    dv = jnp.einsum("gqk,gqf->kf", probs.astype(d_at.dtype), d_at,
                    preferred_element_type=f32)
    d_probs = jnp.einsum("gqf,kf->gqk", d_at, v, preferred_element_type=f32)
    d_logits = probs * (d_probs - delta_at[..., None])
    dq = jnp.einsum("gqk,kf->gqf", d_logits.astype(k.dtype), k,
                    preferred_element_type=f32)
    dk = jnp.einsum("gqk,gqf->kf", d_logits.astype(qt.dtype), qt,
                    preferred_element_type=f32)
    return (d_kv[0] + dk, d_kv[1] + dv), dq

  zeros = jnp.zeros(k.shape, f32)
  (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), (
      _tiles(q, tile), _tiles(d_out, tile), _tiles(lse, tile),
      _tiles(delta, tile), q_index.reshape(-1, tile),
      seg_q.reshape(-1, tile)))
  return _untiled(dq), dk[None], dv[None]
