r"""H.264 bytes and BPE tokens per video, and encode speed (paper's settings).

  PYTHONPATH=. python benchmarks/avc_tokens.py [--train=200 --held_out=50]

Videos: 256x144, 3 fps, 15 frames, libx264 with Avc-LM's settings (baseline,
QP 37, one macroblock per slice, ...), SPS/PPS/SEI stripped (codec.encode).
Clips come from data.sources.synthetic_videos (moving shapes and camera
pans over synthetic pictures): a 1024-entry BPE is trained on --train of them
and tokens are measured on --held_out others. As a check on texture, the same
BPE is also measured on pans over real photographs (scikit-image's, a window
gliding across the photo scaled to 1.6x the frame height) and on any animated
files found offline (scikit-image's tiny GIF; no camera video ships offline).

Reduction is against raw RGB frames (15 * 256 * 144 * 3 bytes; the paper:
about 15K tokens per video, about 110x). Speed, on one core (the process is
pinned to one CPU), best of --repeats passes, in CPU and wall time: x264
alone (PyAV libx264 on frames already at size), codec.encode_frames (x264 +
stripping), codec.encode of an in-memory clip (load + letterbox + encode),
and codec.encode of 640x360, 30 fps, 6 s MP4 files (decoding dominates).

The paper's form (keep_headers=True: x264's stream with its SPS, PPS and SEI)
is measured on the same clips: its own BPE trained on the kept-form training
clips, and the tokens per held-out clip compared with the stripped form's
(--forms=False skips this; it costs a second BPE training).
Prints a markdown block for benchmarks/RESULTS.md.
"""

import dataclasses
import glob
import io
import os
import platform
import time

from absl import app
from absl import flags
import av
import numpy as np
from PIL import Image
from skimage import data as skdata

from codeclm.codecs.avc import AvcCodec
from codeclm.data.sources.synthetic_videos import synthetic_video
from codeclm.tokenizer import ByteBPE

_TRAIN = flags.DEFINE_integer("train", 200, "Synthetic clips the BPE sees.")
_HELD_OUT = flags.DEFINE_integer("held_out", 50, "Synthetic clips measured.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024,
                              "BPE entries (with 256 bytes).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes; the best is kept.")
_FORMS = flags.DEFINE_bool("forms", True, "Also measure keep_headers=True.")

PAPER_TOKENS, PAPER_REDUCTION = 15_000, 110
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "motorcycle_left", "retina", "brick",
          "grass", "gravel", "page")
HELD_OUT_START = 1_000_000  # Synthetic indices of held-out clips.


def photo(name: str) -> np.ndarray:
  if name == "motorcycle_left":
    return skdata.stereo_motorcycle()[0]
  pixels = getattr(skdata, name)()
  return np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels[..., :3]


def photo_pan(name: str, codec: AvcCodec) -> np.ndarray:
  """A window of the codec's size gliding left to right (and a little down)
  across the photo scaled to 1.6x the frame height."""
  pixels = photo(name)
  h = int(codec.height * 1.6)
  w = max(int(pixels.shape[1] * h / pixels.shape[0]), codec.width + 32)
  canvas = np.asarray(Image.fromarray(pixels).resize(
      (w, h), Image.Resampling.LANCZOS))
  xs = np.linspace(0, w - codec.width, codec.frames).round().astype(int)
  ys = np.linspace(0, h - codec.height, codec.frames).round().astype(int)
  return np.stack([canvas[y:y + codec.height, x:x + codec.width]
                   for x, y in zip(xs, ys)])


def mp4_file(index: int) -> bytes:
  """A 640x360, 30 fps, 6 s MP4 (x264 defaults) of a synthetic clip."""
  frames = synthetic_video(index, 640, 360, 180)
  out = io.BytesIO()
  with av.open(out, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
    for rgb in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, "rgb24")))
    container.mux(stream.encode(None))
  return out.getvalue()


def best_rates(fn, items, repeats: int) -> tuple[float, float]:
  """Items per second of wall and of CPU time, fastest of `repeats` passes."""
  wall = cpu = float("inf")
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    for item in items:
      fn(item)
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return len(items) / wall, len(items) / cpu


def row(label: str, raw: int, nbytes: np.ndarray, ntokens: np.ndarray) -> str:
  return (f"| {label} | {len(nbytes)} | {nbytes.mean():,.0f} | "
          f"{np.percentile(nbytes, 95):,.0f} | {ntokens.mean():,.0f} | "
          f"{nbytes.sum() / ntokens.sum():.3f} | {raw / nbytes.mean():.0f}x | "
          f"{raw / ntokens.mean():.0f}x |")


def forms_table(codec: AvcCodec, train: list[bytes], held: list[bytes],
                held_clips: list[np.ndarray], tokenizer: ByteBPE) -> list[str]:
  """Markdown lines: tokens per held-out clip, stripped vs the paper's form."""
  kept_codec = dataclasses.replace(codec, keep_headers=True)
  # The same clips: kept-form training bytes from the same frames.
  kept_train = [kept_codec.encode(synthetic_video(i), fps=codec.fps)
                for i in range(len(train))]
  kept_held = [kept_codec.encode(clip) for clip in held_clips]
  start = time.perf_counter()
  kept_bpe = ByteBPE.train(kept_train, vocab_size=_VOCAB.value)
  bpe_s = time.perf_counter() - start
  stripped = np.array([len(tokenizer.encode(d)) for d in held])
  own = np.array([len(kept_bpe.encode(d)) for d in kept_held])
  same = np.array([len(tokenizer.encode(d)) for d in kept_held])
  extra_bytes = np.array([len(k) - len(d) for k, d in zip(kept_held, held)])
  diff = own - stripped
  return [
      f"Paper's form (keep_headers=True: x264's SPS, PPS and SEI kept): "
      f"{extra_bytes.mean():,.0f} more bytes per clip (min "
      f"{extra_bytes.min()}, max {extra_bytes.max()}); its own BPE trained on "
      f"the same {len(kept_train)} clips in that form ({bpe_s:.1f} s).",
      "",
      "| form, BPE | mean tokens | tokens - stripped's (mean / min / max) |",
      "|---|---|---|",
      f"| stripped (default), its BPE | {stripped.mean():,.1f} | 0 |",
      f"| kept (paper), its own BPE | {own.mean():,.1f} | {diff.mean():+.1f} / "
      f"{diff.min():+d} / {diff.max():+d} |",
      f"| kept (paper), the stripped form's BPE | {same.mean():,.1f} | "
      f"{(same - stripped).mean():+.1f} / {(same - stripped).min():+d} / "
      f"{(same - stripped).max():+d} |",
      "",
  ]


