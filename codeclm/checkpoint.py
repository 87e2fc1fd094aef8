"""Orbax checkpoints of the train state and the Grain iterator, and run files.

A workdir holds everything sampling needs: `checkpoints/<step>/` (the train
state and each process's data-iterator position), plus `config.json`,
`tokenizer.json` and `manifest.json` (codec settings and the stripped header).
Restores go against abstract targets built from the *current* mesh, so a
checkpoint written on one topology loads on another.
"""

import json
import os
import shutil
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

RUN_FILES = ("config.json", "tokenizer.json", "manifest.json")


class _IteratorSnapshot:
  """The iterator position at save time, for Grain's Orbax handler.

  Async saves run the handler later; reading the live iterator then would
  record a later position than the saved model's.
  """

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state(), indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Saves and restores {state, data} with keep-last-N plus keep-every-K."""

  def __init__(self, workdir: str, train_cfg):
    policies = [checkpoint_managers.LatestN(n=train_cfg.keep_last)]
    if train_cfg.keep_every:
      policies.append(checkpoint_managers.EveryNSteps(train_cfg.keep_every))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=train_cfg.async_checkpoints,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        create=True,
    )
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, force: bool = False) -> bool:
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
        ),
        force=force,
    )

  def restore(self, step: int, abstract_state, iterator):
    """Restores the state onto `abstract_state`'s shardings; moves `iterator`."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(iterator),
        ),
    )
    return restored["state"]

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_tree, shardings)


def write_run_files(workdir: str, config, data_dir: str) -> None:
  """Copies config, tokenizer and manifest into the workdir (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  for name in ("tokenizer.json", "manifest.json"):
    src, dst = os.path.join(data_dir, name), os.path.join(workdir, name)
    if os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(src, dst)


def restore_params(path: str, abstract_params: Any) -> Any:
  """Parameters only (no optimizer state is allocated).

  `path` is a workdir (its latest step), a step directory of a training
  checkpoint, or an exported params-only checkpoint directory.
  """
  step_dir = _resolve_step_dir(path)
  ckptr = ocp.PyTreeCheckpointer()
  state_dir = os.path.join(step_dir, "state")
  if os.path.isdir(state_dir):  # A training checkpoint: {step, params, opt}.
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
      step_dir,
      args=ocp.args.PyTreeRestore(
          item=abstract_params,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_params),
      ),
  )


def export_params(path: str, params: Any) -> None:
  """Writes a params-only checkpoint (for sampling and evaluation)."""
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(params))


def committed_step_dir(workdir: str, step: int | None = None
                       ) -> tuple[str, int]:
  """(directory, step) of a workdir's committed checkpoint: `step` or latest."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = ocp.utils.checkpoint_steps(ckpt_dir) if os.path.isdir(
      ckpt_dir) else []
  if step is None and not steps:
    raise FileNotFoundError(
        f"No committed checkpoint in {ckpt_dir}; train first "
        "(--mode=train) or pass a step directory.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint {ckpt_dir}/{step}; pick one of "
                            f"the committed steps {sorted(steps)}.")
  logging.info("Restoring from %s step %d.", ckpt_dir, step)
  return os.path.join(ckpt_dir, str(step)), step


def _resolve_step_dir(path: str) -> str:
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return committed_step_dir(path)[0]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  return path
