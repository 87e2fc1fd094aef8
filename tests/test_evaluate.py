"""The sharded FID job: slices, merge, resume, the reproducibility record.

A real tiny checkpoint (tests/test_sample.py's workdir), random Inception
weights, 16 synthetic references, 2 ratios + unconditional, 2 seeds.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from codeclm.data.sources import synthetic_images
from codeclm.data.sources.base import DataError
from codeclm.eval import completions
from codeclm.eval import evaluate
from codeclm.eval import inception
from codeclm.eval import references
from codeclm.eval import results as results_lib
from codeclm.eval import work
from tests import test_sample
from tests import tiny_config

N, SEEDS, RATIOS = 16, (0, 1), (0.25, 0.5)


@pytest.fixture(scope="module")
def workdir():
  return test_sample.tiny_workdir()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "random.npz")
  inception.save_params(inception.random_params(0), path)
  return path


def eval_config(weights, out_dir, **overrides):
  c = tiny_config.get_config()
  # One device; min_bucket = the workdir's seq_len: one compiled bucket.
  c.sample.update(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=48,
                  cache_dtype="float32", min_bucket=256)
  c.eval.update({**dict(
      source="synthetic", num_examples=N, ratios=RATIOS, unconditional=True,
      seeds=SEEDS, inception_weights=weights, batch_size=8, feature_batch=8,
      mesh_shape=(1, 1, 1, 1), out_dir=str(out_dir), process_index=0,
      process_count=1, fid_method="low_rank"), **overrides})
  return c


@pytest.fixture(scope="module")
def two_shards(workdir, weights, tmp_path_factory):
  """Process 0 then 1 of 2; the second finds both slices and merges."""
  out = tmp_path_factory.mktemp("two_shards")
  first = evaluate.run(eval_config(weights, out, process_index=0,
                                   process_count=2), workdir)
  merged = evaluate.run(eval_config(weights, out, process_index=1,
                                    process_count=2), workdir)
  return out, first, merged


def test_two_shards_merge_into_complete_results(two_shards, workdir):
  out, first, merged = two_shards
  assert first is None  # Slice 1 was missing then.
  results = json.load(open(out / "results.json"))
  assert results == json.loads(json.dumps(merged))
  assert results_lib.merge(str(out), "low_rank") == results  # Deterministic.
  assert sorted(results["metrics"]) == ["r25", "r50", "uncond"]
  for name, m in results["metrics"].items():
    assert sorted(m["fid"]) == ["0", "1"], name
    values = list(m["fid"].values())
    assert all(np.isfinite(v) and v > 0 for v in values), (name, values)
    assert m["fid_mean"] == pytest.approx(np.mean(values))
    assert m["fid_std"] == pytest.approx(np.std(values))
    assert 0 <= m["clean_fraction"] <= 1 and 0 <= m["eos_fraction"] <= 1
    assert m["no_room_fraction"] == 0
    assert m["num_images"] == N and 0 < m["new_tokens_mean"] <= 48
  # The 1-step model writes bytes that decode as grey: completions keep
  # their prompt's clean MCU row (2 of 4), unconditional samples none.
  assert results["metrics"]["r25"]["clean_fraction"] >= 0.5
  # Each (seed, ratio) draws its own samples, even where two ratios cut the
  # same prompt (32x32 has 2 MCU rows: both cut one).
  sha = slice_arrays(out)["sample_sha256"]
  assert len({d.tobytes() for d in sha.reshape(-1, 32)}) == sha.size // 32

  record = results["record"]
  assert record["inception_sha256"] == inception.params_hash(
      inception.random_params(0))
  assert record["checkpoint_step"] == results["step"] == 1
  assert record["processes"] == [2] and record["seeds"] == list(SEEDS)
  assert record["fid_method"] == "low_rank"
  # The reference hash, recomputed from the synthetic pictures themselves.
  digests = b"".join(hashlib.sha256(synthetic_images.synthetic_image(i, 32, 32)
                                    .tobytes()).digest() for i in range(N))
  assert record["reference"] == dict(
      source="synthetic", split=f"first {N} items", num_examples=N,
      images_sha256=hashlib.sha256(digests).hexdigest(),
      images_sha256_of=record["reference"]["images_sha256_of"])
  assert record["images"]["downscale"] is False
  assert "299" in record["images"]["fid_input"]
  assert record["sampler"]["top_k"] == 40 and record["codec"]["width"] == 32
  for p, span in ((0, [0, 8]), (1, [8, 16])):
    info = json.load(open(out / "slices" / f"slice_{p:05d}_of_00002.json"))
    assert info["indices"] == list(range(*span))
    assert sorted(info["slots"]) == ["r25", "r50", "uncond"]
  events = os.listdir(os.path.join(workdir, "eval"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  # Unlabelled references and an unconditional workdir: no class numbers.
  assert not {"fid_per_class", "fid_guided", "class_agreement",
              "classifier_accuracy"} & set(results)
  assert info["settings"]["guidance"] == []


def slice_arrays(out_dir):
  """The slices' per-sample arrays, concatenated in index order."""
  parts = []
  for name in sorted(os.listdir(out_dir / "slices")):
    if name.endswith(".npz"):
      with np.load(out_dir / "slices" / name) as npz:
        parts.append({k: npz[k] for k in ("indices", "generated",
                                          "sample_sha256")})
  order = np.argsort(np.concatenate([p["indices"] for p in parts]))
  return {k: np.concatenate([p[k] for p in parts], 2)[:, :, order]
          for k in ("generated", "sample_sha256")}


