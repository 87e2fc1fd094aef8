"""Per-class and class-conditional evaluation (codeclm/eval/per_class.py).

The nearest-centroid classifier and the class numbers on features placed by
hand (closed forms); then the eval job on a real tiny class-conditional
workdir (synthetic_classes, 3 classes, one training step) with random
Inception weights: 8 labelled references, as 1 slice and as 2 slices.
"""

import json
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from codeclm.data.sources import synthetic_classes
from codeclm.data.sources.base import DataError
from codeclm.eval import completions
from codeclm.eval import evaluate
from codeclm.eval import fid
from codeclm.eval import inception
from codeclm.eval import per_class
from codeclm.eval import references
from codeclm.tokenizer import ByteBPE
from tests import test_evaluate

N_CLASSES = 3
NAMES = synthetic_classes.label_names(N_CLASSES)
REFS = 8            # item i has class i % 3: 3, 3 and 2 references
MIN_PER_CLASS = 3   # so the third class is listed, not scored


# -- closed forms --------------------------------------------------------------


def test_nearest_centroid_on_points_placed_by_hand():
  features = [[0, 0], [2, 0],   # class 5: centroid (1, 0)
              [0, 4], [0, 6],   # class 2: centroid (0, 5)
              [10, 10]]         # class 7: centroid (10, 10)
  classifier = per_class.NearestCentroid.fit(features, [5, 5, 2, 2, 7])
  np.testing.assert_array_equal(classifier.labels, [2, 5, 7])
  np.testing.assert_array_equal(classifier.centroids,
                                [[0, 5], [1, 0], [10, 10]])
  # (1, 1): 1 from (1, 0). (0, 3): 4 from (0, 5), 10 from (1, 0). (6, 7): 25
  # from (10, 10), 40 from (0, 5). (0.5, 2.5): 6.5 from both (0, 5) and
  # (1, 0), a tie: the smaller label.
  np.testing.assert_array_equal(
      classifier.predict([[1, 1], [0, 3], [6, 7], [0.5, 2.5]]), [5, 2, 7, 2])


def held_out_features():
  """8 references of 2 classes: the 1st and 3rd of each class put the
  centroids at (0, 1) and (10, 1); of the others, index 5 (class 0, at
  (8, 0)) is misread."""
  reference = np.array([[0, 0], [1, 0], [10, 0], [9, 0], [0, 2], [8, 0],
                        [10, 2], [6, 0]], np.float64)
  labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
  return reference, labels


def test_classifier_is_fit_on_half_of_each_class_and_scored_on_the_rest():
  reference, labels = held_out_features()
  classifier, record = per_class.classifier_of(reference, labels,
                                               np.arange(8))
  np.testing.assert_array_equal(classifier.centroids, [[0, 1], [10, 1]])
  assert record["accuracy"] == 3 / 4 and record["chance"] == 1 / 2
  assert record["fit_references"] == record["held_out_references"] == 4
  assert record["classes_without_centroid"] == []
  # Labels i % 4 (synthetic_classes with 4 classes), indices out of order:
  # each class has references on both sides.
  indices = np.array([9, 2, 5, 0, 7, 4, 1, 6, 3, 8, 11, 10])
  fit_on, held_out = per_class.held_out_split(indices % 4, indices)
  assert sorted(indices[fit_on].tolist()) == [0, 1, 2, 3, 8, 9, 10, 11]
  assert sorted(indices[held_out].tolist()) == [4, 5, 6, 7]
  with pytest.raises(ValueError, match="two references"):
    per_class.classifier_of(reference[:2], [0, 1], np.arange(2))


