"""The jitted prefill + decode loop a `Sampler` compiles per bucket.

The right-padded prompts are prefilled in one forward pass into a KV cache
(logits only at each row's last prompt position); then one token per row is
drawn and fed back inside a `lax.while_loop` until every row has emitted EOS
or `max_new_tokens` is reached. Each step masks the logits in this order: the
constraint (if any, see constraint.py), temperature, top-k, top-p;
temperature 0 is greedy.

Params: before the loop, inside the same jit, the weights are cast once to
the compute dtype (norm scales stay as stored: the model reads them in fp32)
and laid out for decoding: replicated over the mesh axes the batch is split
over (data, fsdp), split over the rest (tensor) as the rules say. So a
decode step does no all-gather of weights: on a training (fsdp) mesh it would
otherwise gather every layer's fp32 weights, a whole model moved per token.
`Sampler(reshard_params=False)` keeps the given layout instead, for a model
that fits the devices only when sharded over fsdp; "auto" (the default)
chooses by the copy's size per device (`copy_bytes`, sampler.py). The
prefill and the decode step are functions of their own (`prefill`,
`decode_step`), so that --mode=compile compiles the programs sampling runs,
on this layout (`prepared_shardings`).

Layers: a model trained with scanned layers keeps its weights stacked
[layers, ...]; inside a scan each layer reads its slice with a dynamic-slice,
which XLA's CPU backend materialises before every matmul: each decode step
copied the whole model once more before reading it (on a 2-core CPU, 100m,
batch 1: 214 ms per step scanned vs 119 ms unrolled, same process). So the
sampler splits the stack into per-layer weights once, beside the cast, and
runs the layers unrolled (`unroll_layers=False` keeps the scan: one layer
body to compile instead of L, for a very deep model whose compile time
matters more than its decode). With reshard_params=False the scan stays:
the point there is to gather one layer's weights at a time.

Classifier-free guidance (`Guidance`): the batch holds each request twice,
with its class prompt and with its "no class" prompt, as a pair of rows that
share one jitted step and one KV cache. Each step mixes a pair's logits into
s * cond + (1 - s) * uncond (= uncond + s * (cond - uncond); this form gives
exactly uncond at s = 0 and cond at s = 1) and gives both rows the mix, before
the constraint, temperature, top-k and top-p; both rows have the same
sample id, hence the same key, so they draw the same token and stay in step.

Reproducibility: row b draws step i with the key
fold_in(fold_in(key(seed), sample_id[b]), i), so a sample depends on its
seed and global sample index, not on the batch it was drawn in or on the
number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from codeclm.model import kv_cache
from codeclm.model import llama
from codeclm.model import sharding
from codeclm.sampling import hosts


# -- the masks -----------------------------------------------------------------


def _ranks(logits: jax.Array) -> jax.Array:
  """Each token's rank in descending order (ties: the lower id first)."""
  order = jnp.argsort(-logits, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1)


def top_k_mask(logits: jax.Array, k) -> jax.Array:
  """True for the k largest logits of each row (exactly k, ties by id); k <= 0
  keeps all."""
  return (_ranks(logits) < k) | (k <= 0)


def top_p_mask(logits: jax.Array, p) -> jax.Array:
  """True for the smallest prefix (by probability) whose mass reaches p.

  A token is kept when the mass of the tokens ranked above it is < p, so the
  most likely token is always kept and p = 1 keeps every token with nonzero
  probability (as Hugging Face's TopPLogitsWarper).
  """
  ranks = _ranks(logits)
  sorted_logits = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < p
  return jnp.take_along_axis(keep_sorted, ranks, axis=-1) | (p >= 1)


