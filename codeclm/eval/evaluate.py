r"""Sharded FID evaluation of a checkpoint (the Jpeg-LM protocol).

Protocol (Han et al., 2024): for each of N reference images, the prompt is
the first `ratio` of its MCU rows (`codec.prompt`) and the model completes
it; FID is computed between the completions and the reference images, per
ratio (ImageNet: 5,000 validation images, ratios 0.25/0.5/0.75; FFHQ: 1,000
images, 0.375/0.4375/0.5). Unconditional samples (from [BOS] alone, N of
them) are scored against the same references. Every (ratio, seed) is
sampled with each seed of `eval.seeds`; results.json reports FID per seed
and its mean and (population, ddof=0) std over seeds, with the decode report:
the mean share of clean MCUs and the fraction of samples that ended with EOS.
A prompt that fills the model's max_len is scored as the prompt alone
(no_room_fraction counts these) rather than dropped or failing the job.

Reference images are what the model was trained to reproduce before JPEG
loss: `codec.load` (centre crop, LANCZOS resize to the codec size), uint8
RGB. FID sees them and the decoded samples through the Inception's own
conversion (bilinear resize to 299x299, see codeclm/eval/inception.py).

Downscaled variant (`eval.downscale=True`): references are halved
(`PIL.Image.reduce(2)`, a 2x2 box average) and pasted in the top-left corner
of a black canvas of the codec's size; the model's prompt is cut from that
canvas, at `ratio` of the *active* rows (the top half of the canvas), and
FID sees only the active top-left quarter of references and samples alike.

Work and sharding: item (seed, slot, i) for slot = a ratio or "uncond" and
reference index i. Its sampler id is round(ratio * 1e4) * 2**18 + i (uncond:
code 0), so a sample depends only on the seed, the ratio and the index: not
on the number of processes, the batch size, or which other ratios or seeds
are evaluated. Process p of n takes the contiguous indices
[p*N//n, (p+1)*N//n) for every seed and slot and writes
`<out_dir>/slices/slice_{p:05d}_of_{n:05d}.npz` (Inception features of its
references and samples, per-sample decode reports and image digests) and
then its `.json` (indices, settings, summary); the .json's presence marks a
slice done, and a rerun skips slices whose settings match. Whichever process
finds every slice present merges: `merge` checks that the slices cover each
index exactly once, computes FID and writes `results.json` (with the
reproducibility record) and TensorBoard scalars in <workdir>/eval.

Every sampled row gets max_new_tokens = min(M, max_len - prompt length),
with M = config.sample.max_new_tokens, or when 0, max_len - ceil(ratio *
max_len) (uncond: max_len - 1); rows sharing a budget are batched together,
so the budget of a row never depends on its batch.

Two ways to run the slices, with the same numbers:
- One jax.distributed job (config.distributed.initialize=True; a model
  sharded over hosts needs it): process p of n writes slice p of n. The
  sampler is one collective over every host: each process feeds its own
  references into the global batch and keeps its own rows. The processes
  all sample or all skip (a rerun redoes every slice unless all are done);
  process 0 merges once all have written, so out_dir must be shared
  (gs://, NFS).
- Independent JAX jobs (one per host or GPU, no jax.distributed), each with
  its own mesh (eval.mesh_shape) and eval.process_index/process_count.

  # Demo: the synthetic held-out images of a CPU demo run.
  python -m codeclm.main --config=configs/jpeg_lm.py:demo \
      --workdir=/tmp/jpeg_demo --mode=eval \
      --config.eval.inception_weights=fid_inception.npz
  # One job over every host of a pod (launch/tpu_pod.sh runs this on each):
  python -m codeclm.main --config=configs/jpeg_lm.py:1b --workdir=gs://b/run \
      --mode=eval --config.distributed.initialize=True \
      --config.eval.inception_weights=fid_inception.npz
  # ImageNet (5,000 validation images), 8 hosts: one job per host, then
  # (if no job found all slices) a merge.
  python -m codeclm.eval.evaluate --config=configs/jpeg_lm.py:1b --workdir=DIR \
      --config.eval.inception_weights=fid_inception.npz \
      --config.eval.process_index=$HOST --config.eval.process_count=8
  python -m codeclm.eval.evaluate --config=configs/jpeg_lm.py:1b --workdir=DIR \
      --merge_only
  # FFHQ (1,000 images) from a folder.
  ... --config.eval.source=folder:/data/ffhq --config.eval.num_examples=1000 \
      --config.eval.ratios='(0.375,0.4375,0.5)'

Video (AVC) checkpoints are not supported yet: `run` raises
NotImplementedError for a codec other than JPEG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from codeclm.data import prepare
from codeclm.data import sources
from codeclm.data.sources import DataError
from codeclm.eval import fid
from codeclm.eval import inception
from codeclm.runtime import storage
from codeclm.sampling import sampler as sampler_lib
from codeclm.sampling import workdir as workdir_lib

UNCOND = "uncond"
RESULTS = "results.json"
SLICES = "slices"
_ID_STRIDE = 1 << 18      # Reference indices per slot in the sampler's ids.
_RATIO_SCALE = 10_000     # A ratio's slot code: round(ratio * 1e4).
_SLICE_RE = re.compile(r"slice_(\d{5})_of_(\d{5})\.json$")
_FORMAT = 1

# -- the work: slots, ids, slices -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
  """What one group of samples is prompted with: a ratio, or nothing."""
  ratio: float  # 0 = unconditional (from [BOS] alone)

  @property
  def name(self) -> str:
    return UNCOND if not self.ratio else f"r{self.ratio * 100:g}"

  @property
  def code(self) -> int:
    return round(self.ratio * _RATIO_SCALE)


def slots_of(ratios: Sequence[float], unconditional: bool) -> list[Slot]:
  """The slots an eval config asks for, checked."""
  slots = []
  for r in ratios:
    if not 0 < r < 1 or abs(r * _RATIO_SCALE - round(r * _RATIO_SCALE)) > 1e-6:
      raise ValueError(f"eval.ratios holds {r!r}: each ratio must lie in "
                       "(0, 1) and be a multiple of 0.0001, e.g. 0.25.")
    slots.append(Slot(float(r)))
  if len({s.code for s in slots}) != len(slots):
    raise ValueError(f"eval.ratios={tuple(ratios)} repeats a ratio.")
  if unconditional:
    slots.append(Slot(0.0))
  if not slots:
    raise ValueError("Nothing to evaluate: set eval.ratios or "
                     "eval.unconditional=True.")
  return slots


def sample_ids(slot: Slot, indices: Sequence[int]) -> np.ndarray:
  """Global sampler ids: a sample depends on (seed, ratio, index) only."""
  indices = np.asarray(indices, np.int64)
  return (slot.code * _ID_STRIDE + indices).astype(np.uint32)


def slice_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """Process `index` of `count` takes the contiguous indices [lo, hi)."""
  mine = sampler_lib.share(num_examples, index, count)
  return mine.start, mine.stop


def slice_name(index: int, count: int) -> str:
  return f"slice_{index:05d}_of_{count:05d}"


# -- images: the downscaled canvas and what FID sees ----------------------------


def to_canvas(pixels: np.ndarray) -> np.ndarray:
  """The image halved (2x2 box average) in the top-left of a black canvas."""
  h, w = pixels.shape[:2]
  if h % 2 or w % 2:
    raise ValueError(f"Downscaling needs even image sides; got {h}x{w}. Use "
                     "a codec width and height divisible by 2 MCUs.")
  canvas = np.zeros_like(pixels)
  canvas[:h // 2, :w // 2] = np.asarray(Image.fromarray(pixels).reduce(2))
  return canvas


def fid_view(pixels: np.ndarray, downscale: bool) -> np.ndarray:
  """The part of an image FID sees: all of it, or the active top-left."""
  if not downscale:
    return pixels
  h, w = pixels.shape[:2]
  return pixels[:h // 2, :w // 2]


def prompt_ratio(ratio: float, downscale: bool) -> float:
  """The canvas ratio whose MCU rows are `ratio` of the active rows."""
  return ratio / 2 if downscale else ratio


def image_digest(pixels: np.ndarray) -> np.ndarray:
  """sha256 of an image's uint8 pixels, as 32 uint8."""
  return _digest(np.ascontiguousarray(pixels, np.uint8).tobytes())


