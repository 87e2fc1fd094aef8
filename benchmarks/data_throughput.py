r"""Data pipeline throughput: prepare (images/s) and the loader (tokens/s).

  python benchmarks/data_throughput.py
  python benchmarks/data_throughput.py --images=2000 --workers=8 \
      --folder=/path/to/photos --batches=100

Prepare: the synthetic source at 256x256 through `prepare.run` with
`--workers` encoder processes, against two single-core references on the
same pictures: Pillow's JPEG encode alone (the paper's options: quality 25,
4:2:0, tables stripped, a restart marker per MCU) and the whole per-image
work done in a plain loop (make the picture + codec.encode). The ratio of
prepare's per-core rate to each is printed (target: at least 0.8 of the
Pillow-only limit). With --folder, the same for a folder of photos, whose
reference includes reading, decoding and resizing the file (by default a
folder of copies of scikit-image's bundled photos, 172x448 to 872x1000).

Loader: the prepared shards read back with a 320-entry BPE, seq_len 12,288,
batch 8, in "concat" (the paper) and "pack" modes, for each --streams
(config.data.streams: 0 = one stream per row, the default). A 7B model at 50% MFU on
8 H100s consumes about 100K tokens/s per host, so the loader must deliver at
least 1M tokens/s per host (10x headroom); the verdict is printed.
"""

import io
import itertools
import os
import resource
import shutil
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
from PIL import Image

from codeclm import codecs
from codeclm.data import prepare
from codeclm.data import sources
# The loader (Grain) and the tokenizer are imported where used: prepare's
# encoder processes are spawned and re-import this script, and Grain alone
# would add about a CPU-second to each one's start-up.

_IMAGES = flags.DEFINE_integer("images", 4000, "Synthetic pictures to prepare.")
_BPE_EXAMPLES = flags.DEFINE_integer(
    "tokenizer_examples", 1000, "BPE training sample (the paper: 10,000).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Encoder processes; 0 = cores.")
_FOLDER = flags.DEFINE_string(
    "folder", "skimage", "Also time prepare on this folder of images; "
    "'skimage' = copies of scikit-image's bundled photos; '' = skip.")
_PHOTOS = flags.DEFINE_integer("photos", 400, "Files in the 'skimage' folder.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed loader batches per mode.")
_LOADER_WORKERS = flags.DEFINE_multi_integer(
    "loader_workers", [0], "config.data.loader_workers values to time.")
_STREAMS = flags.DEFINE_multi_integer(
    "streams", [0], "config.data.streams values to time (0 = one per row).")
_OUT = flags.DEFINE_string("out", "", "Where to prepare; '' = a temp dir.")

NEEDED_TOKENS_PER_S = 1_000_000  # 10x a 7B model's appetite per host.