def choose(logits: jax.Array, keys: jax.Array, temperature, top_k,
           top_p) -> jax.Array:
  """One token per row of fp32 logits [B, V] with per-row keys [B].

  Keeps top_k_mask & top_p_mask of the scaled logits, computed in sorted
  order from one sort per row (a decode step's sampling cost on CPU; the
  masks above need several), and draws there.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  order = jnp.argsort(-scaled, axis=-1, stable=True)  # Ties: lower id first.
  ranked = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(ranked, axis=-1)
  rank = jnp.arange(ranked.shape[-1])
  keep = (((rank < top_k) | (top_k <= 0))
          & (((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1)))
  at = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked,
                                                        -jnp.inf))
  drawn = jnp.take_along_axis(order, at[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


@flax.struct.dataclass
class Guidance:
  """Classifier-free guidance over pairs of rows (module docstring)."""
  partner: jax.Array      # int32 [B]: the other row of the pair (self: none)
  conditional: jax.Array  # bool [B]: this row holds the class prompt
  scale: jax.Array        # float32 scalar: s

  def mix(self, logits: jax.Array) -> jax.Array:
    """fp32 logits [B, V] -> s * cond + (1 - s) * uncond on both rows."""
    other = logits[self.partner]
    own = self.conditional[:, None]
    cond = jnp.where(own, logits, other)
    uncond = jnp.where(own, other, logits)
    return self.scale * cond + (1 - self.scale) * uncond


# -- the jitted loop -----------------------------------------------------------


@flax.struct.dataclass
class _Loop:
  """What the while_loop carries."""
  step: jax.Array          # int32: new tokens drawn so far
  tokens: jax.Array        # int32 [B, C]: prompt then new tokens, PAD after
  logits: jax.Array        # fp32 [B, V]: the next token's logits
  cache: kv_cache.KVCache
  done: jax.Array          # bool [B]: drew EOS (or a padding row)
  state: jax.Array         # int32 [B]: constraint state
  count: jax.Array         # int32 [B]: constraint counter


def _decode_dtype(path, stored, dtype):
  """A weight's dtype for decoding: `dtype`, but norm scales as stored (the
  model reads them in fp32)."""
  keep = jax.tree_util.keystr(path).endswith("['scale']")
  return stored if keep else jnp.dtype(dtype)


def _for_decoding(params, shardings, dtype):
  """Params cast to the compute dtype (norm scales kept) in `shardings`."""
  def one(path, x, s):
    x = x.astype(_decode_dtype(path, x.dtype, dtype))
    return jax.lax.with_sharding_constraint(x, s)
  return jax.tree_util.tree_map_with_path(one, params, shardings)


def _unrolled(params, model: llama.Llama,
              take=lambda x, i: x[i]) -> tuple[Any, llama.Llama]:
  """Stacked layer weights split per layer (`take` gives layer i of a
  leaf), and the unscanned model."""
  if not model.config.scan_layers:
    return params, model
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(model.config.num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: take(x, i), stacked)
  return params, llama.Llama(dataclasses.replace(model.config,
                                                 scan_layers=False))


def prepared_shardings(model: llama.Llama, mesh: jax.sharding.Mesh,
                       rules: Sequence, *, unroll_layers: bool) -> Any:
  """The shardings `_prepare` lays the weights out in (reshard_params):
  the decode layout, split per layer as `_unrolled` splits them. What
  --mode=compile gives prefill and decode, as a prepared call gets them."""
  shardings = hosts.decode_shardings(model, mesh, rules)
  if not unroll_layers:
    return shardings
  one_layer = lambda s, i: jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
  return _unrolled(shardings, model, take=one_layer)[0]


def copy_bytes(model: llama.Llama, mesh: jax.sharding.Mesh,
               rules: Sequence) -> int:
  """Bytes per device of the weights laid out for decoding: in the model
  dtype, replicated over the batch's mesh axes (JPEG-LM 7B in bf16: 12 GiB)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
  cast = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.ShapeDtypeStruct(
          x.shape, _decode_dtype(path, x.dtype, model.config.dtype)),
      shapes["params"])
  return sharding.bytes_per_device(
      cast, hosts.decode_shardings(model, mesh, rules))


@flax.struct.dataclass
class DecodeParams:
  """Params laid out for decoding once (`Sampler.prepare`): cast, resharded
  and split per layer. Calls given these skip that copy of the whole model,
  which a call given plain params makes every time (about a third of a
  100m batch-1 prefill on CPU). Holds the model it must run with."""
  tree: Any
  model: llama.Llama = flax.struct.field(pytree_node=False)


def _prepare(params, *, model: llama.Llama, param_shardings,
             unroll_layers: bool) -> DecodeParams:
  if param_shardings is not None:
    params = _for_decoding(params, param_shardings, model.config.dtype)
  if unroll_layers:
    params, model = _unrolled(params, model)
  return DecodeParams(params, model)


def prefill(params: DecodeParams, prompts, lengths, *, cache_len: int,
            cache_dtype) -> tuple[jax.Array, kv_cache.KVCache]:
  """Right-padded prompts [B, P] into a fresh cache of cache_len slots:
  (the logits at each row's last prompt position [B, 1, V], the cache)."""
  model = params.model
  cache = kv_cache.init_cache(model.config, prompts.shape[0], cache_len,
                              cache_dtype,
                              per_layer=not model.config.scan_layers)
  # No positions: every row from 0, the model's causal prefill fast path.
  return model.apply({"params": params.tree}, prompts, cache=cache,
                     logits_at=(lengths - 1)[:, None])


def decode_step(params: DecodeParams, tokens, positions, cache
                ) -> tuple[jax.Array, kv_cache.KVCache]:
  """One token per row [B, 1] at `positions` [B, 1]: (logits, cache)."""
  return params.model.apply({"params": params.tree}, tokens, positions,
                            cache=cache)


