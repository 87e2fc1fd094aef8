"""Paths on local disk or an object store (gs://), all through etils.epath.

Every workdir path (run files, checkpoints, samples, eval slices and results,
TensorBoard events, the JAX compilation cache) is an `epath.Path` from
`path()`, so `--workdir=gs://bucket/run` works like a local directory.

One gs:// backend, the tested one: gcsfs. etils.epath has two clients for
gs://, tf.io.gfile and gcsfs (its fsspec backend), and picks one on every
call in `_GPath._backend`: tf.io.gfile whenever TensorFlow is installed
(a codeclm dependency) unless EPATH_USE_TF is false, a value epath caches on
first use (`gpath._is_tf_installed`). The two differ in what an atomic write
or a move does, and only gcsfs reaches the emulator the tests run against
(STORAGE_EMULATOR_HOST; Orbax's arrays use TENSORSTORE_GCS_HTTP_URL). So this
module does not rely on the environment or on import order: it registers
`GcsfsPath` for the gs:// prefix (`epath.register_path_cls`, epath's public
registry), whose backend is always gcsfs. Every `epath.Path("gs://...")` made
after codeclm is imported (`codeclm/__init__.py` imports this module, so any
codeclm import does it), Orbax's included, is a GcsfsPath, whether or not
TensorFlow was imported first. `backend_name()` names the backend (main logs
it at start); check_writable() fails at start when gcsfs is missing.

EPATH_USE_TF set to a true value (anything but unset, empty, false, no, f or
0) is refused with a StorageError on the first gs:// call, rather than
honoured: honouring it would run the untested client on a pod, the very gap
this closes, and ignoring it silently would hide that the setting does
nothing. Other schemes (s3://...) keep epath's own choice and are untested.

Failed requests are retried by the clients themselves (tests/test_faults.py
and benchmarks/store_faults.py measure it through a fault-injecting proxy):
gcsfs retries HTTP 408, 429 and 5xx answers and connection errors 6 times,
pausing 1, 2, 4, 8 and 16 s (plus up to 1 s each), so it rides out about 31 s
without an answer; TensorStore (Orbax's arrays) retries its requests up to 32
times, pausing from 1 s doubling to at most 32 s (its `gcs_request_retries`
defaults, which Orbax keeps), about 15 minutes. A 403 or 404 is not retried.

Writes here are atomic: readers see the old file or the whole new one. On a
local disk that is write-then-rename; an object store has no atomic rename
(gcsfs's is copy-then-delete, or a move API emulators lack), so the data
goes to a temporary object that is then copied onto the name (an object
appears only once its upload or copy is complete).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator
import urllib.parse
import uuid

from absl import logging
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

PathLike = str | os.PathLike
_COPY_CHUNK = 16 << 20  # Bytes per read when streaming a file between stores.
_MIRROR_SYNC_S = 60  # Events reach a remote workdir at most this late.


class StorageError(OSError):
  """A workdir that cannot be written; the message says what to set."""


_USE_TF_OFF = ("", "false", "no", "f", "0")  # epath's own reading of it.

if os.environ.get("STORAGE_EMULATOR_HOST"):
  # gcsfs (2026.x) looks up each bucket's layout through the storage control
  # API, which emulators lack: every call then fails it again and logs a
  # warning. Read when gcsfs is first imported (on the first gs:// call, after
  # codeclm imports this module); a user's setting wins.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@epath.register_path_cls("gs://")
class GcsfsPath(gpath.PosixGPath):
  """A gs:// path whose every call goes through gcsfs (see the docstring)."""

  @property
  def _backend(self) -> epath_backend.Backend:
    if self._uri_scheme != "gs":  # A local path made from this one.
      return super()._backend
    value = os.environ.get("EPATH_USE_TF", "")
    if value.lower() not in _USE_TF_OFF:
      raise StorageError(
          f"EPATH_USE_TF={value}: codeclm reads and writes gs:// through "
          "gcsfs only (the client its tests run against a storage emulator; "
          "tf.io.gfile differs in atomic writes and moves); unset "
          "EPATH_USE_TF.")
    return epath_backend.fsspec_backend