def test_one_shard_with_another_batch_size_gives_the_same_numbers(
    two_shards, workdir, weights, tmp_path):
  """1 shard, batch 4, seed 1 and ratio 0.5 alone: the sampler ids depend
  only on (ratio, index), so these are the very samples of the full run."""
  out2, _, full = two_shards
  one = evaluate.run(eval_config(weights, tmp_path, seeds=(1,),
                                 ratios=(0.5,), batch_size=4), workdir)
  assert one["record"]["processes"] == [1]
  for name in ("r50", "uncond"):
    assert one["metrics"][name]["fid"]["1"] == pytest.approx(
        full["metrics"][name]["fid"]["1"], rel=1e-6), name
  got, want = slice_arrays(tmp_path), slice_arrays(out2)
  # Full run slots: r25, r50, uncond; this run's: r50, uncond.
  np.testing.assert_array_equal(got["sample_sha256"][0],
                                want["sample_sha256"][1, 1:])
  np.testing.assert_allclose(got["generated"][0], want["generated"][1, 1:],
                             rtol=1e-5, atol=1e-6)


def test_rerun_skips_finished_slices(two_shards, workdir, weights):
  out, _, results = two_shards
  files = sorted((out / "slices").iterdir())
  before = {f: f.stat().st_mtime_ns for f in files}
  for p in (0, 1):
    again = evaluate.run(eval_config(weights, out, process_index=p,
                                     process_count=2), workdir)
  assert {f: f.stat().st_mtime_ns for f in files} == before
  assert again == results
  with pytest.raises(DataError, match=r"different settings \(\['sampler'\]\)"):
    changed = eval_config(weights, out, process_index=0, process_count=2)
    changed.sample.top_k = 80
    evaluate.run(changed, workdir)


def test_merge_names_missing_and_duplicated_indices(two_shards, tmp_path):
  out, _, _ = two_shards
  shutil.copytree(out / "slices", tmp_path / "slices")
  one = tmp_path / "slices" / "slice_00001_of_00002"
  info = json.load(open(f"{one}.json"))
  os.rename(f"{one}.json", f"{one}.json.bak")
  with pytest.raises(DataError, match=r"8 missing indices \[8, 9, 10, 11, 12, "
                     r"13, 14, 15\] \(absent slices: \['slice_00001_of_00002'"):
    results_lib.merge(str(tmp_path))
  info["indices"][0] = 3  # Claims index 3 (slice 0's) instead of 8.
  json.dump(info, open(f"{one}.json", "w"))
  with pytest.raises(DataError) as error:
    results_lib.merge(str(tmp_path))
  message = str(error.value)
  assert "1 missing indices [8]" in message
  assert "1 duplicated indices [3]" in message
  assert "'slice_00000_of_00002', 'slice_00001_of_00002'" in message


