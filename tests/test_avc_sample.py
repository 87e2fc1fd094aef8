"""Sampling an Avc-LM checkpoint: videos out, and frame strips in TensorBoard."""

import glob
import io
import json
import os

import av
import numpy as np
from PIL import Image
import pytest

from codeclm.codecs import avc
from codeclm import config_base
from codeclm.data.sources import synthetic_videos
from codeclm.sampling import files
from codeclm.train import loop
from tests import tiny_config

RATIO = 0.2  # 3 of 15 frames: short prompts keep the test's windows small.


def tb_images(workdir: str) -> dict[str, np.ndarray]:
  """The last image of each tag in the run's real TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith("samples/"):
          png = value.tensor.string_val[2]  # [width, height, png, ...]
          out[value.tag] = np.asarray(Image.open(io.BytesIO(png)))
  return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Two training steps of the tiny AVC config, with TensorBoard samples."""
  path = str(tmp_path_factory.mktemp("avc_run"))
  c = tiny_config.get_config("avc")
  c.seq_len = 512
  c.train.update(steps=2, ckpt_every=2, async_checkpoints=False,
                 compilation_cache=False)
  c.sample.update(tb_every=2, tb_samples=2, tb_images=1, completions=1,
                  tb_ratio=RATIO, max_new_tokens=24, min_bucket=512)
  loop.train(c, path)
  return path


def test_training_writes_frame_strips_to_tensorboard(workdir):
  images = tb_images(workdir)
  strip_w = 15 * 32  # One row per video: 15 frames of 32x32 side by side.
  # Two unconditional videos, one row each.
  assert images["samples/unconditional"].shape[:2] == (2 * 32 + 2, strip_w)
  # prompt | completion | original, one row each.
  grid = images["samples/completions"]
  assert grid.shape[:2] == (3 * 32 + 2 * 2, strip_w)
  # The prompt's 3 frames are real pictures, its other 12 slots grey.
  prompt = grid[:32]
  assert prompt[:, 3 * 32:].min() == prompt[:, 3 * 32:].max() == 128
  assert prompt[:, :3 * 32].std() > 5


def test_sample_command_writes_videos_and_reports(workdir, tmp_path):
  codec = avc.AvcCodec(width=32, height=32)
  clip = str(tmp_path / "clip")
  codec.save(clip, codec.encode(synthetic_videos.synthetic_video(3, 32, 32)))
  out = tmp_path / "out"
  cfg = config_base.lm_config("demo").sample
  cfg.update(num_samples=1, images=clip + ".mp4", ratios=(RATIO,),
             completions=1, max_new_tokens=64, mesh_shape=(1, 1, 1, 1),
             min_bucket=512, out_dir=str(out))
  summary = files.run(cfg, workdir)
  assert sorted(summary["samples"]) == ["clip_r20_0", "sample_0000"]
  for name in summary["samples"]:
    info = json.load(open(out / f"{name}.json"))
    assert info["report"]["frames_expected"] == 15
    assert info["files"] == [f"{name}.{e}" for e in ("h264", "mp4", "gif",
                                                     "png")] or (
        info["report"]["frames_decoded"] == 0)
  # The completion starts with its prompt's 3 frames, and its .mp4 plays
  # (PyAV, an independent decoder) as many frames as the report says.
  info = json.load(open(out / "clip_r20_0.json"))
  assert info["report"]["frames_decoded"] >= 3 and info["ratio"] == RATIO
  full = codec.encode(clip + ".mp4")
  prompt_frames = codec.decode(codec.prompt(full, RATIO))[0]
  assert len(prompt_frames) == 3
  data = open(out / "clip_r20_0.h264", "rb").read()
  frames = codec.decode(data)[0]
  np.testing.assert_array_equal(frames[:3], prompt_frames)
  played = []
  with av.open(str(out / "clip_r20_0.mp4")) as container:
    for packet in container.demux(video=0):
      try:  # A player skips a damaged access unit, as codec.decode does.
        played += [f.to_ndarray(format="rgb24") for f in packet.decode()]
      except av.error.InvalidDataError:
        pass
  assert len(played) == info["report"]["frames_decoded"]
  np.testing.assert_array_equal(played[0], prompt_frames[0])
  grid = np.asarray(Image.open(out / "clip_grid.png"))
  assert grid.shape[:2] == (3 * 32 + 2 * 2, 15 * 32)
  assert (out / "clip_original.mp4").exists()
