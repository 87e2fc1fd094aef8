r"""The KV-cache sampler and the image sample command.

Sampler: prompts -> new tokens, jitted once per (batch, prompt length, cache
length) bucket. The right-padded prompts are prefilled in one forward pass
into a KV cache; then one token per row is drawn and fed back inside a
`lax.while_loop` until every row has emitted EOS or `max_new_tokens` is
reached. Each step masks the logits in this order: the constraint (if any),
temperature, top-k, top-p; temperature 0 is greedy. Settings, seed,
`max_new_tokens` and the EOS/PAD ids are traced values, so changing them
never recompiles. Params keep the shardings they were restored with (as
trained); prompts and outputs split over the mesh's batch axes.

Reproducibility: row b draws step i with the key
fold_in(fold_in(key(seed), sample_id[b]), i), so a sample depends on its
seed and global sample index, not on the batch it was drawn in or on the
number of processes.

Constraint hook: a per-row automaton state is carried through the loop; each
step keeps only `allowed[state_b]` and then moves to
`next_state[state_b, token_b]`. A grammar over JPEG bytes (a later issue)
plugs in here as a state x token table.

Images (`run`, `python -m codeclm.sample`, `--mode=sample` of codeclm.main):
unconditional samples from [BOS] and completions of image files whose prompt
is the first `ratio` of the MCU rows, decoded with the codec into .jpg / .png
files, a JSON report per sample and grids of prompt | completions | original:

  python -m codeclm.sample --workdir=/tmp/jpeg_demo \
      --sample.images=cat.png,dog.jpg --sample.ratios='(0.5,)'
  python -m codeclm.main --config=configs/jpeg_lm.py:demo \
      --workdir=/tmp/jpeg_demo --mode=sample --config.sample.num_samples=8

During training, `TensorBoardSampler` draws a grid of samples and completions
of held-out images every `config.sample.tb_every` steps.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

from absl import logging
import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from codeclm import config_base
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
class Constraint:
  """A token automaton: states x vocabulary tables, applied every step.

  allowed: bool [S, V]; a row in state s may only draw tokens allowed[s]
    (every state must allow at least one token).
  next_state: int32 [S, V]; the state after drawing a token.
  initial_state: int32 scalar; every row's state after its prompt.
  """
  allowed: jax.Array
  next_state: jax.Array
  initial_state: jax.Array

  @classmethod
  def create(cls, allowed, next_state, initial_state: int = 0) -> Constraint:
    allowed = np.asarray(allowed, bool)
    next_state = np.asarray(next_state, np.int32)
    if allowed.ndim != 2 or allowed.shape != next_state.shape:
      raise ValueError(
          f"Constraint tables must both be [states, vocab]; got allowed "
          f"{allowed.shape} and next_state {next_state.shape}.")
    if not allowed.any(axis=1).all():
      raise ValueError(
          "Constraint states "
          f"{np.flatnonzero(~allowed.any(axis=1)).tolist()[:10]} allow no "
          "token; every state must allow at least one.")
    s = allowed.shape[0]
    if next_state.min() < 0 or next_state.max() >= s or not (
        0 <= initial_state < s):
      raise ValueError(f"Constraint states must lie in [0, {s}); check "
                       "next_state and initial_state.")
    return cls(jnp.asarray(allowed), jnp.asarray(next_state),
               jnp.asarray(initial_state, jnp.int32))


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
  """One token per row of fp32 logits [B, V] with per-row keys [B]."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  keep = top_k_mask(scaled, top_k) & top_p_mask(scaled, top_p)
  scaled = jnp.where(keep, scaled, -jnp.inf)
  drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


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