def _digest(data: bytes) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(data).digest(), np.uint8)


# -- reference images -----------------------------------------------------------


def reference_spec(config) -> str:
  """eval.source, else the training source (TFDS: its validation split)."""
  if config.eval.source:
    return config.eval.source
  spec = config.data.source
  kind, _, arg = spec.partition(":")
  if kind == "tfds":
    return f"tfds:{arg.partition(':')[0]}:validation"
  if config.eval.num_examples > config.data.eval_examples:
    logging.warning(
        "eval.num_examples=%d exceeds data.eval_examples=%d: references past "
        "the held-out split of %r were seen in training.",
        config.eval.num_examples, config.data.eval_examples, spec)
  return spec


def split_of(spec: str, num_examples: int) -> str:
  kind, _, arg = spec.partition(":")
  if kind == "tfds":
    return arg.partition(":")[2] or "train"
  return f"first {num_examples} items"


def open_reference(config, spec: str, codec) -> Any:
  """The reference source: `spec` at the codec's size, N items or an error."""
  n = config.eval.num_examples
  view = ml_collections.ConfigDict(dict(
      data=dict(config.data.to_dict(), source=spec, num_examples=n,
                labels_from_folders=False),
      codec=codec.settings()))
  source = sources.open_source(view)
  if len(source) < n:
    raise DataError(f"The reference source {spec!r} has {len(source)} images, "
                    f"fewer than eval.num_examples={n}; lower it.")
  return source


