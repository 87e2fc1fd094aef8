r"""Params + optimizer bytes per device for each size's default mesh.

  python benchmarks/state_bytes.py

Shapes only (eval_shape and the shardings loop.build makes; nothing is
allocated or compiled), on simulated CPU devices: the number the trainer's
start-up report prints, from each leaf's shard shape.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=256"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from codeclm import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.model import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.train import planner  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB = 322


def main():
  print("| size | mesh.shape | devices | mesh | state total | per device |")
  print("|---|---|---|---|---|---|")
  for size in ("100m", "1b", "7b"):
    for n in (8, 64, 256):
      # 1B and 7B leave the layout to the planner; this table is of the
      # layout it replaced (fsdp over every device).
      config = planner.unplanned(config_base.lm_config(size))
      config.batch_size = max(config.batch_size, n)  # Rows for every device.
      setup = loop.build(config, VOCAB, np.ones(VOCAB, np.float32),
                          jax.devices()[:n])
      total = sum(x.size * x.dtype.itemsize
                  for x in jax.tree.leaves(setup.abstract_state))
      per_device = sharding.bytes_per_device(setup.abstract_state,
                                             setup.state_shardings)
      print(f"| {size} | {tuple(config.mesh.shape)} | {n} | "
            f"{dict(setup.mesh.shape)} | {total / 2**30:.1f} GiB | "
            f"{per_device / 2**30:.2f} GiB |")


if __name__ == "__main__":
  main()
