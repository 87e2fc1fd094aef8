"""Sources: synthetic determinism, folder walking and labels, TFDS access."""

import functools
import io
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
from skimage import data as skdata

from codeclm.data import sources
from codeclm.data.sources import folder
from codeclm.data.sources import synthetic_images
from codeclm.data.sources import tfds_source
from codeclm.data.sources.base import DataError


def make_config(**data) -> ml_collections.ConfigDict:
  """The fields the data modules read, at tiny sizes; `data` overrides."""
  config = ml_collections.ConfigDict()
  config.seq_len = 256
  config.batch_size = 4
  config.seed = 0
  config.codec = ml_collections.ConfigDict(dict(
      name="jpeg", width=32, height=32, quality=25, subsampling="4:2:0"))
  config.data = ml_collections.ConfigDict(dict(
      source="synthetic", tfds_data_dir=None, num_examples=None,
      eval_examples=4, labels_from_folders=False, examples_per_shard=8,
      prepare_workers=1, tokenizer="", vocab_size=300, tokenizer_examples=100,
      packing="concat", drop_long=False, streams=0, loader_workers=0))
  config.data.update(data)
  return config


def source_of(config: ml_collections.ConfigDict):
  """sources.open_source on a test config's data and codec sections."""
  return sources.open_source(config.data, config.codec)


def write_image_folder(root: str, damaged: bool = True) -> dict[str, str]:
  """Real photos at several sizes and modes in two class folders, plus junk.

  Returns {relative path: what it is} for the images and damaged files.
  """
  photos = dict(astronaut=skdata.astronaut(), camera=skdata.camera(),
                coffee=skdata.coffee(), chelsea=skdata.chelsea(),
                coins=skdata.coins(), rocket=skdata.rocket())
  made = {}
  for i, (name, pixels) in enumerate(sorted(photos.items())):
    image = Image.fromarray(pixels)
    image = image.resize((40 + 13 * i, 30 + 17 * i))
    animal = name in ("chelsea", "coffee", "astronaut")
    folder = "animals" if animal else "things"
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    if i % 3 == 0:
      rel = os.path.join(folder, f"{name}.jpg")
      image.convert("RGB").save(os.path.join(root, rel), quality=90)
    elif i % 3 == 1:
      rel = os.path.join(folder, f"{name}.PNG")  # Upper-case extension too.
      image.save(os.path.join(root, rel))
    else:
      rel = os.path.join(folder, "deeper", f"{name}.webp")
      os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
      image.convert("RGBA" if i % 2 else "L").save(os.path.join(root, rel))
    made[rel] = "ok"
  with open(os.path.join(root, "things", "notes.txt"), "w") as f:
    f.write("not an image")  # Not an image extension: never listed.
  if damaged:
    jpeg = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(jpeg, "JPEG")
    junk = {
        os.path.join("things", "truncated.jpg"): jpeg.getvalue()[:300],
        os.path.join("things", "random.png"): np.random.default_rng(0).bytes(
            500),
        os.path.join("animals", "empty.jpg"): b"",
    }
    for rel, payload in junk.items():
      with open(os.path.join(root, rel), "wb") as f:
        f.write(payload)
      made[rel] = "damaged"
  return made


# -- synthetic -----------------------------------------------------------------


def test_synthetic_is_deterministic_by_index_in_any_order():
  a = synthetic_images.SyntheticSource(20, 48, 40)
  # A different count: same items.
  b = synthetic_images.SyntheticSource(50, 48, 40)
  forward = [np.asarray(a[i].data) for i in range(20)]
  backward = [np.asarray(b[i].data) for i in reversed(range(20))][::-1]
  for i, (x, y) in enumerate(zip(forward, backward)):
    assert x.shape == (40, 48, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, y)
    assert a[i].key == f"synthetic/{i}" and a[i].label is None
  # Different indices give different pictures.
  flat = {x.tobytes() for x in forward}
  assert len(flat) == 20


