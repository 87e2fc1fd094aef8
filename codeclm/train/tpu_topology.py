"""Cloud TPU slices by name: libtpu's topology, its devices, and the mesh.

Slices are named as Cloud TPU names them (v4-32, v5litepod-256, v5p-128,
v6e-64); libtpu describes a slice by its chip grid ("v5e:16x16"), and gives
its devices without any TPU attached, so that --mode=compile
(codeclm/train/compile.py) can compile for a slice on any machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from codeclm.model import sharding

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  libtpu: str            # libtpu's name ("v5e" in "v5e:4x4")
  dims: int              # 2-D or 3-D torus
  per_chip: int          # Cloud TPU names count TensorCores (2) or chips (1)
  hbm_bytes: int         # per chip (data sheet)
  sizes: tuple[int, ...]  # the slice sizes in the name (cores or chips)


# Cloud TPU slice names: v4 and v5p count TensorCores (v5p-8 is 4 chips),
# v5e and v6e count chips.
GENERATIONS = {
    "v4": Generation("v4", 3, 2, 32 * GIB, tuple(2**i for i in range(3, 13))),
    "v5p": Generation("v5p", 3, 2, 95 * GIB,
                      tuple(2**i for i in range(3, 14))),
    "v5e": Generation("v5e", 2, 1, 16 * GIB, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": Generation("v6e", 2, 1, 32 * GIB, (1, 4, 8, 16, 32, 64, 128, 256)),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
# libtpu flags that keep libtpu from aborting, by libtpu's slice name. v5p-8
# (4 chips): its all-reduce-scatter fusion aborts compiling a Llama-2 7B
# train step over fsdp or context 4 (rotated_pincer_fusion_emitter.cc,
# "Check failed: s_count.has_value()"; libtpu 0.0.42.1); without the fusion
# it compiles. benchmarks/libtpu_v5p8.py reproduces both.
LIBTPU_WORKAROUNDS = {
    "v5p:2x2x1": ("--xla_tpu_enable_all_reduce_scatter_fusion=false",),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str              # as typed, e.g. "v5litepod-16"
  generation: str        # "v5e"
  chips: int
  grid: tuple[int, ...]  # chips along each torus axis

  @property
  def libtpu_name(self) -> str:
    return f"{GENERATIONS[self.generation].libtpu}:" + "x".join(
        map(str, self.grid))

  @property
  def hbm_bytes(self) -> int:
    return GENERATIONS[self.generation].hbm_bytes


def known_topologies() -> str:
  return "; ".join(
      f"{g}-N with N in {list(spec.sizes)}" + (
          " (TensorCores: 2 per chip)" if spec.per_chip == 2 else " (chips)")
      for g, spec in GENERATIONS.items()) + "; v5litepod-N = v5e-N."


def parse_topology(name: str) -> Topology:
  """A Cloud TPU slice name (v4-32, v5litepod-256, v5e-256, v5p-128, v6e-64)."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  gen = match and ALIASES.get(match.group(1), match.group(1))
  if not match or gen not in GENERATIONS:
    raise ValueError(f"Unknown TPU topology {name!r}; known: "
                     f"{known_topologies()}")
  spec, n = GENERATIONS[gen], int(match.group(2))
  if n not in spec.sizes:
    raise ValueError(f"{name!r}: {gen} slices come in sizes {list(spec.sizes)}"
                     f"; known: {known_topologies()}")
  chips = n // spec.per_chip
  grid = [1] * spec.dims if chips < 4 else [2, 2] + [1] * (spec.dims - 2)
  while math.prod(grid) < chips:  # Double the smallest axis, the last first.
    smallest = min(grid)
    i = max(j for j, g in enumerate(grid) if g == smallest)
    grid[i] *= 2
  return Topology(name, gen, chips, tuple(grid))


def apply_libtpu_workarounds(topology: Topology, environ=os.environ
                             ) -> tuple[str, ...]:
  """Adds the slice's LIBTPU_WORKAROUNDS to LIBTPU_INIT_ARGS (read when
  libtpu starts, so call this first); a flag the user already set there,
  to any value, is left alone. Returns the flags added."""
  given = environ.get("LIBTPU_INIT_ARGS", "").split()
  names = {flag.split("=")[0] for flag in given}
  added = tuple(flag for flag in LIBTPU_WORKAROUNDS.get(
      topology.libtpu_name, ()) if flag.split("=")[0] not in names)
  if added:
    environ["LIBTPU_INIT_ARGS"] = " ".join(given + list(added))
  return added


def workarounds_for_this_vm(environ=os.environ) -> tuple[str, ...]:
  """apply_libtpu_workarounds for the slice this TPU VM is part of (its
  TPU_ACCELERATOR_TYPE, e.g. "v5p-8"); nothing elsewhere."""
  try:
    topology = parse_topology(environ.get("TPU_ACCELERATOR_TYPE", ""))
  except ValueError:
    return ()
  return apply_libtpu_workarounds(topology, environ)


def topology_devices(topology: Topology) -> list:
  """The slice's (unattached) devices, from libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        "--mode=compile needs libtpu to compile for TPUs: install the [tpu] "
        "extra (pip install -e '.[tpu]').")
  # Without these libtpu looks for a TPU VM's metadata and warns at length.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name)
  # Only topologies, no chip: other compiling processes (pytest -n 2) may
  # hold libtpu too; without this the second one fails on its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  apply_libtpu_workarounds(topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  hosts = {}
  if topology.chips < 4:  # libtpu's default host of 2x2 chips cannot hold it.
    hosts["chips_per_host_bounds"] = topology.grid + (1,) * (
        3 - len(topology.grid))
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=topology.libtpu_name, **hosts).devices)


def check_mesh(shape, topology: Topology) -> None:
  """A mesh the slice cannot hold fails here, naming the axis to change."""
  sharding.check_shape(shape)
  shape = [int(s) for s in shape]
  fixed = {a: s for a, s in zip(sharding.MESH_AXES, shape) if s != -1}
  for axis, size in fixed.items():
    if topology.chips % size:
      raise ValueError(
          f"mesh.shape {tuple(shape)}: the {axis} axis ({size}) does not "
          f"divide the {topology.chips} chips of {topology.name}; change "
          f"mesh.shape's {axis} entry to a divisor of {topology.chips}.")
  if -1 not in shape and math.prod(shape) != topology.chips:
    raise ValueError(
        f"mesh.shape {tuple(shape)} covers {math.prod(shape)} devices but "
        f"{topology.name} has {topology.chips} chips; put -1 in one axis "
        "(e.g. fsdp: mesh.shape=(1,-1,1,1)).")
  if -1 in shape and topology.chips % math.prod(fixed.values()):
    raise ValueError(
        f"mesh.shape {tuple(shape)}: the fixed axes {fixed} do not divide "
        f"{topology.chips} chips; change one of them.")