def make_config(source: str, num_examples: int | None, workers: int,
                tokenizer_examples: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seq_len = 12_288
  config.batch_size = 8
  config.seed = 0
  config.codec = ml_collections.ConfigDict(dict(
      name="jpeg", width=256, height=256, quality=25, subsampling="4:2:0"))
  config.data = ml_collections.ConfigDict(dict(
      source=source, tfds_data_dir=None, num_examples=num_examples,
      eval_examples=8, labels_from_folders=False, examples_per_shard=256,
      prepare_workers=workers, tokenizer="", vocab_size=320,
      tokenizer_examples=tokenizer_examples, packing="concat", drop_long=False,
      streams=0, loader_workers=0))
  return config


def cpu_seconds() -> float:
  """CPU time of this process and its finished children (encoder workers)."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rate(fn, items) -> float:
  """Items per CPU-second of fn over items, on one core."""
  start = time.process_time()
  for x in items:
    fn(x)
  return len(items) / (time.process_time() - start)


def pillow_only(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, "JPEG", quality=25, subsampling="4:2:0", streamtype=2,
             restart_marker_blocks=1)
  return out.getvalue()


def bench_prepare(name: str, config, out_dir: str, workers: int) -> None:
  """Per-core rates use CPU time, so other load on the machine cancels out.

  Prepares twice: once in full (encode + BPE training), then again into a
  fresh directory with that BPE given, which times the encoding alone.
  """
  source = sources.open_source(config.data, config.codec)
  codec = codecs.from_config(config.codec)
  sample = range(min(len(source), 300))
  # References on one core, on the same inputs.
  loaded = [codec.load(source[i].data) for i in sample]
  limit = rate(pillow_only, loaded)
  work = rate(lambda i: codec.encode(source[i].data), sample)
  full = time.perf_counter()
  manifest = prepare.run(config.data, config.codec, out_dir, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  full = time.perf_counter() - full
  again = config.copy_and_resolve_references()
  again.data.tokenizer = os.path.join(out_dir, "tokenizer.json")
  wall, cpu = time.perf_counter(), cpu_seconds()
  prepare.run(again.data, again.codec, out_dir + "_encode_only",
              seed=again.seed, process_index=0, process_count=1,
              progress=False)
  wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
  shutil.rmtree(out_dir + "_encode_only")
  total = manifest["counts"]["seen"]
  per_cpu, per_wall = total / cpu, total / wall
  print(f"\n== prepare: {name}, {total} images at 256x256, {workers} encoder "
        f"processes ==")
  print(f"  Pillow encode only, 1 core:          {limit:8.1f} images/s")
  print(f"  source + codec.encode loop, 1 core:  {work:8.1f} images/s")
  print(f"  prepare.run, wall clock:             {per_wall:8.1f} images/s "
        f"({per_wall / workers:.1f} per core; {wall:.1f} s)")
  print(f"  prepare.run, per CPU-second:         {per_cpu:8.1f} images/s "
        "(all processes, start-up included)")
  print(f"  per core / Pillow-only limit:        {per_cpu / limit:8.2f} "
        f"(target >= 0.8: {'MET' if per_cpu >= 0.8 * limit else 'NOT MET'})")
  print(f"  per core / source+encode loop:       {per_cpu / work:8.2f}")
  print(f"  with BPE training ({config.data.tokenizer_examples} examples): "
        f"{full:.1f} s in all")
  print(f"  bytes per image: mean {manifest['bytes']['mean']:.0f}, p95 "
        f"{manifest['bytes']['p95']:.0f}; "
        f"skipped {manifest['counts']['skipped']}")


def bench_loader(config, data_dir: str) -> None:
  """Wall-clock tokens/s decides the verdict; per CPU-second is also shown
  because it does not depend on other load on the machine."""
  # pylint: disable=g-import-not-at-top
  from codeclm.data import loader
  from codeclm.tokenizer import ByteBPE
  # pylint: enable=g-import-not-at-top
  tokenizer = ByteBPE.load(os.path.join(data_dir, "tokenizer.json"))
  manifest = prepare.load_manifest(data_dir)
  print(f"\n== loader: seq_len {config.seq_len}, batch {config.batch_size}, "
        f"BPE {tokenizer.num_entries} entries + BOS/EOS, "
        f"{manifest['counts']['written']} images, one host ==")
  for packing, workers, streams in itertools.product(
      ("concat", "pack"), _LOADER_WORKERS.value, _STREAMS.value):
    config.data.update(packing=packing, loader_workers=workers,
                       streams=streams)
    it = loader.TrainBatches(config.data, data_dir, tokenizer,
                             seq_len=config.seq_len,
                             batch_size=config.batch_size, seed=config.seed)
    for _ in range(2):  # Warm up (threads, worker processes).
      next(it)
    wall, cpu = time.perf_counter(), cpu_now()
    real = 0
    for _ in range(_BATCHES.value):
      real += int((next(it)["segment_ids"] != 0).sum())
    wall, cpu = time.perf_counter() - wall, cpu_now() - cpu
    it.close()
    tokens = _BATCHES.value * config.batch_size * config.seq_len
    per_s = tokens / wall
    verdict = "OK" if per_s >= NEEDED_TOKENS_PER_S else "TOO SLOW"
    cpu_note = (f"{tokens / cpu / 1e6:5.2f}M per CPU-second" if not workers
                else "CPU not counted: workers still running")
    print(f"  {packing:6s} loader_workers={workers} streams={streams}: "
          f"{per_s / 1e6:5.2f}M tokens/s ({cpu_note}; "
          f"{real / tokens:.1%} real tokens) -> {verdict} "
          f"(need >= {NEEDED_TOKENS_PER_S / 1e6:.0f}M/s per host)")


def cpu_now() -> float:
  """CPU time of this process, all threads."""
  return time.process_time()


def skimage_folder(path: str, count: int) -> str:
  """`count` JPEG/PNG files cycling through scikit-image's bundled photos."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  names = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket",
           "hubble_deep_field", "immunohistochemistry", "page", "text")
  photos = [Image.fromarray(getattr(skdata, n)()) for n in names]
  os.makedirs(path, exist_ok=True)
  for i in range(count):
    photo = photos[i % len(photos)]
    ext = ".jpg" if i % 2 else ".png"  # Both decoders, as in real folders.
    photo.save(os.path.join(path, f"{i:05d}{ext}"), quality=90)
  return path


def main(argv):
  del argv
  flags.FLAGS.mark_as_parsed()
  workers = _WORKERS.value or os.cpu_count() or 1
  root = _OUT.value or tempfile.mkdtemp(prefix="codeclm_bench_")
  print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
        f"(other work on the machine slows wall-clock rates); output in {root}")
  try:
    synthetic = os.path.join(root, "synthetic")
    shutil.rmtree(synthetic, ignore_errors=True)
    config = make_config("synthetic", _IMAGES.value, workers,
                         tokenizer_examples=_BPE_EXAMPLES.value)
    bench_prepare("synthetic", config, synthetic, workers)
    if _FOLDER.value:
      images = _FOLDER.value
      if images == "skimage":
        images = skimage_folder(os.path.join(root, "photos"), _PHOTOS.value)
      folder = os.path.join(root, "folder")
      shutil.rmtree(folder, ignore_errors=True)
      bench_prepare(_FOLDER.value, make_config(
          f"folder:{images}", None, workers, _BPE_EXAMPLES.value),
          folder, workers)
    bench_loader(config, synthetic)
  finally:
    if not _OUT.value:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