def reference_image(source, codec, index: int) -> np.ndarray:
  """Reference `index` as the codec loads it (uint8 HxWx3)."""
  item = source[index]
  try:
    return np.asarray(codec.load(item.data))
  except ValueError as e:
    raise DataError(f"Reference image {index} ({item.key}) cannot be read: "
                    f"{e}") from e


# -- sampling -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completion:
  data: bytes              # prompt + generated codec bytes
  pixels: np.ndarray
  clean_fraction: float
  ended: bool              # drew EOS
  new_tokens: int


def complete(sampler: sampler_lib.Sampler, params, tokenizer, codec,
             prompts: Sequence[bytes], ids: Sequence[int],
             settings: sampler_lib.Settings, *, seed: int, batch_size: int,
             progress: Callable[[int], Any] = lambda n: None,
             grammar=None) -> list[Completion]:
  """Samples and decodes each prompt (b"" = from [BOS] alone).

  Row r draws min(settings.max_new_tokens, max_len - its prompt) tokens at
  most; rows are batched with others of the same budget, so what a row draws
  depends only on its prompt, its id and the seed. grammar: a
  token_grammar.TokenGrammar constraining every row (None: unconstrained).
  """
  max_len = sampler.model.config.max_len
  tokens = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(p)])
            .astype(np.int32) for p in prompts]
  budgets = [min(settings.max_new_tokens, max_len - len(t)) for t in tokens]
  out: list[Completion | None] = [None] * len(prompts)
  groups: dict[int, list[int]] = {}
  for r, budget in enumerate(budgets):
    if budget >= 1:
      groups.setdefault(budget, []).append(r)
    else:  # No room to generate: the prompt alone is scored (not dropped,
      # which would bias FID towards short images); merge counts these.
      pixels, report = codec.decode(prompts[r])
      out[r] = Completion(prompts[r], pixels, report.clean_fraction, False, 0)
  full = sum(b < 1 for b in budgets)
  if full:
    logging.warning(
        "%d of %d prompts fill the model's max_len=%d: scored as the prompt "
        "alone (results.json: no_room_fraction). Use smaller ratios or a "
        "longer seq_len.", full, len(prompts), max_len)
    progress(full)
  # The budgets of every process (sampler calls are collective under
  # jax.distributed): each process joins each group's calls, rows or not.
  params = sampler.prepare(params)  # Once for every call (DecodeParams).
  counts = np.bincount(list(groups), minlength=max_len + 1)
  every = sampler_lib.gather_ints(counts).sum(axis=0)
  for budget in np.flatnonzero(every)[::-1].tolist():
    rows = groups.get(budget, [])
    for part in sampler.chunks(len(rows), batch_size):
      chunk = rows[part]
      extra = grammar.sampler_args([prompts[r] for r in chunk]) if (
          grammar) else {}
      drawn = sampler(params, [tokens[r] for r in chunk],
                      dataclasses.replace(settings, max_new_tokens=budget),
                      seed=seed, sample_ids=[ids[r] for r in chunk], **extra)
      for r, s in zip(chunk, drawn):
        data = prompts[r] + tokenizer.decode(s.tokens)
        pixels, report = codec.decode(data)
        out[r] = Completion(data, pixels, report.clean_fraction, s.ended,
                            len(s.tokens))
      progress(len(chunk))
  return out


