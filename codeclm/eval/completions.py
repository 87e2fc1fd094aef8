"""One slice of an FID evaluation: prompts, completions and features.

For each seed and slot, a slice's references are cut into prompts
(`codec.prompt`, at the slot's ratio; b"" for uncond), completed by the
sampler, decoded by the codec and featurised by the Inception network,
beside per-sample decode reports and digests.

Every sampled row gets max_new_tokens = min(M, max_len - prompt length),
with M = config.sample.max_new_tokens, or when 0, max_len - ceil(ratio *
max_len) (uncond: max_len - 1); rows sharing a budget are batched together,
so the budget of a row never depends on its batch. A prompt that fills the
model's max_len is scored as the prompt alone.

Guided samples (class-conditional workdirs, per guidance scale in
eval.guidance): reference i gets one sample from [BOS, its class token],
drawn with guidance (a call holds 2 * eval.batch_size rows: each request
with its class and with "no class"); sample ids (work.guided_ids) are shared
by every scale, so two scales differ by the guidance alone. Completions and
unconditional samples of such a model start [BOS, "no class"].
per_class.py scores them.

Signature: `evaluate_slice(ec, sample_cfg, loaded, extractor, source,
indices, scales)`, with the config's eval and sample sections, never the
whole config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
import tqdm

from codeclm.data.sources.base import DataError
from codeclm.eval import inception
from codeclm.eval import references
from codeclm.eval import work
from codeclm.runtime import distributed
from codeclm.sampling import files
from codeclm.sampling import sampler as sampler_lib
from codeclm.sampling import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sample: its codec bytes, decoded pixels and decode report."""
  data: bytes              # prompt + generated codec bytes
  pixels: np.ndarray
  clean_fraction: float
  ended: bool              # drew EOS
  new_tokens: int


def complete(sampler: sampler_lib.Sampler, params, tokenizer, codec,
             prompts: Sequence[bytes], ids: Sequence[int],
             settings: sampler_lib.Settings, *, seed: int, batch_size: int,
             progress: Callable[[int], Any] = lambda n: None,
             grammar=None, classes: Sequence[int] | None = None,
             guidance: float | None = None) -> list[Completion]:
  """Samples and decodes each prompt (b"" = from [BOS] alone).

  Row r draws min(settings.max_new_tokens, max_len - its prompt) tokens at
  most; rows are batched with others of the same budget, so what a row draws
  depends only on its prompt, its id and the seed. grammar: a
  token_grammar.TokenGrammar constraining every row (None: unconstrained).
  A class-conditional model's prompts start [BOS, class token]: `classes`
  gives each row's class (the tokenizer's class index; None: "no class"),
  and `guidance` their classifier-free guidance scale (the unconditional
  rows: "no class"; None: no guidance).
  """
  max_len = sampler.model.config.max_len
  classes = [None] * len(prompts) if classes is None else list(classes)
  tokens = [files.prompt_ids(tokenizer, p, c)
            for p, c in zip(prompts, classes)]
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
  every = distributed.gather_ints(counts).sum(axis=0)
  for budget in np.flatnonzero(every)[::-1].tolist():
    rows = groups.get(budget, [])
    for part in sampler.chunks(len(rows), batch_size):
      chunk = rows[part]
      extra = grammar.sampler_args([prompts[r] for r in chunk]) if (
          grammar) else {}
      if guidance is not None:
        extra.update(guidance=float(guidance), unconditional=[
            files.prompt_ids(tokenizer, prompts[r], None) for r in chunk])
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


def model_classes(tokenizer, names: Sequence[str] | None,
                  labels: np.ndarray) -> list[int]:
  """The model's class index of each reference's label, matched by name (the
  references may number their classes unlike the training data)."""
  known = {n: i for i, n in enumerate(getattr(tokenizer, "class_names", ()))}
  if not known:
    raise DataError("eval.guidance needs a class-conditional workdir (data."
                    "conditioning='class'); set --config.eval.guidance='()'.")
  if names is None or (labels < 0).any():
    raise DataError(
        "eval.guidance samples one image per reference, of its class, but the "
        "references have no labels: use a labelled eval.source (folder:PATH "
        "with data.labels_from_folders=True, a TFDS dataset with labels, "
        "synthetic_classes) or set --config.eval.guidance='()'.")
  missing = sorted({names[c] for c in labels.tolist()} - set(known))
  if missing:
    raise DataError(f"Reference classes {missing[:10]} are not among the "
                    f"workdir's {len(known)} classes; use references of the "
                    "classes the model was trained on.")
  return [known[names[c]] for c in labels.tolist()]


def max_new_tokens(sample_cfg, slot: work.Slot, max_len: int) -> int:
  """The budget M of a slot (see the module docstring)."""
  if sample_cfg.max_new_tokens:
    return min(sample_cfg.max_new_tokens, max_len - 1)
  return max(1, max_len - max(1, math.ceil(slot.ratio * max_len)))


def image_digest(pixels: np.ndarray) -> np.ndarray:
  """sha256 of an image's uint8 pixels, as 32 uint8."""
  return _digest(np.ascontiguousarray(pixels, np.uint8).tobytes())


def _digest(data: bytes) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(data).digest(), np.uint8)


