"""Video data: synthetic clips, folders of video files, TFDS videos, AVC shards.

Prepare and the loader are the ones images use; here they run on an Avc-LM
config, and PyAV (FFmpeg's H.264 decoder) checks the bytes independently.
"""

import functools
import io
import os

import av
from array_record.python import array_record_module
import numpy as np
import pytest

from codeclm import codecs
from codeclm.data import loader
from codeclm.data import prepare
from codeclm.data import sources
from codeclm.data.sources import folder
from codeclm.data.sources import synthetic_videos
from codeclm.data.sources import tfds_source
from codeclm.data.sources.base import DataError
from codeclm.runtime import storage
from codeclm.tokenizer import ByteBPE
from tests import tiny_config
from tests.test_loader import examples
from tests.test_sources import make_config
from tests.test_sources import source_of


def avc_config(**data):
  config = tiny_config.get_config("avc")
  config.data.update(data)
  return config


def read_records(path: str) -> list[bytes]:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.read_all()
  finally:
    reader.close()


def pyav_frames(data: bytes) -> np.ndarray:
  """An H.264 byte stream decoded by FFmpeg, as [T, H, W, 3] RGB."""
  with av.open(io.BytesIO(data), format="h264") as container:
    return np.stack([f.to_ndarray(format="rgb24")
                     for f in container.decode(video=0)])


def write_video(path: str, frames: np.ndarray, fps: int, codec: str) -> None:
  """A real video file written by PyAV (FFmpeg)."""
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    for pixels in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, "rgb24")))
    container.mux(stream.encode(None))


# -- synthetic -----------------------------------------------------------------