def test_missing_inception_weights_name_the_url(workdir, tmp_path):
  for weights in ("", str(tmp_path / "absent.npz")):
    with pytest.raises(FileNotFoundError) as error:
      evaluate.run(eval_config(weights, tmp_path), workdir)
    assert inception.WEIGHTS_URL in str(error.value)
    assert "convert_inception" in str(error.value)


def test_downscale_canvas_and_the_area_fid_sees():
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
  full = small.repeat(2, axis=0).repeat(2, axis=1)  # 2x2 blocks: exact.
  want = np.zeros((8, 12, 3), np.uint8)
  want[:4, :6] = small
  canvas = references.to_canvas(full)
  np.testing.assert_array_equal(canvas, want)
  np.testing.assert_array_equal(references.fid_view(canvas, True), small)
  # A sample's pixels outside the active area never reach FID.
  noisy = canvas.copy()
  noisy[4:] = rng.integers(0, 256, noisy[4:].shape, dtype=np.uint8)
  noisy[:, 6:] = 255
  np.testing.assert_array_equal(references.fid_view(noisy, True), small)
  np.testing.assert_array_equal(references.fid_view(noisy, False), noisy)
  # The prompt ratio is of the active rows: half of the canvas's.
  assert references.prompt_ratio(0.5, True) == 0.25
  with pytest.raises(ValueError, match="even"):
    references.to_canvas(np.zeros((5, 4, 3), np.uint8))


def test_sample_ids_are_global_and_distinct():
  slots = work.slots_of((0.375, 0.4375, 0.5), True)
  assert [s.name for s in slots] == ["r37.5", "r43.75", "r50", "uncond"]
  ids = np.concatenate([work.sample_ids(s, range(5000)) for s in slots]
                       + [work.guided_ids(range(5000))])
  assert len(set(ids.tolist())) == len(ids)
  # The largest guided id still fits the sampler's uint32 ids.
  assert int(work.guided_ids([work.ID_STRIDE - 1])[0]) == 2**32 - 1
  np.testing.assert_array_equal(work.sample_ids(slots[2], [7]),
                                [5000 * work.ID_STRIDE + 7])
  assert [work.slice_bounds(10, p, 3) for p in range(3)] == [
      (0, 3), (3, 6), (6, 10)]
  with pytest.raises(ValueError, match="multiple of 0.0001"):
    work.slots_of((0.12345,), False)


def test_a_prompt_that_fills_max_len_is_scored_as_the_prompt(workdir):
  from codeclm.sampling import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  loaded = workdir_lib.load(workdir, mesh_shape=(1, 1, 1, 1))
  c = tiny_config.get_config()
  c.sample.update(max_new_tokens=8, cache_dtype="float32", min_bucket=256)
  sampler = workdir_lib.sampler_of(c.sample, loaded.model, loaded.tokenizer,
                              loaded.mesh, loaded.rules)
  image = synthetic_images.synthetic_image(0, 32, 32)
  fits = loaded.codec.prompt(loaded.codec.encode(image), 0.5)
  # The real prompt, padded with junk past the model's max_len (256).
  too_long = fits + bytes(range(256)) * 4
  assert len(loaded.tokenizer.encode(too_long)) >= loaded.model.config.max_len
  done = completions.complete(
      sampler, loaded.params, loaded.tokenizer, loaded.codec,
      [fits, too_long], [0, 1], workdir_lib.settings_of(c.sample, 8), seed=0,
      batch_size=2)
  assert done[0].new_tokens > 0 and done[0].data.startswith(fits)
  assert done[1].new_tokens == 0 and not done[1].ended
  assert done[1].data == too_long
  np.testing.assert_array_equal(done[1].pixels,
                                loaded.codec.decode(too_long)[0])


