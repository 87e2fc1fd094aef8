"""Prepare: shards of codec bytes, manifest, skips, processes, resume, BPE."""

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from array_record.python import array_record_module
import numpy as np
import pytest

from codeclm import codecs
from codeclm.data import prepare
from codeclm.data import sources
from codeclm.data.sources.base import DataError
from codeclm.runtime import storage
from codeclm.tokenizer import ByteBPE
from tests.test_sources import make_config
from tests.test_sources import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_records(path: str) -> list[bytes]:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.read_all()
  finally:
    reader.close()


def all_records(out_dir: str) -> dict[str, list[bytes]]:
  """Every shard's records, by shard file name."""
  return {name: read_records(os.path.join(out_dir, name))
          for name in sorted(os.listdir(out_dir))
          if name.endswith(".array_record")}


def test_folder_with_damaged_files(tmp_path):
  made = write_image_folder(str(tmp_path / "images"))
  config = make_config(source=f"folder:{tmp_path / 'images'}",
                       labels_from_folders=True, eval_examples=3,
                       examples_per_shard=4, prepare_workers=2)
  out = str(tmp_path / "data")
  manifest = prepare.run(config.data, config.codec, out, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  source = sources.open_source(config.data, config.codec)
  keys = [source[i].key for i in range(len(source))]
  assert sorted(keys) == sorted(made)
  damaged = sorted(k for k, v in made.items() if v == "damaged")
  eval_ok = sum(keys[i] not in damaged for i in range(3))
  assert manifest["counts"] == dict(
      seen=len(keys), written=len(keys) - len(damaged), skipped=len(damaged),
      eval=eval_ok, train=len(keys) - len(damaged) - eval_ok)
  skipped = manifest["skipped"]
  assert sorted(s["key"] for s in skipped) == damaged
  for s in skipped:
    assert keys[s["index"]] == s["key"] and s["reason"]  # Says why.

  # Records: in source order, exactly what the codec makes of each file.
  codec = codecs.from_config(config.codec)
  assert base64.b64decode(manifest["header_b64"]) == codec.header()
  assert manifest["codec"] == json.loads(json.dumps(codec.settings()))
  lengths = []
  for shard in manifest["shards"]:
    records = read_records(os.path.join(out, shard["path"]))
    meta = storage.read_json(os.path.join(out, shard["path"].replace(
        ".array_record", ".json")))
    assert len(records) == shard["records"] == len(meta["indices"])
    expected = [i for i in range(shard["start"], shard["stop"])
                if keys[i] not in damaged]
    assert meta["indices"] == expected
    for index, record, label in zip(expected, records, meta["labels"]):
      assert record == codec.encode(source[index].data)
      assert manifest["label_names"][label] == keys[index].split(os.sep)[0]
      pixels, _ = codec.decode(record)
      assert pixels.shape == (32, 32, 3)
    lengths += [len(r) for r in records]
    assert shard["split"] == ("eval" if shard["stop"] <= 3 else "train")
  assert manifest["eval"]["indices"] == [0, 3]
  stats = manifest["bytes"]
  assert stats["total"] == sum(lengths)
  assert stats["min"] == min(lengths) and stats["max"] == max(lengths)
  assert stats["p50"] == pytest.approx(np.median(lengths))
  # The BPE was trained and saved beside the shards.
  tokenizer = ByteBPE.load(os.path.join(out, "tokenizer.json"))
  assert tokenizer.vocab_size >= 300
  assert prepare.load_manifest(out) == manifest


def test_two_processes_make_the_same_data_as_one(tmp_path):
  config = make_config(num_examples=21, eval_examples=3, examples_per_shard=4)
  one = str(tmp_path / "one")
  manifest = prepare.run(config.data, config.codec, one, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  two = str(tmp_path / "two")
  partial = prepare.run(config.data, config.codec, two, seed=config.seed,
                        process_index=0, process_count=2, progress=False,
                        wait=False)
  assert partial["complete"] is False  # Process 1 has not run yet.
  assert not os.path.exists(os.path.join(two, "manifest.json"))
  with pytest.raises(DataError, match="not finished"):
    prepare.merge(config.data, two, seed=config.seed)
  merged = prepare.run(config.data, config.codec, two, seed=config.seed,
                       process_index=1, process_count=2, progress=False,
                       wait=False)  # The last one merges.
  assert merged == manifest
  assert all_records(two) == all_records(one)
  assert manifest["counts"]["written"] == 21
  with open(os.path.join(one, "tokenizer.json"), "rb") as a, open(
      os.path.join(two, "tokenizer.json"), "rb") as b:
    assert a.read() == b.read()  # Seeded sample: the same BPE.
  assert prepare.merge(config.data, two,
                       seed=config.seed) == manifest  # Idempotent.


def test_prepare_into_a_bucket_uploads_what_a_local_prepare_writes(
    gcs_env, tmp_path, monkeypatch, capsys):
  """ArrayRecord writes local files only: for gs:// each shard is written to
  a local temporary file, uploaded and deleted. The bucket then holds, byte
  for byte, what a local prepare writes, and nothing else."""
  config = make_config(num_examples=21, eval_examples=3, examples_per_shard=4)
  local = str(tmp_path / "local")
  manifest = prepare.run(config.data, config.codec, local, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  staging = tmp_path / "tmp"
  staging.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(staging))
  bucket = storage.path(f"gs://test-bucket/prepared-{os.getpid()}")
  assert prepare.run(config.data, config.codec, os.fspath(bucket),
                     seed=config.seed, process_index=0,
                     process_count=1) == manifest
  assert "uploaded=6/6" in capsys.readouterr().err  # The progress bar.
  assert not list(staging.iterdir())  # Temporary files deleted.
  assert sorted(p.name for p in bucket.iterdir()) == sorted(os.listdir(local))
  for name in os.listdir(local):
    with open(os.path.join(local, name), "rb") as f:
      assert (bucket / name).read_bytes() == f.read(), name
  for name, records in all_records(local).items():  # Through a local copy.
    with storage.local_file(bucket / name) as copy:
      assert read_records(copy) == records
  assert prepare.run(config.data, config.codec, os.fspath(bucket),
                     seed=config.seed, process_index=0, process_count=1,
                     progress=False) == manifest  # Resumes.


_SLOW_PREPARE = """
import sys, time
sys.path.insert(0, {repo!r})
from codeclm.data import prepare
from codeclm.data.sources import synthetic_images
from tests.test_sources import make_config
getitem = synthetic_images.SyntheticSource.__getitem__
def slow(self, index):
  time.sleep(0.1)
  return getitem(self, index)
synthetic_images.SyntheticSource.__getitem__ = slow
config = make_config(**{data!r})
prepare.run(config.data, config.codec, {out!r}, seed=config.seed,
            process_index=0, process_count=1, progress=False)
print("finished")
"""


def test_killed_prepare_resumes_to_the_same_shards(tmp_path):
  data = dict(num_examples=40, eval_examples=4, examples_per_shard=6)
  config = make_config(**data)
  clean = str(tmp_path / "clean")
  prepare.run(config.data, config.codec, clean, seed=config.seed,
              process_index=0, process_count=1, progress=False)

  out = str(tmp_path / "killed")
  script = _SLOW_PREPARE.format(repo=REPO, data=data, out=out)
  proc = subprocess.Popen([sys.executable, "-c", script],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  first = os.path.join(out, "train-00000-of-00006.json")
  deadline = time.time() + 60
  while not os.path.exists(first) and time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # Mid-way through the next shard.
  proc.wait()
  assert os.path.exists(first)
  names = os.listdir(out)
  assert "manifest.json" not in names
  assert "train-00001-of-00006.array_record.tmp" in names  # Half-written.
  assert "train-00001-of-00006.array_record" not in names
  with pytest.raises(DataError, match="did not finish"):
    prepare.load_manifest(out)

  before = read_records(os.path.join(out, "train-00000-of-00006.array_record"))
  mtime = os.path.getmtime(first)
  manifest = prepare.run(config.data, config.codec, out, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  assert os.path.getmtime(first) == mtime  # Finished shards are not redone.
  assert all_records(out) == all_records(clean)
  assert before == all_records(clean)["train-00000-of-00006.array_record"]
  assert manifest == prepare.load_manifest(clean)
  assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_rerun_with_other_settings_is_refused(tmp_path):
  out = str(tmp_path / "data")
  ten = make_config(num_examples=10)
  manifest = prepare.run(ten.data, ten.codec, out, seed=ten.seed,
                         process_index=0, process_count=1, progress=False)
  tokenizer = os.path.join(out, "tokenizer.json")
  mtime = os.path.getmtime(tokenizer)
  assert prepare.run(ten.data, ten.codec, out, seed=ten.seed, process_index=0,
                     process_count=1, progress=False) == manifest
  assert os.path.getmtime(tokenizer) == mtime  # Nothing redone.
  with open(tokenizer, "rb") as f:
    before = f.read()
  bigger = make_config(num_examples=10, vocab_size=280)  # Only the BPE changes.
  assert prepare.run(bigger.data, bigger.codec, out, seed=bigger.seed,
                     process_index=0, process_count=1, progress=False
                     )["tokenizer_settings"]["vocab_size"] == 280
  with open(tokenizer, "rb") as f:
    assert f.read() != before  # Retrained.
  config = make_config(num_examples=10)
  config.codec.quality = 50
  with pytest.raises(DataError, match="different settings"):
    prepare.run(config.data, config.codec, out, seed=config.seed,
                process_index=0, process_count=1, progress=False)


def test_given_tokenizer_is_copied(tmp_path):
  first = str(tmp_path / "first")
  ten = make_config(num_examples=10)
  prepare.run(ten.data, ten.codec, first, seed=ten.seed, process_index=0,
              process_count=1, progress=False)
  given = os.path.join(first, "tokenizer.json")
  config = make_config(num_examples=12, tokenizer=given)
  second = str(tmp_path / "second")
  prepare.run(config.data, config.codec, second, seed=config.seed,
              process_index=0, process_count=1, progress=False)
  with open(given, "rb") as a, open(os.path.join(second, "tokenizer.json"),
                                    "rb") as b:
    assert a.read() == b.read()
  config.data.tokenizer = str(tmp_path / "missing.json")
  with pytest.raises(DataError, match="missing.json"):
    prepare.run(config.data, config.codec, str(tmp_path / "third"),
                seed=config.seed, process_index=0, process_count=1,
                progress=False)


def test_clear_errors(tmp_path):
  with pytest.raises(DataError, match="run --mode=prepare first"):
    prepare.load_manifest(str(tmp_path))
  no_train = make_config(num_examples=4, eval_examples=4)
  with pytest.raises(DataError, match="eval_examples"):
    prepare.run(no_train.data, no_train.codec, str(tmp_path),
                seed=no_train.seed, process_index=0, process_count=1,
                progress=False)
  junk = tmp_path / "junk"
  junk.mkdir()
  for i in range(3):
    (junk / f"{i}.jpg").write_bytes(b"not a jpeg")
  all_junk = make_config(source=f"folder:{junk}", eval_examples=0)
  with pytest.raises(DataError, match="No training examples"):
    prepare.run(all_junk.data, all_junk.codec, str(tmp_path / "out"),
                seed=all_junk.seed, process_index=0, process_count=1,
                progress=False)
  four = make_config(num_examples=4)
  with pytest.raises(ValueError, match="process_index"):
    prepare.run(four.data, four.codec, str(tmp_path), seed=four.seed,
                process_index=2, process_count=2)


def test_plan_shards_cover_every_index_once():
  shards = prepare.plan_shards(23, 5, 4)
  covered = [i for s in shards for i in range(s.start, s.stop)]
  assert covered == list(range(23))
  assert [s.split for s in shards] == ["eval"] * 2 + ["train"] * 5
  assert shards[0].name == "eval-00000-of-00002"
  assert shards[-1].name == "train-00004-of-00005"
  assert len({s.name for s in shards}) == len(shards)