def test_synthetic_same_in_another_process():
  code = ("import hashlib; from codeclm.data.sources import synthetic_images;"
          "print(hashlib.sha256(synthetic_images.synthetic_image("
          "7, 64, 64).tobytes()).hexdigest())")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout.strip()
  import hashlib  # pylint: disable=g-import-not-at-top
  assert out == hashlib.sha256(
      synthetic_images.synthetic_image(7, 64, 64).tobytes()).hexdigest()


def test_synthetic_pictures_are_not_trivial():
  for i in range(30):
    x = synthetic_images.synthetic_image(i, 64, 64)
    colours = np.unique(x.reshape(-1, 3), axis=0)
    assert len(colours) >= 3, i  # Background plus at least one shape.
    # Edges exist: some neighbouring pixels differ strongly.
    assert np.abs(np.diff(x.astype(int), axis=1)).max() > 20, i


def test_open_source_synthetic_needs_a_count():
  with pytest.raises(DataError, match="num_examples"):
    source_of(make_config(source="synthetic"))
  with pytest.raises(DataError, match="num_examples"):
    source_of(make_config(source="synthetic", num_examples=0))
  s = source_of(make_config(num_examples=5))
  assert len(s) == 5 and s[0].data.size == (32, 32)  # A PIL image.
  np.testing.assert_array_equal(np.asarray(s[3].data),
                                synthetic_images.synthetic_image(3, 32, 32))
  with pytest.raises(IndexError):
    s[5]  # pylint: disable=pointless-statement


def test_open_source_synthetic_classes_labels_each_picture():
  s = source_of(make_config(source="synthetic_classes", num_examples=9,
                            num_classes=3))
  assert s.label_names == ["hue000", "hue120", "hue240"] and len(s) == 9
  assert [s[i].label for i in range(9)] == [0, 1, 2] * 3
  again = pickle.loads(pickle.dumps(s))  # Prepare's workers get a copy.
  np.testing.assert_array_equal(np.asarray(again[4].data),
                                np.asarray(s[4].data))
  assert not np.array_equal(np.asarray(s[4].data),
                            synthetic_images.synthetic_image(4, 32, 32))
  with pytest.raises(DataError, match="num_classes >= 2"):
    source_of(make_config(source="synthetic_classes", num_examples=9,
                          num_classes=1))
  video = make_config(source="synthetic_classes", num_examples=9,
                      num_classes=3)
  video.codec = ml_collections.ConfigDict(dict(name="avc"))
  with pytest.raises(DataError, match="makes images"):
    source_of(video)


def test_unknown_source_string():
  for spec in ("imagenet", "folder:", "tfds:", "s3:bucket"):
    with pytest.raises(DataError, match="config.data.source"):
      source_of(make_config(source=spec))


# -- folder --------------------------------------------------------------------


def test_folder_lists_every_image_sorted_with_labels(tmp_path):
  made = write_image_folder(str(tmp_path))
  config = make_config(source=f"folder:{tmp_path}", labels_from_folders=True)
  s = sources.open_source(config.data, config.codec)
  keys = [s[i].key for i in range(len(s))]
  assert sorted(keys) == sorted(made)  # txt ignored; damaged files listed.
  assert keys != sorted(keys)  # Mixed, so that eval spans the classes...
  again = sources.open_source(config.data, config.codec)
  assert [again[i].key for i in range(len(s))] == keys  # ...in a fixed order.
  assert s.label_names == ["animals", "things"]
  for i in range(len(s)):
    item = s[i]
    assert item.data == os.path.join(str(tmp_path), item.key)  # The path.
    assert s.label_names[item.label] == item.key.split(os.sep)[0]
  # Capped, and picklable for worker processes.
  capped = source_of(make_config(source=f"folder:{tmp_path}",
                                 num_examples=3))
  assert len(capped) == 3 and capped[2].key == keys[2]
  assert capped[0].label is None and capped.label_names is None
  clone = pickle.loads(pickle.dumps(s))
  assert [clone[i] for i in range(len(s))] == [s[i] for i in range(len(s))]