def max_new_tokens(sample_cfg, slot: Slot, max_len: int) -> int:
  """The budget M of a slot (see the module docstring)."""
  if sample_cfg.max_new_tokens:
    return min(sample_cfg.max_new_tokens, max_len - 1)
  return max(1, max_len - max(1, math.ceil(slot.ratio * max_len)))


# -- one slice ------------------------------------------------------------------


def _settings(config, *, step: int, spec: str, codec, max_len: int,
              weights_hash: str, constrained: bool) -> dict:
  """What a slice's numbers depend on: equal settings, mergeable slices."""
  ec, sc = config.eval, config.sample
  return json.loads(json.dumps(dict(
      format=_FORMAT,
      checkpoint_step=step,
      reference=dict(source=spec, split=split_of(spec, ec.num_examples),
                     num_examples=ec.num_examples),
      ratios=list(ec.ratios), unconditional=ec.unconditional,
      seeds=list(ec.seeds),
      sampler=dict(temperature=sc.temperature, top_k=sc.top_k,
                   top_p=sc.top_p, max_new_tokens=sc.max_new_tokens,
                   max_len=max_len, cache_dtype=sc.cache_dtype,
                   constrained=constrained,
                   sample_ids=f"round(ratio*{_RATIO_SCALE})*{_ID_STRIDE}+index"),
      codec=codec.settings(),
      images=dict(
          reference="codec.load: centre crop, LANCZOS resize to the codec "
                    "size; uint8 RGB",
          fid_input=f"uint8 RGB, bilinear resize to {inception.INPUT_SIZE}x"
                    f"{inception.INPUT_SIZE} (no antialias), pytorch-fid "
                    "normalisation",
          downscale=ec.downscale),
      inception_sha256=weights_hash,
  )))


