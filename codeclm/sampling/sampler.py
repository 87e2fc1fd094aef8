r"""The KV-cache sampler: token prompts -> new tokens.

Jitted once per (batch, prompt length, cache length) bucket
(decode_loop.py): the prompts are prefilled into a KV cache, then one token
per row is drawn and fed back until every row has emitted EOS or
`max_new_tokens` is reached, masked by the constraint (if any, see
constraint.py), temperature, top-k and top-p; temperature 0 is greedy.
Settings, seed, `max_new_tokens` and the EOS/PAD ids are traced values, so
changing them never recompiles. Prompts and outputs split over the mesh's
batch axes.

Several processes (jax.distributed): a call is collective. Each process
passes its own prompts (any number, none included) and gets back its own
rows; the global batch is assembled from the rows each process's devices
hold, so no process needs another's prompts or outputs (hosts.py). The
processes agree on the shapes (most rows, longest prompt) with one small
all-gather; a process with fewer prompts fills its rows with inactive
padding. `chunks` gives every process the same number of calls.

Classifier-free guidance: given `unconditional` prompts (one per prompt,
e.g. the same bytes after "no class" instead of the class token) and a
`guidance` scale, a call doubles its batch into pairs of rows that mix their
logits every step (decode_loop.Guidance) and returns the pairs' shared
tokens, one Sample per prompt.

A constraint's tables (the JPEG grammar's: tens of MB) go to the mesh's
devices once per Sampler, on the first call that passes that constraint
object (`place`); later calls reuse the device copies, so a call moves only
its own prompts, rows and settings to the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codeclm.model import llama
from codeclm.model import sharding
from codeclm.runtime import distributed
from codeclm.sampling import constraint as constraint_lib
from codeclm.sampling import decode_loop
from codeclm.sampling import hosts


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


def bucket(n: int, minimum: int) -> int:
  """The next power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# reshard_params="auto": the largest share of a device's memory the
# replicated decode copy may take; the KV cache and activations need the rest.
MAX_COPY_FRACTION = 0.5


def choose_reshard(setting, model: llama.Llama, mesh: jax.sharding.Mesh,
                   rules: Sequence, *, memory: int | None,
                   max_fraction: float = MAX_COPY_FRACTION
                   ) -> tuple[bool, str]:
  """(reshard_params, why): True/False (or their text) as given; "auto"
  replicates the weights for decoding (no gathers per token) unless that
  copy would take over `max_fraction` of `memory`, a device's bytes (None,
  as on CPU: unknown, so replicate), where it keeps them sharded as trained
  (a decode step gathers them layer by layer) rather than run out of memory.
  """
  text = str(setting).strip().lower()
  if text not in ("auto", "true", "false"):
    raise ValueError(f"sample.reshard_params={setting!r}: use True, False "
                     "or 'auto'.")
  if text != "auto":
    return text == "true", f"reshard_params={setting!r} as given"
  if memory is None:
    return True, "auto: device memory unknown, weights replicated"
  need = decode_loop.copy_bytes(model, mesh, rules)
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  if need <= max_fraction * memory:
    return True, (f"auto: the replicated {model.config.dtype} copy of the "
                  f"weights takes {gib(need)} per device, within "
                  f"{max_fraction:g} of its {gib(memory)}")
  return False, (f"auto: a replicated {model.config.dtype} copy of the "
                 f"weights would take {gib(need)} per device, over "
                 f"{max_fraction:g} of its {gib(memory)}, so they stay "
                 "sharded as trained and each decode step gathers them "
                 "layer by layer (sample.reshard_params=True forces the copy)")


@dataclasses.dataclass(frozen=True)
class Sample:
  """One row's result: new tokens (EOS and padding dropped)."""
  tokens: np.ndarray
  ended: bool              # drew EOS (else stopped at max_new_tokens)
  prompt_len: int


