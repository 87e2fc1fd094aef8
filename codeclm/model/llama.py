"""The Flax (linen) Llama-2 decoder: its layers and its parameter count.

Owns the architecture (token embedding, pre-norm blocks of causal
self-attention with rotary embeddings and optional grouped KV heads, SwiGLU
MLP, RMSNorm, no biases, untied output head). Its config, size table and
FLOP count live in `llama_config.py`, the KV cache used for sampling in
`kv_cache.py`. It knows only JAX and Flax; the mesh rules that place the
logical axes live in `sharding.py`.

Einsum axis letters (every einsum below uses these and only these):

  B batch          T query length     S key/value length (= T without a cache)
  D model width    H query heads      K key/value heads   F head dim
  M MLP hidden     V vocabulary       L layers

Logical axis names, on parameters and main activations alike; `sharding.py`
maps them onto the (data, fsdp, context, tensor) mesh:

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

Rematerialisation (`remat_policy`, see llama_config.py) is per decoder
layer; the policies save (or offload to host memory) the activations named
by checkpoint_name, the layer input among them.

Context parallelism: where the mesh splits "length" (a context axis > 1) and
no cache is used, the model puts its inputs into the context layout on entry
and its logits back into window order on exit (context_attention.py);
attention then runs over the sequence shards. A cache's prefill splits the
same way in window order; a decode step's one position attends to a cache
whose length is split over the axis (kv_cache.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from codeclm.model import attention
from codeclm.model import context_attention
from codeclm.model import kv_cache
from codeclm.model import llama_config


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
  config: llama_config.LlamaConfig
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
  rotated = jnp.einsum("btnf,fg->btng", x32, _rotate_half(f),
                       precision=jax.lax.Precision.HIGHEST)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _rotate_half(f: int) -> np.ndarray:
  """The [F, F] matrix of x -> [-x2, x1] (entries 0 and +-1, so exact).

  A product rather than a split into halves: on TPU an array of F/2 = 64
  lanes is padded to 128, and the backward pass of the split kept a dozen
  such fp32 halves alive (192 MiB each at 12,288 tokens of 7B; the train
  step's temporaries fell by 0.74 GiB per chip on v5e-256 without them).
  """
  r = np.zeros((f, f), np.float32)
  half = f // 2
  r[half:, :half] = -np.eye(half)  # Output i < F/2 takes -x[i + F/2].
  r[:half, half:] = np.eye(half)   # Output i >= F/2 takes x[i - F/2].
  return r


class Attention(nn.Module):
  """Causal self-attention with grouped KV heads and an optional KV cache.

  With a cache, `cache_kv` holds every layer's k, v and `layer` says which
  is this one's; the updated cache is returned. `prefill` (static) promises
  positions == arange(T) in every row (Llama sets it only when it made those
  positions itself). `context_parallel` (static): inputs are in the context
  layout, split over the context axis (Llama sets it).
  """
  config: llama_config.LlamaConfig
  prefill: bool = False
  context_parallel: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None,
               cache_kv: kv_cache.Stacked | None,
               layer: jax.Array | int | None = None
               ) -> tuple[jax.Array, kv_cache.Stacked | None]:
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
      new_kv = cache_kv.write(keys, values, positions, layer, self.prefill)
      # A prefill attends causally over just these T keys; other positions
      # attend to every cached index <= their query's position.
      if not self.prefill:
        keys, values = new_kv.read(layer, dt)
        mask = (jnp.arange(keys.shape[1])[None, None, :]
                <= positions[:, :, None])[:, None]         # [B, 1, T, S]
        is_causal = False

    # Packed rows (segment_ids) attend within the same segment, causally.
    # Padding (id 0) attends to padding, so no row is fully masked; the loss
    # mask drops it.
    if self.context_parallel:
      out = context_attention.attend(q, keys, values, segment_ids,
                                     impl=c.attention_impl,
                                     balance=c.context_load_balance,
                                     strategy=c.context_strategy)
    else:
      out = attention.attend(q, keys, values, impl=c.attention_impl,
                             segment_ids=segment_ids, mask=mask,
                             is_causal=is_causal,
                             prefill=self.prefill)        # [B, T, H, F]
    out = checkpoint_name(out, "attention_out")
    out = jnp.einsum("BTHF,HFD->BTD", out, wo.astype(dt))
    return nn.with_logical_constraint(out, ("batch", "length", "embed")), new_kv


class Mlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  config: llama_config.LlamaConfig

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
  config: llama_config.LlamaConfig
  prefill: bool = False
  context_parallel: bool = False

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, kv_cache.Stacked | None],
               positions: jax.Array,
               segment_ids: jax.Array | None,
               layer: jax.Array | int | None) -> tuple[tuple, None]:
    c = self.config
    x, cache_kv = carry
    # Named inside the remat'd layer, so the offload policies can keep it
    # in host memory (the scan's saved carry otherwise stays in HBM).
    x = checkpoint_name(x, llama_config.LAYER_INPUT)
    attn, cache_kv = Attention(c, prefill=self.prefill,
                               context_parallel=self.context_parallel,
                               name="attn")(
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
  config: llama_config.LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               cache: kv_cache.KVCache | None = None,
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
      cache_kv = kv_cache.Stacked.of(cache)
    # Over a context axis (training, eval): inputs into the context layout.
    # A prefill splits too, in window order (no load balancing: its keys go
    # into the cache at positions 0..T-1 and its logits are read at each
    # row's last prompt position). Other calls (a decode step, or T not in
    # C or 2C chunks: init's one token) attend over gathered, unsplit
    # inputs (attention.py), correct but not split.
    shards = context_attention.num_shards()
    balance = c.context_load_balance and not prefill
    if c.context_load_balance and prefill:
      c = dataclasses.replace(c, context_load_balance=False)
    split = (shards > 1 and (prefill or (cache is None and logits_at is None))
             and t % (2 * shards if balance else shards) == 0)
    if split:
      tokens, positions = (context_attention.to_layout(x, shards, balance)
                           for x in (tokens, positions))
      if segment_ids is not None:
        segment_ids = context_attention.to_layout(segment_ids, shards,
                                                  balance)

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
    policy = llama_config.REMAT_POLICIES[c.remat_policy]
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
      carry, _ = stack(c, prefill=prefill, context_parallel=split,
                       name="layers")(carry, positions, segment_ids,
                                      layer_ids)
    else:
      for i in range(c.num_layers):
        carry, _ = layer(c, prefill=prefill, context_parallel=split,
                         name=f"layers_{i}")(
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
    if split:  # Back into window order: V wide, cheaper than the D-wide x.
      logits = nn.with_logical_constraint(
          context_attention.from_layout(logits, shards, balance),
          ("batch", "length", "vocab"))
    if cache is None:
      return logits
    return logits, new_kv.cache()


def param_count(config: llama_config.LlamaConfig) -> int:
  """Number of parameters, from shapes only (jax.eval_shape; no allocation)."""
  model = Llama(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 1), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nn.meta.unbox(shapes)))