def _evaluate_slice(config, loaded: workdir_lib.Loaded, extractor, source,
                    indices: range) -> tuple[dict, dict]:
  """Samples, decodes and featurises one slice; returns (arrays, summary)."""
  ec = config.eval
  codec, tokenizer = loaded.codec, loaded.tokenizer
  slots = slots_of(ec.ratios, ec.unconditional)
  sampler = workdir_lib.sampler_of(config.sample, loaded.model, tokenizer,
                                   loaded.mesh, loaded.rules)
  sampler.check_split()  # Each process samples its own slice.
  grammar = workdir_lib.grammar_of(config.sample.constrained, codec,
                                     tokenizer)
  max_len = loaded.model.config.max_len
  model_inputs = []
  for i in indices:
    pixels = reference_image(source, codec, i)
    model_inputs.append(to_canvas(pixels) if ec.downscale else pixels)
  views = [fid_view(x, ec.downscale) for x in model_inputs]
  encoded = [codec.encode(x) for x in model_inputs]
  n, s, k = len(indices), len(ec.seeds), len(slots)
  arrays = dict(
      indices=np.asarray(indices, np.int64),
      reference=extractor(np.stack(views)),
      reference_sha256=np.stack([image_digest(v) for v in views]),
      generated=np.zeros((s, k, n, inception.FEATURE_DIM), np.float32),
      sample_sha256=np.zeros((s, k, n, 32), np.uint8),  # of the codec bytes
      clean_fraction=np.zeros((s, k, n), np.float32),
      ended=np.zeros((s, k, n), bool),
      new_tokens=np.zeros((s, k, n), np.int32),
  )
  with tqdm.tqdm(total=s * k * n, unit="img", smoothing=0.1,
                 desc=f"eval {indices.start}:{indices.stop}") as bar:
    for a, seed in enumerate(ec.seeds):
      for b, slot in enumerate(slots):
        prompts = [codec.prompt(e, prompt_ratio(slot.ratio, ec.downscale))
                   if slot.ratio else b"" for e in encoded]
        settings = workdir_lib.settings_of(config.sample,
                                      max_new_tokens(config.sample, slot,
                                                     max_len))
        done = complete(sampler, loaded.params, tokenizer, codec, prompts,
                        sample_ids(slot, indices), settings, seed=seed,
                        batch_size=ec.batch_size, progress=bar.update,
                        grammar=grammar)
        shown = [fid_view(c.pixels, ec.downscale) for c in done]
        arrays["generated"][a, b] = extractor(np.stack(shown))
        arrays["sample_sha256"][a, b] = [_digest(c.data) for c in done]
        arrays["clean_fraction"][a, b] = [c.clean_fraction for c in done]
        arrays["ended"][a, b] = [c.ended for c in done]
        arrays["new_tokens"][a, b] = [c.new_tokens for c in done]
  summary = {slot.name: {str(seed): dict(
      clean_fraction=float(arrays["clean_fraction"][a, b].mean()),
      eos_fraction=float(arrays["ended"][a, b].mean()))
                         for a, seed in enumerate(ec.seeds)}
             for b, slot in enumerate(slots)}
  return arrays, summary


def _write_slice(out_dir: str, name: str, arrays: dict, info: dict) -> None:
  """The .npz, then the .json that marks the slice done (both atomic)."""
  path = storage.path(out_dir) / SLICES / name
  npz = io.BytesIO()
  np.savez(npz, **arrays)
  storage.write_bytes(f"{path}.npz", npz.getvalue())
  storage.write_json(f"{path}.json", info)


def _finished_slice(out_dir: str, name: str, settings: dict) -> bool:
  """True when the slice is done with these settings; raises if not these."""
  path = storage.path(out_dir) / SLICES / name
  if not (epath.Path(f"{path}.json").exists() and
          epath.Path(f"{path}.npz").exists()):
    return False
  old = storage.read_json(f"{path}.json")["settings"]
  if old != settings:
    diff = sorted(k for k in set(old) | set(settings)
                  if old.get(k) != settings.get(k))
    raise DataError(
        f"{path}.json was made with different settings ({diff}). Use another "
        "eval.out_dir, delete the old slices, or restore those settings.")
  return True


# -- merge ----------------------------------------------------------------------


def _load_slices(out_dir: str) -> tuple[list[dict], list[str]]:
  folder = storage.path(out_dir) / SLICES
  names = sorted(f.name for f in folder.iterdir() if _SLICE_RE.match(
      f.name)) if folder.is_dir() else []
  if not names:
    raise DataError(f"No slices in {folder}; run the eval (every process) "
                    "first.")
  infos = [storage.read_json(folder / f) for f in names]
  return infos, [os.fspath(folder / f[:-len(".json")]) for f in names]