def evaluate_slice(ec, sample_cfg, loaded: workdir_lib.Loaded, extractor,
                   source, indices: range, scales: Sequence[float] = ()
                   ) -> tuple[dict, dict]:
  """Samples, decodes and featurises one slice; returns (arrays, summary).
  `ec` and `sample_cfg`: the config's eval and sample sections; scales: the
  guidance scales of the guided samples (() = none)."""
  codec, tokenizer = loaded.codec, loaded.tokenizer
  slots = work.slots_of(ec.ratios, ec.unconditional)
  sampler = workdir_lib.sampler_of(sample_cfg, loaded.model, tokenizer,
                                   loaded.mesh, loaded.rules)
  sampler.check_split()  # Each process samples its own slice.
  grammar = workdir_lib.grammar_of(sample_cfg.constrained, codec,
                                   tokenizer)
  max_len = loaded.model.config.max_len
  model_inputs, labels = [], []
  for i in indices:
    pixels, label = references.load_reference(source, codec, i)
    model_inputs.append(references.to_canvas(pixels) if ec.downscale
                        else pixels)
    labels.append(label)
  labels = np.asarray(labels, np.int64)
  asked = model_classes(tokenizer, source.label_names, labels) if scales else (
      None)
  views = [references.fid_view(x, ec.downscale) for x in model_inputs]
  encoded = [codec.encode(x) for x in model_inputs]
  n, s, k, g = len(indices), len(ec.seeds), len(slots), len(scales)
  arrays = dict(
      indices=np.asarray(indices, np.int64),
      labels=labels,                # -1: unlabelled
      reference=extractor(np.stack(views)),
      reference_sha256=np.stack([image_digest(v) for v in views]),
      generated=np.zeros((s, k, n, inception.FEATURE_DIM), np.float32),
      sample_sha256=np.zeros((s, k, n, 32), np.uint8),  # of the codec bytes
      clean_fraction=np.zeros((s, k, n), np.float32),
      ended=np.zeros((s, k, n), bool),
      new_tokens=np.zeros((s, k, n), np.int32),
      # Guided samples: [seed, scale, reference], the reference's class.
      guided=np.zeros((s, g, n, inception.FEATURE_DIM), np.float32),
      guided_sha256=np.zeros((s, g, n, 32), np.uint8),
      guided_clean_fraction=np.zeros((s, g, n), np.float32),
      guided_ended=np.zeros((s, g, n), bool),
  )
  # A source that can tell a picture's class itself (synthetic_classes: its
  # hue rule) scores the guided samples too: -1 where it has no rule.
  rule = getattr(source, "class_of", None) if scales else None
  if rule:
    arrays["guided_rule_class"] = np.full((s, g, n), -1, np.int32)
  with tqdm.tqdm(total=s * (k + g) * n, unit="img", smoothing=0.1,
                 desc=f"eval {indices.start}:{indices.stop}") as bar:
    for a, seed in enumerate(ec.seeds):
      for b, slot in enumerate(slots):
        cut = references.prompt_ratio(slot.ratio, ec.downscale)
        prompts = [codec.prompt(e, cut) if slot.ratio else b""
                   for e in encoded]
        settings = workdir_lib.settings_of(
            sample_cfg, max_new_tokens(sample_cfg, slot, max_len))
        done = complete(sampler, loaded.params, tokenizer, codec, prompts,
                        work.sample_ids(slot, indices), settings, seed=seed,
                        batch_size=ec.batch_size, progress=bar.update,
                        grammar=grammar)
        shown = [references.fid_view(c.pixels, ec.downscale) for c in done]
        arrays["generated"][a, b] = extractor(np.stack(shown))
        arrays["sample_sha256"][a, b] = [_digest(c.data) for c in done]
        arrays["clean_fraction"][a, b] = [c.clean_fraction for c in done]
        arrays["ended"][a, b] = [c.ended for c in done]
        arrays["new_tokens"][a, b] = [c.new_tokens for c in done]
      for b, scale in enumerate(scales):
        settings = workdir_lib.settings_of(
            sample_cfg, max_new_tokens(sample_cfg, work.Slot(0.0), max_len))
        done = complete(sampler, loaded.params, tokenizer, codec, [b""] * n,
                        work.guided_ids(indices), settings, seed=seed,
                        batch_size=ec.batch_size, progress=bar.update,
                        grammar=grammar, classes=asked, guidance=scale)
        shown = [references.fid_view(c.pixels, ec.downscale) for c in done]
        arrays["guided"][a, b] = extractor(np.stack(shown))
        arrays["guided_sha256"][a, b] = [_digest(c.data) for c in done]
        arrays["guided_clean_fraction"][a, b] = [c.clean_fraction
                                                 for c in done]
        arrays["guided_ended"][a, b] = [c.ended for c in done]
        if rule:
          arrays["guided_rule_class"][a, b] = [rule(c.pixels) for c in done]
  summary = {slot.name: {str(seed): dict(
      clean_fraction=float(arrays["clean_fraction"][a, b].mean()),
      eos_fraction=float(arrays["ended"][a, b].mean()))
                         for a, seed in enumerate(ec.seeds)}
             for b, slot in enumerate(slots)}
  for b, scale in enumerate(scales):
    summary[work.guided_name(scale)] = {str(seed): dict(
        clean_fraction=float(arrays["guided_clean_fraction"][a, b].mean()),
        eos_fraction=float(arrays["guided_ended"][a, b].mean()))
                                        for a, seed in enumerate(ec.seeds)}
  return arrays, summary
