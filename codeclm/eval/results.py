"""The slices of an FID evaluation on disk, and their merge.

Process p of n writes `<out_dir>/slices/slice_{p:05d}_of_{n:05d}.npz`
(Inception features of its references and samples, per-sample decode
reports and image digests) and then its `.json` (indices, settings,
summary); the .json's presence marks a slice done, and a rerun skips slices
whose settings match. `merge` checks that the slices cover each index
exactly once, computes FID per seed and slot and writes `results.json` with
the reproducibility record; with labelled references also FID per class,
and with guided samples their FID and class agreement (per_class.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

from etils import epath
import numpy as np

from codeclm.data.sources.base import DataError
from codeclm.eval import fid
from codeclm.eval import per_class
from codeclm.eval import work
from codeclm.runtime import storage

RESULTS = "results.json"
SLICES = "slices"
_SLICE_RE = re.compile(r"slice_(\d{5})_of_(\d{5})\.json$")


# -- the slices ----------------------------------------------------------------


def write_slice(out_dir: str, name: str, arrays: dict, info: dict) -> None:
  """The .npz, then the .json that marks the slice done (both atomic)."""
  path = storage.path(out_dir) / SLICES / name
  npz = io.BytesIO()
  np.savez(npz, **arrays)
  storage.write_bytes(f"{path}.npz", npz.getvalue())
  storage.write_json(f"{path}.json", info)


def finished_slice(out_dir: str, name: str, settings: dict) -> bool:
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


# -- merge ---------------------------------------------------------------------


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
  absent = sorted({work.slice_name(j, info["process_count"])
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


def merge(out_dir: str, fid_method: str = "sqrtm",
          min_per_class: int = 5) -> dict:
  """Checks the slices, computes FID per seed and slot, writes results.json.

  fid_method: "sqrtm" (pytorch-fid's, the standard) or "low_rank" (exact and
  much faster below 2048 images; see fid.low_rank_frechet). min_per_class:
  fewer references of a class are listed in fid_per_class, not scored.
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
          "clean_fraction", "ended", "new_tokens", "labels", "guided",
          "guided_clean_fraction", "guided_ended", "guided_rule_class")
  parts = []
  for path in paths:
    with np.load(io.BytesIO(epath.Path(f"{path}.npz").read_bytes())) as npz:
      parts.append({key: npz[key] for key in keys if key in npz})
  names = {json.dumps(info.get("label_names")) for info in infos}
  if len(names) > 1:
    raise DataError(f"The slices in {epath.Path(paths[0]).parent} name "
                    f"different reference classes ({sorted(names)}); delete "
                    "the stale slices and rerun.")
  order = np.argsort(np.concatenate([p["indices"] for p in parts]))
  cat = lambda key, axis: np.concatenate([p[key] for p in parts], axis)
  reference = cat("reference", 0)[order]
  generated = cat("generated", 2)[:, :, order]
  clean = cat("clean_fraction", 2)
  ended = cat("ended", 2)
  new_tokens = cat("new_tokens", 2)
  slots = work.slots_of(settings["ratios"], settings["unconditional"])
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
  label_names = infos[0].get("label_names")
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
      guidance=settings.get("guidance", []),
      classes=label_names,
      processes=sorted({info["process_count"] for info in infos}),
      fid_method=fid_method,
      std="population (ddof=0) over seeds")
  results = dict(step=settings["checkpoint_step"], metrics=metrics,
                 record=record)
  if label_names and "labels" in parts[0]:
    labels = cat("labels", 0)[order]
    conditional = [b for b, slot in enumerate(slots) if slot.ratio]
    if conditional:
      results["fid_per_class"] = per_class.fid_per_class(
          reference, generated[:, conditional], labels, label_names,
          [slots[b].name for b in conditional], settings["seeds"],
          min_per_class=min_per_class, method=fid_method)
    scales = settings.get("guidance") or []
    if scales:
      results.update(per_class.guided_metrics(
          reference, cat("guided", 2)[:, :, order], labels,
          np.arange(n), scales, settings["seeds"],
          clean=cat("guided_clean_fraction", 2),
          ended=cat("guided_ended", 2), method=fid_method,
          rule_classes=(cat("guided_rule_class", 2)[:, :, order]
                        if "guided_rule_class" in parts[0] else None)))
  storage.write_json(storage.path(out_dir) / RESULTS, results)
  return results


def write_tensorboard(results: dict, logdir: str) -> None:
  """fid/<slot> (mean over seeds), clean/<slot> and eos/<slot> scalars, and
  the class numbers (per_class.tensorboard_scalars)."""
  scalars = {}
  for name, m in results["metrics"].items():
    scalars.update({f"fid/{name}": m["fid_mean"],
                    f"fid_std/{name}": m["fid_std"],
                    f"clean/{name}": m["clean_fraction"],
                    f"eos/{name}": m["eos_fraction"]})
  scalars.update(per_class.tensorboard_scalars(results))
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
  for key, m in results.get("fid_guided", {}).items():
    rows.append(f"{'s=' + key:>8} {m['fid_mean']:>10.3f} {m['fid_std']:>8.3f} "
                f"{m['clean_fraction']:>6.3f} {m['eos_fraction']:>6.3f} "
                f"{m['num_images']:>6}  class agreement "
                f"{results['class_agreement'][key]:.3f}"
                + (f" (the source's rule: "
                   f"{results['class_agreement_by_rule'][key]:.3f})"
                   if "class_agreement_by_rule" in results else ""))
  if "classifier_accuracy" in results:
    rows.append(f"guided rows: class-conditional FID; the classifier's held-"
                f"out accuracy is {results['classifier_accuracy']:.3f}")
  if "fid_per_class" in results:
    per = results["fid_per_class"]
    rows.append(f"FID per class of {len(per['num_references'])} classes in "
                f"results.json (fid_per_class); {len(per['too_few'])} with "
                f"fewer than {per['min_per_class']} references not scored")
  return "\n".join(rows)