def _check_coverage(infos: list[dict], paths: list[str], n: int) -> None:
  """Each index in [0, n) in exactly one slice, else an error listing them."""
  owners: dict[int, list[str]] = {}
  for info, path in zip(infos, paths):
    for i in info["indices"]:
      owners.setdefault(int(i), []).append(epath.Path(path).name)
  duplicated = sorted(i for i, who in owners.items() if len(who) > 1)
  outside = sorted(i for i in owners if not 0 <= i < n)
  missing = sorted(set(range(n)) - set(owners))
  if not (duplicated or outside or missing):
    return
  present = {epath.Path(p).name for p in paths}
  absent = sorted({slice_name(j, info["process_count"])
                   for info in infos for j in range(info["process_count"])}
                  - present)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing indices {missing[:50]}"
                    f"{' ...' if len(missing) > 50 else ''} (absent slices: "
                    f"{absent})")
  if duplicated:
    problems.append(f"{len(duplicated)} duplicated indices "
                    f"{duplicated[:50]} (e.g. index {duplicated[0]} in "
                    f"{owners[duplicated[0]]})")
  if outside:
    problems.append(f"indices outside [0, {n}): {outside[:50]}")
  raise DataError(
      f"The slices in {epath.Path(paths[0]).parent} do not cover the {n} "
      f"references exactly once: {'; '.join(problems)}. Run the missing "
      "processes (eval resumes) or delete slices left by another process "
      "count.")


def merge(out_dir: str, fid_method: str = "sqrtm") -> dict:
  """Checks the slices, computes FID per seed and slot, writes results.json.

  fid_method: "sqrtm" (pytorch-fid's, the standard) or "low_rank" (exact and
  much faster below 2048 images; see fid.low_rank_frechet).
  """
  infos, paths = _load_slices(out_dir)
  settings = infos[0]["settings"]
  for info, path in zip(infos, paths):
    if info["settings"] != settings:
      raise DataError(f"{path}.json and {paths[0]}.json were made with "
                      "different settings; delete the stale slices and rerun.")
  n = settings["reference"]["num_examples"]
  _check_coverage(infos, paths, n)
  keys = ("indices", "reference", "reference_sha256", "generated",
          "clean_fraction", "ended", "new_tokens")
  parts = []
  for path in paths:
    with np.load(io.BytesIO(epath.Path(f"{path}.npz").read_bytes())) as npz:
      parts.append({key: npz[key] for key in keys})
  order = np.argsort(np.concatenate([p["indices"] for p in parts]))
  cat = lambda key, axis: np.concatenate([p[key] for p in parts], axis)
  reference = cat("reference", 0)[order]
  generated = cat("generated", 2)[:, :, order]
  clean = cat("clean_fraction", 2)
  ended = cat("ended", 2)
  new_tokens = cat("new_tokens", 2)
  slots = slots_of(settings["ratios"], settings["unconditional"])
  if fid_method not in fid.METHODS:
    raise ValueError(f"Unknown eval.fid_method {fid_method!r}; use one of "
                     f"{fid.METHODS}.")
  ref_stats = fid.statistics(reference) if fid_method == "sqrtm" else None
  metrics = {}
  for b, slot in enumerate(slots):
    per_seed = {}
    for a, seed in enumerate(settings["seeds"]):
      per_seed[str(seed)] = (
          fid.frechet_distance(*fid.statistics(generated[a, b]), *ref_stats)
          if ref_stats else fid.low_rank_frechet(generated[a, b], reference))
    values = np.array(list(per_seed.values()))
    metrics[slot.name] = dict(
        ratio=slot.ratio, fid=per_seed, fid_mean=float(values.mean()),
        fid_std=float(values.std()), clean_fraction=float(clean[:, b].mean()),
        eos_fraction=float(ended[:, b].mean()),
        no_room_fraction=float(((new_tokens[:, b] == 0)
                                & ~ended[:, b]).mean()),
        new_tokens_mean=float(new_tokens[:, b].mean()),
        num_images=int(generated.shape[2]))
  reference_sha = hashlib.sha256(
      cat("reference_sha256", 0)[order].tobytes()).hexdigest()
  record = dict(
      checkpoint_step=settings["checkpoint_step"],
      inception_sha256=settings["inception_sha256"],
      reference=dict(settings["reference"], images_sha256=reference_sha,
                     images_sha256_of="sha256 over the per-image sha256 "
                                      "digests (index order) of the uint8 "
                                      "reference images FID sees"),
      images=settings["images"], sampler=settings["sampler"],
      codec=settings["codec"], ratios=settings["ratios"],
      unconditional=settings["unconditional"], seeds=settings["seeds"],
      processes=sorted({info["process_count"] for info in infos}),
      fid_method=fid_method,
      std="population (ddof=0) over seeds")
  results = dict(step=settings["checkpoint_step"], metrics=metrics,
                 record=record)
  storage.write_json(storage.path(out_dir) / RESULTS, results)
  return results


