r"""codeclm's entry point: parses flags and dispatches; nothing else.

  python -m codeclm.main --config=configs/jpeg_lm.py:demo --workdir=/tmp/demo
  python -m codeclm.main --config=configs/jpeg_lm.py:demo --workdir=/tmp/demo \
      --mode=prepare
  python -m codeclm.main --config=configs/jpeg_lm.py:1b --workdir=DIR \
      --config.train.steps=1000 --config.mesh.shape='(1,-1,1)'
  python -m codeclm.main --config=configs/jpeg_lm.py:7b --workdir=DIR \
      --mode=compile --config.compile.topology=v5p-128
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/jpeg_lm.py:demo.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics and run files go here.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["prepare", "train", "sample", "eval", "compile"],
    "prepare: encode the source into byte shards and train the BPE; "
    "train: train (preparing built-in synthetic data if absent); "
    "sample: images from the workdir's checkpoint (see config.sample); "
    "eval: this process's slice of the FID evaluation (see config.eval); "
    "compile: compile every step for config.compile.topology (a TPU slice) "
    "and report memory, FLOPs and collectives (needs the [tpu] extra).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  # Imported here so --help is fast and flags parse before JAX starts.
  from codeclm.runtime import distributed  # pylint: disable=g-import-not-at-top
  from codeclm.runtime import storage  # pylint: disable=g-import-not-at-top
  if storage.is_remote(workdir):  # e.g. "storage: gs:// through gcsfs 2024.9.0"
    logging.info("storage: %s:// through %s", workdir.split("://", 1)[0],
                 storage.backend_name(workdir))
  distributed.skip_absent_tpu()
  if _MODE.value == "compile":  # One process on a host with no TPU.
    from codeclm.train import compile as aot  # pylint: disable=g-import-not-at-top
    if not aot.run(config, workdir)["verdict"]["fits"]:
      sys.exit(2)  # Launchers stop here (launch/tpu_pod.sh).
    return
  distributed.initialize(config.distributed)
  if _MODE.value in ("sample", "eval"):  # Train checks its own, first thing.
    storage.check_writable(workdir)  # A bad store fails before compiling.

  if _MODE.value == "prepare":
    from codeclm.train import loop  # pylint: disable=g-import-not-at-top
    from codeclm.data import prepare  # pylint: disable=g-import-not-at-top
    manifest = prepare.run(config.data, config.codec,
                           loop.data_dir_of(config.data, workdir),
                           seed=config.seed)
    logging.info("Prepared: %s", {k: manifest[k] for k in ("counts",)
                                  if k in manifest})
  elif _MODE.value == "train":
    from codeclm.train import loop  # pylint: disable=g-import-not-at-top
    loop.train(config, workdir)
  elif _MODE.value == "sample":
    from codeclm.sampling import files  # pylint: disable=g-import-not-at-top
    files.run(config.sample, workdir)
  elif _MODE.value == "eval":
    from codeclm.eval import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run(config, workdir)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  app.run(main)
