r"""codeclm's entry point: parses flags, dispatches, and says what was done.

  python -m codeclm.main --config=configs/jpeg_lm.py:demo --workdir=/tmp/demo
  python -m codeclm.main --config=configs/jpeg_lm.py:demo --workdir=/tmp/demo \
      --mode=prepare
  python -m codeclm.main --config=configs/jpeg_lm.py:1b --workdir=DIR \
      --config.train.steps=1000 --config.mesh.shape='(1,-1,1,1)'
  python -m codeclm.main --config=configs/jpeg_lm.py:7b --workdir=DIR \
      --mode=compile --config.compile.topology=v5p-128

configs/ is the checkout's; an installed codeclm (a wheel) carries the same
files in its package folder, codeclm/configs/ (see setup.py).

Each mode ends with a summary: where its outputs are, the TensorBoard command
and the next command to run. Libraries' INFO logs are off unless
--verbose_libraries (codeclm/runtime/console.py).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from codeclm.runtime import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/jpeg_lm.py:demo (installed: "
    "the configs/ folder inside the codeclm package).",
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
flags.DEFINE_bool(console.FLAG, False, console.FLAG_HELP)  # Read by setup.
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
    report = aot.run(config, workdir)
    fits = report["verdict"]["fits"]
    _summary(workdir, *_compiled(config.compile.topology, workdir, fits,
                                 report["planner"]), events=False)
    if not fits:
      sys.exit(2)  # Launchers stop here (launch/tpu_pod.sh).
    return
  from codeclm.train import tpu_topology  # pylint: disable=g-import-not-at-top
  for flag in tpu_topology.workarounds_for_this_vm():  # Before libtpu starts.
    logging.info("libtpu workaround for this slice: %s", flag)
  distributed.initialize(config.distributed)
  if _MODE.value in ("sample", "eval"):  # Train checks its own, first thing.
    storage.check_writable(workdir)  # A bad store fails before compiling.

  if _MODE.value == "prepare":
    from codeclm.train import loop  # pylint: disable=g-import-not-at-top
    from codeclm.data import prepare  # pylint: disable=g-import-not-at-top
    data_dir = loop.data_dir_of(config.data, workdir)
    counts = prepare.run(config.data, config.codec, data_dir,
                         seed=config.seed)["counts"]
    _summary(workdir, f"Prepared {counts['train']} training and "
             f"{counts['eval']} held-out examples", [
                 ("data", data_dir),
                 ("next", console.next_command(sys.argv, "train"))],
             events=False)
  elif _MODE.value == "train":
    from codeclm.train import loop  # pylint: disable=g-import-not-at-top
    from codeclm.train import planner  # pylint: disable=g-import-not-at-top
    config = planner.resolve_for_devices(config)  # "auto" layout fields
    _summary(workdir, *_trained(config.train, workdir,
                                loop.train(config, workdir)))
  elif _MODE.value == "sample":
    from codeclm.sampling import files  # pylint: disable=g-import-not-at-top
    out = files.run(config.sample, workdir)
    _summary(workdir, f"Sampled step {out['step']}: {len(out['samples'])} "
             "samples", [("samples", out["out_dir"]),
                         *_eval_next(config.eval)])
  elif _MODE.value == "eval":
    from codeclm.eval import evaluate  # pylint: disable=g-import-not-at-top
    results = evaluate.run(config, workdir)
    _summary(workdir, *_evaluated(config.eval, config.train, workdir,
                                  results))


def _trained(tc, workdir, last: dict):
  """Train's summary (`tc`: config.train): the newest checkpoint, and
  sampling from it next."""
  from codeclm.train import checkpoint_steps  # pylint: disable=g-import-not-at-top
  steps = checkpoint_steps.committed_steps(workdir)
  where = checkpoint_steps.checkpoints_dir(workdir) / str(steps[-1])
  loss = f", loss {last['loss']:.4g}" if "loss" in last else ""
  return (f"Trained to step {steps[-1]} of {tc.steps}{loss}", [
      ("checkpoint", str(where)),
      ("next", console.next_command(sys.argv, "sample"))])


def _compiled(topology: str, workdir, fits: bool, plan: dict):
  """Compile's summary: the report, and training on the slice if it fits,
  with the planner's choices (`plan`: the report's) as flags, so the slice
  runs the layout compiled here."""
  from codeclm.runtime import storage  # pylint: disable=g-import-not-at-top
  report = str(storage.path(workdir) / "compile_report.json")
  if not fits:
    return (f"Does not fit {topology}", [
        ("report", report),
        ("next", "change what the report's verdict.knobs name and compile "
                 "again")])
  return (f"Fits {topology}", [
      ("report", report),
      ("next", console.next_command(sys.argv, "train", _layout_flags(plan))
       + "  # on the slice: launch/tpu_pod.sh runs it on every host")])


def _layout_flags(plan: dict) -> list[str]:
  """--config flags for the fields the planner chose (compile's report)."""
  chosen = dict(plan["layout"], shape=tuple(plan["layout"]["mesh"]))
  return [f"--config.{name}={chosen[name.split('.')[1]]}".replace(" ", "")
          for name in plan["auto"]]


def _evaluated(ec, tc, workdir, results):
  """Eval's summary (`ec`, `tc`: config.eval, config.train): results.json
  (or the merge still to run); next, more training (the run resumes)."""
  if results is None:
    return ("Evaluated this process's slice; not merged", [
        ("next", "python -m codeclm.eval.evaluate ... --merge_only, once "
                 "every slice is written")])
  from codeclm.eval import results as results_lib  # pylint: disable=g-import-not-at-top
  from codeclm.eval import evaluate  # pylint: disable=g-import-not-at-top
  from codeclm.runtime import storage  # pylint: disable=g-import-not-at-top
  out_dir = evaluate.out_dir_of(ec, workdir, results["step"])
  return (f"Evaluated step {results['step']}", [
      ("results", str(storage.path(out_dir) / results_lib.RESULTS)),
      ("next", console.next_command(sys.argv, "train", [
          f"--config.train.steps={2 * tc.steps}"]))])


def _eval_next(ec) -> list[tuple[str, str]]:
  """Rows for evaluating next (`ec`: config.eval); FID needs the Inception
  weights, converted once."""
  if ec.inception_weights:
    return [("next", console.next_command(sys.argv, "eval"))]
  from codeclm.eval import inception  # pylint: disable=g-import-not-at-top
  return [("fid weights", f"download {inception.WEIGHTS_URL}, then "
                          f"{inception.CONVERT_COMMAND}"),
          ("next", console.next_command(sys.argv, "eval", [
              "--config.eval.inception_weights=fid_inception.npz"]))]


def _summary(workdir: str, title: str, rows, events: bool = True) -> None:
  """Prints the closing block on process 0 (every process ran the mode);
  `events`: the workdir has TensorBoard events to look at."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    board = [("tensorboard", f"tensorboard --logdir={workdir}")] * events
    console.summary(f"{title}.", [("workdir", workdir), *rows[:-1], *board,
                                  rows[-1]])


if __name__ == "__main__":
  console.setup(sys.argv)  # Before JAX, TensorFlow and Orbax load and log.
  app.run(main)
