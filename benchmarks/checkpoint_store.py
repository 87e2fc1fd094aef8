r"""Checkpoint save and restore time: local disk vs a GCS emulator, same run.

  python benchmarks/checkpoint_store.py [demo 100m]

For each size: the real train state (params + AdamW moments, fp32, one CPU
device) saved by the trainer's Checkpointer (Orbax, OCDBT) with a real Grain
iterator position, waited on, then restored onto the abstract state, first
into a local temp dir, then into gs://bench/<size> on the emulator the tests
use (tests/gcs_emulator.py, in memory, on this machine). The emulator is a
single-threaded Python HTTP server, so the ratio bounds the path layer's
overhead from above; it says nothing about real GCS bandwidth.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def start_emulator() -> subprocess.Popen:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, os.path.join(
      ROOT, "tests", "gcs_emulator.py"), str(port), "bench"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(300):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/bench", timeout=1)
      break
    except OSError:
      time.sleep(0.1)
  os.environ.update(TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url)
  return proc


def measure(size: str) -> dict:
  import grain  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from codeclm.train import checkpoint  # pylint: disable=g-import-not-at-top
  from codeclm import config_base  # pylint: disable=g-import-not-at-top
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  from codeclm.train import planner  # pylint: disable=g-import-not-at-top
  config = planner.unplanned(config_base.lm_config(size))
  config.mesh.shape = (1, 1, 1, 1)
  config.train.async_checkpoints = False
  vocab = 322
  setup = loop.build(config, vocab, np.ones(vocab, np.float32),
                      jax.devices()[:1])
  state = jax.block_until_ready(setup.init_fn(jax.random.key(0)))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  abstract = checkpoint.abstract_with_shardings(setup.abstract_state,
                                                setup.state_shardings)
  out = dict(size=size, mib=nbytes / 2**20)
  with tempfile.TemporaryDirectory() as tmp:
    for where, workdir in (("local", tmp), ("emulator", f"gs://bench/{size}")):
      iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
      next(iterator)
      ckpt = checkpoint.Checkpointer(workdir, config.train)
      t0 = time.perf_counter()
      ckpt.save(1, state, iterator, force=True)
      ckpt.wait()
      save = time.perf_counter() - t0
      ckpt.close()
      ckpt = checkpoint.Checkpointer(workdir, config.train)
      t0 = time.perf_counter()
      restored = jax.block_until_ready(ckpt.restore(1, abstract, iterator))
      restore = time.perf_counter() - t0
      ckpt.close()
      assert all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(restored), jax.tree.leaves(state)))
      out[where] = (save, restore)
  return out


def main(sizes):
  proc = start_emulator()
  try:
    print("| size | state MiB | local save s | emulator save s | ratio | "
          "local restore s | emulator restore s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
      r = measure(size)
      (ls, lr), (es, er) = r["local"], r["emulator"]
      print(f"| {size} | {r['mib']:.0f} | {ls:.2f} | {es:.2f} | {es / ls:.1f} "
            f"| {lr:.2f} | {er:.2f} | {er / lr:.1f} |", flush=True)
  finally:
    proc.kill()


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  main(sys.argv[1:] or ["demo", "100m"])
