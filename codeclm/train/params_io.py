"""Parameters alone, in and out of checkpoints: for sampling, evaluation,
export and train.init_from, which need no optimizer state or data position.

Reading a workdir skips damaged steps with a warning but never moves them: a
trainer may be writing the workdir while this reads it.

Signature: `init_params_from(model_cfg, workdir, params, vocab_size, *,
seq_len)`, the config's model section and seq_len, never the whole config.
"""

from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from codeclm.runtime import storage
from codeclm.train import checkpoint_steps


def restore_params(path: str, abstract_params: Any) -> Any:
  """Parameters only (no optimizer state is allocated).

  `path` is a workdir (its newest step that restores), a step directory of a
  training checkpoint, or an exported params-only checkpoint directory.
  """
  path = storage.path(path)
  if (path / "checkpoints").is_dir():
    return restore_workdir_params(path, abstract_params)[0]
  if not path.is_dir():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  ckptr = ocp.PyTreeCheckpointer()
  state_dir = path / "state"
  if state_dir.is_dir():  # A training checkpoint: {step, params, opt}.
    target = {"params": abstract_params}
    restored = ckptr.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return restored["params"]
  return ckptr.restore(
      path,
      args=ocp.args.PyTreeRestore(
          item=abstract_params,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_params),
      ),
  )


def restore_workdir_params(workdir: str, abstract_params: Any,
                           step: int | None = None) -> tuple[Any, int]:
  """(params, step) of a workdir's newest step that restores, or of `step`.

  Skipped steps are only warned about, never moved: a trainer may be writing
  the workdir while this reads it.
  """
  if step is not None:
    path, step = checkpoint_steps.committed_step_dir(workdir, step)
    try:
      return restore_params(path, abstract_params), step
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint_steps.RestoreError(
          f"Checkpoint step {step} at {path} does not restore "
          f"({checkpoint_steps.describe(e)}); pick another of the committed "
          f"steps {checkpoint_steps.committed_steps(workdir)}.") from e
  failures = []
  ckpt_dir = checkpoint_steps.checkpoints_dir(workdir)
  for step in checkpoint_steps.complete_steps(ckpt_dir, ("state",),
                                              warn=True):
    path = ckpt_dir / str(step)
    try:
      params = restore_params(path, abstract_params)
    except Exception as e:  # pylint: disable=broad-except
      why = checkpoint_steps.describe(e)
      logging.warning("Skipping checkpoint %s: it does not restore (%s).",
                      path, why)
      failures.append(f"  {path}: {why}")
      continue
    logging.info("Restored params from %s.", path)
    return params, step
  if failures:
    raise checkpoint_steps.RestoreError(
        f"No checkpoint in {workdir} restores:\n" + "\n".join(failures))
  raise FileNotFoundError(
      f"No committed checkpoint in {ckpt_dir}; train first "
      "(--mode=train) or pass a step directory.")


def init_params_from(model_cfg, workdir: str, params: Any, vocab_size: int,
                     *, seq_len: int) -> Any:
  """The params of `workdir`'s newest step, placed like `params`.

  For train.init_from. The source's model (its config.json and tokenizer)
  must have this run's vocabulary and shapes (`model_cfg`: this run's model
  section; `seq_len`: its config.seq_len); the error names both sides of
  each difference.
  """
  from codeclm import config_base  # pylint: disable=g-import-not-at-top
  from codeclm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  workdir = storage.path(workdir)
  try:
    source_config = storage.read_json(workdir / "config.json")
  except OSError as e:
    raise FileNotFoundError(
        f"train.init_from={workdir} has no config.json ({e}); point it at a "
        "training workdir or one written by codeclm.hf.import_hf.") from e
  source_vocab = tokenizer_lib.load(workdir / "tokenizer.json").vocab_size
  if source_vocab != vocab_size:
    raise ValueError(
        f"train.init_from={workdir} has vocab_size {source_vocab} (its "
        f"tokenizer.json) but this run's tokenizer has vocab_size "
        f"{vocab_size}; fine-tune with the source's tokenizer: "
        f"--config.data.tokenizer={workdir / 'tokenizer.json'} "
        "and a new data dir.")
  ours = config_base.model_config(
      ml_collections.ConfigDict(dict(model=model_cfg, seq_len=seq_len)),
      vocab_size)
  model = dict(source_config["model"], vocab_size=source_vocab)
  theirs = config_base.model_config(
      ml_collections.ConfigDict(dict(model=model,
                                     seq_len=source_config["seq_len"])),
      source_vocab)
  fields = ("num_layers", "emb_dim", "num_heads", "num_kv_heads", "mlp_dim",
            "head_dim", "qk_norm", "scan_layers", "param_dtype")
  diff = {f: (getattr(theirs, f), getattr(ours, f)) for f in fields
          if getattr(theirs, f) != getattr(ours, f)}
  if diff:
    raise ValueError(
        f"train.init_from={workdir} has a different model: " + ", ".join(
            f"{f} {a} there vs {b} here" for f, (a, b) in diff.items())
        + "; set --config.model.* to the source's values.")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params)
  restored, step = restore_workdir_params(workdir, abstract)
  logging.info("Initialised params from %s step %d.", workdir, step)
  return restored


def export_params(path: str, params: Any) -> None:
  """Writes a params-only checkpoint (for sampling and evaluation)."""
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(storage.path(path), args=ocp.args.PyTreeSave(params))
