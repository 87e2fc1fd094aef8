"""Golden bytes: the canonical codec bytes of fixed inputs are pinned.

tests/data/golden_<codec>.json records the sha256 and length of the canonical
bytes (and the stripped header) of a few fixed pictures and clips, with the
library versions that wrote them (Pillow/libjpeg for JPEG; PyAV, libavcodec
and x264 for AVC). A model learns one encoder's bytes: if the installed
libraries write other bytes, shards prepared earlier no longer match what this
machine writes, so this test fails and says which versions made which.

After an intended encoder change (then prepare the data again), regenerate:

    python -m tests.test_golden        # rewrites tests/data/golden_*.json

The same version records sit in every manifest; loading prepared data or a
workdir with other library versions warns (`codecs.version_differences`).
"""

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import pytest

from codeclm import codecs
from codeclm.codecs import avc
from codeclm.codecs import jpeg
from codeclm.data import loader
from codeclm.data import prepare
from codeclm.data.sources import synthetic_images
from codeclm.data.sources import synthetic_videos
from codeclm.tokenizer import ByteBPE
from tests import tiny_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REGENERATE = "python -m tests.test_golden"


def _astronaut() -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top
  return skimage.data.astronaut()  # 512x512: crop and LANCZOS resize too.


def _jpeg_cases():
  small, paper = jpeg.JpegCodec(64, 64), jpeg.JpegCodec()
  cases = {f"synthetic_image({i}, 64, 64)": (
      lambda i=i: small.encode(synthetic_images.synthetic_image(i, 64, 64)))
           for i in range(4)}
  cases["synthetic_image(0, 256, 256)"] = (
      lambda: paper.encode(synthetic_images.synthetic_image(0)))
  cases["skimage astronaut -> 256x256"] = lambda: paper.encode(_astronaut())
  cases["header() (quality 25, 4:2:0)"] = paper.header
  return paper, cases


def _avc_cases():
  small = avc.AvcCodec(64, 48)  # 15 frames at 3 fps, the paper's x264 setup.
  cases = {f"synthetic_video({i}, 64, 48)": (
      lambda i=i: small.encode_frames(
          synthetic_videos.synthetic_video(i, 64, 48)))
           for i in range(2)}
  cases["header() (SPS + PPS, 64x48)"] = small.header
  return small, cases


CASES = {"jpeg": _jpeg_cases, "avc": _avc_cases}


def versions(codec) -> dict:
  """The library versions in codec.settings() (the keys beyond its fields)."""
  fields = {f.name for f in dataclasses.fields(codec)} | {"name"}
  return {k: v for k, v in codec.settings().items() if k not in fields}


def record(data: bytes) -> dict:
  return dict(sha256=hashlib.sha256(data).hexdigest(), length=len(data))


def golden_path(name: str) -> str:
  return os.path.join(DATA, f"golden_{name}.json")


def write_golden(name: str) -> str:
  codec, cases = CASES[name]()
  golden = dict(regenerate=REGENERATE, versions=versions(codec),
                cases={case: record(make()) for case, make in cases.items()})
  path = golden_path(name)
  os.makedirs(DATA, exist_ok=True)
  with open(path, "w") as f:
    json.dump(golden, f, indent=1)
    f.write("\n")
  return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_canonical_bytes_match_golden(name):
  with open(golden_path(name)) as f:
    golden = json.load(f)
  codec, cases = CASES[name]()
  assert sorted(golden["cases"]) == sorted(cases), (
      f"{golden_path(name)} lists other cases than this test; run "
      f"`{REGENERATE}`.")
  changed = {case: (record(make()), golden["cases"][case])
             for case, make in cases.items()
             if record(make()) != golden["cases"][case]}
  assert not changed, (
      f"The installed {name} encoder writes other canonical bytes than the "
      f"golden ones for {len(changed)} of {len(cases)} inputs:\n"
      + "\n".join(f"  {case}: now {now['sha256'][:16]}.. ({now['length']} B),"
                  f" golden {old['sha256'][:16]}.. ({old['length']} B)"
                  for case, (now, old) in changed.items())
      + f"\nGolden values were written with {golden['versions']}; installed: "
      f"{versions(codec)}. A changed encoder invalidates prepared shards (and "
      "the stored header): models trained on them no longer see this "
      "machine's bytes. Install the golden versions, or, if the change is "
      f"intended, prepare the data again and run `{REGENERATE}`.")


# -- Version records in manifests. ---------------------------------------------


def test_version_differences_name_each_changed_library():
  codec = jpeg.JpegCodec(32, 32)
  stored = codec.settings()
  assert not codecs.version_differences(stored, codec)
  now = versions(codec)
  stored.update(pillow="9.5.0", libjpeg="6b")
  assert codecs.version_differences(stored, codec) == {
      "libjpeg": ("6b", now["libjpeg"]), "pillow": ("9.5.0", now["pillow"])}


def test_training_data_with_other_versions_warns_once(tmp_path, caplog):
  config = tiny_config.get_config()
  data_dir = str(tmp_path)
  prepare.run(config.data, config.codec, data_dir, seed=config.seed,
              progress=False)
  tokenizer = ByteBPE.load(os.path.join(data_dir, "tokenizer.json"))
  with caplog.at_level(logging.WARNING):
    loader.TrainBatches(config.data, data_dir, tokenizer,
                        seq_len=config.seq_len, batch_size=config.batch_size,
                        seed=config.seed)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

  path = os.path.join(data_dir, prepare.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  now = manifest["codec"]["pillow"]
  manifest["codec"]["pillow"] = "9.5.0"
  with open(path, "w") as f:
    json.dump(manifest, f)
  with caplog.at_level(logging.WARNING):
    batch = next(loader.TrainBatches(
        config.data, data_dir, tokenizer, seq_len=config.seq_len,
        batch_size=config.batch_size, seed=config.seed))
  assert batch["inputs"].shape == (config.batch_size, config.seq_len)
  warned = [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING]
  assert len(warned) == 1, warned
  assert f"pillow '9.5.0' -> '{now}'" in warned[0]
  assert path in warned[0] and "libjpeg" not in warned[0]
  assert "prepare the data again" in warned[0]


if __name__ == "__main__":
  for codec_name in sorted(CASES):
    print("wrote", write_golden(codec_name))