def test_folder_errors_name_the_path(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataError, match=str(missing)):
    source_of(make_config(source=f"folder:{missing}"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.md").write_text("no images")
  with pytest.raises(DataError, match="No image files"):
    source_of(make_config(source=f"folder:{tmp_path / 'empty'}"))
  loose = tmp_path / "loose"
  loose.mkdir()
  Image.new("RGB", (8, 8)).save(loose / "a.png")
  with pytest.raises(DataError, match="labels_from_folders"):
    source_of(make_config(source=f"folder:{loose}",
                          labels_from_folders=True))


def test_image_extensions_are_openable_formats():
  ext = folder.image_extensions()
  assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"} <= ext
  assert ".pdf" not in ext  # Pillow writes PDF but cannot read it.


# -- tfds ----------------------------------------------------------------------


@functools.cache
def _tiny_builder_class():
  """A real TFDS dataset built offline: 7 train + 3 test images."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CodeclmTinyImages(tfds.core.GeneratorBasedBuilder):
    # A one-part module name keeps TFDS from probing package resources (which
    # needs the `importlib_resources` backport, absent here).
    __module__ = "codeclm_tiny_images"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["even", "odd"])})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(7),
              "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        pixels = np.full((8 + i, 9, 3), 30 * i, np.uint8)
        yield i, {"image": pixels, "label": i % 2}

  return CodeclmTinyImages


def _tiny_builder(data_dir: str, file_format: str):
  builder = _tiny_builder_class()(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare()
  return builder


def test_tfds_array_record_and_tfrecord_read_the_same(tmp_path):
  seen = {}
  for fmt in ("array_record", "tfrecord"):
    data_dir = str(tmp_path / fmt)
    _tiny_builder(data_dir, fmt)
    s = source_of(make_config(source="tfds:codeclm_tiny_images",
                              tfds_data_dir=data_dir))
    assert s.random_access == (fmt == "array_record")
    assert len(s) == 7 and s.label_names == ["even", "odd"]
    items = [s[i] for i in range(len(s))]
    # Random access (and restarts of the sequential reader) agree.
    assert s[3] == items[3] and s[1] == items[1]
    assert pickle.loads(pickle.dumps(s))[5] == items[5]
    pictures = []
    for item in items:
      assert isinstance(item.data, bytes)  # Still encoded: the codec opens it.
      pixels = np.asarray(Image.open(io.BytesIO(item.data)))
      value = int(pixels[0, 0, 0]) // 30
      assert pixels.shape == (8 + value, 9, 3)
      assert item.label == value % 2
      pictures.append(value)
    assert sorted(pictures) == list(range(7))
    seen[fmt] = [(i.key, i.data, i.label) for i in items]
    test = source_of(make_config(
        source="tfds:codeclm_tiny_images:test", tfds_data_dir=data_dir))
    assert len(test) == 3
    with pytest.raises(DataError, match="no split 'val'"):
      source_of(make_config(source="tfds:codeclm_tiny_images:val",
                            tfds_data_dir=data_dir))
  assert seen["array_record"] == seen["tfrecord"]


def test_tfds_mock_data_both_access_paths():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    for random_access in (True, False):
      s = tfds_source.TfdsSource("cifar10", "train", "/nonexistent",
                                 random_access=random_access)
      assert len(s) == 6 and s.feature_key == "image"
      items = [s[i] for i in range(6)]
      for item in items:
        assert Image.open(io.BytesIO(item.data)).size == (32, 32)
        assert item.key.startswith("cifar10/train/")
      assert len({i.data for i in items}) == 6


def test_tfds_manual_download_error_names_the_step(tmp_path):
  with pytest.raises(DataError) as e:
    source_of(make_config(source="tfds:imagenet2012",
                          tfds_data_dir=str(tmp_path)))
  message = str(e.value)
  assert os.path.join(str(tmp_path), "downloads", "manual") in message
  assert "tfds build imagenet2012" in message
