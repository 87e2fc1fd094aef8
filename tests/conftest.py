"""Tests run on CPU with 8 simulated devices (set before JAX is imported)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


from tests import torch_compat  # pylint: disable=g-import-not-at-top,wrong-import-position

torch_compat.importable_torchvision()


def _one_compilation_cache() -> None:
  """One persistent JAX compilation cache for the whole test run.

  Many tests, and the `python -m codeclm...` processes they start (which
  inherit this environment), compile the same tiny steps; on CI's two cores
  compiling is a large share of the run. The xdist controller imports this
  file before it starts its workers, so they all share one directory, which
  pytest_sessionfinish removes. A cache hit returns the same executable, so
  no result depends on it.
  """
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="codeclm-tests-jax-cache-")
    os.environ["CODECLM_TESTS_OWN_JAX_CACHE"] = "1"
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


_one_compilation_cache()


def pytest_sessionfinish(session):
  if (not hasattr(session.config, "workerinput")
      and os.environ.get("CODECLM_TESTS_OWN_JAX_CACHE")):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# CI runs whole modules per worker (`--dist loadfile`), so each module's
# fixtures (trained workdirs, multi-process chains, eval shards) are built
# once, not once per worker that draws one of its tests. With
# `--no-loadscope-reorder` modules start in collection order; these, the
# longest in CI (--durations), go first, so the two workers end close
# together (longest-processing-time-first). Others keep pytest's order. A
# stale ranking costs only time.
_LONGEST_FIRST = (
    "test_launch.py", "test_train.py", "test_readme.py", "test_evaluate.py",
    "test_multihost.py", "test_sample.py", "test_faults.py",
    "test_context_parallel.py", "test_class_conditioning.py",
    "test_compile.py", "test_distributed.py", "test_notebook.py",
    "test_llama.py", "test_eval_classes.py", "test_weight_gather.py",
    "test_attention.py", "test_offload.py", "test_constrained_sample.py",
    "test_storage.py", "test_sharding.py", "test_hf_io.py",
    "test_avc_sample.py", "test_packaging.py", "test_checkpoint.py",
    "test_jpeg_grammar.py", "test_optimizer.py", "test_fid.py",
    "test_planner.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A Google Cloud Storage API on localhost with the bucket `test-bucket`.

  gcp-storage-emulator from PyPI (tests/gcs_emulator.py). Yields the
  environment that points each client at it: TENSORSTORE_GCS_HTTP_URL for
  Orbax's arrays and STORAGE_EMULATOR_HOST for gcsfs (codeclm's one gs://
  client, chosen by codeclm/runtime/storage.py, not by the environment).
  """
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  # Its log goes to a file, not a pipe: it writes a traceback for each
  # request a client drops, and once a pipe nobody reads holds 64 KiB the
  # emulator blocks mid-response and every later gs:// call waits forever.
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  with open(log, "wb") as log_file:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__),
                                      "gcs_emulator.py"), str(port),
         "test-bucket"], stdout=subprocess.DEVNULL, stderr=log_file)
  try:
    for _ in range(300):
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/test-bucket", timeout=1)
        break
      except OSError:
        if proc.poll() is not None:
          pytest.fail(f"The storage emulator exited: {log.read_text()}")
        time.sleep(0.1)
    else:
      pytest.fail(f"The storage emulator did not answer at {url}.")
    yield dict(TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url)
  finally:
    proc.kill()
    proc.wait()


@pytest.fixture
def gcs_env(gcs, monkeypatch):
  """This process's clients pointed at the emulator, for one test."""
  for name, value in gcs.items():
    monkeypatch.setenv(name, value)
  # Not needed: codeclm picks gcsfs itself. Unset, as on a pod.
  monkeypatch.delenv("EPATH_USE_TF", raising=False)
  yield gcs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny config's data (tests/tiny_config.py), prepared once per module."""
  from codeclm.data import prepare  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("data"))
  config = tiny_config.get_config()
  prepare.run(config.data, config.codec, path, seed=config.seed,
              progress=False)
  return path
