r"""The jitted KV-cache sampler: token prompts -> new tokens.

Jitted once per (batch, prompt length, cache length) bucket. The right-padded
prompts are prefilled in one forward pass into a KV cache; then one token per
row is drawn and fed back inside a `lax.while_loop` until every row has
emitted EOS or `max_new_tokens` is reached. Each step masks the logits in this
order: the constraint (if any), temperature, top-k, top-p; temperature 0 is
greedy. Settings, seed, `max_new_tokens` and the EOS/PAD ids are traced
values, so changing them never recompiles. Prompts and outputs split over
the mesh's batch axes.

Several processes (jax.distributed): a call is collective. Each process
passes its own prompts (any number, none included) and gets back its own
rows; the global batch is assembled from the rows each process's devices
hold, so no process needs another's prompts or outputs. The processes agree
on the shapes (most rows, longest prompt) with one small all-gather; a
process with fewer prompts fills its rows with inactive padding. `chunks`
gives every process the same number of calls.

Params: before the loop, inside the same jit, the weights are cast once to
the compute dtype (norm scales stay as stored: the model reads them in fp32)
and laid out for decoding: replicated over the mesh axes the batch is split
over (data, fsdp), split over the rest (tensor) as the rules say. So a
decode step does no all-gather of weights: on a training (fsdp) mesh it would
otherwise gather every layer's fp32 weights, a whole model moved per token.
`Sampler(reshard_params=False)` keeps the given layout instead, for a model
that fits the devices only when sharded over fsdp. The prefill computes
logits only at each row's last prompt position.

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

Reproducibility: row b draws step i with the key
fold_in(fold_in(key(seed), sample_id[b]), i), so a sample depends on its
seed and global sample index, not on the batch it was drawn in or on the
number of processes.

Constraint hook: a per-row automaton state is carried through the loop; each
step keeps only `allowed[state_b]` and then moves to
`next_state[state_b, token_b]`. The JPEG grammar
(codeclm/sampling/jpeg_grammar.py) plugs in here as a state x token table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from codeclm.model import llama
from codeclm.model import sharding

# -- settings and the constraint hook ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """How tokens are drawn (the paper: top-p 0.9 or 1, top-k 40 or 80)."""
  temperature: float = 1.0   # 0 = greedy (argmax)
  top_k: int = 0             # keep the k most likely tokens; 0 = off
  top_p: float = 1.0         # keep the smallest set with this mass; 1 = off
  max_new_tokens: int = 256

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is "
                       "greedy).")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off).")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must lie in (0, 1] (1 turns it "
                       "off).")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")


@flax.struct.dataclass
class Counter:
  """A per-row count carried beside the automaton state.

  For a grammar whose one non-regular part is a count (JPEG: which restart
  marker comes next, and EOI only after the last MCU). A token's kind is 1
  in `state` (JPEG: right after a marker's FF) and 0 elsewhere. Drawing token
  t adds step[kind, t] to the count; t is allowed only where ok[kind, t],
  first[kind, t] < 0 or == count % modulus, and count + step <= limit, with
  equality where final[kind, t].
  """
  state: jax.Array     # int32 scalar
  limit: jax.Array     # int32 scalar
  modulus: jax.Array   # int32 scalar
  step: jax.Array      # int32 [2, V]
  first: jax.Array     # int32 [2, V]
  final: jax.Array     # bool [2, V]
  ok: jax.Array        # bool [2, V]

  def allows(self, state: jax.Array, count: jax.Array) -> jax.Array:
    """bool [B, V]: the tokens the counts of rows in `state` [B] allow."""
    kind = (state == self.state).astype(jnp.int32)
    step, first = self.step[kind], self.first[kind]
    after = count[:, None] + step
    return (self.ok[kind] & ((first < 0) | (first == count[:, None]
                                             % self.modulus))
            & (after <= self.limit)
            & (~self.final[kind] | (after == self.limit)))

  def advance(self, state: jax.Array, count: jax.Array,
              token: jax.Array) -> jax.Array:
    kind = (state == self.state).astype(jnp.int32)
    return count + self.step[kind, token]


@flax.struct.dataclass
class Constraint:
  """A token automaton: a states x vocabulary table, applied every step.

  next_state: int32 [S, V]; the state after drawing a token, -1 where the
    token is not allowed (every state must allow at least one token).
  initial_state: int32 scalar; a row's state after its prompt unless the
    call gives per-row `starts`.
  counter: an optional per-row count that further restricts tokens.
  """
  next_state: jax.Array
  initial_state: jax.Array
  counter: Counter | None = None

  @classmethod
  def create(cls, allowed, next_state, initial_state: int = 0,
             counter: Counter | None = None) -> Constraint:
    """From separate tables: allowed bool [S, V], next_state int [S, V]."""
    allowed = np.asarray(allowed, bool)
    next_state = np.asarray(next_state, np.int32)
    if allowed.ndim != 2 or allowed.shape != next_state.shape:
      raise ValueError(
          f"Constraint tables must both be [states, vocab]; got allowed "
          f"{allowed.shape} and next_state {next_state.shape}.")
    return cls.from_table(np.where(allowed, next_state, -1), initial_state,
                          counter)

  @classmethod
  def from_table(cls, next_state, initial_state: int = 0,
                 counter: Counter | None = None) -> Constraint:
    """From one table: int [S, V] with -1 where a token is not allowed."""
    next_state = np.asarray(next_state, np.int32)
    if next_state.ndim != 2:
      raise ValueError(f"Constraint table must be [states, vocab]; got "
                       f"{next_state.shape}.")
    s = next_state.shape[0]
    empty = (next_state < 0).all(axis=1)
    if empty.any():
      raise ValueError(
          f"Constraint states {np.flatnonzero(empty).tolist()[:10]} allow no "
          "token; every state must allow at least one.")
    if next_state.max() >= s or not 0 <= initial_state < s:
      raise ValueError(f"Constraint states must lie in [0, {s}); check "
                       "next_state and initial_state.")
    return cls(jnp.asarray(next_state), jnp.asarray(initial_state, jnp.int32),
               counter)


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


# -- the jitted loop -----------------------------------------------------------


@flax.struct.dataclass
class _Loop:
  """What the while_loop carries."""
  step: jax.Array          # int32: new tokens drawn so far
  tokens: jax.Array        # int32 [B, C]: prompt then new tokens, PAD after
  logits: jax.Array        # fp32 [B, V]: the next token's logits
  cache: llama.KVCache
  done: jax.Array          # bool [B]: drew EOS (or a padding row)
  state: jax.Array         # int32 [B]: constraint state
  count: jax.Array         # int32 [B]: constraint counter


def batch_mesh_axes(rules: Sequence) -> tuple[str, ...]:
  """The mesh axes the rules split the batch over (data and fsdp by default)."""
  axes = nn.logical_to_mesh_axes(("batch",), tuple(rules))[0]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def decode_shardings(model: llama.Llama, mesh: jax.sharding.Mesh,
                     rules: Sequence) -> Any:
  """The params' decode layout: the rules without the batch's mesh axes.

  Replicated over the axes the batch is split over (the decode is data
  parallel there), split over the others (tensor) as in training.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))["params"]
  batch = batch_mesh_axes(rules)
  as_tuple = lambda axes: ((axes,) if isinstance(axes, str) else
                           tuple(axes or ()))
  decode_rules = tuple(
      (name, tuple(a for a in as_tuple(axes) if a not in batch) or None)
      for name, axes in rules)
  return sharding.logical_shardings(boxed, mesh, decode_rules)