class Sampler:
  """Draws continuations of token prompts with a model on a mesh.

  Params may come in any layout (e.g. restored with the training shardings,
  see `load`); each call lays them out for decoding first (decode_loop.py)
  unless reshard_params=False ("auto": unless that copy would take over
  max_copy_fraction of a device, see `choose_reshard`), and then splits
  scanned layers to run them unrolled unless unroll_layers=False. Prompts
  and outputs are split over the mesh's batch axes by the logical rules.
  Batches are padded to a power of two (a multiple of the data-parallel
  size); prompts to a power of two >= `min_bucket`; the cache
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
               reshard_params: bool | str = "auto",
               unroll_layers: bool = True,
               max_copy_fraction: float = MAX_COPY_FRACTION):
    self.model = model
    self.eos_id, self.pad_id = int(eos_id), int(pad_id)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(
        (-1,) + (1,) * (len(sharding.MESH_AXES) - 1), jax.devices()[:1])
    self.rules = tuple(rules)
    self.cache_dtype = jnp.dtype(cache_dtype)
    self.min_bucket = int(min_bucket)
    with self._context():
      spec = nn.logical_to_mesh_axes(("batch", "length"), self.rules)
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, spec)
    self._row_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(spec[0]))
    self.batch_multiple = math.prod(
        self.mesh.shape[a] for a in sharding.batch_axes(self.rules))
    # Processes the batch is split over (1 in a single-process run).
    self.feeds = self.batch_multiple // len(self.rows(self.batch_multiple))
    self._replicated = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec())
    # id -> (constraint, its tables on the mesh), most recent last (`place`).
    self._placed: dict[int, tuple] = {}
    # The layout decoding uses: the replicated copy, or the weights as given.
    self.reshard_params, why = choose_reshard(
        reshard_params, model, self.mesh, self.rules,
        memory=sharding.device_memory(self.mesh),
        max_fraction=max_copy_fraction)
    if not self.reshard_params and str(reshard_params).lower() == "auto":
      logging.info("Sampler: %s.", why)
    self._jitted, self._traces, self._prepare = decode_loop.loop_for(
        model, self.mesh, self.rules, self.cache_dtype, self.reshard_params,
        bool(unroll_layers))

  @property
  def num_compilations(self) -> int:
    """Traces of the jitted loop (shared by equal Samplers, see loop_for)."""
    return len(self._traces)

  def prepare(self, params) -> decode_loop.DecodeParams:
    """`params` laid out for decoding, once (see DecodeParams); pass the
    result to every call instead of `params`. Peak memory is what a call
    given plain params needs anyway (it makes the same copy inside)."""
    if isinstance(params, decode_loop.DecodeParams):
      return params
    if not self.reshard_params:  # Nothing to lay out: no copy either.
      return decode_loop.DecodeParams(params, self.model)
    with self._context():
      return self._prepare(params)

  # Constraints whose tables stay on the devices (a grammar per codec setting;
  # more are placed again when used again).
  _MAX_PLACED = 4

  def place(self, constraint: constraint_lib.Constraint
            ) -> constraint_lib.Constraint:
    """`constraint` with its tables on this Sampler's devices, replicated.

    Made once per constraint object and kept (it is held, so its id cannot
    be reused); every call given the same object reuses these arrays
    instead of moving the tables to the devices again. On a mesh of this
    process's devices the tables are copied from where they are (a grammar
    builds them on a device); on a mesh across processes each process puts
    its own copy of the (identical) host tables into its shards.
    """
    hit = self._placed.pop(id(constraint), None)
    if hit is None or hit[0] is not constraint:
      where = self._replicated
      if where.is_fully_addressable:
        place = lambda x: jax.device_put(x, where)
      else:
        place = lambda x: hosts.put(np.asarray(x), where)
      hit = (constraint, jax.tree.map(place, constraint))
      while len(self._placed) >= self._MAX_PLACED:
        self._placed.pop(next(iter(self._placed)))
    self._placed[id(constraint)] = hit
    return hit[1]

  def rows(self, batch: int) -> list[int]:
    """The rows of a `batch`-row global batch this process's devices hold.

    Processes that hold the same rows (a tensor axis across hosts) must pass
    the same prompts; `check_split` refuses such a mesh where they do not.
    """
    owners = hosts.owners(self._row_sharding, batch)
    mine = sorted(r for r, who in owners.items()
                  if jax.process_index() in who)
    if not mine:
      raise ValueError(
          f"The sampler's mesh {dict(self.mesh.shape)} holds no device of "
          f"process {jax.process_index()}; under jax.distributed give a mesh "
          "over every process's devices (a mesh_shape with -1).")
    return mine

  def check_split(self) -> None:
    """Raises unless each row sits on one process's devices, as processes
    that each pass their own share of the requests need (`hosts.share`)."""
    owners = hosts.owners(self._row_sharding, self.batch_multiple)
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
    most = int(distributed.gather_ints([num_rows])[:, 0].max())
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
               constraint: constraint_lib.Constraint | None = None,
               starts: Sequence[tuple[int, int]] | None = None,
               unconditional: Sequence[Sequence[int]] | None = None,
               guidance: float = 1.0) -> list[Sample]:
    """Continues each prompt (token ids, BOS included; none may be empty).

    Under jax.distributed every process calls this together with its own
    prompts (and their global sample_ids) and gets back those rows only.
    starts: each row's (constraint state, counter) after its prompt; default
    (constraint.initial_state, 0). unconditional: a prompt per prompt for
    classifier-free guidance at scale `guidance` (None: no guidance); every
    process passes them or none does.
    """
    args, cache_len, lengths, rows = self._arguments(
        params, prompts, settings, seed, sample_ids, constraint, starts,
        unconditional, guidance)
    with self._context():
      out = self._jitted(*args, cache_len=cache_len)
    held = hosts.local_rows(out)  # This process's rows, each whole.
    results = []
    pairs = 2 if unconditional is not None else 1  # Keep the class rows.
    for i, length in list(enumerate(lengths))[::pairs]:
      new = held[rows[i]][length:length + settings.max_new_tokens]
      stop = np.flatnonzero(new == self.eos_id)
      ended = bool(len(stop))
      results.append(Sample(new[:stop[0]] if ended else new, ended,
                            int(length)))
    return results

  def lower(self, params, prompts: Sequence[Sequence[int]],
            settings: Settings, *,
            constraint: constraint_lib.Constraint | None = None,
            starts: Sequence[tuple[int, int]] | None = None,
            unconditional: Sequence[Sequence[int]] | None = None,
            guidance: float = 1.0) -> jax.stages.Lowered:
    """The jitted loop lowered for this call's bucket (to read its HLO)."""
    args, cache_len, _, _ = self._arguments(params, prompts, settings, 0,
                                            None, constraint, starts,
                                            unconditional, guidance)
    with self._context():
      return self._jitted.lower(*args, cache_len=cache_len)

  def _arguments(self, params, prompts, settings, seed, sample_ids,
                 constraint, starts, unconditional=None, guidance=1.0
                 ) -> tuple[tuple, int, np.ndarray, list]:
    """The jitted loop's arguments, its cache length, the prompt lengths and
    the global rows this process's prompts fill (with guidance: pairs of
    rows, the class prompt first)."""
    prompts = [np.asarray(x, np.int32).reshape(-1) for x in prompts]
    if unconditional is not None:
      if len(unconditional) != len(prompts):
        raise ValueError(f"Got {len(unconditional)} unconditional prompts "
                         f"for {len(prompts)} prompts; give one each.")
      n = len(prompts)
      sample_ids = np.arange(n) if sample_ids is None else np.asarray(
          sample_ids)
      if starts is not None:
        starts = np.repeat(np.asarray(starts, np.int32).reshape(-1, 2), 2,
                           axis=0)
      sample_ids = np.repeat(sample_ids, 2)  # A pair draws the same tokens.
      prompts = [np.asarray(x, np.int32).reshape(-1) for pair in zip(
          prompts, unconditional) for x in pair]
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
    every = distributed.gather_ints([n, lengths.max(initial=0)])
    most, longest = every.max(axis=0)
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
    guided = None
    if unconditional is not None:
      mine = np.asarray(rows)
      partner = np.arange(b, dtype=np.int32)  # Unpaired rows: themselves.
      partner[mine[0::2]], partner[mine[1::2]] = mine[1::2], mine[0::2]
      guided = decode_loop.Guidance(
          partner=hosts.put(partner, self._row_sharding),
          conditional=hosts.put(per_row(np.arange(len(rows)) % 2 == 0, True,
                                        bool), self._row_sharding),
          scale=hosts.put(np.asarray(guidance, np.float32),
                          self._replicated))
    # What moves to the devices per call, all of it here (explicitly, so a
    # transfer guard sees nothing else move): each process fills only its
    # own rows; the settings are replicated. The constraint's tables were
    # put once (`place`).
    put = hosts.put
    scalar = lambda value, dtype: put(np.asarray(value, dtype),
                                      self._replicated)
    if constraint is not None:
      constraint = self.place(constraint)
    args = (params, put(batch, self._batch_sharding),
            put(per_row(lengths, 1, np.int32), self._row_sharding),
            put(per_row(True, False, bool), self._row_sharding),
            put(per_row(sample_ids.astype(np.uint32), 0, np.uint32),
                self._row_sharding),
            put(per_row(starts[:, 0], first, np.int32), self._row_sharding),
            put(per_row(starts[:, 1], 0, np.int32), self._row_sharding),
            scalar(seed, np.uint32), scalar(settings.max_new_tokens, np.int32),
            scalar(settings.temperature, np.float32),
            scalar(settings.top_k, np.int32),
            scalar(settings.top_p, np.float32), scalar(self.eos_id, np.int32),
            scalar(self.pad_id, np.int32), constraint, guided)
    return args, cache_len, lengths, rows