def test_class_agreement_and_guided_fid_on_placed_samples():
  reference, labels = held_out_features()
  rng = np.random.default_rng(0)
  noise = lambda: rng.normal(0, 0.01, (8, 2))
  at_centroid = np.where(labels[:, None] == 0, [0, 1], [10, 1])
  guided = np.stack([
      # seed 0: scale 0 draws everything near class 0's centroid (agreement
      # 4/8), scale 3 each sample near its own class's (8/8);
      [[0, 1] + noise(), at_centroid + noise()],
      # seed 1: the same, but at scale 3 sample 2 (class 1) lands on class 0.
      [[0, 1] + noise(), at_centroid + noise() - 10 * (np.arange(8) == 2)[
          :, None] * [1, 0]],
  ])
  got = per_class.guided_metrics(
      reference, guided, labels, np.arange(8), (0.0, 3.0), (0, 1),
      clean=np.ones((2, 2, 8)), ended=np.zeros((2, 2, 8), bool),
      method="sqrtm")
  assert got["class_agreement"] == {"0": 0.5, "3": pytest.approx(15 / 16)}
  assert got["fid_guided"]["3"]["class_agreement"] == {
      "0": 1.0, "1": 7 / 8}
  assert got["classifier_accuracy"] == 3 / 4
  assert "class_agreement_by_rule" not in got
  # A source's own rule: at scale 3 of seed 1 two samples miss.
  rule = np.stack([[np.zeros(8), labels], [np.zeros(8), labels]]).astype(int)
  rule[1, 1, :2] = labels[:2] + 1
  by_rule = per_class.guided_metrics(
      reference, guided, labels, np.arange(8), (0.0, 3.0), (0, 1),
      clean=np.ones((2, 2, 8)), ended=np.zeros((2, 2, 8), bool),
      method="sqrtm", rule_classes=rule)
  assert by_rule["class_agreement_by_rule"] == {
      "0": (labels == 0).mean(), "3": pytest.approx((1 + 6 / 8) / 2)}
  assert by_rule["fid_guided"]["3"]["class_agreement_by_rule"] == {
      "0": 1.0, "1": 6 / 8}
  for g, key in enumerate(("0", "3")):
    for a in (0, 1):
      assert got["fid_guided"][key]["fid"][str(a)] == pytest.approx(
          fid.fid(guided[a, g], reference), rel=1e-9)
  with pytest.raises(ValueError, match="have no label"):
    per_class.guided_metrics(reference, guided, labels - 1, np.arange(8),
                             (0.0, 3.0), (0, 1), clean=np.ones((2, 2, 8)),
                             ended=np.zeros((2, 2, 8), bool), method="sqrtm")


def test_fid_per_class_of_shifted_classes_is_the_squared_shift():
  """Completions = references + a shift per class: equal covariances, so
  each class's FID is |shift|^2 (and the overall FID is not)."""
  rng = np.random.default_rng(1)
  labels = np.array([0, 1, 2] * 5 + [0, 1])  # 6, 6 and 5 references
  reference = rng.normal(size=(len(labels), 3))
  shifts = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
  generated = (reference + shifts[labels])[None, None]
  for method in fid.METHODS:
    got = per_class.fid_per_class(reference, generated, labels,
                                  ["a", "b", "c"], ["r50"], [7],
                                  min_per_class=6, method=method)
    assert got["num_references"] == {"a": 6, "b": 6, "c": 5}
    assert got["too_few"] == {"c": 5}
    assert sorted(got["ratios"]["r50"]) == ["a", "b"]
    assert got["ratios"]["r50"]["a"]["fid"]["7"] == pytest.approx(1, abs=1e-6)
    assert got["ratios"]["r50"]["b"]["fid_mean"] == pytest.approx(
        4, abs=1e-6)
  with pytest.raises(ValueError, match="at least 2"):
    per_class.fid_per_class(reference, generated, labels, ["a", "b", "c"],
                            ["r50"], [7], min_per_class=1, method="sqrtm")


def test_guidance_defaults_to_two_scales_for_class_conditional_workdirs():
  ec = lambda guidance: ml_collections.ConfigDict(dict(guidance=guidance))
  conditional, plain = dict(conditioning="class"), dict(conditioning="none")
  assert evaluate.guidance_scales(ec(None), conditional) == (0.0, 3.0)
  assert evaluate.guidance_scales(ec(None), plain) == ()
  assert evaluate.guidance_scales(ec(None), {}) == ()  # An older workdir.
  assert evaluate.guidance_scales(ec((1.5,)), conditional) == (1.5,)
  assert evaluate.guidance_scales(ec(()), conditional) == ()
  with pytest.raises(ValueError, match="needs a class-conditional workdir"):
    evaluate.guidance_scales(ec((3.0,)), plain)
  with pytest.raises(ValueError, match="repeats"):
    evaluate.guidance_scales(ec((3.0, 3.0)), conditional)


