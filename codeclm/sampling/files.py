r"""Requests -> samples -> files and grids: the sample command.

Unconditional samples from [BOS] and completions of image (or video) files
whose prompt is the first `ratio` of the MCU rows (frames), decoded with the
codec into .jpg / .png (.mp4 / .gif) files, a JSON report per sample and grids
of prompt | completions | original:

  python -m codeclm.sampling --workdir=/tmp/jpeg_demo \
      --sample.images=cat.png,dog.jpg --sample.ratios='(0.5,)'
  python -m codeclm.main --config=configs/jpeg_lm.py:demo \
      --workdir=/tmp/jpeg_demo --mode=sample --config.sample.num_samples=8

A class-conditional model (trained with data.conditioning="class") samples
per class with classifier-free guidance: --config.sample.classes=all (or
names or ids, comma-separated) draws sample.per_class samples of each class at
scale sample.guidance, written as class_<name>_<j> files with one grid per
class (class_<name>.png) and one of all classes, a row each (classes.png).
Every prompt of such a model starts [BOS, class token]; requests without a
class (unconditional samples, completions) get the "no class" token.

Under jax.distributed (a model sharded over hosts) process p of n draws and
writes its contiguous share of each request list (hosts.share), with the
global sample ids; process 0 also writes the grids of all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from codeclm.runtime import distributed
from codeclm.runtime import storage
from codeclm.sampling import hosts
from codeclm.sampling import sampler as sampler_lib
from codeclm.sampling import workdir as workdir_lib

@dataclasses.dataclass
class Request:
  """One sample to draw: a prompt (codec bytes; b"" = unconditional)."""
  name: str                # file name stem of its outputs
  prompt: bytes = b""
  ratio: float = 0.0
  image: str = ""          # name of the image completed
  source: str = ""         # where that image came from
  label: int | None = None  # class index (None: no class)
  class_name: str = ""


@dataclasses.dataclass
class Result:
  request: Request
  data: bytes              # prompt + generated codec bytes
  pixels: np.ndarray
  report: Any              # the codec's DecodeReport
  sample: sampler_lib.Sample | None  # None: another process's (everyone)


def draw(sampler: sampler_lib.Sampler, params, tokenizer, codec,
         requests: Sequence[Request], settings: sampler_lib.Settings, *,
         seed: int, batch_size: int, first_id: int = 0,
         grammar=None, guidance: float | None = None) -> list[Result]:
  """Samples every request (in batches) and decodes the bytes to pixels.

  Request i uses sample id first_id + i, so results do not depend on
  batch_size. settings.max_new_tokens is lowered where a prompt would not
  fit the model's max_len. grammar: a token_grammar.TokenGrammar that
  constrains every row (None: unconstrained). Under jax.distributed every
  process calls this together with its own requests (none included) and
  their first global id; batch_size counts the rows of all processes.
  guidance: classifier-free guidance at this scale for a class-conditional
  model (None: none); every process passes the same.
  """
  prompts = [prompt_ids(tokenizer, r.prompt, r.label) for r in requests]
  guided = guidance is not None and bool(tokenizer.class_names)
  unconditional = [prompt_ids(tokenizer, r.prompt, None) for r in requests]
  longest = int(distributed.gather_ints(
      [max((len(x) for x in prompts), default=0)]).max())
  room = sampler.model.config.max_len - longest
  if room < 1:
    raise ValueError(f"A prompt of {longest} tokens leaves no room in the "
                     f"model's max_len={sampler.model.config.max_len}; use a "
                     "smaller prompt ratio.")
  settings = dataclasses.replace(
      settings, max_new_tokens=min(settings.max_new_tokens, room))
  results = []
  params = sampler.prepare(params)  # Once for every chunk (DecodeParams).
  for chunk in sampler.chunks(len(requests), batch_size):
    extra = grammar.sampler_args(
        [r.prompt for r in requests[chunk]],
        [r.name for r in requests[chunk]]) if grammar else {}
    if guided:
      extra.update(unconditional=unconditional[chunk], guidance=guidance)
    samples = sampler(params, prompts[chunk], settings, seed=seed,
                      sample_ids=np.arange(len(requests))[chunk] + first_id,
                      **extra)
    for request, sample in zip(requests[chunk], samples):
      data = request.prompt + tokenizer.decode(sample.tokens)
      pixels, report = codec.decode(data)
      results.append(Result(request, data, pixels, report, sample))
  return results


def prompt_ids(tokenizer, prompt: bytes, label: int | None) -> np.ndarray:
  """A request's token prompt: BOS, the class token of `label` ("no class"
  for None) if the tokenizer has classes, then the prompt bytes' ids."""
  head = [tokenizer.bos_id]
  if tokenizer.class_names:
    head.append(tokenizer.class_id(label))
  return np.concatenate([head, tokenizer.encode(prompt)]).astype(np.int32)


