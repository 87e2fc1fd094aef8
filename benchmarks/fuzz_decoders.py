r"""Fuzz of the JPEG and H.264 `decode`: model output is untrusted input.

  nice -n 19 python benchmarks/fuzz_decoders.py --cases=1000000
  python benchmarks/fuzz_decoders.py --tiny      # a seconds-long smoke run

Each case is a damaged stream, drawn from a seed derived from its index (so
any case can be replayed with --replay=INDEX), of one of these kinds:
  truncated  a real stream cut at a random length
  flipped    a real stream with 1 to 8 random bits flipped
  spliced    the head of one real stream and the tail of another (of either
             codec, cut at random points)
  random     random bytes (0 to 4,096), half of them after the codec's own
             stream start (JPEG SOI + prefix, an H.264 IDR start code)
  walk       (JPEG) a grammar-valid random walk (codeclm/sampling/
             jpeg_grammar.py) with one byte replaced; (H.264, which has no
             grammar) a real stream with one byte replaced
and goes through `codec.decode` of the JPEG codec (64 and 256 px, q25 4:2:0)
or the AVC codec (32x32 and 64x48, 15 frames, both header forms). A case
fails when decode raises or returns pixels of the wrong shape/dtype or a
report that does not add up. Real streams: scikit-image photographs (JPEG)
and synthetic clips (AVC). Cases are split over --workers processes
(default: all cores); a worker that dies (a crash in C) is reported.
Prints a markdown block for benchmarks/RESULTS.md; exits 1 on any failure.
"""

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import platform
import sys
import time
import traceback

from absl import app
from absl import flags
import numpy as np

from codeclm.codecs import avc
from codeclm.codecs import jpeg
from codeclm.data.sources import synthetic_videos
from codeclm.sampling import jpeg_grammar

_CASES = flags.DEFINE_integer("cases", 100_000, "Damaged streams to decode.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes (0: all cores).")
_CHUNK = flags.DEFINE_integer("chunk", 2_000, "Cases per task.")
_MAX_MINUTES = flags.DEFINE_float(
    "max_minutes", 0, "Stop starting tasks after this long (0: run all); "
    "the report counts the cases that ran.")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed of all cases.")
_TINY = flags.DEFINE_bool("tiny", False,
                          "Smoke run: 300 cases in this process, small seeds.")
_REPLAY = flags.DEFINE_integer("replay", -1,
                               "Run this one case here and print its error.")

KINDS = ("truncated", "flipped", "spliced", "random", "walk")
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "page")


def codecs_under_test(tiny: bool) -> list:
  """(name, codec) of every decoder setting fuzzed."""
  out = [("jpeg64", jpeg.JpegCodec(64, 64))]
  if not tiny:
    out.append(("jpeg256", jpeg.JpegCodec(256, 256)))
  out.append(("avc32", avc.AvcCodec(32, 32)))
  if not tiny:
    out += [("avc64x48", avc.AvcCodec(64, 48)),
            ("avc32kept", avc.AvcCodec(32, 32, keep_headers=True))]
  return out


@dataclasses.dataclass
class Corpus:
  """Per codec setting: its real streams and (JPEG) grammar walks."""
  codecs: list
  real: dict
  walks: dict
  seed: int


def build_corpus(tiny: bool, seed: int) -> Corpus:
  from skimage import data  # pylint: disable=g-import-not-at-top
  settings = codecs_under_test(tiny)
  photos = [getattr(data, n)() for n in PHOTOS[:2 if tiny else None]]
  real, walks = {}, {}
  rng = np.random.default_rng(seed)
  for name, codec in settings:
    if codec.name == "jpeg":
      real[name] = [codec.encode(p) for p in photos]
      automaton = jpeg_grammar.build(codec)
      walks[name] = automaton.random_walks(
          4 if tiny else (16 if codec.width > 64 else 64), rng)
    else:
      clips = range(2 if tiny else 6)
      real[name] = [codec.encode_frames(codec.load(
          synthetic_videos.synthetic_video(i, codec.width, codec.height,
                                           codec.frames), codec.fps))
                    for i in clips]
      walks[name] = real[name]
  return Corpus(settings, real, walks, seed)