def _for_decoding(params, shardings, dtype):
  """Params cast to the compute dtype (norm scales kept) in `shardings`."""
  def one(path, x, s):
    if not jax.tree_util.keystr(path).endswith("['scale']"):
      x = x.astype(dtype)
    return jax.lax.with_sharding_constraint(x, s)
  return jax.tree_util.tree_map_with_path(one, params, shardings)


def _unrolled(params, model: llama.Llama) -> tuple[Any, llama.Llama]:
  """Stacked layer weights split per layer, and the unscanned model."""
  if not model.config.scan_layers:
    return params, model
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(model.config.num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params, llama.Llama(dataclasses.replace(model.config,
                                                 scan_layers=False))


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


def _generate(params, prompts, lengths, active, sample_ids, states, counts,
              seed, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
              constraint, *, model: llama.Llama, cache_len: int, cache_dtype,
              param_shardings, unroll_layers: bool,
              trace_counter: list[int]):
  """Prefill + decode loop; returns tokens [B, cache_len] (see _Loop)."""
  trace_counter.append(1)  # Runs once per compilation.
  b, p = prompts.shape
  if not isinstance(params, DecodeParams):  # Once, outside the loop.
    params = _prepare(params, model=model, param_shardings=param_shardings,
                      unroll_layers=unroll_layers)
  params, model = params.tree, params.model
  apply = functools.partial(model.apply, {"params": params})
  cache = llama.init_cache(model.config, b, cache_len, cache_dtype,
                           per_layer=not model.config.scan_layers)
  # No positions: every row from 0, the model's causal prefill fast path.
  last, cache = apply(prompts, cache=cache, logits_at=(lengths - 1)[:, None])
  tokens = jnp.full((b, cache_len), pad_id, jnp.int32)
  tokens = jax.lax.dynamic_update_slice(tokens, prompts, (0, 0))
  tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      jax.random.key(seed), sample_ids)

  def draw(s: _Loop):
    """Token s.step of each row (PAD once done), the constraint's state and
    counter after it, and the token buffer holding it."""
    logits, state, count = s.logits, s.state, s.count
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
    new_logits, cache = apply(token[:, None], pos[:, None], cache=s.cache)
    return _Loop(step=s.step + 1, tokens=tokens,
                 logits=new_logits[:, 0], cache=cache,
                 done=s.done | (token == eos_id), state=state, count=count)

  init = _Loop(step=jnp.zeros((), jnp.int32), tokens=tokens, logits=last[:, 0],
               cache=cache, done=~active, state=states, count=counts)
  end = jax.lax.while_loop(cond, body, init)
  return draw(end.replace(done=end.done | (end.step >= max_new_tokens)))[3]