def class_labels(spec: str, class_names: Sequence[str]) -> list[int]:
  """sample.classes ("all", or comma-separated names or ids) -> class ids."""
  spec = str(spec or "").strip()
  if not spec:
    return []
  if not class_names:
    raise ValueError(
        f"sample.classes={spec!r}, but this model has no class tokens (it "
        "was trained with data.conditioning='none'); leave sample.classes "
        "empty or train with --config.data.conditioning=class.")
  if spec == "all":
    return list(range(len(class_names)))
  labels = []
  for part in (x.strip() for x in spec.split(",") if x.strip()):
    if part in class_names:
      labels.append(list(class_names).index(part))
    elif part.isdigit() and int(part) < len(class_names):
      labels.append(int(part))
    else:
      raise ValueError(f"sample.classes: {part!r} is neither a class name "
                       f"nor an id of this model's classes {list(class_names)}"
                       f" (ids 0..{len(class_names) - 1}).")
  return labels


def everyone(codec, requests: Sequence[Request],
             mine: Sequence[Result]) -> list[Result]:
  """Every process's results for `requests`, each process having drawn its
  `hosts.share` (collective under jax.distributed). Other processes' rows
  are decoded here from their bytes and carry sample=None."""
  every = hosts.gather_bytes([r.data for r in mine], len(requests))
  own = {r.request.name: r for r in mine}
  return [own.get(q.name) or Result(q, data, *codec.decode(data), None)
          for q, data in zip(requests, every)]


def grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
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
  picture = preview_bytes(codec, original)
  rows = []
  for _, group in sorted(by_ratio.items()):
    rows.append([preview_bytes(codec, group[0].request.prompt)]
                + [codec.preview(r.pixels) for r in group] + [picture])
  return grid(rows)


def preview_bytes(codec, data: bytes) -> np.ndarray:
  return codec.preview(codec.decode(data)[0])


def _write(local: str, result: Result, codec, info: dict) -> None:
  """The codec's files for <name> (e.g. .jpg and .png) and <name>.json."""
  name = os.path.join(local, result.request.name)
  files = codec.save(name, result.data)
  labelled = result.request.label is not None
  with open(name + ".json", "w") as f:
    json.dump(dict(info, name=result.request.name,
                   label=result.request.label,
                   **{"class": result.request.class_name or None},
                   guidance=info.get("guidance") if labelled else None,
                   image=result.request.image,
                   source=result.request.source, ratio=result.request.ratio,
                   prompt_tokens=result.sample.prompt_len,
                   new_tokens=len(result.sample.tokens),
                   ended_with_eos=result.sample.ended, bytes=len(result.data),
                   files=[os.path.basename(x) for x in files],
                   report=result.report.to_dict()), f, indent=1)