def backend_name(p: PathLike) -> str:
  """The client that reads and writes `p`: "gcsfs 2024.9.0" for gs://,
  "local disk" for a local path. Raises StorageError when it is missing."""
  p = path(p)
  backend = p._backend  # pylint: disable=protected-access
  if backend is epath_backend.os_backend:
    return "local disk"
  if backend is epath_backend.tf_backend:
    return "tf.io.gfile"
  if backend is not epath_backend.fsspec_backend:
    return type(backend).__name__
  import fsspec  # pylint: disable=g-import-not-at-top
  protocol = os.fspath(p).split("://", 1)[0]
  try:
    package = fsspec.get_filesystem_class(protocol).__module__.split(".")[0]
  except (ImportError, ValueError) as e:
    raise StorageError(f"{p}: no client for {protocol}:// is installed "
                       f"(for gs://: pip install gcsfs): {e}") from e
  try:
    return f"{package} {importlib.metadata.version(package)}"
  except importlib.metadata.PackageNotFoundError:
    return package


def is_remote(p: PathLike) -> bool:
  """Whether `p` is a URL (gs://, s3://...) rather than a local path."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path; local paths made absolute, `~` expanded."""
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def read_json(p: PathLike) -> Any:
  return json.loads(path(p).read_text())


def write_json(p: PathLike, value: Any, indent: int | None = 1) -> None:
  """Atomic (see the module docstring)."""
  write_bytes(p, json.dumps(value, indent=indent).encode())


def write_text(p: PathLike, text: str) -> None:
  """Atomic (see the module docstring)."""
  write_bytes(p, text.encode())


def write_bytes(p: PathLike, data: bytes) -> None:
  """Atomic (see the module docstring); makes the parent folder."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / tmp_name(p.name)
  tmp.write_bytes(data)
  if is_remote(p):
    tmp.copy(p, overwrite=True)
    tmp.unlink()
  else:
    tmp.replace(p)


def tmp_name(name: str) -> str:
  """A temporary name no other process (on any host) writes at the same time."""
  return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or folder; on an object store copy then delete."""
  src, dst = path(src), path(dst)
  if not is_remote(src):
    src.rename(dst)
    return
  for rel, f in files(src):
    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
    f.copy(dst / rel, overwrite=True)
  src.rmtree()


def files(p: PathLike, rel: str = "") -> Iterator[tuple[str, epath.Path]]:
  """(path relative to `p`, file) for each file under the folder `p`."""
  for child in path(p).iterdir():  # epath's walk() drops gs:// from roots.
    if child.is_dir():
      yield from files(child, f"{rel}{child.name}/")
    else:
      yield f"{rel}{child.name}", child


@contextlib.contextmanager
def local_dir(p: PathLike) -> Iterator[str]:
  """A local folder standing in for `p` while libraries write files there.

  Pillow, PyAV and the codecs write only local files: for a remote `p` they
  write into a temporary folder whose files are copied to `p` on exit.
  """
  p = path(p)
  if not is_remote(p):
    p.mkdir(parents=True, exist_ok=True)
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory(prefix="codeclm_stage_") as tmp:
    yield tmp
    upload(tmp, p)


def upload(local: PathLike, dst: PathLike) -> None:
  """Copies a local folder's files to `dst` (any store), keeping the tree."""
  dst = path(dst)
  for rel, f in files(local):
    upload_file(f, dst / rel)


def upload_file(local: PathLike, dst: PathLike) -> None:
  """Streams a local file to `dst` (any store); makes the parent folder.

  On an object store the object appears only once the upload is complete.
  """
  dst = path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with open(local, "rb") as src, dst.open("wb") as out:  # Across backends.
    shutil.copyfileobj(src, out, _COPY_CHUNK)


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
  """A local path to the file `p`, for libraries that read local files only:
  `p` itself, or for a remote `p` a temporary copy removed on exit."""
  p = path(p)
  if not is_remote(p):
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory(prefix="codeclm_fetch_") as tmp:
    local = os.path.join(tmp, p.name)
    with p.open("rb") as src, open(local, "wb") as out:
      shutil.copyfileobj(src, out, _COPY_CHUNK)
    yield local


