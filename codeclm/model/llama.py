"""The Flax (linen) Llama-2 decoder, its size table and derived numbers.

Owns the architecture (token embedding, pre-norm blocks of causal
self-attention with rotary embeddings and optional grouped KV heads, SwiGLU
MLP, RMSNorm, no biases, untied output head), the KV cache used for sampling,
and the parameter / FLOP counts. It knows only JAX and Flax; the mesh rules
that place the logical axes live in `sharding.py`.

Einsum axis letters (every einsum below uses these and only these):

  B batch          T query length     S key/value length (= T without a cache)
  D model width    H query heads      K key/value heads   F head dim
  M MLP hidden     V vocabulary       L layers

Logical axis names, on parameters and main activations alike; `sharding.py`
maps them onto the (data, fsdp, tensor) mesh:

  "batch", "length", "embed" (D), "heads" (H), "kv_heads" (K),
  "head_dim" (F), "mlp" (M), "vocab" (V), "layers" (L, the scan axis).

Parameters (plain nested dicts once unboxed; scan_layers stacks the layer
weights on a leading L axis under "layers", otherwise "layers_0", ...):

  embedding [V, D]            head [D, V]             final_norm/scale [D]
  layers/attn_norm/scale [D]  layers/mlp_norm/scale [D]
  layers/attn/{q_proj [D, H, F], k_proj [D, K, F], v_proj [D, K, F],
               o_proj [H, F, D]}  (+ q_norm/scale, k_norm/scale [F] if qk_norm)
  layers/mlp/{gate_proj [D, M], up_proj [D, M], down_proj [M, D]}

Precision: parameters are stored in `param_dtype` (fp32) and cast to `dtype`
(bf16) for the matmuls; RMSNorm, rotary embeddings and the attention softmax
run in fp32 and the logits come out in fp32, so the loss is taken in fp32.

Rematerialisation (`remat_policy`), per decoder layer:

  "none"              no remat: keep every activation (fastest, most memory)
  "full"              save nothing but the layer input; recompute the layer
  "nothing_saveable"  the same as "full" (JAX's name)
  "dots"              save matmul outputs without batch dims (JAX policy)
  "qkv_proj"          save only the named q/k/v projections
  "all_proj"          save q/k/v, the attention output and the MLP gate/up
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from codeclm.model import attention

# One size table. Vocabulary size comes from the tokenizer, not from here.
# "1b" uses 16 heads of 128 (Llama-2's head dim, the fast path of the flash
# kernels) and an MLP of 4 * width, so it has 1.07B parameters (+ embeddings).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, emb_dim=32, num_heads=4, num_kv_heads=2,
                 mlp_dim=64),
    "demo": dict(num_layers=4, emb_dim=128, num_heads=4, num_kv_heads=4,
                 mlp_dim=352),
    "100m": dict(num_layers=12, emb_dim=768, num_heads=12, num_kv_heads=12,
                 mlp_dim=2048),
    "1b": dict(num_layers=16, emb_dim=2048, num_heads=16, num_kv_heads=16,
               mlp_dim=8192),
    "7b": dict(num_layers=32, emb_dim=4096, num_heads=32, num_kv_heads=32,
               mlp_dim=11008),
}

# Activations a remat policy can name (see checkpoint_name below).
_PROJ_NAMES = ("query_proj", "key_proj", "value_proj")
_ALL_NAMES = _PROJ_NAMES + ("attention_out", "mlp_gate", "mlp_up")
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(*_PROJ_NAMES),
    "all_proj": jax.checkpoint_policies.save_only_these_names(*_ALL_NAMES),
}
ATTENTION_IMPLS = attention.IMPLS
# Logical names of a KVCache's k and v arrays [L, B, K, S, F].
CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of one model; `head_dim` is resolved on init."""
  vocab_size: int
  num_layers: int
  emb_dim: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None        # None: emb_dim // num_heads
  norm_eps: float = 1e-5
  rope_theta: float = 1e4
  max_len: int = 4096                # longest sequence (positions) accepted
  dtype: str = "bfloat16"            # compute
  param_dtype: str = "float32"       # storage
  scan_layers: bool = True
  remat_policy: str = "full"
  attention_impl: str | None = "auto"  # see attention.py
  qk_norm: bool = False

  def __post_init__(self):
    if self.head_dim is None:
      if self.emb_dim % self.num_heads:
        raise ValueError(
            f"emb_dim={self.emb_dim} is not divisible by num_heads="
            f"{self.num_heads}; set head_dim explicitly or change the sizes.")
      object.__setattr__(self, "head_dim", self.emb_dim // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
          f"{self.num_kv_heads} (grouped-query attention).")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat_policy={self.remat_policy!r}; use one "
                       f"of {sorted(REMAT_POLICIES)}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"Unknown attention_impl={self.attention_impl!r}; use "
                       f"one of {ATTENTION_IMPLS} (see attention.py).")
    for field in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError as e:
        raise ValueError(f"{field}={getattr(self, field)!r} is not a dtype "
                         "name; use e.g. 'bfloat16' or 'float32'.") from e

  @classmethod
  def from_size(cls, size: str, **overrides) -> LlamaConfig:
    """A config from SIZES[size]; needs vocab_size= (the tokenizer's)."""
    if size not in SIZES:
      raise ValueError(f"Unknown model size {size!r}; use one of "
                       f"{sorted(SIZES)}.")
    if "vocab_size" not in overrides:
      raise ValueError("LlamaConfig.from_size needs vocab_size=... (the "
                       "tokenizer's vocab_size).")
    return cls(**{**SIZES[size], **overrides})


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer: [L, B, K, S, F] stacked like the scan,
  or (per_layer, for unrolled layers) a tuple of L arrays [B, K, S, F].

  Head-major (K before S): a decode step's attention dots are batched over
  (B, K), so each head's [S, F] block is contiguous; from [.., S, K, F] XLA
  first gathers every layer into that order, every step (on CPU about half
  the decode speed at 4K context, 100m-sized caches).

  Per layer: a layer's keys are then a buffer of their own that its dots
  read in place. From a stack XLA's CPU backend copies the layer out first,
  every decode step: the whole cache once per token (at batch 8 x 576
  slots, 100m, 40% of a step).
  """
  k: Any  # jax.Array or tuple[jax.Array, ...]
  v: Any

  @property
  def length(self) -> int:
    """Positions it holds (S)."""
    return jax.tree.leaves(self.k)[0].shape[-2]


@flax.struct.dataclass
class _Stacked:
  """The cache as the layers carry it, each writing its rows in place.

  A 16-bit float cache travels as its uint16 bits: XLA's CPU backend widens
  every bf16 dynamic-slice / update to fp32 (converting the whole stacked
  cache, per layer and step), while integer ones stay in place. The bits are
  the same, and on GPU / TPU the bitcasts cost nothing.
  """
  k: jax.Array
  v: jax.Array
  dtype: Any = flax.struct.field(pytree_node=False)  # The stored dtype.

  @classmethod
  def of(cls, cache: KVCache) -> _Stacked:
    return cls(jax.tree.map(_bits, cache.k), jax.tree.map(_bits, cache.v),
               jax.tree.leaves(cache.k)[0].dtype)

  def cache(self) -> KVCache:
    unbits = lambda a: _constrain_cache(_unbits(a, self.dtype))
    return KVCache(k=jax.tree.map(unbits, self.k),
                   v=jax.tree.map(unbits, self.v))


def _constrain_cache(x: jax.Array) -> jax.Array:
  """CACHE_AXES on a stacked cache array, or on one layer's."""
  return nn.with_logical_constraint(x, CACHE_AXES[-x.ndim:])