def test_folder_references_keep_their_labels(tmp_path):
  """A folder of class sub-folders, read as eval references."""
  from codeclm import codecs  # pylint: disable=g-import-not-at-top
  for i, name in enumerate(["dog", "cat", "dog"]):
    os.makedirs(tmp_path / name, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(
        tmp_path / name / f"{i}.png")
  c = test_evaluate.eval_config("", "", source=f"folder:{tmp_path}",
                                num_examples=3)
  c.data.labels_from_folders = True
  codec = codecs.from_settings(dict(c.codec))
  source = references.open_reference(c.eval, c.data, c.eval.source, codec)
  assert source.label_names == ["cat", "dog"]
  for i in range(3):
    pixels, label = references.load_reference(source, codec, i)
    # The picture's grey level says which file, hence which folder, it is.
    level = int(round(pixels.mean() / 40))
    assert label == (0 if level == 1 else 1)


# -- the eval job on a class-conditional workdir -------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A class-conditional tiny workdir, trained for one step."""
  from tests import test_class_conditioning  # pylint: disable=g-import-not-at-top
  return test_class_conditioning.class_workdir(
      str(tmp_path_factory.mktemp("classes") / "w"), N_CLASSES)


def class_eval_config(weights, out, p, count):
  # Batches of 4 (sampler and Inception): the same shapes in either run. No
  # grammar: it takes seconds to build per run (test_class_conditioning.py
  # samples with guidance and the grammar).
  c = test_evaluate.eval_config(
      weights, out, source="synthetic_classes", num_examples=REFS,
      ratios=(0.5,), unconditional=False, seeds=(0,), batch_size=4,
      feature_batch=4, min_per_class=MIN_PER_CLASS, process_index=p,
      process_count=count)
  c.sample.constrained = False
  c.data.num_classes = N_CLASSES
  return c


@pytest.fixture(scope="module")
def runs(workdir, tmp_path_factory):
  """The job as 1 slice and as 2 slices (guidance: its default)."""
  weights = str(tmp_path_factory.mktemp("inception") / "random.npz")
  inception.save_params(inception.random_params(0), weights)
  one, two = (tmp_path_factory.mktemp(n) for n in ("one", "two"))
  evaluate.run(class_eval_config(weights, one, 0, 1), workdir)
  assert evaluate.run(class_eval_config(weights, two, 0, 2), workdir) is None
  evaluate.run(class_eval_config(weights, two, 1, 2), workdir)
  return one, two


def slices(out_dir, keys):
  parts = []
  for name in sorted(os.listdir(out_dir / "slices")):
    if name.endswith(".npz"):
      with np.load(out_dir / "slices" / name) as npz:
        parts.append({k: npz[k] for k in ("indices", *keys)})
  return {k: np.concatenate([p[k] for p in parts], 0 if k in (
      "indices", "reference") else 2) for k in ("indices", *keys)}


def test_fid_per_class_equals_each_class_alone_on_one_or_two_slices(runs):
  one, two = runs
  results = json.load(open(two / "results.json"))
  per = results["fid_per_class"]
  assert per["num_references"] == {NAMES[0]: 3, NAMES[1]: 3, NAMES[2]: 2}
  assert per["too_few"] == {NAMES[2]: 2}
  assert per["min_per_class"] == MIN_PER_CLASS
  assert sorted(per["ratios"]["r50"]) == NAMES[:2]
  got = slices(two, ("reference", "generated"))
  np.testing.assert_array_equal(got["indices"], np.arange(REFS))
  classes = got["indices"] % N_CLASSES  # The source's rule: class i % N.
  for c in (0, 1):
    mask = classes == c
    alone = fid.fid(got["generated"][0, 0][mask], got["reference"][mask],
                    "low_rank")
    assert np.isfinite(alone) and alone > 0
    assert per["ratios"]["r50"][NAMES[c]]["fid"]["0"] == pytest.approx(
        alone, rel=1e-9)
  single = json.load(open(one / "results.json"))
  assert single["record"]["processes"] == [1]
  for c in (0, 1):
    assert single["fid_per_class"]["ratios"]["r50"][NAMES[c]]["fid"][
        "0"] == pytest.approx(per["ratios"]["r50"][NAMES[c]]["fid"]["0"],
                              rel=1e-5)


def test_guided_samples_give_class_agreement_and_conditional_fid(
    runs, workdir):
  one, two = runs
  results = json.load(open(two / "results.json"))
  info = json.load(open(two / "slices" / "slice_00001_of_00002.json"))
  assert info["settings"]["guidance"] == [0.0, 3.0]  # The default.
  assert info["label_names"] == NAMES
  assert sorted(info["slots"]) == ["guided_s0", "guided_s3", "r50"]
  assert sorted(results["class_agreement"]) == sorted(results["fid_guided"])
  assert sorted(results["fid_guided"]) == ["0", "3"]
  # Recomputed from the slices' features with a plain nearest-centroid rule.
  got = slices(two, ("reference", "guided", "guided_sha256"))
  reference, classes = got["reference"], got["indices"] % N_CLASSES
  # Classes 0, 1, 2 hold indices (0, 3, 6), (1, 4, 7), (2, 5): the 1st and
  # 3rd of each fit the centroids, the 2nd is held out.
  held_out = np.isin(got["indices"], [3, 4, 5])
  centroids = np.stack([reference[~held_out & (classes == c)].mean(0)
                        for c in range(N_CLASSES)])
  nearest = lambda x: np.argmin(
      ((x[:, None].astype(np.float64) - centroids[None]) ** 2).sum(-1), 1)
  assert results["classifier_accuracy"] == pytest.approx(
      (nearest(reference[held_out]) == classes[held_out]).mean())
  for g, key in enumerate(("0", "3")):
    m = results["fid_guided"][key]
    assert m["num_images"] == REFS and m["guidance"] == float(key)
    assert results["class_agreement"][key] == pytest.approx(
        (nearest(got["guided"][0, g]) == classes).mean())
    assert m["fid"]["0"] == pytest.approx(
        fid.low_rank_frechet(got["guided"][0, g], reference), rel=1e-9)
  # Each reference draws its own guided sample, and the scale reaches the
  # sampler: s = 3 changes the bytes (their pixels may not differ: a 1-step
  # model's bytes decode to flat grey).
  assert len({d.tobytes() for d in got["guided_sha256"][0, 0]}) == REFS
  assert (got["guided_sha256"][0, 0] != got["guided_sha256"][0, 1]).any()
  single = json.load(open(one / "results.json"))
  assert single["class_agreement"] == results["class_agreement"]
  # The source's hue rule (synthetic_classes.class_of) on every guided
  # sample, kept per slice and scored against the requested classes.
  rule = slices(two, ("guided_rule_class",))["guided_rule_class"]
  assert rule.shape == (1, 2, REFS) and set(rule.ravel()) <= set(
      range(N_CLASSES))
  assert results["class_agreement_by_rule"] == single[
      "class_agreement_by_rule"] == {
          key: pytest.approx((rule[0, g] == classes).mean())
          for g, key in enumerate(("0", "3"))}
  assert single["classifier_accuracy"] == results["classifier_accuracy"]
  for key in ("0", "3"):
    assert single["fid_guided"][key]["fid_mean"] == pytest.approx(
        results["fid_guided"][key]["fid_mean"], rel=1e-5)
  # TensorBoard beside today's scalars.
  from tests import test_train  # pylint: disable=g-import-not-at-top
  logdir = os.path.join(workdir, "eval")
  assert test_train.read_scalars(logdir, "class_agreement/s3")[1] == (
      pytest.approx(results["class_agreement"]["3"]))
  assert test_train.read_scalars(logdir, f"fid_class/r50/{NAMES[0]}")[1] == (
      pytest.approx(results["fid_per_class"]["ratios"]["r50"][NAMES[0]][
          "fid_mean"], rel=1e-5))


def test_guided_classes_are_matched_by_name(workdir):
  tokenizer = ByteBPE.load(os.path.join(workdir, "tokenizer.json"))
  assert tokenizer.class_names == tuple(NAMES)
  # References numbering the same classes the other way round.
  assert completions.model_classes(
      tokenizer, NAMES[::-1], np.array([0, 2, 1])) == [2, 0, 1]
  with pytest.raises(DataError, match=r"\['moon'\] are not among"):
    completions.model_classes(tokenizer, ["moon"], np.array([0]))
  with pytest.raises(DataError, match="have no labels"):
    completions.model_classes(tokenizer, None, np.array([-1]))