@pytest.mark.parametrize("module, flag", [
    ("codeclm.eval.evaluate", "--merge_only"),
    ("codeclm.eval.convert_inception", "--src"),
    ("codeclm.sampling", "--sample: ConfigDict")])
def test_command_line_modules_define_their_flags(module, flag):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", module, "--helpfull"],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=root), check=False)
  assert flag in done.stdout + done.stderr, done.stderr[-2000:]


def tree_sha256(folder) -> dict[str, str]:
  return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(folder.iterdir())}


@pytest.mark.slow
def test_two_processes_sample_and_evaluate_as_one_process(
    workdir, weights, tmp_path):
  """--mode=sample and --mode=eval as 2 processes x 4 devices (jax.distributed
  on localhost) against this process's 8 devices: the same files, byte for
  byte, the same slices per index and the same FID.

  Eval's batch of 2 rows is split 1 + 1 over the processes, so the 2-process
  calls hold other references together (0 and 2) than the 1-process ones
  (0 and 1): only the global sample ids decide what a row draws.
  """
  from codeclm.sampling import files  # pylint: disable=g-import-not-at-top
  from tests import multihost  # pylint: disable=g-import-not-at-top
  image = test_sample.photo_files(tmp_path)[0]
  sample = dict(num_samples=5, images=image, ratios=(0.5,), completions=2,
                max_new_tokens=24, mesh_shape=(-1, 1, 1, 1), min_bucket=256,
                batch_size=8)
  evals = dict(source="synthetic", num_examples=4, ratios=(0.5,),
               unconditional=False, seeds=(0,), inception_weights=weights,
               batch_size=2, feature_batch=4, mesh_shape=(-1, 1, 1, 1),
               fid_method="low_rank")
  flag = lambda section, key, value: f"--config.{section}.{key}={value}"
  flags = ([flag("sample", k, v) for k, v in sample.items()]
           + [flag("eval", k, v) for k, v in evals.items()])
  logs = {mode: multihost.run(2, workdir, [
      f"--mode={mode}", *flags,
      f"--config.sample.out_dir={tmp_path / 'two_samples'}",
      f"--config.eval.out_dir={tmp_path / 'two_eval'}"], timeout=400)
          for mode in ("sample", "eval")}
  # Each process drew and wrote its share: samples 0-1 and completion 0,
  # then samples 2-4 and completion 1.
  for log, count in zip(logs["sample"], (3, 4)):
    assert f"Wrote {count} samples to" in log, log[-3000:]

  c = tiny_config.get_config()
  c.sample.update(sample, out_dir=str(tmp_path / "one_samples"))
  c.eval.update(evals, out_dir=str(tmp_path / "one_eval"))
  summary = files.run(c.sample, workdir)
  one_eval = evaluate.run(c, workdir)

  one, two = (tree_sha256(tmp_path / f"{n}_samples") for n in ("one", "two"))
  assert one == two
  names = {k.rsplit(".", 1)[0] for k in one}
  assert names >= set(summary["samples"]) | {"samples", "astronaut_grid"}
  assert len(summary["samples"]) == 5 + 2
  # Process 1 of 2 drew samples 2-4 and completion 1: different streams.
  assert len({one[f"sample_{i:04d}.jpg"] for i in range(5)}) == 5

  assert sorted(os.listdir(tmp_path / "two_eval" / "slices")) == [
      f"slice_0000{p}_of_00002.{e}" for p in (0, 1) for e in ("json", "npz")]
  got, want = (slice_arrays(tmp_path / f"{n}_eval") for n in ("two", "one"))
  np.testing.assert_array_equal(got["sample_sha256"], want["sample_sha256"])
  np.testing.assert_array_equal(got["generated"], want["generated"])
  two_eval = json.load(open(tmp_path / "two_eval" / "results.json"))
  assert two_eval["record"]["processes"] == [2]
  assert two_eval["metrics"] == one_eval["metrics"]
  assert np.isfinite(one_eval["metrics"]["r50"]["fid"]["0"])