def write_tensorboard(results: dict, logdir: str) -> None:
  """fid/<slot> (mean over seeds), clean/<slot> and eos/<slot> scalars."""
  scalars = {}
  for name, m in results["metrics"].items():
    scalars.update({f"fid/{name}": m["fid_mean"],
                    f"fid_std/{name}": m["fid_std"],
                    f"clean/{name}": m["clean_fraction"],
                    f"eos/{name}": m["eos_fraction"]})
  writer = storage.MirroredWriter(logdir, asynchronous=False)
  writer.write_scalars(results["step"], scalars)
  writer.close()


def summary_table(results: dict) -> str:
  rows = [f"{'slot':>8} {'FID mean':>10} {'std':>8} {'clean':>6} "
          f"{'eos':>6} {'n':>6}  per seed"]
  for name, m in results["metrics"].items():
    seeds = " ".join(f"{s}:{v:.2f}" for s, v in m["fid"].items())
    rows.append(f"{name:>8} {m['fid_mean']:>10.3f} {m['fid_std']:>8.3f} "
                f"{m['clean_fraction']:>6.3f} {m['eos_fraction']:>6.3f} "
                f"{m['num_images']:>6}  {seeds}")
  return "\n".join(rows)


# -- the job --------------------------------------------------------------------


def _extractor(ec) -> inception.FeatureExtractor:
  if not ec.inception_weights:
    raise FileNotFoundError(
        "config.eval.inception_weights is empty: FID needs the Inception "
        f"weights. Download {inception.WEIGHTS_URL}, convert them once with "
        f"`{inception.CONVERT_COMMAND}` and pass "
        "--config.eval.inception_weights=fid_inception.npz.")
  return inception.FeatureExtractor.from_file(ec.inception_weights,
                                              batch_size=ec.feature_batch)


def _step_and_out_dir(ec, workdir: str) -> tuple[int, str]:
  from codeclm.train import checkpoint  # pylint: disable=g-import-not-at-top
  _, step = checkpoint.committed_step_dir(workdir, ec.step or None)
  return step, os.fspath(storage.path(ec.out_dir or storage.path(workdir) /
                                      "eval" / f"step_{step}"))