def test_synthetic_video_is_deterministic_varied_and_moving():
  clips = [synthetic_videos.synthetic_video(i, 48, 32, 15) for i in range(24)]
  for i in reversed(range(24)):  # Any order, any time: the same clip.
    np.testing.assert_array_equal(
        synthetic_videos.synthetic_video(i, 48, 32, 15), clips[i])
  assert len({c.tobytes() for c in clips}) == 24
  for i, clip in enumerate(clips):
    assert clip.shape == (15, 32, 48, 3) and clip.dtype == np.uint8
    steps = np.abs(np.diff(clip.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0).sum() >= 10, i  # Motion across the clip...
    colours = np.unique(clip[0].reshape(-1, 3), axis=0)
    assert len(colours) >= 3, i  # ...and content.
  # Other sizes and lengths draw the same kind of clip, at that size.
  assert (synthetic_videos.synthetic_video(3, 256, 144, 5).shape ==
          (5, 144, 256, 3))


def test_open_source_picks_videos_by_codec(tmp_path):
  source = source_of(avc_config(num_examples=6))
  assert isinstance(source, synthetic_videos.SyntheticVideoSource)
  item = source[5]
  assert item.key == "synthetic/5" and item.fps == 3.0
  np.testing.assert_array_equal(item.data,
                                synthetic_videos.synthetic_video(5, 32, 32, 15))
  with pytest.raises(IndexError):
    source[6]  # pylint: disable=pointless-statement
  # A folder of images is no video source, and says so.
  (tmp_path / "a.png").write_bytes(b"")
  with pytest.raises(DataError, match="No video files.*codec.name"):
    source_of(avc_config(source=f"folder:{tmp_path}"))
  config = avc_config(num_examples=6)
  config.codec.name = "gif"
  with pytest.raises(DataError, match="config.codec.name='gif'"):
    sources.open_source(config.data, config.codec)


# -- prepare and load ----------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The tiny Avc-LM config's synthetic clips as shards, plus their BPE."""
  config = avc_config()
  out = str(tmp_path_factory.mktemp("avc"))
  manifest = prepare.run(config.data, config.codec, out, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  return config, out, manifest


def test_prepare_writes_h264_streams_of_every_clip(prepared):
  config, out, manifest = prepared
  codec = codecs.from_config(config.codec)
  assert manifest["codec"]["name"] == "avc"
  assert manifest["counts"] == dict(seen=24, written=24, skipped=0, eval=4,
                                    train=20)
  for shard in manifest["shards"]:
    records = read_records(os.path.join(out, shard["path"]))
    assert len(records) == shard["records"] == shard["stop"] - shard["start"]
    for index, record in zip(range(shard["start"], shard["stop"]), records):
      clip = synthetic_videos.synthetic_video(index, 32, 32, 15)
      assert record == codec.encode(clip)  # In source order, exactly.
      frames, _ = codec.decode(record)
      assert frames.shape == (15, 32, 32, 3) and frames.dtype == np.uint8
      reference = pyav_frames(codec.wrap(record))  # FFmpeg, independently.
      np.testing.assert_array_equal(frames, reference)
      # QP 37 is lossy, but the clip is recognisable.
      assert np.abs(reference.astype(int) - clip).mean() < 30, index
  tokenizer = ByteBPE.load(os.path.join(out, "tokenizer.json"))
  assert tokenizer.vocab_size >= 300


def test_loader_yields_windows_of_avc_streams(prepared):
  config, out, manifest = prepared
  tokenizer = ByteBPE.load(os.path.join(out, "tokenizer.json"))
  train = [r for p in prepare.shard_paths(out, manifest, "train")
           for r in read_records(p)]
  config.batch_size = 4
  config.data.streams = 1  # Rows in order are one window stream.
  tokens = sum(len(tokenizer.encode(r)) + 2 for r in train)
  steps = -(-tokens // (4 * config.seq_len)) + 2  # Over one epoch.
  it = loader.TrainBatches(config.data, out, tokenizer,
                           seq_len=config.seq_len,
                           batch_size=config.batch_size, seed=config.seed)
  stream = []
  for _ in range(steps):
    batch = next(it)
    assert sorted(batch) == sorted(loader.BATCH_KEYS)
    assert batch["inputs"].shape == (4, config.seq_len)
    np.testing.assert_array_equal(batch["targets"][:, :-1],
                                  batch["inputs"][:, 1:])
    for row in range(4):
      stream += list(batch["inputs"][row]) + [batch["targets"][row, -1]]
  decoded = examples(stream, tokenizer)  # BOS ... EOS runs -> bytes.
  assert len(decoded) >= len(train)
  assert sorted(decoded[:len(train)]) == sorted(train)  # Each once an epoch.


# -- folders of video files ----------------------------------------------------


def test_folder_of_video_files_skips_and_lists_damaged_ones(tmp_path):
  root = tmp_path / "clips"
  (root / "walk").mkdir(parents=True)
  (root / "run").mkdir()
  made = {  # Several containers, codecs, sizes and frame rates.
      "walk/a.mp4": (synthetic_videos.synthetic_video(1, 40, 30, 20), 10,
                     "libx264"),
      "walk/b.mkv": (synthetic_videos.synthetic_video(2, 48, 36, 60), 24,
                     "mpeg4"),
      "run/c.avi": (synthetic_videos.synthetic_video(3, 30, 20, 12), 6,
                    "mpeg4"),
  }
  for rel, (frames, fps, codec_name) in made.items():
    write_video(str(root / rel), frames, fps, codec_name)
  good = (root / "walk" / "a.mp4").read_bytes()
  (root / "run" / "truncated.mp4").write_bytes(good[:len(good) // 3])
  (root / "run" / "garbage.mov").write_bytes(
      np.random.default_rng(0).bytes(3000))
  (root / "walk" / "notes.txt").write_text("not a video")  # Never listed.
  damaged = {"run/truncated.mp4", "run/garbage.mov"}

  config = avc_config(source=f"folder:{root}", labels_from_folders=True,
                      eval_examples=1, examples_per_shard=2)
  out = str(tmp_path / "data")
  manifest = prepare.run(config.data, config.codec, out, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  source = sources.open_source(config.data, config.codec)
  keys = [source[i].key for i in range(len(source))]
  assert sorted(keys) == sorted(set(made) | damaged)
  assert manifest["label_names"] == ["run", "walk"]
  assert manifest["counts"]["written"] == 3
  assert manifest["counts"]["skipped"] == 2
  assert {s["key"] for s in manifest["skipped"]} == damaged
  assert all(s["reason"] for s in manifest["skipped"])  # Says why.
  codec = codecs.from_config(config.codec)
  for shard in manifest["shards"]:
    meta = storage.read_json(os.path.join(
        out, shard["path"].replace(".array_record", ".json")))
    records = read_records(os.path.join(out, shard["path"]))
    for index, record in zip(meta["indices"], records):
      assert record == codec.encode(source[index].data)  # The codec opened it.
      frames = pyav_frames(codec.wrap(record))
      assert frames.shape == (15, 32, 32, 3), keys[index]


def test_video_extensions():
  ext = folder.video_extensions()
  assert {".mp4", ".mov", ".mkv", ".webm", ".avi"} <= ext
  assert not ext & {".txt", ".srt", ".wav", ".jpg", ".png"}


# -- tfds ----------------------------------------------------------------------


@functools.cache
def _tiny_video_builder_class():
  """A real TFDS video dataset built offline: 5 clips of 3..7 frames."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CodeclmTinyVideos(tfds.core.GeneratorBasedBuilder):
    __module__ = "codeclm_tiny_videos"  # See test_sources: no package probe.
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({
          "video": tfds.features.Video(shape=(None, 12, 16, 3)),
          "label": tfds.features.ClassLabel(names=["even", "odd"])})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        frames = np.arange(3 + i, dtype=np.uint8)[:, None, None, None] * 20
        yield i, {"video": np.broadcast_to(frames + 10 * i,
                                           (3 + i, 12, 16, 3)),
                  "label": i % 2}

  return CodeclmTinyVideos


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_video_frames_with_their_rate(tmp_path, file_format):
  data_dir = str(tmp_path)
  _tiny_video_builder_class()(data_dir=data_dir,
                              file_format=file_format).download_and_prepare()
  config = avc_config(source="tfds:codeclm_tiny_videos",
                      tfds_data_dir=data_dir, tfds_fps=2.0)
  config.codec.frames = 4  # 4 frames at 3 fps: 1.33 s = up to 4 source frames.
  source = sources.open_source(config.data, config.codec)
  assert len(source) == 5 and source.label_names == ["even", "odd"]
  made = []
  for i in reversed(range(5)):  # Clip j (TFDS's order) starts at level 10 j.
    item = source[i]
    j = int(item.data[0, 0, 0, 0]) // 10
    made.append(j)
    assert item.fps == 2.0 and item.label == j % 2
    n = min(3 + j, 4)  # Only what the codec keeps is decoded.
    assert item.data.shape == (n, 12, 16, 3) and item.data.dtype == np.uint8
    np.testing.assert_array_equal(item.data[:, 0, 0, 0],
                                  np.arange(n) * 20 + 10 * j)
  assert sorted(made) == list(range(5))
  # Prepare hands the codec the dataset's rate: 2 fps, not its own 3.
  manifest = prepare.run(config.data, config.codec, str(tmp_path / "data"),
                         seed=config.seed, process_index=0, process_count=1,
                         progress=False)
  assert manifest["counts"]["written"] == 5
  codec = codecs.from_config(config.codec)
  records = [r for split in ("eval", "train") for p in prepare.shard_paths(
      str(tmp_path / "data"), manifest, split) for r in read_records(p)]
  clips = [source[i].data for i in range(5)]
  assert records == [codec.encode(c, fps=2.0) for c in clips]
  assert records != [codec.encode(c) for c in clips]
  # Without a known rate, the error names the field to set.
  with pytest.raises(DataError, match="config.data.tfds_fps"):
    source_of(avc_config(source="tfds:codeclm_tiny_videos",
                         tfds_data_dir=data_dir))


def test_tfds_without_video_feature_names_the_fix():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=2,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(DataError,
                       match="no top-level Video.*codec.name='jpeg'"):
      source_of(avc_config(source="tfds:cifar10", tfds_fps=25.0))
    # And the image codec on it still works.
    assert len(source_of(make_config(source="tfds:cifar10"))) == 2
  assert tfds_source.TFDS_VIDEO_FPS["ucf101"] == 25.0