def _generate(params, prompts, lengths, active, sample_ids, states, counts,
              seed, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
              constraint, guidance=None, *, model: llama.Llama,
              cache_len: int, cache_dtype,
              param_shardings, unroll_layers: bool,
              trace_counter: list[int]):
  """Prefill + decode loop; returns tokens [B, cache_len] (see _Loop)."""
  trace_counter.append(1)  # Runs once per compilation.
  b, p = prompts.shape
  if not isinstance(params, DecodeParams):  # Once, outside the loop.
    params = _prepare(params, model=model, param_shardings=param_shardings,
                      unroll_layers=unroll_layers)
  last, cache = prefill(params, prompts, lengths, cache_len=cache_len,
                        cache_dtype=cache_dtype)
  tokens = jnp.full((b, cache_len), pad_id, jnp.int32)
  tokens = jax.lax.dynamic_update_slice(tokens, prompts, (0, 0))
  tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      jax.random.key(seed), sample_ids)

  def draw(s: _Loop):
    """Token s.step of each row (PAD once done), the constraint's state and
    counter after it, and the token buffer holding it."""
    logits, state, count = s.logits, s.state, s.count
    if guidance is not None:  # Before the constraint and the masks.
      logits = guidance.mix(logits)
    if constraint is not None:
      row = constraint.next_state[state]                      # [B, V]
      allowed = row >= 0
      if constraint.counter is not None:
        allowed &= constraint.counter.allows(state, count)
      logits = jnp.where(allowed, logits, -jnp.inf)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, s.step)
    token = choose(logits, keys, temperature, top_k, top_p)
    token = jnp.where(s.done, pad_id, token)
    if constraint is not None:
      moved = jnp.take_along_axis(row, token[:, None], axis=1)[:, 0]
      if constraint.counter is not None:
        count = jnp.where(s.done, count,
                          constraint.counter.advance(state, count, token))
      state = jnp.where(s.done, state, moved)
    # Mapped over the rows: a batch split over the mesh writes its own rows.
    tokens = jax.vmap(lambda t, i, x: t.at[i].set(x))(
        s.tokens, lengths + s.step, token)
    return token, state, count, tokens

  # Each step draws a token and runs the model on it for the next logits;
  # the last token needs no model step after it, so the loop stops one
  # short and a final draw (PAD when nothing is left to draw) ends it.
  def cond(s: _Loop):
    return (s.step < max_new_tokens - 1) & ~jnp.all(s.done)

  def body(s: _Loop) -> _Loop:
    token, state, count, tokens = draw(s)
    pos = lengths + s.step
    new_logits, cache = decode_step(params, token[:, None], pos[:, None],
                                    s.cache)
    return _Loop(step=s.step + 1, tokens=tokens,
                 logits=new_logits[:, 0], cache=cache,
                 done=s.done | (token == eos_id), state=state, count=count)

  init = _Loop(step=jnp.zeros((), jnp.int32), tokens=tokens, logits=last[:, 0],
               cache=cache, done=~active, state=states, count=counts)
  end = jax.lax.while_loop(cond, body, init)
  return draw(end.replace(done=end.done | (end.step >= max_new_tokens)))[3]


@functools.lru_cache(maxsize=16)
def loop_for(model: llama.Llama, mesh: jax.sharding.Mesh, rules: tuple,
             cache_dtype, reshard_params: bool,
             unroll_layers: bool) -> tuple[Any, list[int], Any]:
  """The jitted loop, its trace log and the jitted params layout (prepare),
  shared by equal Samplers.

  A Sampler re-created for the same model, mesh, rules, cache dtype and
  layout choices (a notebook cell run again, a second command in one process)
  reuses the compiled buckets. The rules are part of the key because flax
  reads them at trace time and jit's own cache does not see them.
  """
  traces: list[int] = []
  shardings = (hosts.decode_shardings(model, mesh, rules) if reshard_params
               else None)
  # Sharded weights stay scanned (module docstring).
  layout = dict(model=model, param_shardings=shardings,
                unroll_layers=unroll_layers and reshard_params)
  fn = jax.jit(functools.partial(_generate, cache_dtype=cache_dtype,
                                 trace_counter=traces, **layout),
               static_argnames=("cache_len",),
               out_shardings=_token_sharding(mesh, rules))
  return fn, traces, jax.jit(functools.partial(_prepare, **layout))


def _token_sharding(mesh: jax.sharding.Mesh,
                    rules: Sequence) -> jax.sharding.NamedSharding:
  """Tokens [B, C]: rows split over the batch axes, each row whole, so each
  process reads its own rows from its own devices."""
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(sharding.batch_axes(rules) or None,
                                       None))