def _generate(params, prompts, lengths, active, sample_ids, seed,
              max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
              constraint, *, model: llama.Llama, cache_len: int, cache_dtype,
              trace_counter: list[int]):
  """Prefill + decode loop; returns tokens [B, cache_len] (see _Loop)."""
  trace_counter.append(1)  # Runs once per compilation.
  b, p = prompts.shape
  apply = functools.partial(model.apply, {"params": params})
  cache = llama.init_cache(model.config, b, cache_len, cache_dtype)
  # No positions: every row from 0, the model's causal prefill fast path.
  logits, cache = apply(prompts, cache=cache)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
  tokens = jnp.full((b, cache_len), pad_id, jnp.int32)
  tokens = jax.lax.dynamic_update_slice(tokens, prompts, (0, 0))
  tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      jax.random.key(seed), sample_ids)
  state0 = jnp.zeros((b,), jnp.int32)
  if constraint is not None:
    state0 = state0 + constraint.initial_state
  rows = jnp.arange(b)

  def cond(s: _Loop):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: _Loop) -> _Loop:
    logits = s.logits
    if constraint is not None:
      logits = jnp.where(constraint.allowed[s.state], logits, -jnp.inf)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, s.step)
    token = choose(logits, keys, temperature, top_k, top_p)
    token = jnp.where(s.done, pad_id, token)
    pos = lengths + s.step
    state = s.state
    if constraint is not None:
      state = jnp.where(s.done, state, constraint.next_state[state, token])
    new_logits, cache = apply(token[:, None], pos[:, None], cache=s.cache)
    return _Loop(step=s.step + 1, tokens=s.tokens.at[rows, pos].set(token),
                 logits=new_logits[:, 0], cache=cache,
                 done=s.done | (token == eos_id), state=state)

  init = _Loop(step=jnp.zeros((), jnp.int32), tokens=tokens, logits=last[:, 0],
               cache=cache, done=~active, state=state0)
  return jax.lax.while_loop(cond, body, init).tokens