def run(sample_cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """The sample command: writes samples, completions and grids; returns a
  summary {out_dir, step, constrained, samples: {name: decode report dict}}
  (under jax.distributed: the samples this process drew and wrote)."""
  loaded = workdir_lib.load(workdir, sample_cfg.step or None,
                sample_cfg.mesh_shape or None)
  out_dir = storage.path(sample_cfg.out_dir or storage.path(workdir) /
                         "samples" / f"step_{loaded.step}")
  sampler = workdir_lib.sampler_of(sample_cfg, loaded.model, loaded.tokenizer,
                       loaded.mesh, loaded.rules)
  sampler.check_split()  # Each process draws its own share.
  max_new = sample_cfg.max_new_tokens or loaded.model.config.max_len
  settings = workdir_lib.settings_of(sample_cfg, max_new)
  grammar = workdir_lib.grammar_of(sample_cfg.constrained, loaded.codec,
                                     loaded.tokenizer)
  class_names = loaded.tokenizer.class_names
  labels = class_labels(sample_cfg.get("classes", ""), class_names)
  guidance = float(sample_cfg.get("guidance", 1.0))
  info = dict(step=loaded.step, seed=sample_cfg.seed,
              settings=dataclasses.asdict(settings),
              constrained=grammar is not None,
              guidance=guidance if labels else None)
  draw_ = functools.partial(draw, sampler, loaded.params, loaded.tokenizer,
                            loaded.codec, seed=sample_cfg.seed,
                            batch_size=sample_cfg.batch_size, grammar=grammar)
  codec, summary = loaded.codec, {}
  with storage.local_dir(out_dir) as local:  # Uploaded if out_dir is remote.
    _draw_and_write(sample_cfg, draw_, codec, info, local, settings, summary)
    if labels:
      _draw_classes(sample_cfg, draw_, codec, info, local, settings, summary,
                    [(i, class_names[i]) for i in labels], guidance)
  logging.info("Wrote %d samples to %s.", len(summary), out_dir)
  return dict(out_dir=os.fspath(out_dir), step=loaded.step,
              constrained=grammar is not None, samples=summary)


def _draw_and_write(sample_cfg, draw_, codec, info, local: str, settings,
                    summary: dict) -> None:
  """Draws the config's samples and completions; files go to `local`.

  Each process draws and writes its share of each request list (see
  hosts.share); process 0 also writes the grids, which show them all.
  """
  grids = jax.process_index() == 0
  requests = [Request(f"sample_{i:04d}")
              for i in range(sample_cfg.num_samples)]
  if requests:
    mine = hosts.share(len(requests))
    results = draw_(requests[mine.start:mine.stop], settings,
                    first_id=mine.start)
    for r in results:
      _write(local, r, codec, info)
    summary.update({r.request.name: r.report.to_dict() for r in results})
    every = everyone(codec, requests, results)
    if grids:
      cols = math.ceil(math.sqrt(len(every)))
      pics = [codec.preview(r.pixels) for r in every]
      Image.fromarray(grid([pics[i:i + cols] for i in range(
          0, len(pics), cols)])).save(os.path.join(local, "samples.png"))

  images = [x for x in sample_cfg.images.split(",") if x]
  if images:
    requests, originals = completion_requests(
        codec, images, sample_cfg.ratios, sample_cfg.completions)
    mine = hosts.share(len(requests))
    # Ids after the unconditional ones: each sample has its own stream.
    results = draw_(requests[mine.start:mine.stop], settings,
                    first_id=sample_cfg.num_samples + mine.start)
    for r in results:
      _write(local, r, codec, info)
    summary.update({r.request.name: r.report.to_dict() for r in results})
    every = everyone(codec, requests, results)
    for name, original in originals.items() if grids else ():
      codec.save(os.path.join(local, f"{name}_original"), original)
      Image.fromarray(completion_grid(
          codec, [r for r in every if r.request.image == name],
          original)).save(os.path.join(local, f"{name}_grid.png"))


def _draw_classes(sample_cfg, draw_, codec, info, local: str, settings,
                  summary: dict, classes: Sequence[tuple[int, str]],
                  guidance: float) -> None:
  """sample.per_class guided samples of each (label, name) in `classes`:
  files class_<name>_<j>, a grid per class and classes.png (a row each)."""
  per = sample_cfg.get("per_class", 4)
  stem = {name: re.sub(r"[^A-Za-z0-9_.-]+", "_", name) for _, name in classes}
  requests = [Request(f"class_{stem[name]}_{j:02d}", label=label,
                      class_name=name)
              for label, name in classes for j in range(per)]
  mine = hosts.share(len(requests))
  # Ids after the unconditional samples and completions' (any count).
  first = 1 << 20
  results = draw_(requests[mine.start:mine.stop], settings,
                  first_id=first + mine.start, guidance=guidance)
  for r in results:
    _write(local, r, codec, info)
  summary.update({r.request.name: r.report.to_dict() for r in results})
  every = everyone(codec, requests, results)
  if jax.process_index() != 0:
    return
  rows = []
  for _, name in classes:
    row = [codec.preview(r.pixels) for r in every
           if r.request.class_name == name]
    Image.fromarray(grid([row])).save(os.path.join(
        local, f"class_{stem[name]}.png"))
    rows.append(row)
  Image.fromarray(grid(rows)).save(os.path.join(local, "classes.png"))