def damaged(corpus: Corpus, index: int) -> tuple[str, str, bytes]:
  """(codec setting, kind, bytes) of case `index` (deterministic)."""
  rng = np.random.default_rng([corpus.seed, index])
  name, _ = corpus.codecs[index % len(corpus.codecs)]
  kind = KINDS[(index // len(corpus.codecs)) % len(KINDS)]
  pick = lambda xs: xs[rng.integers(len(xs))]
  base = pick(corpus.real[name])
  if kind == "truncated":
    out = base[:rng.integers(len(base) + 1)]
  elif kind == "flipped":
    buf = bytearray(base)
    for pos in rng.integers(0, len(buf) * 8, rng.integers(1, 9)):
      buf[pos // 8] ^= 1 << (pos % 8)
    out = bytes(buf)
  elif kind == "spliced":
    other = pick(corpus.real[pick(list(corpus.real))])
    out = base[:rng.integers(len(base) + 1)] + other[rng.integers(
        len(other) + 1):]
  elif kind == "random":
    out = rng.bytes(int(rng.integers(0, 4097)))
    if rng.random() < 0.5:
      out = base[:rng.integers(4, 64)] + out
  else:
    buf = bytearray(pick(corpus.walks[name]))
    buf[rng.integers(len(buf))] = rng.integers(256)
    out = bytes(buf)
  return name, kind, out


def check(codec, data: bytes) -> None:
  """decode must return and its output must add up; raises otherwise."""
  pixels, report = codec.decode(data)
  if codec.name == "jpeg":
    assert pixels.shape == (codec.height, codec.width, 3), pixels.shape
    assert report.expected == codec.num_mcus, report
    assert 0 <= report.clean <= min(report.found, report.expected), report
  else:
    assert pixels.shape[1:] == (codec.height, codec.width, 3), pixels.shape
    assert len(pixels) == report.frames_decoded <= codec.frames, report
    assert 0 <= report.slices_clean <= report.slices_found, report
  assert pixels.dtype == np.uint8, pixels.dtype


_CORPUS = None  # One per worker process, built by _init.


def _init(tiny: bool, seed: int) -> None:
  global _CORPUS  # pylint: disable=global-statement
  _CORPUS = build_corpus(tiny, seed)


def run_cases(start: int, stop: int) -> dict:
  """Counts per (setting, kind) and the first failures of cases start..stop."""
  codecs_by_name = dict(_CORPUS.codecs)
  cases, failed, examples = collections.Counter(), collections.Counter(), []
  begin, begin_cpu = time.perf_counter(), time.process_time()
  for index in range(start, stop):
    name, kind, data = damaged(_CORPUS, index)
    cases[name, kind] += 1
    try:
      check(codecs_by_name[name], data)
    except Exception as e:  # pylint: disable=broad-exception-caught
      failed[name, kind] += 1
      if len(examples) < 5:
        examples.append((index, name, kind, f"{type(e).__name__}: {e}"))
  return dict(cases=cases, failed=failed, examples=examples,
              seconds=time.perf_counter() - begin,
              cpu=time.process_time() - begin_cpu)


def main(argv):
  del argv
  tiny = _TINY.value
  total = 300 if tiny else _CASES.value
  if _REPLAY.value >= 0:
    _init(tiny, _SEED.value)
    name, kind, data = damaged(_CORPUS, _REPLAY.value)
    print(f"case {_REPLAY.value}: {name} {kind}, {len(data)} bytes")
    check(dict(_CORPUS.codecs)[name], data)
    print("decoded without error")
    return
  workers = 1 if tiny else (_WORKERS.value or len(os.sched_getaffinity(0)))
  start = time.perf_counter()
  cases, failed, examples, died = (collections.Counter(),
                                   collections.Counter(), [], [])
  chunks = [(i, min(i + _CHUNK.value, total))
            for i in range(0, total, _CHUNK.value)]
  if workers == 1:
    _init(tiny, _SEED.value)
    setup_s = time.perf_counter() - start
    results = [run_cases(*c) for c in chunks]
  else:
    context = multiprocessing.get_context("spawn")  # No libav state forked.
    results = []
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init,
        initargs=(tiny, _SEED.value)) as pool:
      futures = {pool.submit(run_cases, *c): c for c in chunks}
      setup_s = float("nan")
      for future in concurrent.futures.as_completed(futures):
        if _MAX_MINUTES.value and (
            time.perf_counter() - start > 60 * _MAX_MINUTES.value):
          for f in futures:
            f.cancel()  # Tasks not started yet; running ones finish.
        if future.cancelled():
          continue
        try:
          results.append(future.result())
        except Exception:  # pylint: disable=broad-exception-caught
          died.append((futures[future], traceback.format_exc(limit=1)))
  wall = time.perf_counter() - start
  for r in results:
    cases.update(r["cases"])
    failed.update(r["failed"])
    examples += r["examples"]
  ran = sum(cases.values())
  busy = sum(r["seconds"] for r in results)  # Worker time in run_cases.
  cpu = sum(r["cpu"] for r in results)
  lines = [
      f"{ran:,} cases in {wall:.1f} s wall on {workers} worker process(es): "
      f"{ran / wall:,.0f} cases/s (setup included"
      + (f", of it {setup_s:.1f} s" if setup_s == setup_s else "")
      + f"); decoding alone {ran / busy:,.0f} cases per worker-second of "
      f"wall time, {ran / cpu:,.0f} per CPU-second. 1,000,000 would take "
      f"{1e6 / (ran / wall) / 60:,.0f} min at this rate, "
      f"{1e6 / (ran / cpu) / workers / 60:,.0f} min on {workers} free cores. "
      f"Raised or bad output: {sum(failed.values())}; tasks lost to a dead "
      f"worker: {len(died)} ({sum(b - a for (a, b), _ in died):,} cases).",
      "",
      "| setting | " + " | ".join(KINDS) + " | failed |",
      "|---|" + "---|" * (len(KINDS) + 1),
  ]
  for name in sorted({n for n, _ in cases}):
    lines.append(f"| {name} | " + " | ".join(
        f"{cases[name, k]:,}" for k in KINDS)
                 + f" | {sum(failed[name, k] for k in KINDS)} |")
  lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at the end, Python "
            f"{platform.python_version()}."]
  for example in examples[:10]:
    lines.append(f"FAILED case {example[0]} ({example[1]} {example[2]}): "
                 f"{example[3]}")
  for (a, b), trace in died[:3]:
    lines.append(f"DIED cases {a}..{b}: {trace.strip().splitlines()[-1]}")
  print("\n".join(lines))
  if failed or died:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
