r"""Labelled references: FID per class, class-conditional FID, class agreement.

With labelled references (folder sub-folders with data.labels_from_folders,
TFDS label features, the synthetic_classes source), the merge adds:

* `fid_per_class`: per ratio and seed, the FID between the completions of
  class c's references and those references (the paper's Figure 4 sets it
  against how common each class is). A class with fewer than
  eval.min_per_class references is listed with its count, not scored. A
  class with fewer references than feature dimensions (2048) is scored with
  fid.low_rank_frechet: exact there, and without the 2048^2 sqrtm per class
  that would make 1,000 classes take hours.
* Guided samples (a class-conditional workdir and eval.guidance): reference
  i of class c gets one sample from [BOS, class c] at each guidance scale, so
  the guided set has the references' class balance; `fid_guided` is its FID
  against all references (class-conditional FID), per scale.
* `class_agreement` per scale: the share of guided samples that a
  nearest-centroid classifier on Inception pool features assigns to the
  class they were asked for. The classifier is fit on half of each class's
  references (the 1st, 3rd, 5th... in index order) and scored on the other
  half (`classifier_accuracy`): the split depends on the labels and indices
  alone (never on the process count), every class with two references has a
  centroid and a held-out reference (a split by index parity would not: with
  labels i % 4, the even indices hold classes 0 and 2 only), and an
  agreement is only as good as that accuracy says the classifier is.
* `class_agreement_by_rule` per scale, where the reference source can tell
  a picture's class itself (synthetic_classes' hue rule, `class_of`): the
  share of guided samples that rule gives their requested class, a check
  that needs no Inception weights.

Each process's slice holds its references' labels (-1: unlabelled) and its
guided samples' features; only this merge sees every class.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from codeclm.eval import fid


def scale_key(scale: float) -> str:
  """The results.json key of a guidance scale: 3.0 -> "3", 1.5 -> "1.5"."""
  return f"{float(scale):g}"


# -- the nearest-centroid classifier -------------------------------------------


@dataclasses.dataclass(frozen=True)
class NearestCentroid:
  """Assigns a feature vector the class of the nearest class mean.

  Distances are Euclidean in float64; a tie goes to the smaller label.
  """
  labels: np.ndarray     # [C] the classes that have a centroid, ascending
  centroids: np.ndarray  # [C, D]

  @classmethod
  def fit(cls, features, labels) -> NearestCentroid:
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, np.int64)
    if features.ndim != 2 or len(features) != len(labels) or not len(labels):
      raise ValueError(f"NearestCentroid.fit: features {features.shape} and "
                       f"labels {labels.shape}; expected [N, D] and [N], "
                       "N >= 1.")
    classes, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(classes), features.shape[1]))
    np.add.at(sums, inverse, features)
    return cls(classes, sums / np.bincount(inverse)[:, None])

  def predict(self, features) -> np.ndarray:
    features = np.asarray(features, np.float64)
    # ||x - c||^2 without the ||x||^2 every class shares.
    scores = (self.centroids ** 2).sum(1) - 2 * features @ self.centroids.T
    return self.labels[np.argmin(scores, axis=1)]


def held_out_split(labels, indices) -> tuple[np.ndarray, np.ndarray]:
  """(fit, held out) masks: within each class, in index order, the 1st, 3rd,
  5th... reference fit the classifier and the 2nd, 4th... test it."""
  labels, indices = np.asarray(labels), np.asarray(indices)
  fit_on = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    fit_on[members[np.argsort(indices[members], kind="stable")[::2]]] = True
  return fit_on, ~fit_on


def classifier_of(reference, labels, indices) -> tuple[NearestCentroid, dict]:
  """The classifier fit on half of each class's references, and its record:
  accuracy on the other half and what it was fit on."""
  reference, labels = np.asarray(reference), np.asarray(labels)
  fit_on, held_out = held_out_split(labels, indices)
  if not held_out.any():
    raise ValueError("The classifier needs a class with two references at "
                     f"least (one to fit, one to test); got {len(indices)} "
                     "references: raise eval.num_examples.")
  classifier = NearestCentroid.fit(reference[fit_on], labels[fit_on])
  hits = classifier.predict(reference[held_out]) == labels[held_out]
  missing = sorted(set(labels[held_out].tolist())
                   - set(classifier.labels.tolist()))
  return classifier, dict(
      accuracy=float(hits.mean()), fit_references=int(fit_on.sum()),
      held_out_references=int(held_out.sum()),
      chance=1 / len(np.unique(labels)),
      classes_without_centroid=missing,
      split="per class in index order: 1st, 3rd, ... fit the centroids; "
            "2nd, 4th, ... give the accuracy")


# -- the numbers ---------------------------------------------------------------


def fid_per_class(reference, generated, labels, names: Sequence[str],
                  slot_names: Sequence[str], seeds: Sequence[int], *,
                  min_per_class: int, method: str) -> dict:
  """FID of each class's completions against that class's references.

  reference [N, D] and labels [N] in index order; generated [S, K, N, D]
  (seeds, slots); slot_names name the K slots (unconditional ones, which
  have no class, are skipped by the caller).
  """
  if min_per_class < 2:
    raise ValueError(f"eval.min_per_class={min_per_class}: FID needs at "
                     "least 2 references of a class.")
  counts = np.bincount(labels[labels >= 0], minlength=len(names))
  scored = [c for c in range(len(names)) if counts[c] >= min_per_class]
  out = dict(
      min_per_class=min_per_class,
      num_references={names[c]: int(counts[c]) for c in range(len(names))
                      if counts[c]},
      too_few={names[c]: int(counts[c]) for c in range(len(names))
               if 0 < counts[c] < min_per_class},
      method=method if method == "low_rank" else
      f"{method}; low_rank for classes under {reference.shape[1]} references",
      ratios={})
  for b, slot in enumerate(slot_names):
    per_class = {}
    for c in scored:
      mask = labels == c
      how = "low_rank" if counts[c] < reference.shape[1] else method
      values = {str(seed): fid.fid(generated[a, b][mask], reference[mask],
                                   how) for a, seed in enumerate(seeds)}
      array = np.array(list(values.values()))
      per_class[names[c]] = dict(fid=values, fid_mean=float(array.mean()),
                                 fid_std=float(array.std()))
    out["ratios"][slot] = per_class
  return out


def guided_metrics(reference, guided, labels, indices, scales: Sequence[float],
                   seeds: Sequence[int], *, clean, ended, method: str,
                   rule_classes=None) -> dict:
  """Class-conditional FID and class agreement of the guided samples.

  guided [S, G, N, D]: seed a, scale g, the sample asked for class
  labels[i] of reference i; clean and ended [S, G, N] their decode reports;
  rule_classes [S, G, N] (optional): the class the source's own rule gives
  each sample. Returns the results.json fields fid_guided, class_agreement,
  classifier_accuracy and classifier, and with rule_classes
  class_agreement_by_rule.
  """
  if (labels < 0).any():
    raise ValueError(f"{int((labels < 0).sum())} references have no label; "
                     "guided samples need a class for every reference.")
  classifier, record = classifier_of(reference, labels, indices)
  ref_stats = fid.statistics(reference) if method == "sqrtm" else None
  scored, agreement, by_rule = {}, {}, {}
  for g, scale in enumerate(scales):
    values, agrees = {}, {}
    for a, seed in enumerate(seeds):
      values[str(seed)] = (
          fid.frechet_distance(*fid.statistics(guided[a, g]), *ref_stats)
          if ref_stats else fid.low_rank_frechet(guided[a, g], reference))
      agrees[str(seed)] = float(
          (classifier.predict(guided[a, g]) == labels).mean())
    fids, shares = np.array(list(values.values())), np.array(
        list(agrees.values()))
    key = scale_key(scale)
    agreement[key] = float(shares.mean())
    scored[key] = dict(
        guidance=float(scale), fid=values, fid_mean=float(fids.mean()),
        fid_std=float(fids.std()), class_agreement=agrees,
        class_agreement_std=float(shares.std()),
        clean_fraction=float(clean[:, g].mean()),
        eos_fraction=float(ended[:, g].mean()),
        num_images=int(guided.shape[2]))
    if rule_classes is not None:
      shares = (np.asarray(rule_classes)[:, g] == labels).mean(1)
      scored[key]["class_agreement_by_rule"] = {
          str(seed): float(v) for seed, v in zip(seeds, shares)}
      by_rule[key] = float(shares.mean())
  out = dict(fid_guided=scored, class_agreement=agreement,
             classifier_accuracy=record["accuracy"], classifier=record)
  if rule_classes is not None:
    out["class_agreement_by_rule"] = by_rule
  return out


def tensorboard_scalars(results: dict) -> dict[str, float]:
  """The per-class and guided numbers as TensorBoard scalars."""
  scalars = {}
  for slot, per_class in results.get("fid_per_class", {}).get(
      "ratios", {}).items():
    for name, m in per_class.items():
      scalars[f"fid_class/{slot}/{name}"] = m["fid_mean"]
  for key, m in results.get("fid_guided", {}).items():
    scalars[f"fid_guided/s{key}"] = m["fid_mean"]
    scalars[f"class_agreement/s{key}"] = results["class_agreement"][key]
    if "class_agreement_by_rule" in results:
      scalars[f"class_agreement_by_rule/s{key}"] = results[
          "class_agreement_by_rule"][key]
  if "classifier_accuracy" in results:
    scalars["classifier_accuracy"] = results["classifier_accuracy"]
  return scalars