def _bits(x: jax.Array) -> jax.Array:
  """16-bit floats as uint16 (see _Stacked); anything else unchanged."""
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _unbits(x: jax.Array, dtype) -> jax.Array:
  return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def init_cache(config: LlamaConfig, batch_size: int, max_len: int,
               dtype=jnp.bfloat16, per_layer: bool = False) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_len` positions.

  per_layer: a tuple of one array per layer (unrolled layers only; faster
  decoding on CPU, see KVCache); else stacked [L, B, K, S, F].
  """
  if max_len > config.max_len:
    raise ValueError(f"Cache max_len={max_len} exceeds the model's max_len="
                     f"{config.max_len}; lower it or raise config.max_len.")
  if per_layer and config.scan_layers:
    raise ValueError("A per-layer cache needs unrolled layers "
                     "(scan_layers=False): the scan indexes a stacked one.")
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  if per_layer:
    zeros = lambda: tuple(_constrain_cache(jnp.zeros(shape, dtype))
                          for _ in range(config.num_layers))
  else:
    zeros = lambda: _constrain_cache(
        jnp.zeros((config.num_layers, *shape), dtype))
  return KVCache(k=zeros(), v=zeros())


def param_count(config: LlamaConfig) -> int:
  """Number of parameters, from shapes only (jax.eval_shape; no allocation)."""
  model = Llama(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 1), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nn.meta.unbox(shapes)))


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token, PaLM appendix B style.

  6 * N + 12 * L * seq_len * H * F, where N counts the matmul weights: every
  layer's q, k, v, o and MLP projections plus the output head; not the input
  embedding (a lookup in the model's math; the one-hot matmul that implements
  it is an implementation cost, like remat) nor the norm scales. The attention
  term counts QK^T and AV over the full (not causally halved) window; remat
  recomputation is not counted (these are "model FLOPs", as used for MFU).
  """
  c = config
  attn = c.emb_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  attn += c.num_heads * c.head_dim * c.emb_dim
  mlp = 3 * c.emb_dim * c.mlp_dim
  n = c.num_layers * (attn + mlp) + c.emb_dim * c.vocab_size
  return float(6 * n + 12 * c.num_layers * seq_len * c.num_heads * c.head_dim)


def _param(module: nn.Module, name: str, init, shape, names):
  """A parameter carrying its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      jnp.dtype(module.config.param_dtype))


def _fan_in(in_axis, out_axis):
  """Unit-variance outputs for unit-variance inputs (as MaxText)."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in fp32."""
  config: LlamaConfig
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],),
                   (self.axis_name,))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)
                          + self.config.norm_eps)
    return (x * scale.astype(jnp.float32)).astype(self.config.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the Hugging Face "rotate_half" layout, in fp32.

  x: [B, T, N, F] (N: any head count); positions: int [B, T]. The first and
  second halves of F are the real and imaginary parts, so HF Llama weights
  need no permutation.
  """
  f = x.shape[-1]
  inv_freq = (1.0 / theta ** (np.arange(0, f, 2, dtype=np.float64) / f))
  angles = positions[..., None].astype(jnp.float32) * inv_freq.astype(
      np.float32)                                  # [B, T, F/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
  """Causal self-attention with grouped KV heads and an optional KV cache.

  With a cache, `cache_kv` holds every layer's k, v and `layer` says which
  is this one's; the updated cache is returned. `prefill` (static) promises
  positions == arange(T) in every row (Llama sets it only when it made those
  positions itself).
  """
  config: LlamaConfig
  prefill: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None, cache_kv: _Stacked | None,
               layer: jax.Array | int | None = None
               ) -> tuple[jax.Array, _Stacked | None]:
    c = self.config
    d, h, k, f = c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim
    dt = jnp.dtype(c.dtype)
    wq = _param(self, "q_proj", _fan_in(0, (1, 2)), (d, h, f),
                ("embed", "heads", "head_dim"))
    wk = _param(self, "k_proj", _fan_in(0, (1, 2)), (d, k, f),
                ("embed", "kv_heads", "head_dim"))
    wv = _param(self, "v_proj", _fan_in(0, (1, 2)), (d, k, f),
                ("embed", "kv_heads", "head_dim"))
    wo = _param(self, "o_proj", _fan_in((0, 1), 2), (h, f, d),
                ("heads", "head_dim", "embed"))

    q = jnp.einsum("BTD,DHF->BTHF", x, wq.astype(dt))
    keys = jnp.einsum("BTD,DKF->BTKF", x, wk.astype(dt))
    values = jnp.einsum("BTD,DKF->BTKF", x, wv.astype(dt))
    q = checkpoint_name(q, "query_proj")
    keys = checkpoint_name(keys, "key_proj")
    values = checkpoint_name(values, "value_proj")
    if c.qk_norm:  # Normalise q and k per head before RoPE (OLMo-2 / Qwen3).
      q = RMSNorm(c, axis_name="head_dim", name="q_norm")(q)
      keys = RMSNorm(c, axis_name="head_dim", name="k_norm")(keys)
    q = apply_rope(q, positions, c.rope_theta)
    keys = apply_rope(keys, positions, c.rope_theta)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    kv_names = ("batch", "length", "kv_heads", "head_dim")
    keys = nn.with_logical_constraint(keys, kv_names)
    values = nn.with_logical_constraint(values, kv_names)

    new_kv, mask, is_causal = None, None, True
    if cache_kv is not None:
      stored = lambda new: _bits(new.astype(cache_kv.dtype))
      # One layer's [B, K, S, F], written at index `at` of its leading dims
      # (this layer's in a stack; none in a per-layer cache).
      per_layer = isinstance(cache_kv.k, tuple)
      at = () if per_layer else (layer,)
      if self.prefill:
        # Every row starts at 0: one slab write, and causal attention over
        # just these T keys (the cache's older contents there are
        # overwritten, and nothing beyond T is visible to these queries).
        write = lambda cache, new: jax.lax.dynamic_update_slice(
            cache, jnp.swapaxes(stored(new), 1, 2)[(None,) * len(at)],
            (*at, 0, 0, 0, 0))
      else:
        # Each row writes at its own positions (out-of-range ones are
        # dropped), then attends to every cached index <= its query's
        # position. [B, T] indices around the K slice: updates [B, T, K, F].
        # (On a batch split over the mesh, GSPMD gathers these small update
        # rows and indices; mapping the write over the batch instead makes
        # XLA's CPU backend transpose the whole cache every step.)
        rows = jnp.arange(q.shape[0])[:, None]
        write = lambda cache, new: cache.at[(*at, rows, slice(None),
                                             positions)].set(stored(new))
      if per_layer:
        update = lambda layers, new: (
            layers[:layer] + (_constrain_cache(write(layers[layer], new)),)
            + layers[layer + 1:])
      else:
        update = lambda cache, new: _constrain_cache(write(cache, new))
      new_kv = _Stacked(update(cache_kv.k, keys), update(cache_kv.v, values),
                        cache_kv.dtype)
      if not self.prefill:
        # This layer, [B, K, S, F] -> [B, S, K, F]: XLA fuses the swap and
        # the astype (free when the cache is in the compute dtype) into the
        # one per-head relayout it makes for the attention dots.
        read = lambda cache: jnp.swapaxes(
            _unbits(cache[layer], cache_kv.dtype).astype(dt), 1, 2)
        keys = nn.with_logical_constraint(read(new_kv.k), kv_names)
        values = nn.with_logical_constraint(read(new_kv.v), kv_names)
        mask = (jnp.arange(keys.shape[1])[None, None, :]
                <= positions[:, :, None])[:, None]         # [B, 1, T, S]
        is_causal = False

    # Packed rows (segment_ids) attend within the same segment, causally.
    # Padding (id 0) attends to padding, so no row is fully masked; the loss
    # mask drops it.
    out = attention.attend(q, keys, values, impl=c.attention_impl,
                           segment_ids=segment_ids, mask=mask,
                           is_causal=is_causal,
                           prefill=self.prefill)          # [B, T, H, F]
    out = checkpoint_name(out, "attention_out")
    out = jnp.einsum("BTHF,HFD->BTD", out, wo.astype(dt))
    return nn.with_logical_constraint(out, ("batch", "length", "embed")), new_kv


class Mlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dt = jnp.dtype(c.dtype)
    w_gate = _param(self, "gate_proj", _fan_in(0, 1), (c.emb_dim, c.mlp_dim),
                    ("embed", "mlp"))
    w_up = _param(self, "up_proj", _fan_in(0, 1), (c.emb_dim, c.mlp_dim),
                  ("embed", "mlp"))
    w_down = _param(self, "down_proj", _fan_in(0, 1), (c.mlp_dim, c.emb_dim),
                    ("mlp", "embed"))
    gate = checkpoint_name(jnp.einsum("BTD,DM->BTM", x, w_gate.astype(dt)),
                           "mlp_gate")
    up = checkpoint_name(jnp.einsum("BTD,DM->BTM", x, w_up.astype(dt)),
                         "mlp_up")
    hidden = nn.with_logical_constraint(nn.silu(gate) * up,
                                        ("batch", "length", "mlp"))
    out = jnp.einsum("BTM,MD->BTD", hidden, w_down.astype(dt))
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Pre-norm residual block over carry = (x, the stacked cache or None).

  Returns (carry, None) for nn.scan; `layer` indexes the stacked cache.
  """
  config: LlamaConfig
  prefill: bool = False

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, _Stacked | None],
               positions: jax.Array,
               segment_ids: jax.Array | None,
               layer: jax.Array | int | None) -> tuple[tuple, None]:
    c = self.config
    x, cache_kv = carry
    attn, cache_kv = Attention(c, prefill=self.prefill, name="attn")(
        RMSNorm(c, name="attn_norm")(x), positions, segment_ids, cache_kv,
        layer)
    x = x + attn
    x = x + Mlp(c, name="mlp")(RMSNorm(c, name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, cache_kv), None


def _check_positions(positions, limit: int, what: str) -> None:
  """Rejects positions >= limit when they are concrete (not under jit)."""
  if isinstance(positions, jax.core.Tracer):
    return  # Traced: values unknown; see Llama.__call__'s docstring.
  top = int(np.max(np.asarray(positions))) if np.size(positions) else -1
  if top >= limit:
    raise ValueError(f"positions reach {top} but {what} is {limit}; shorten "
                     "the sequence or raise the limit.")


class Llama(nn.Module):
  """Llama-2 over token ids.

  __call__(tokens, positions=None, segment_ids=None, cache=None,
           logits_at=None):
    tokens, positions, segment_ids: int32 [B, T]; positions default arange(T).
    logits_at: int32 [B, N] indices into T: logits come back only there,
      [B, N, V] (a prefill needs just each row's last prompt position; the
      head over every position is most of a short model's prefill).
    segment_ids None: plain causal attention (is_causal, no dense mask, so the
      flash kernels apply). Given: attend only within the same segment,
      causally (0 = padding): splash takes the ids, XLA and cuDNN a dense
      [B, 1, T, T] mask (see attention.py).
    cache None: returns fp32 logits [B, T, V].
    cache (a KVCache): writes this call's K/V at `positions` (per row) and
      attends to every cached index <= the query's position; returns
      (logits, new_cache). Right-pad prompts: a pad's K/V is overwritten by
      the real token at that position before anyone sees it.
      Prefill: positions=None (so arange(T) in every row) is the fast path:
      the K/V go into the cache as one slab and attention runs causally over
      the T new keys only (is_causal, no mask; flash kernels apply). It gives
      what explicit arange positions give, since those queries see no index
      >= T. Decode (T = 1, each row at its own position) and any other
      explicit positions attend to the whole cache with a dense [B, 1, T, S]
      mask; one-token steps always use the XLA kernel.
      The layers carry the stacked cache and update it in place; under jit,
      donate it (or, as the sampler does, keep it inside one jitted loop) so
      the call does not copy it.

  Token ids must lie in [0, vocab_size): the embedding is a one-hot matmul,
  so an out-of-range id reads a zero vector rather than failing.

  Lengths are checked at trace time (T <= max_len, T <= cache length). Position
  values are checked only when concrete; under jit a position >= the cache
  length is dropped by the scatter (JAX's out-of-bounds rule), so the sampler
  must stop at the cache length.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               cache: KVCache | None = None,
               logits_at: jax.Array | None = None):
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got {tokens.shape}.")
    b, t = tokens.shape
    if t > c.max_len:
      raise ValueError(f"Sequence length {t} exceeds max_len={c.max_len}; "
                       "raise LlamaConfig.max_len or shorten the inputs.")
    prefill = positions is None and cache is not None
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if positions.shape != tokens.shape:
      raise ValueError(f"positions shape {positions.shape} must equal tokens "
                       f"shape {tokens.shape}.")
    _check_positions(positions, c.max_len, "max_len")
    cache_kv = None
    if cache is not None:
      if segment_ids is not None:
        raise ValueError("segment_ids cannot be combined with a KV cache; "
                         "right-pad prompts and pass segment_ids=None.")
      if t > cache.length:
        raise ValueError(f"{t} tokens do not fit a cache of length "
                         f"{cache.length}; make a longer cache.")
      if isinstance(cache.k, tuple) and c.scan_layers:
        raise ValueError("A per-layer cache needs unrolled layers "
                         "(scan_layers=False).")
      _check_positions(positions, cache.length, "the cache length")
      cache_kv = _Stacked.of(cache)

    embedding = _param(self, "embedding", nn.initializers.normal(1.0),
                       (c.vocab_size, c.emb_dim), ("vocab", "embed"))
    # A one-hot matmul rather than a gather: GSPMD partitions it cleanly under
    # any sharding of the table (a gather is replicated first), and with
    # codec vocabularies (~300-1000) it costs less than the output head.
    # HIGHEST: an exact lookup even for fp32 on TPU/GPU (no bf16/TF32 passes).
    one_hot = jax.nn.one_hot(tokens, c.vocab_size, dtype=c.dtype)
    x = jnp.einsum("BTV,VD->BTD", one_hot, embedding.astype(c.dtype),
                   precision=jax.lax.Precision.HIGHEST)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    layer = DecoderLayer
    policy = REMAT_POLICIES[c.remat_policy]
    if c.remat_policy != "none":
      # Unrolled, the layer index stays a Python int (argument 4, self
      # counted): a per-layer cache is picked by it.
      layer = nn.remat(layer, policy=policy, prevent_cse=not c.scan_layers,
                       static_argnums=() if c.scan_layers else (4,))
    carry = (x, cache_kv)
    if c.scan_layers:
      stack = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0), length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      layer_ids = None if cache is None else jnp.arange(c.num_layers)
      carry, _ = stack(c, prefill=prefill, name="layers")(
          carry, positions, segment_ids, layer_ids)
    else:
      for i in range(c.num_layers):
        carry, _ = layer(c, prefill=prefill, name=f"layers_{i}")(
            carry, positions, segment_ids, None if cache is None else i)
    x, new_kv = carry
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)  # [B, N, D]

    x = RMSNorm(c, name="final_norm")(x)
    head = _param(self, "head", _fan_in(0, 1), (c.emb_dim, c.vocab_size),
                  ("embed", "vocab"))
    logits = jnp.einsum("BTD,DV->BTV", x, head.astype(c.dtype),
                        preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    if cache is None:
      return logits
    return logits, new_kv.cache()