@functools.lru_cache(maxsize=16)
def _loop_for(model: llama.Llama, mesh: jax.sharding.Mesh, rules: tuple,
              cache_dtype) -> tuple[Any, list[int]]:
  """The jitted loop and its trace log, shared by equal Samplers.

  A Sampler re-created for the same model, mesh, rules and cache dtype (a
  notebook cell run again, a second command in one process) reuses the
  compiled buckets. The rules are part of the key because flax reads them
  at trace time and jit's own cache does not see them.
  """
  del mesh, rules  # Keys only: the caller traces under them.
  traces: list[int] = []
  fn = jax.jit(functools.partial(_generate, model=model,
                                 cache_dtype=cache_dtype,
                                 trace_counter=traces),
               static_argnames=("cache_len",))
  return fn, traces


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

  Params are used where they lie (restore them with the training shardings,
  see `load`); prompts and outputs are split over the mesh's batch axes by
  the logical rules. Batches are padded to a power of two (a multiple of the
  data-parallel size); prompts to a power of two >= `min_bucket`; the cache
  to a power of two >= prompt + max_new_tokens, capped at the model's max_len.
  Settings, seed, EOS and PAD are traced, so only a new bucket compiles;
  `num_compilations` counts the traces.
  """

  def __init__(self, model: llama.Llama, *, eos_id: int, pad_id: int,
               mesh: jax.sharding.Mesh | None = None,
               rules: Sequence = sharding.DEFAULT_RULES,
               cache_dtype=jnp.bfloat16, min_bucket: int = 64):
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
    batch_axes = spec[0] if isinstance(spec[0], tuple) else (
        () if spec[0] is None else (spec[0],))
    self.batch_multiple = math.prod(self.mesh.shape[a] for a in batch_axes)
    self._jitted, self._traces = _loop_for(model, self.mesh, self.rules,
                                           self.cache_dtype)

  @property
  def num_compilations(self) -> int:
    """Traces of the jitted loop (shared by equal Samplers, see _loop_for)."""
    return len(self._traces)

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
    cache_len = min(bucket(longest_prompt + max_new_tokens, self.min_bucket),
                    max_len)
    return b, min(bucket(longest_prompt, self.min_bucket), cache_len), cache_len

  def __call__(self, params, prompts: Sequence[Sequence[int]],
               settings: Settings, *, seed: int = 0,
               sample_ids: Sequence[int] | None = None,
               constraint: Constraint | None = None) -> list[Sample]:
    """Continues each prompt (token ids, BOS included; none may be empty)."""
    prompts = [np.asarray(x, np.int32).reshape(-1) for x in prompts]
    if not prompts or any(not len(x) for x in prompts):
      raise ValueError("Sampler needs at least one prompt and no empty one; "
                       "an unconditional sample starts from [BOS].")
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
    b, p, cache_len = self.shapes(n, int(lengths.max()),
                                  settings.max_new_tokens)
    batch = np.full((b, p), self.pad_id, np.int32)
    for i, x in enumerate(prompts):
      batch[i, :len(x)] = x
    rows = lambda x: np.concatenate([x, np.ones(b - n, x.dtype)])
    put = lambda x, s: jax.make_array_from_callback(
        x.shape, s, lambda idx: x[idx])
    with self._context():
      out = self._jitted(
          params, put(batch, self._batch_sharding),
          put(rows(lengths), self._row_sharding),
          put(np.arange(b) < n, self._row_sharding),
          put(rows(sample_ids.astype(np.uint32)), self._row_sharding),
          np.uint32(seed), np.int32(settings.max_new_tokens),
          np.float32(settings.temperature), np.int32(settings.top_k),
          np.float32(settings.top_p), np.int32(self.eos_id),
          np.int32(self.pad_id), constraint, cache_len=cache_len)
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    results = []
    for i, length in enumerate(lengths):
      new = out[i, length:length + settings.max_new_tokens]
      stop = np.flatnonzero(new == self.eos_id)
      ended = bool(len(stop))
      results.append(Sample(new[:stop[0]] if ended else new, ended,
                            int(length)))
    return results


# -- loading a workdir ---------------------------------------------------------


def _tuples(x):
  """JSON lists back to the tuples configs hold (mesh rules and shapes)."""
  return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass
class Loaded:
  """A trained model ready to sample, with what decodes its output."""
  config: ml_collections.ConfigDict
  model: llama.Llama
  params: Any
  tokenizer: Any
  codec: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  step: int


def load(workdir: str, step: int | None = None,
         mesh_shape: Sequence[int] | None = None) -> Loaded:
  """A workdir's config, tokenizer, codec and params (latest or `step`).

  Params are restored with the training rules onto `mesh_shape` (default: the
  training config's mesh.shape over this machine's devices; a shape without
  -1 takes the first devices it needs, so (1, 1, 1) samples on one device).
  """
  from codeclm import checkpoint  # pylint: disable=g-import-not-at-top
  from codeclm import codecs  # pylint: disable=g-import-not-at-top
  from codeclm.tokenizer import ByteBPE  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  for name in checkpoint.RUN_FILES:
    if not os.path.exists(os.path.join(workdir, name)):
      raise FileNotFoundError(
          f"{workdir} has no {name}: point --workdir at a training workdir "
          "(config.json, tokenizer.json, manifest.json and checkpoints/).")
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(workdir, "manifest.json")) as f:
    manifest = json.load(f)
  tokenizer = ByteBPE.load(os.path.join(workdir, "tokenizer.json"))
  codec = codecs.from_settings(manifest["codec"])
  codecs.warn_on_version_differences(manifest["codec"], codec,
                                     os.path.join(workdir, "manifest.json"))
  stored = manifest.get("header_b64")  # Codecs that strip headers store one.
  if stored and base64.b64decode(stored) != codec.header():
    logging.warning(
        "The codec header this Pillow/libjpeg makes differs from the one the "
        "training data used (manifest.json: %s); decoded samples may show "
        "wrong colours or blocks. Install the versions named there.",
        manifest["codec"])
  rules = _tuples(config.mesh.rules)
  shape = _tuples(mesh_shape or config.mesh.shape)
  # A shape without -1 may use fewer devices than there are (e.g. (1, 1, 1)).
  devices = None if -1 in shape else jax.devices()[:math.prod(shape)]
  mesh = sharding.make_mesh(shape, devices)
  model = llama.Llama(config_base.model_config(config, tokenizer.vocab_size))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))
  shardings = sharding.logical_shardings(boxed["params"], mesh, rules)
  abstract = checkpoint.abstract_with_shardings(
      nn.meta.unbox(boxed["params"]), shardings)
  params, step = checkpoint.restore_workdir_params(workdir, abstract, step)
  return Loaded(config, model, params, tokenizer, codec, mesh, rules, step)


# -- images --------------------------------------------------------------------


def settings_of(sample_cfg, max_new_tokens: int) -> Settings:
  return Settings(temperature=sample_cfg.temperature, top_k=sample_cfg.top_k,
                  top_p=sample_cfg.top_p, max_new_tokens=max_new_tokens)


def sampler_of(sample_cfg, model, tokenizer, mesh, rules) -> Sampler:
  return Sampler(model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                 mesh=mesh, rules=rules, cache_dtype=sample_cfg.cache_dtype,
                 min_bucket=sample_cfg.min_bucket)


@dataclasses.dataclass
class Request:
  """One sample to draw: a prompt (codec bytes; b"" = unconditional)."""
  name: str                # file name stem of its outputs
  prompt: bytes = b""
  ratio: float = 0.0
  image: str = ""          # name of the image completed
  source: str = ""         # where that image came from


@dataclasses.dataclass
class Result:
  request: Request
  data: bytes              # prompt + generated codec bytes
  pixels: np.ndarray
  report: Any              # the codec's DecodeReport
  sample: Sample


def draw(sampler: Sampler, params, tokenizer, codec,
         requests: Sequence[Request], settings: Settings, *, seed: int,
         batch_size: int, first_id: int = 0) -> list[Result]:
  """Samples every request (in batches) and decodes the bytes to pixels.

  Request i uses sample id first_id + i, so results do not depend on
  batch_size. settings.max_new_tokens is lowered where a prompt would not
  fit the model's max_len.
  """
  prompts = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(r.prompt)])
             .astype(np.int32) for r in requests]
  longest = max(len(x) for x in prompts)
  room = sampler.model.config.max_len - longest
  if room < 1:
    raise ValueError(f"A prompt of {longest} tokens leaves no room in the "
                     f"model's max_len={sampler.model.config.max_len}; use a "
                     "smaller prompt ratio.")
  settings = dataclasses.replace(
      settings, max_new_tokens=min(settings.max_new_tokens, room))
  results = []
  for start in range(0, len(requests), batch_size):
    chunk = slice(start, start + batch_size)
    samples = sampler(params, prompts[chunk], settings, seed=seed,
                      sample_ids=np.arange(len(requests))[chunk] + first_id)
    for request, sample in zip(requests[chunk], samples):
      data = request.prompt + tokenizer.decode(sample.tokens)
      pixels, report = codec.decode(data)
      results.append(Result(request, data, pixels, report, sample))
  return results


def _grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
  """Images laid out in rows (all the same size), white gaps between.

  Wide images (a video's frame strip) go one per row instead, in order.
  """
  h, w = rows[0][0].shape[:2]
  if w > 2 * h:
    rows = [[image] for row in rows for image in row]
  cols = max(len(r) for r in rows)
  out = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255,
                np.uint8)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = (
          image)
  return out


def completion_requests(codec, images, ratios: Sequence[float],
                        per_prompt: int) -> tuple[list[Request], dict]:
  """Requests for `per_prompt` completions of each image at each ratio.

  images: file paths (named by their base names) or {name: image} with any
  image the codec loads (a path, PIL image, array or file bytes). Returns the
  requests and {name: the image's canonical codec bytes}.
  """
  if not isinstance(images, dict):
    named = {}
    for path in images:
      name = os.path.splitext(os.path.basename(path))[0]
      named[name if name not in named else f"{name}_{len(named)}"] = path
    images = named
  requests, originals = [], {}
  for name, image in images.items():
    full = codec.encode(image)
    originals[name] = full
    source = image if isinstance(image, (str, os.PathLike)) else name
    for ratio in ratios:
      prompt = codec.prompt(full, ratio)
      for j in range(per_prompt):
        requests.append(Request(f"{name}_r{round(ratio * 100):02d}_{j}",
                                prompt, ratio, name, os.fspath(source)))
  return requests, originals


def completion_grid(codec, results: Sequence[Result],
                    original: bytes) -> np.ndarray:
  """One row per ratio: prompt | completions | original (codec previews)."""
  by_ratio: dict[float, list[Result]] = {}
  for r in results:
    by_ratio.setdefault(r.request.ratio, []).append(r)
  picture = _preview(codec, original)
  rows = []
  for _, group in sorted(by_ratio.items()):
    rows.append([_preview(codec, group[0].request.prompt)]
                + [codec.preview(r.pixels) for r in group] + [picture])
  return _grid(rows)


def _preview(codec, data: bytes) -> np.ndarray:
  return codec.preview(codec.decode(data)[0])


def _write(out_dir: str, result: Result, codec, info: dict) -> None:
  """The codec's files for <name> (e.g. .jpg and .png) and <name>.json."""
  name = os.path.join(out_dir, result.request.name)
  files = codec.save(name, result.data)
  with open(name + ".json", "w") as f:
    json.dump(dict(info, name=result.request.name, image=result.request.image,
                   source=result.request.source, ratio=result.request.ratio,
                   prompt_tokens=result.sample.prompt_len,
                   new_tokens=len(result.sample.tokens),
                   ended_with_eos=result.sample.ended, bytes=len(result.data),
                   files=[os.path.basename(x) for x in files],
                   report=result.report.to_dict()), f, indent=1)


def run(sample_cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """The sample command: writes samples, completions and grids; returns a
  summary {out_dir, step, samples: {name: decode report dict}}."""
  loaded = load(workdir, sample_cfg.step or None,
                sample_cfg.mesh_shape or None)
  out_dir = sample_cfg.out_dir or os.path.join(
      workdir, "samples", f"step_{loaded.step}")
  os.makedirs(out_dir, exist_ok=True)
  sampler = sampler_of(sample_cfg, loaded.model, loaded.tokenizer,
                       loaded.mesh, loaded.rules)
  max_new = sample_cfg.max_new_tokens or loaded.model.config.max_len
  settings = settings_of(sample_cfg, max_new)
  info = dict(step=loaded.step, seed=sample_cfg.seed,
              settings=dataclasses.asdict(settings))
  draw_ = functools.partial(draw, sampler, loaded.params, loaded.tokenizer,
                            loaded.codec, seed=sample_cfg.seed,
                            batch_size=sample_cfg.batch_size)
  codec, summary = loaded.codec, {}
  write = jax.process_index() == 0

  requests = [Request(f"sample_{i:04d}")
              for i in range(sample_cfg.num_samples)]
  if requests:
    results = draw_(requests, settings)
    if write:
      for r in results:
        _write(out_dir, r, codec, info)
      cols = math.ceil(math.sqrt(len(results)))
      pics = [codec.preview(r.pixels) for r in results]
      Image.fromarray(_grid([pics[i:i + cols] for i in range(
          0, len(pics), cols)])).save(os.path.join(out_dir, "samples.png"))
    summary.update({r.request.name: r.report.to_dict() for r in results})

  images = [x for x in sample_cfg.images.split(",") if x]
  if images:
    requests, originals = completion_requests(
        codec, images, sample_cfg.ratios, sample_cfg.completions)
    # Ids after the unconditional ones: each sample has its own stream.
    results = draw_(requests, settings, first_id=sample_cfg.num_samples)
    for name, original in originals.items():
      mine = [r for r in results if r.request.image == name]
      if write:
        for r in mine:
          _write(out_dir, r, codec, info)
        codec.save(os.path.join(out_dir, f"{name}_original"), original)
        Image.fromarray(completion_grid(codec, mine, original)).save(
            os.path.join(out_dir, f"{name}_grid.png"))
      summary.update({r.request.name: r.report.to_dict() for r in mine})
  logging.info("Wrote %d samples to %s.", len(summary), out_dir)
  return dict(out_dir=out_dir, step=loaded.step, samples=summary)


# -- TensorBoard during training -----------------------------------------------


def eval_examples(data_dir: str, count: int) -> list[bytes]:
  """The first `count` held-out codec byte strings of prepared data."""
  import grain  # pylint: disable=g-import-not-at-top
  from codeclm.data import prepare  # pylint: disable=g-import-not-at-top
  manifest = prepare.load_manifest(data_dir)
  paths = prepare.shard_paths(data_dir, manifest, "eval")
  if not paths:
    return []
  source = grain.sources.ArrayRecordDataSource(paths)
  return [bytes(source[i]) for i in range(min(count, len(source)))]


class TensorBoardSampler:
  """Image grids of samples for the trainer's writer, every tb_every steps.

  Built once (the sampler compiles on the first call and is reused):

    tb = sample.TensorBoardSampler(config, setup.model, setup.mesh,
                                   setup.rules, tokenizer, codec, data_dir)
    ...
    if tb.due(step):
      writer.write_images(step, tb(state.params))

  The sampler enters the mesh and rules itself. A call returns
  {"samples/unconditional": [1, H, W, 3] uint8, "samples/completions":
  [1, H, W, 3] uint8 (rows: held-out images; columns: prompt | completions |
  original)}, with the same seed every time, so the grids show training
  progress on fixed prompts.
  """

  def __init__(self, config, model, mesh, rules, tokenizer, codec,
               data_dir: str):
    self.cfg = config.sample
    self.tokenizer, self.codec = tokenizer, codec
    self.sampler = sampler_of(self.cfg, model, tokenizer, mesh, rules)
    # Held-out examples whose prompt leaves room to generate in max_len (a
    # long video's 10-frame prompt may not): skipped with a warning rather
    # than stopping training.
    self.originals = []
    for original in eval_examples(data_dir, self.cfg.tb_images):
      prompt = codec.prompt(original, self.cfg.tb_ratio)
      if len(tokenizer.encode(prompt)) + 2 < model.config.max_len:
        self.originals.append(original)
      else:
        logging.warning(
            "TensorBoard samples skip a held-out example: its prompt "
            "(tb_ratio=%s) does not leave room in seq_len=%d.",
            self.cfg.tb_ratio, model.config.max_len)
    self.settings = settings_of(self.cfg, self.cfg.max_new_tokens
                                or model.config.max_len)

  def due(self, step: int) -> bool:
    return bool(self.cfg.tb_every) and step % self.cfg.tb_every == 0

  def __call__(self, params) -> dict[str, np.ndarray]:
    draw_ = functools.partial(draw, self.sampler, params, self.tokenizer,
                              self.codec, seed=self.cfg.seed,
                              batch_size=self.cfg.batch_size)
    n = self.cfg.tb_samples
    out = {}
    if n:
      results = draw_([Request(f"s{i}") for i in range(n)], self.settings)
      out["samples/unconditional"] = _grid(
          [[self.codec.preview(r.pixels) for r in results]])
    if self.originals:
      per = self.cfg.completions
      prompts = [self.codec.prompt(o, self.cfg.tb_ratio)
                 for o in self.originals]
      requests = [Request(f"e{i}_{j}", prompt, self.cfg.tb_ratio)
                  for i, prompt in enumerate(prompts) for j in range(per)]
      results = draw_(requests, self.settings, first_id=n)
      rows = [[_preview(self.codec, prompt)]
              + [self.codec.preview(r.pixels)
                 for r in results[i * per:(i + 1) * per]]
              + [_preview(self.codec, original)]
              for i, (prompt, original) in enumerate(zip(prompts,
                                                         self.originals))]
      out["samples/completions"] = _grid(rows)
    return {name: grid[None] for name, grid in out.items()}


# -- command line --------------------------------------------------------------


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  summary = run(_SAMPLE.value, _WORKDIR.value)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from codeclm import config_base  # pylint: disable=g-import-not-at-top
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
  # Any size's sample section: only tb_* (unused here) differ by size.
  _SAMPLE = config_flags.DEFINE_config_dict(
      "sample", config_base.lm_config("100m").sample, lock_config=True)
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