def finish(out_dir: str, workdir: str, fid_method: str = "sqrtm") -> dict:
  """Merges, writes TensorBoard scalars in <workdir>/eval, logs a table."""
  results = merge(out_dir, fid_method)
  write_tensorboard(results, storage.path(workdir) / "eval")
  logging.info("FID at step %d (%s):\n%s", results["step"],
               storage.path(out_dir) / RESULTS, summary_table(results))
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Evaluates this process's slice; returns the results if it merged.

  Reads config.eval (the job), config.sample (temperature, top_k, top_p,
  max_new_tokens, cache_dtype, min_bucket) and config.data (the default
  reference source); the model, tokenizer and codec come from `workdir`.
  """
  from codeclm import codecs  # pylint: disable=g-import-not-at-top
  ec = config.eval
  distributed = jax.process_count() > 1
  p, count = prepare.resolve_process(
      None if ec.process_index < 0 else ec.process_index,
      None if ec.process_count <= 0 else ec.process_count)
  if distributed and (p, count) != (jax.process_index(),
                                    jax.process_count()):
    raise ValueError(
        f"eval.process_index={ec.process_index} and eval.process_count="
        f"{ec.process_count} name separate jobs, but this is a "
        f"{jax.process_count()}-process jax.distributed run, whose process i "
        "writes slice i itself: leave them unset (-1 and 0).")
  if distributed and ec.num_examples < count:
    raise ValueError(f"eval.num_examples={ec.num_examples} is fewer than the "
                     f"{count} processes; each needs one reference at least.")
  if ec.num_examples < 2 or not ec.seeds or ec.batch_size < 1:
    raise ValueError(f"eval.num_examples={ec.num_examples} (need >= 2), "
                     f"eval.seeds={ec.seeds} (need one), eval.batch_size="
                     f"{ec.batch_size} (need >= 1).")
  if ec.num_examples > _ID_STRIDE or len(set(ec.seeds)) != len(ec.seeds):
    raise ValueError(f"eval.num_examples must be <= {_ID_STRIDE} and "
                     f"eval.seeds={ec.seeds} distinct.")
  slots_of(ec.ratios, ec.unconditional)
  step, out_dir = _step_and_out_dir(ec, workdir)
  codec = codecs.from_settings(
      storage.read_json(storage.path(workdir) / "manifest.json")["codec"])
  if codec.name != "jpeg":
    raise NotImplementedError(
        f"FID evaluation supports JPEG checkpoints only; {workdir} uses the "
        f"{codec.name!r} codec.")
  max_len = storage.read_json(storage.path(workdir) / "config.json")["seq_len"]
  extractor = _extractor(ec)
  spec = reference_spec(config)
  settings = _settings(config, step=step, spec=spec, codec=codec,
                       max_len=max_len, weights_hash=extractor.weights_hash,
                       constrained=bool(config.sample.constrained))
  name = slice_name(p, count)
  lo, hi = slice_bounds(ec.num_examples, p, count)
  done = _finished_slice(out_dir, name, settings)
  if distributed:  # One collective job: every process samples, or none.
    done = bool(sampler_lib.gather_ints([done]).all())
  if done:
    logging.info("%s is done; skipping it.",
                 storage.path(out_dir) / SLICES / name)
  else:
    start = time.time()
    source = open_reference(config, spec, codec)
    loaded = workdir_lib.load(workdir, step, ec.mesh_shape or None)
    arrays, summary = _evaluate_slice(config, loaded, extractor, source,
                                      range(lo, hi))
    _write_slice(out_dir, name, arrays, dict(
        settings=settings, process_index=p, process_count=count,
        indices=list(range(lo, hi)), slots=summary,
        seconds=round(time.time() - start, 1)))
    logging.info("Wrote %s (indices %d:%d).",
                 storage.path(out_dir) / SLICES / name, lo, hi)
  if distributed:  # Process 0 merges once every slice is written.
    multihost_utils.sync_global_devices("eval slices written")
    if p:
      return None
  present = all((storage.path(out_dir) / SLICES / f"{slice_name(j, count)}"
                 ".json").exists() for j in range(count))
  if not (ec.merge and present):
    logging.info("%s; merge later with `python -m codeclm.eval.evaluate ... "
                 "--merge_only`.", "Not merging (eval.merge=False)" if present
                 else "Slices of other processes are missing")
    return None
  return finish(out_dir, workdir, ec.fid_method)


# -- command line ---------------------------------------------------------------


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MERGE_ONLY.value:
    results = finish(_step_and_out_dir(config.eval, workdir)[1], workdir,
                     config.eval.fid_method)
  else:
    results = run(config, workdir)
  if results is not None:
    print(json.dumps(results["metrics"], indent=1))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The run's config, e.g. configs/jpeg_lm.py:demo.",
      lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
  _MERGE_ONLY = flags.DEFINE_bool(
      "merge_only", False, "Only merge the slices already written.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