@functools.lru_cache(maxsize=16)
def _loop_for(model: llama.Llama, mesh: jax.sharding.Mesh, rules: tuple,
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
  shardings = (decode_shardings(model, mesh, rules) if reshard_params
               else None)
  # Sharded weights stay scanned (class doc).
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
      mesh, jax.sharding.PartitionSpec(batch_mesh_axes(rules) or None, None))


def bucket(n: int, minimum: int) -> int:
  """The next power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class Sample:
  """One row's result: new tokens (EOS and padding dropped)."""
  tokens: np.ndarray
  ended: bool              # drew EOS (else stopped at max_new_tokens)
  prompt_len: int


class Sampler:
  """Draws continuations of token prompts with a model on a mesh.

  Params may come in any layout (e.g. restored with the training shardings,
  see `load`); each call lays them out for decoding first (module docstring)
  unless reshard_params=False, and then splits scanned layers to run them
  unrolled unless unroll_layers=False. Prompts and outputs are split over
  the mesh's batch axes by the logical rules. Batches are padded to a power
  of two (a multiple of the data-parallel size); prompts to a power of two
  >= `min_bucket`; the cache
  holds the prompt bucket + max_new_tokens rounded up to a power of two
  >= `min_bucket`, capped at the model's max_len. So prompts of any length
  within a bucket share one compilation, and a decode step attends over
  about what it needs (512 + 128 tokens: 640 slots, not 1,024). Settings,
  seed, EOS and PAD are traced, so only a new bucket compiles;
  `num_compilations` counts the traces.
  """

  def __init__(self, model: llama.Llama, *, eos_id: int, pad_id: int,
               mesh: jax.sharding.Mesh | None = None,
               rules: Sequence = sharding.DEFAULT_RULES,
               cache_dtype=jnp.bfloat16, min_bucket: int = 64,
               reshard_params: bool = True, unroll_layers: bool = True):
    self.model = model
    self.eos_id, self.pad_id = int(eos_id), int(pad_id)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(
        (-1, 1, 1), jax.devices()[:1])
    self.rules = tuple(rules)
    self.cache_dtype = jnp.dtype(cache_dtype)
    self.min_bucket = int(min_bucket)
    with self._context():
      spec = nn.logical_to_mesh_axes(("batch", "length"), self.rules)
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, spec)
    self._row_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(spec[0]))
    self.batch_multiple = math.prod(
        self.mesh.shape[a] for a in batch_mesh_axes(self.rules))
    # Processes the batch is split over (1 in a single-process run).
    self.feeds = self.batch_multiple // len(self.rows(self.batch_multiple))
    self._reshard_params = bool(reshard_params)
    self._jitted, self._traces, self._prepare = _loop_for(
        model, self.mesh, self.rules, self.cache_dtype, bool(reshard_params),
        bool(unroll_layers))

  @property
  def num_compilations(self) -> int:
    """Traces of the jitted loop (shared by equal Samplers, see _loop_for)."""
    return len(self._traces)

  def prepare(self, params) -> DecodeParams:
    """`params` laid out for decoding, once (see DecodeParams); pass the
    result to every call instead of `params`. Peak memory is what a call
    given plain params needs anyway (it makes the same copy inside)."""
    if isinstance(params, DecodeParams):
      return params
    if not self._reshard_params:  # Nothing to lay out: no copy either.
      return DecodeParams(params, self.model)
    with self._context():
      return self._prepare(params)

  def rows(self, batch: int) -> list[int]:
    """The rows of a `batch`-row global batch this process's devices hold.

    Processes that hold the same rows (a tensor axis across hosts) must pass
    the same prompts; `check_split` refuses such a mesh where they do not.
    """
    owners = self._owners(batch)
    mine = sorted(r for r, who in owners.items()
                  if jax.process_index() in who)
    if not mine:
      raise ValueError(
          f"The sampler's mesh {dict(self.mesh.shape)} holds no device of "
          f"process {jax.process_index()}; under jax.distributed give a mesh "
          "over every process's devices (a mesh_shape with -1).")
    return mine

  def _owners(self, batch: int) -> dict[int, set[int]]:
    owners: dict[int, set[int]] = {}
    for device, index in self._row_sharding.devices_indices_map(
        (batch,)).items():
      for r in range(*index[0].indices(batch)):
        owners.setdefault(r, set()).add(device.process_index)
    return owners

  def check_split(self) -> None:
    """Raises unless each row sits on one process's devices, as processes
    that each pass their own share of the requests need (see `share`)."""
    owners = self._owners(self.batch_multiple)
    shared = [r for r, who in owners.items() if len(who) > 1]
    if shared:
      raise ValueError(
          f"Rows {shared[:8]} of the sampler's batch sit on devices of "
          f"processes {sorted(owners[shared[0]])}: a mesh axis the batch is "
          f"not split over (tensor) spans hosts in {dict(self.mesh.shape)}. "
          "Sample with a mesh whose tensor axis stays within a host "
          "(sample.mesh_shape / eval.mesh_shape).")

  def chunks(self, num_rows: int, batch_size: int) -> list[slice]:
    """This process's `num_rows` in sampler calls of `batch_size` rows in all.

    Collective under jax.distributed: every process gets the same number of
    slices (the most any process needs), each of up to batch_size / feeds
    of its rows; a process with fewer rows gets empty ones at the end and
    must still make those calls.
    """
    per = max(1, -(-batch_size // self.feeds))
    most = int(gather_ints([num_rows])[:, 0].max())
    return [slice(i, i + per) for i in range(0, most, per)]

  def _context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def shapes(self, num_rows: int, longest_prompt: int,
             max_new_tokens: int) -> tuple[int, int, int]:
    """(batch, prompt length, cache length) buckets for a request."""
    max_len = self.model.config.max_len
    if longest_prompt + max_new_tokens > max_len:
      raise ValueError(
          f"A prompt of {longest_prompt} tokens + max_new_tokens="
          f"{max_new_tokens} exceeds the model's max_len={max_len} (the "
          "training seq_len); lower max_new_tokens or shorten the prompt.")
    b = bucket(num_rows, 1)
    b = -(-b // self.batch_multiple) * self.batch_multiple
    p = bucket(longest_prompt, self.min_bucket)
    cache_len = min(p + bucket(max_new_tokens, self.min_bucket), max_len)
    return b, min(p, cache_len), cache_len

  def __call__(self, params, prompts: Sequence[Sequence[int]],
               settings: Settings, *, seed: int = 0,
               sample_ids: Sequence[int] | None = None,
               constraint: Constraint | None = None,
               starts: Sequence[tuple[int, int]] | None = None
               ) -> list[Sample]:
    """Continues each prompt (token ids, BOS included; none may be empty).

    Under jax.distributed every process calls this together with its own
    prompts (and their global sample_ids) and gets back those rows only.
    starts: each row's (constraint state, counter) after its prompt; default
    (constraint.initial_state, 0).
    """
    args, cache_len, lengths, rows = self._arguments(
        params, prompts, settings, seed, sample_ids, constraint, starts)
    with self._context():
      out = self._jitted(*args, cache_len=cache_len)
    held = {}
    for shard in out.addressable_shards:  # This process's rows, each whole.
      data = np.asarray(shard.data)
      for j, r in enumerate(range(*shard.index[0].indices(out.shape[0]))):
        held[r] = data[j]
    results = []
    for i, length in enumerate(lengths):
      new = held[rows[i]][length:length + settings.max_new_tokens]
      stop = np.flatnonzero(new == self.eos_id)
      ended = bool(len(stop))
      results.append(Sample(new[:stop[0]] if ended else new, ended,
                            int(length)))
    return results

  def lower(self, params, prompts: Sequence[Sequence[int]],
            settings: Settings, *, constraint: Constraint | None = None,
            starts: Sequence[tuple[int, int]] | None = None
            ) -> jax.stages.Lowered:
    """The jitted loop lowered for this call's bucket (to read its HLO)."""
    args, cache_len, _, _ = self._arguments(params, prompts, settings, 0,
                                            None, constraint, starts)
    with self._context():
      return self._jitted.lower(*args, cache_len=cache_len)

  def _arguments(self, params, prompts, settings, seed, sample_ids,
                 constraint, starts) -> tuple[tuple, int, np.ndarray, list]:
    """The jitted loop's arguments, its cache length, the prompt lengths and
    the global rows this process's prompts fill."""
    prompts = [np.asarray(x, np.int32).reshape(-1) for x in prompts]
    if any(not len(x) for x in prompts):
      raise ValueError("Sampler got an empty prompt; an unconditional sample "
                       "starts from [BOS].")
    vocab = self.model.config.vocab_size
    for i, x in enumerate(prompts):
      if x.min() < 0 or x.max() >= vocab:
        raise ValueError(f"Prompt {i} holds token ids outside [0, {vocab}); "
                         "was it encoded with this model's tokenizer?")
    n = len(prompts)
    sample_ids = np.arange(n) if sample_ids is None else np.asarray(
        sample_ids)
    if sample_ids.shape != (n,):
      raise ValueError(f"sample_ids has shape {sample_ids.shape}; give one "
                       f"id per prompt ({n}).")
    lengths = np.array([len(x) for x in prompts], np.int32)
    first = int(constraint.initial_state) if constraint is not None else 0
    if starts is None:
      starts = [(first, 0)] * n
    starts = np.asarray(starts, np.int32).reshape(-1, 2)
    if starts.shape != (n, 2):
      raise ValueError(f"starts has {len(starts)} entries; give one (state, "
                       f"count) per prompt ({n}).")
    most, longest = gather_ints([n, lengths.max(initial=0)]).max(axis=0)
    if not most:
      raise ValueError("Sampler needs at least one prompt (on some "
                       "process); an unconditional sample starts from [BOS].")
    b, p, cache_len = self.shapes(int(most) * self.feeds, int(longest),
                                  settings.max_new_tokens)
    rows = self.rows(b)[:n]  # Global rows; the rest of ours stay inactive.
    batch = np.full((b, p), self.pad_id, np.int32)
    for r, x in zip(rows, prompts):
      batch[r, :len(x)] = x
    def per_row(values, fill, dtype):
      out = np.full(b, fill, dtype)
      out[rows] = values
      return out
    # Each process fills only its own rows (the callback sees only those).
    put = lambda x, s: jax.make_array_from_callback(
        x.shape, s, lambda idx: x[idx])
    replicated = jax.sharding.NamedSharding(self.mesh,
                                            jax.sharding.PartitionSpec())
    if constraint is not None:  # Host tables, the same on every process.
      constraint = jax.tree.map(
          lambda x: put(np.asarray(x), replicated), constraint)
    args = (params, put(batch, self._batch_sharding),
            put(per_row(lengths, 1, np.int32), self._row_sharding),
            put(per_row(True, False, bool), self._row_sharding),
            put(per_row(sample_ids.astype(np.uint32), 0, np.uint32),
                self._row_sharding),
            put(per_row(starts[:, 0], first, np.int32), self._row_sharding),
            put(per_row(starts[:, 1], 0, np.int32), self._row_sharding),
            np.uint32(seed), np.int32(settings.max_new_tokens),
            np.float32(settings.temperature), np.int32(settings.top_k),
            np.float32(settings.top_p), np.int32(self.eos_id),
            np.int32(self.pad_id), constraint)
    return args, cache_len, lengths, rows


def share(num: int, index: int | None = None,
          count: int | None = None) -> range:
  """Process `index` of `count`'s contiguous share of `num` requests.

  [index*num//count, (index+1)*num//count); default: this process of all.
  Ids stay global (the share's start + i), so what a request draws does not
  depend on the number of processes.
  """
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return range(index * num // count, (index + 1) * num // count)


def gather_bytes(local: Sequence[bytes], num: int) -> list[bytes]:
  """Every process's `share(num)` byte strings, in global order (collective
  under jax.distributed; `local` itself in a single process)."""
  count = jax.process_count()
  if count == 1:
    return list(local)
  most = -(-num // count)
  lengths = np.zeros(most, np.int32)
  lengths[:len(local)] = [len(x) for x in local]
  width = max(1, int(gather_ints([lengths.max(initial=0)]).max()))
  padded = np.zeros((most, width), np.uint8)
  for j, x in enumerate(local):
    padded[j, :len(x)] = np.frombuffer(x, np.uint8)
  every, sizes = (np.asarray(x) for x in multihost_utils.process_allgather(
      (padded, lengths)))
  return [every[p, j, :sizes[p, j]].tobytes() for p in range(count)
          for j in range(len(share(num, p, count)))]


def gather_ints(values: Sequence[int]) -> np.ndarray:
  """int32 [processes, len(values)]: every process's values (collective
  under jax.distributed; no communication in a single process)."""
  values = np.asarray(values, np.int32)[None]
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values, tiled=True))
