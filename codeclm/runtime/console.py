"""What a run prints: codeclm's own lines, and what libraries warn about.

Libraries log a great deal at INFO: Orbax a few dozen lines per checkpoint
(temporary folders, signalling threads, metadata stores), clu each metric
write, TensorFlow and XLA notices from C++. By default a codeclm command shows
its own INFO lines and only the warnings and errors of libraries;
--verbose_libraries brings the libraries' INFO lines back.

C++ libraries read their log level from the environment once, when they load,
and JAX loads while flags are parsed (a config file imports codeclm's model):
so `setup` reads the flag from argv itself, before absl parses it.
"""

import logging
import os
import shlex
import sys
from typing import Iterable, Sequence

from absl import flags
from absl import logging as absl_logging

FLAG = "verbose_libraries"
FLAG_HELP = ("Show the INFO logs of libraries (Orbax, Grain, clu, JAX, "
             "TensorFlow/XLA C++). Off: codeclm's own lines, and libraries' "
             "warnings and errors only.")

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Library INFO lines kept anyway: each says once what a cluster process joined
# (e.g. JAX's "JAX distributed initialized with visible devices: 0,1,2,3").
_KEPT = ("jax._src.distributed",)
# Environment defaults for C++ logging when libraries are quiet (a value the
# user set wins). TF_CPP_MIN_LOG_LEVEL=1 drops INFO from TensorFlow and XLA;
# TensorFlow's oneDNN notice is printed before any level applies, so its
# oneDNN kernels are off: TensorFlow only writes TensorBoard events and reads
# TFDS here, where they do not matter.
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}
_VERBOSE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0"}


def verbose_requested(argv: Sequence[str]) -> bool:
  """Whether argv sets --verbose_libraries (absl's boolean flag syntax)."""
  names = (FLAG, "no" + FLAG)
  mine = [a for a in argv[1:] if a.lstrip("-").split("=", 1)[0] in names]
  values = flags.FlagValues()
  flags.DEFINE_boolean(FLAG, False, FLAG_HELP, flag_values=values)
  values(argv[:1] + mine)
  return values[FLAG].value


class _LibraryInfoFilter(logging.Filter):
  """Passes warnings and errors, and INFO lines from codeclm's own code."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING
            or record.pathname.startswith(_PACKAGE + os.sep)
            or record.name.startswith(_KEPT))


def setup(argv: Sequence[str]) -> None:
  """Quiets library INFO logs unless argv has --verbose_libraries.

  Call it first thing in a command's `__main__`, before JAX, TensorFlow or
  Orbax are imported.
  """
  verbose = verbose_requested(argv)
  for name, value in (_VERBOSE_ENV if verbose else _QUIET_ENV).items():
    os.environ.setdefault(name, value)
  handler = absl_logging.get_absl_handler()  # app.run installs it on root.
  for f in [f for f in handler.filters if isinstance(f, _LibraryInfoFilter)]:
    handler.removeFilter(f)
  if not verbose:
    handler.addFilter(_LibraryInfoFilter())


def duration(seconds: float) -> str:
  """3725.0 -> '1h02m', 175.0 -> '2m55s', 9.4 -> '9s'."""
  s = max(0, round(seconds))
  if s >= 3600:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  if s >= 60:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s}s"


def step_line(step: int, steps: int, metrics: dict) -> str:
  """One training log line: loss, speed and the time left at this pace.

  Starts like clu's metric lines ("[step] bits_per_byte=..., loss=..."), which
  scripts and tests read.
  """
  m = metrics
  line = (f"[{step}] bits_per_byte={m['bits_per_byte']:.6g}, "
          f"loss={m['loss']:.6g}, grad_norm={m['grad_norm']:.3g}, "
          f"lr={m['learning_rate']:.3g} | {m['tokens_per_s']:,.0f} tokens/s, "
          f"{m['step_time']:.3g} s/step")
  if "mfu" in m:
    line += f", MFU {m['mfu']:.1%}"
  return line + (f" | step {step}/{steps}, ETA "
                 f"{duration((steps - step) * m['step_time'])}")


def next_command(argv: Sequence[str], mode: str,
                 extra: Iterable[str] = ()) -> str:
  """The `python -m codeclm.main` command of argv with --mode=`mode` (train:
  no --mode) and `extra` flags, quoted for a shell."""
  args, skip = [], False
  for arg in argv[1:]:
    if skip:
      skip = False
    elif arg in ("--mode", "-mode"):
      skip = True
    elif not arg.startswith(("--mode=", "-mode=")):
      args.append(arg)
  args += [] if mode == "train" else [f"--mode={mode}"]
  return shlex.join(["python", "-m", "codeclm.main", *args, *extra])


def summary(title: str, rows: Sequence[tuple[str, str]],
            out=None) -> None:
  """Prints a run's closing block: a title, then aligned `name  value` rows."""
  out = out or sys.stdout
  width = max((len(name) for name, _ in rows), default=0)
  lines = [title] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
  print("\n".join(lines), file=out, flush=True)