def main(argv):
  del argv
  cpu = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cpu})  # Before any thread pool starts: one core.
  codec = AvcCodec()
  raw = codec.frames * codec.width * codec.height * 3

  start = time.perf_counter()
  train = [codec.encode(synthetic_video(i), fps=codec.fps)
           for i in range(_TRAIN.value)]
  encode_s = time.perf_counter() - start
  start = time.perf_counter()
  tokenizer = ByteBPE.train(train, vocab_size=_VOCAB.value)
  bpe_s = time.perf_counter() - start

  held_clips = [synthetic_video(HELD_OUT_START + i)
                for i in range(_HELD_OUT.value)]
  held = [codec.encode(clip) for clip in held_clips]
  pans = [codec.encode(photo_pan(name, codec)) for name in PHOTOS]
  files = sorted(glob.glob(os.path.join(os.path.dirname(skdata.__file__),
                                        "*.gif")))
  found = []
  for path in files:
    with av.open(path) as f:
      if f.streams.video and f.streams.video[0].frames > 1:
        found.append((os.path.basename(path), codec.encode(path)))

  def counts(datas):
    return (np.array([len(d) for d in datas]),
            np.array([len(tokenizer.encode(d)) for d in datas]))

  lines = [
      f"Clips: BPE of {_VOCAB.value} entries (+BOS/EOS) trained on "
      f"{len(train)} synthetic clips ({sum(map(len, train)):,} bytes; encoded "
      f"in {encode_s:.1f} s, BPE trained in {bpe_s:.1f} s); measured on "
      f"{len(held)} other synthetic clips, {len(pans)} pans over real photos "
      f"and {len(found)} animated file(s) found offline "
      f"({', '.join(n for n, _ in found) or 'none'}).",
      "",
      "| videos | n | mean bytes | p95 bytes | mean tokens | bytes/token | "
      "RGB/bytes | RGB/tokens |",
      "|---|---|---|---|---|---|---|---|",
      row("synthetic, held out", raw, *counts(held)),
      row("synthetic, BPE's own", raw, *counts(train)),
      row("pans over real photos", raw, *counts(pans)),
  ]
  if found:
    lines.append(row("animated files offline", raw,
                     *counts([d for _, d in found])))
  nbytes, ntokens = counts(held)
  lines += [
      "",
      f"Paper: about {PAPER_TOKENS:,} tokens per video, {PAPER_REDUCTION}x. "
      f"Held-out synthetic: {ntokens.mean():,.0f} tokens "
      f"({ntokens.mean() / PAPER_TOKENS:.2f} of the paper's), "
      f"{raw / ntokens.mean():.0f}x.",
      "",
  ]

  if _FORMS.value:
    lines += forms_table(codec, train, held, held_clips, tokenizer)

  frames = [codec.load(clip) for clip in held_clips[:20]]
  mp4s = [mp4_file(HELD_OUT_START + i) for i in range(4)]
  repeats = _REPEATS.value
  # pylint: disable-next=protected-access
  x264 = best_rates(codec._x264, frames, repeats)
  enc = best_rates(codec.encode_frames, frames, repeats)
  full = best_rates(codec.encode, held_clips[:20], repeats)
  files = best_rates(codec.encode, mp4s, repeats)
  tok = best_rates(tokenizer.encode, held[:20], repeats)
  lines += [
      f"Speed on one core (the process pinned to CPU {cpu}), best of "
      f"{repeats} passes; load average {os.getloadavg()[0]:.1f} on "
      f"{os.cpu_count()} CPUs at the end:",
      "",
      "| what | videos/s (CPU time) | videos/s (wall) |",
      "|---|---|---|",
      f"| (a) PyAV libx264 alone, frames at size (the limit) | {x264[1]:.1f} | "
      f"{x264[0]:.1f} |",
      f"| (b) codec.encode_frames: x264 + stripping | {enc[1]:.1f} | "
      f"{enc[0]:.1f} |",
      f"| (b) / (a) | {enc[1] / x264[1]:.2f} | {enc[0] / x264[0]:.2f} |",
      f"| codec.encode of a 256x144 clip at 3 fps (load + encode) | "
      f"{full[1]:.1f} | {full[0]:.1f} |",
      f"| codec.encode of a 640x360 30 fps 6 s MP4 (decode + resample + "
      f"letterbox + encode) | {files[1]:.1f} | {files[0]:.1f} |",
      f"| tokenizer.encode alone | {tok[1]:.1f} | {tok[0]:.1f} |",
      "",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
      f"{platform.python_version()}, PyAV {av.__version__}, libavcodec "
      f"{codec.settings()['libavcodec']}, x264 {codec.settings()['x264']}.",
  ]
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