def check_writable(workdir: PathLike) -> epath.Path:
  """The workdir, made and probed with a small write before any compile.

  Fails with StorageError naming the path and what to set: the bucket when
  it does not exist, else the credentials (or the emulator settings).
  """
  p = path(workdir)
  remote = is_remote(p)
  if remote:
    backend_name(p)  # No client for it (gcsfs), or EPATH_USE_TF=true.
    _check_emulator_reachable(p)
  probe = p / tmp_name(".codeclm_write_check")
  try:
    p.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # gcsfs and os raise different types for the same causes.
    if remote and not _bucket_exists(p):
      raise StorageError(
          f"--workdir={p}: the bucket {_bucket(p)} does not exist; create it "
          f"(gcloud storage buckets create {_bucket(p)}) or fix the name."
      ) from e
    fix = (_CLOUD_FIX if remote else
           "check that the folder's owner and permissions let this user "
           "write, or pick another --workdir")
    raise StorageError(f"--workdir={p} is not writable ({type(e).__name__}: "
                       f"{str(e).strip()[:300]}); {fix}.") from e
  return p


_CLOUD_FIX = (
    "give this machine's account write access (on a TPU VM its service "
    "account; elsewhere `gcloud auth application-default login` or "
    "GOOGLE_APPLICATION_CREDENTIALS), or for a local emulator set "
    "STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL")


def _bucket(p: epath.Path) -> str:
  parts = urllib.parse.urlsplit(os.fspath(p))
  return f"{parts.scheme}://{parts.netloc}"


def _bucket_exists(p: epath.Path) -> bool:
  try:
    return epath.Path(_bucket(p)).exists()
  except Exception:  # pylint: disable=broad-except
    return True  # Unknown: report the write error itself.


def _check_emulator_reachable(p: epath.Path) -> None:
  """An emulator that does not answer fails now, not after a minute of
  client retries."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host or not os.fspath(p).startswith("gs://"):
    return
  url = urllib.parse.urlsplit(host if "://" in host else f"http://{host}")
  try:
    socket.create_connection((url.hostname, url.port or 80), timeout=5).close()
  except OSError as e:
    raise StorageError(
        f"--workdir={p}: the storage emulator at STORAGE_EMULATOR_HOST={host} "
        f"does not answer ({e}); start it, or unset STORAGE_EMULATOR_HOST "
        "(and TENSORSTORE_GCS_HTTP_URL) to use Google Cloud Storage.") from e


class MirroredWriter:
  """A clu metric writer whose event files reach a remote logdir via epath.

  TensorFlow's own GCS client (which clu's writers use) reaches only the
  real googleapis.com endpoints, so it cannot be tested against an emulator
  and would be the one writer outside this module. For a remote logdir the
  events are written to a local temporary folder and copied to the logdir
  (whole files, via epath) on flush, on close, and after a write at most
  every _MIRROR_SYNC_S seconds; a hard kill loses at most that much.
  """

  def __init__(self, logdir: PathLike, **kwargs):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.logdir = path(logdir)
    self._local = (tempfile.mkdtemp(prefix="codeclm_events_")
                   if is_remote(self.logdir) else os.fspath(self.logdir))
    self._writer = metric_writers.create_default_writer(self._local, **kwargs)
    self._synced = time.monotonic()

  def __getattr__(self, name):
    attr = getattr(self._writer, name)
    if not name.startswith("write_"):
      return attr

    def write(*args, **kwargs):
      attr(*args, **kwargs)
      if time.monotonic() - self._synced > _MIRROR_SYNC_S:
        self.flush()
    return write

  def flush(self) -> None:
    self._writer.flush()
    self._sync()

  def close(self) -> None:
    self._writer.close()
    self._sync()
    if is_remote(self.logdir):  # Mirrored: the local copy is spent.
      shutil.rmtree(self._local, ignore_errors=True)

  def _sync(self) -> None:
    self._synced = time.monotonic()
    if not is_remote(self.logdir):
      return
    upload(self._local, self.logdir)
    logging.log_first_n(logging.INFO, "TensorBoard events mirrored from %s "
                        "to %s.", 1, self._local, self.logdir)
