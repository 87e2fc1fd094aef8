r"""A run on gs:// through a failing object store, against the same run without.

  python benchmarks/store_faults.py [--outage_s=30] [--rate=0.02]
  python benchmarks/store_faults.py --position_streams=128 [--latency_s=0.05]

The tiny test config (tests/tiny_config.py, float32) as a user runs it, each
stage a `python -m codeclm.main` process: train 4 steps (a checkpoint every
2), resume to 8, sample, eval. First on a local disk (the reference), then on
gs://bench/run on the GCS emulator (tests/gcs_emulator.py) behind
tests/fault_proxy.py, which answers `rate` of the requests each with 503, with
429, with a connection reset and slowly (0.5 s), and shuts the store for
`outage_s` seconds from the first request of step 2's checkpoint save. Prints
per stage the seconds, requests and faults injected by kind, then the losses
compared (every one in the run's TensorBoard event files) and how many differ
from the reference, and whether the samples and the eval results are
identical.

--position_streams=N times DataPositionHandler.save of N streams' positions
(Grain states of the size the loader writes) to the emulator, with 1 writer
(one upload after another, as before) and with data_position.WRITERS, each
request delayed by --latency_s (a real store's round trip) in the proxy.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests import fault_proxy  # pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = "bench"


def start_emulator(log_path: str) -> tuple[subprocess.Popen, str]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "wb") as log:
    proc = subprocess.Popen([sys.executable, os.path.join(
        ROOT, "tests", "gcs_emulator.py"), str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=log)
  for _ in range(300):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1)
      return proc, url
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"The emulator did not answer at {url}.")


def stages(data_dir: str, weights: str) -> list[tuple[str, list[str]]]:
  train = ["--config.train.ckpt_every=2", "--config.train.keep_last=10",
           "--config.model.dtype=float32"]
  return [
      ("train 1-4", train + ["--config.train.steps=4"]),
      ("resume 5-8", train + ["--config.train.steps=8"]),
      ("sample", ["--mode=sample", "--config.sample.num_samples=2",
                  "--config.sample.max_new_tokens=32",
                  "--config.sample.images="]),
      ("eval", ["--mode=eval", f"--config.eval.inception_weights={weights}",
                "--config.eval.num_examples=4", "--config.eval.seeds=(0,)",
                "--config.eval.ratios=(0.5,)",
                "--config.eval.unconditional=False",
                "--config.eval.feature_batch=4",
                "--config.eval.fid_method=low_rank",
                "--config.sample.max_new_tokens=32"]),
  ]


def run_stage(workdir: str, data_dir: str, flags: list[str], env: dict,
              log_path: str) -> float:
  cmd = [sys.executable, "-m", "codeclm.main",
         f"--config={ROOT}/tests/tiny_config.py", f"--workdir={workdir}",
         f"--config.data.dir={data_dir}", *flags]
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    code = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=ROOT, **env),
                          stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode
  if code:
    raise RuntimeError(f"{flags} exited {code}; see {log_path}")
  return time.perf_counter() - t0


def losses(workdir: str, tmp: str) -> dict[int, list[float]]:
  """step -> every loss in the workdir's event files (local copies)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from codeclm.runtime import storage  # pylint: disable=g-import-not-at-top
  out = {}
  for i, path in enumerate(sorted(storage.path(workdir).glob(
      "events.out.tfevents*"))):
    local = os.path.join(tmp, f"events-{i}")
    with open(local, "wb") as f:
      f.write(path.read_bytes())
    for event in tf.compat.v1.train.summary_iterator(local):
      for value in event.summary.value:
        if value.tag == "loss":
          out.setdefault(event.step, []).append(
              float(tf.make_ndarray(value.tensor)))
  return out


def outputs(workdir: str) -> dict[str, object]:
  """Sample files and eval results by path under the workdir, as content:
  arrays of an .npz (its zip headers hold the write time), JSON without the
  timing field "seconds", else the bytes."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from codeclm.runtime import storage  # pylint: disable=g-import-not-at-top
  found = {}
  for folder in ("samples", "eval"):
    for rel, f in storage.files(storage.path(workdir) / folder):
      data = f.read_bytes()
      if "events.out" in rel:
        continue
      if rel.endswith(".npz"):
        with np.load(io.BytesIO(data)) as z:
          data = {k: z[k].tobytes() for k in z.files}
      elif rel.endswith(".json"):
        data = json.loads(data)
        data.pop("seconds", None)
      found[f"{folder}/{rel}"] = data
  return found


def faults_run(args) -> None:
  tmp = tempfile.mkdtemp(prefix="store_faults_")
  from codeclm.data import prepare  # pylint: disable=g-import-not-at-top
  from codeclm.eval import inception  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  data_dir = os.path.join(tmp, "data")
  prepare.run(config.data, config.codec, data_dir, seed=config.seed,
              progress=False)
  weights = os.path.join(tmp, "inception.npz")
  inception.save_params(inception.random_params(0), weights)
  emulator, url = start_emulator(os.path.join(tmp, "emulator.log"))
  proxy = fault_proxy.FaultProxy(url, fault_proxy.Faults()).start()
  try:
    reference = os.path.join(tmp, "reference")
    rows = []
    for name, flags in stages(data_dir, weights):
      seconds = run_stage(reference, data_dir, flags, {},
                          os.path.join(tmp, f"reference {name}.log"))
      rows.append((f"reference (local disk): {name}", seconds, {}))
    workdir = f"gs://{BUCKET}/run"
    env = dict(STORAGE_EMULATOR_HOST=proxy.url,
               TENSORSTORE_GCS_HTTP_URL=proxy.url)
    for i, (name, flags) in enumerate(stages(data_dir, weights)):
      proxy.set_faults(fault_proxy.Faults(
          seed=i, p503=args.rate, p429=args.rate, reset=args.rate,
          slow=args.rate, slow_s=0.5,
          outage_on=r"/run/checkpoints/2/" if i == 0 else None,
          outage_s=args.outage_s))
      seconds = run_stage(workdir, data_dir, flags, env,
                          os.path.join(tmp, f"faults {name}.log"))
      rows.append((f"gs:// through faults: {name}", seconds, proxy.counts()))
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    want, got = losses(reference, tmp), losses(workdir, tmp)
    compared = sum(len(v) for v in got.values())
    differing = sum(x != want[s][0] for s, v in got.items() for x in v
                    if s in want)
    missing = sorted(set(want) - set(got)) + sorted(set(got) - set(want))
    expected, produced = outputs(reference), outputs(workdir)
    differ = sorted(k for k in expected.keys() | produced.keys()
                    if expected.get(k) != produced.get(k))
  finally:
    proxy.stop()
    emulator.kill()
  kinds = ("requests", "503", "429", "reset", "slow", "outage")
  print("| stage | s | " + " | ".join(kinds) + " | outage s |")
  print("|---|---|" + "---|" * (len(kinds) + 1))
  for name, seconds, counts in rows:
    print(f"| {name} | {seconds:.1f} | " + " | ".join(
        str(counts.get(k, "-")) for k in kinds)
          + f" | {counts.get('outage_seconds', '-')} |")
  total = {k: sum(c.get(k, 0) for _, _, c in rows) for k in kinds}
  print(f"\nTotal through the proxy: {json.dumps(total)}")
  print(f"Losses compared: {compared} (steps {sorted(got)}), differing from "
        f"the reference: {differing}; steps missing on one side: {missing}")
  print(f"Sample and eval files compared: {len(expected)}, differing from "
        f"the reference: {len(differ)} {differ}")
  print(f"Logs in {tmp}")


def position_run(args) -> None:
  """Seconds to save N streams' data position to the emulator."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from codeclm.train import data_position  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix="store_position_")
  emulator, url = start_emulator(os.path.join(tmp, "emulator.log"))
  # Every request waits latency_s first: a round trip to a real store,
  # which the emulator on this machine lacks.
  proxy = fault_proxy.FaultProxy(url, fault_proxy.Faults(
      slow=1.0 if args.latency_s else 0.0, slow_s=args.latency_s)).start()
  os.environ.update(STORAGE_EMULATOR_HOST=proxy.url,
                    TENSORSTORE_GCS_HTTP_URL=proxy.url)
  # A Grain state as the loader writes it (about 200 bytes per stream).
  state = {"next_index": 12345, "parent": {"next_index": 678, "remainder": [
      -1, -1], "buffer": list(range(20))}}
  n = args.position_streams
  save = data_position.DataSave(batch_size=n, num_streams=n,
                                streams={j: state for j in range(n)})
  handler = data_position.DataPositionHandler()
  try:
    for writers in (1, data_position.WRITERS, 1, data_position.WRITERS):
      data_position.WRITERS = writers
      directory = epath.Path(f"gs://{BUCKET}/position-{writers}-{time.time()}")
      directory.mkdir(parents=True, exist_ok=True)
      before = proxy.counts()["requests"]
      t0 = time.perf_counter()
      handler.save(directory, args=save)
      seconds = time.perf_counter() - t0
      requests = proxy.counts()["requests"] - before
      written = len(list(directory.iterdir()))
      print(f"{n} streams, {writers} writer(s), {args.latency_s * 1e3:.0f} "
            f"ms per request added: {seconds:.2f} s ({written} files, "
            f"{requests} requests)")
  finally:
    proxy.stop()
    emulator.kill()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--outage_s", type=float, default=30.0)
  parser.add_argument("--rate", type=float, default=0.02,
                      help="share of requests per fault kind")
  parser.add_argument("--position_streams", type=int, default=0)
  parser.add_argument("--latency_s", type=float, default=0.0,
                      help="--position_streams: seconds added per request")
  args = parser.parse_args()
  if args.position_streams:
    position_run(args)
  else:
    faults_run(args)


if __name__ == "__main__":
  main()
