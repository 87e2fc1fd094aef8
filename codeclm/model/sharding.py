"""The device mesh, the logical-axis rules and the shardings they give.

The model names its axes logically (see llama.py's docstring); this module
maps those names onto a mesh with axes (data, fsdp, context, tensor):

  data     pure data parallelism: params replicated, batch split.
  fsdp     data parallelism with params, grads and optimizer state split
           (ZeRO-3); XLA all-gathers each layer's weights before use.
  context  sequence (context) parallelism: the length of every activation
           split, so a long window need not fit one device; attention
           all-gathers K/V over it (context_attention.py). Params, grads and
           optimizer state split over it as over fsdp; the batch does not.
  tensor   Megatron-style tensor parallelism over heads, MLP and vocabulary.

The mesh uses Auto axis types (GSPMD propagation from the constraints the
model places), not JAX's Explicit default: Flax linen's logical constraints are
written for that mode.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")
# Logical axis -> mesh axes (first matching, still unused mesh axis wins).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    # ZeRO-3 over fsdp and context; over fsdp alone each context shard
    # would hold its fsdp group's whole state (7B over fsdp 2: 36 GiB).
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", "context"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, context, tensor) mesh; one -1 entry takes the remaining
  devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in shape]
  check_shape(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"Mesh shape {tuple(shape)} must have {len(MESH_AXES)} "
                     f"entries, one per axis {MESH_AXES}.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"Mesh shape {tuple(shape)}: use positive sizes and at "
                     "most one -1.")
  n = len(devices)
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if n % rest:
      raise ValueError(f"Mesh shape {tuple(shape)}: {n} devices are not "
                       f"divisible by {rest}; change mesh.shape.")
    shape[shape.index(-1)] = n // rest
  if math.prod(shape) != n:
    raise ValueError(
        f"Mesh shape {tuple(shape)} over {MESH_AXES} needs {math.prod(shape)} "
        f"devices but there are {n}; make the product equal the device count "
        "or put -1 in one entry (e.g. mesh.shape=(-1, 1, 1, 1)).")
  return jax.make_mesh(tuple(shape), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def check_shape(shape: Sequence[int]) -> None:
  """A mesh shape of the old (data, fsdp, tensor) form fails with the fix."""
  shape = tuple(int(s) for s in shape)
  if len(shape) == 3:
    new = (*shape[:2], 1, shape[2])
    raise ValueError(
        f"mesh.shape is now {MESH_AXES}: (1,-1,1) becomes (1,-1,1,1); insert "
        f"the context entry, e.g. {shape} -> {new}.".replace("'", ""))


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh
         ) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide evenly.

  jit requires parameter shardings to split evenly; a 322-entry vocabulary on
  tensor=4, say, stays whole on that axis rather than failing to compile.
  check_large_params_sharded catches a large parameter left unsplit this way.
  """
  fitted = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape)
                                                          - len(spec))):
    axes = [] if entry is None else (
        [entry] if isinstance(entry, str) else list(entry))
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    fitted.append(None if not axes else axes[0] if len(axes) == 1
                  else tuple(axes))
  return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a boxed abstract tree (jax.eval_shape of model.init).

  Works on any tree whose leaves are nn.LogicallyPartitioned boxes (sharded
  by their names and `rules`) or plain shaped leaves (replicated), e.g. a
  whole train state with its optimizer moments. The result has the unboxed
  tree's structure, ready for jit's out_shardings.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      return NamedSharding(mesh, _fit(spec, leaf.value.shape, mesh))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def check_large_params_sharded(shardings_or_params: Any, mesh: Mesh,
                               min_size: int = 1 << 20,
                               shapes: Any = None) -> None:
  """Start-up check that no large parameter is replicated on every device.

  On a mesh with fsdp or tensor > 1, every parameter with >= min_size elements
  must be split over at least one mesh axis of size > 1. A pure data-parallel
  mesh replicates parameters by design; there `check_state_fits` is the guard
  (a replicated 7B state does not fit a device). Leaves may be arrays
  or ShapeDtypeStructs that carry a NamedSharding, or NamedShardings with
  `shapes` a matching tree of shaped leaves (e.g. the abstract params). Bare
  NamedShardings without `shapes` carry no sizes: then every parameter counts
  as large (fine for the default rules, where every weight has an "embed"
  axis on fsdp; pass `shapes` to exempt small ones such as norm scales).
  """
  if all(mesh.shape[a] == 1 for a in ("fsdp", "context", "tensor")):
    return  # Pure data parallelism replicates parameters by design.
  is_leaf = lambda x: isinstance(x, NamedSharding)
  flat, _ = jax.tree_util.tree_flatten_with_path(shardings_or_params,
                                                 is_leaf=is_leaf)
  if shapes is not None:
    shapes = nn.meta.unbox(shapes)
    if jax.tree.structure(shapes) != jax.tree.structure(
        shardings_or_params, is_leaf=is_leaf):
      raise ValueError("shapes and shardings are different trees; pass the "
                       "abstract params the shardings were made from.")
    shape_leaves = jax.tree.leaves(shapes)
  offenders = []
  for i, (path, leaf) in enumerate(flat):
    if isinstance(leaf, NamedSharding):
      sharding = leaf
      shape = None if shapes is None else shape_leaves[i].shape
    else:
      sharding, shape = getattr(leaf, "sharding", None), leaf.shape
      if not isinstance(sharding, NamedSharding):
        raise ValueError(f"{jax.tree_util.keystr(path)} has no NamedSharding "
                         f"(got {sharding!r}); pass shardings and shapes.")
    if shape is not None and int(np.prod(shape)) < min_size:
      continue
    split = [a for entry in sharding.spec if entry is not None
             for a in ((entry,) if isinstance(entry, str) else entry)
             if sharding.mesh.shape[a] > 1]
    if not split:
      offenders.append(jax.tree_util.keystr(path) + (
          "" if shape is None else f" {tuple(shape)}"))
  if offenders:
    sized = shapes is not None or not any(
        isinstance(x, NamedSharding) for _, x in flat)
    what = f"with >= {min_size} elements " if sized else ""
    raise ValueError(
        f"{len(offenders)} parameters {what}are replicated on mesh "
        f"{dict(mesh.shape)}: {', '.join(offenders[:10])}. Check mesh.rules "
        "maps their logical axes onto fsdp or tensor (given bare shardings, "
        "pass shapes= to exempt small parameters).")


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of a tree laid out by `shardings`.

  From each leaf's shard shape (what a device actually stores: whole when
  replicated, a slice when split), not total bytes / device count. Shardings
  from `logical_shardings` split evenly, so every device holds the same.
  """
  return sum(bytes_by_memory_kind(abstract_tree, shardings).values())


def bytes_by_memory_kind(abstract_tree: Any, shardings: Any
                         ) -> dict[str, int]:
  """Bytes one device holds of a tree, by where: {"device": HBM, "host":
  pinned host memory} (a sharding with memory_kind "pinned_host" or
  "unpinned_host" counts as host, any other as device)."""
  out = {"device": 0, "host": 0}
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    where = "host" if (s.memory_kind or "").endswith("host") else "device"
    out[where] += math.prod(s.shard_shape(x.shape)) * np.dtype(
        x.dtype).itemsize
  return out


def in_memory(shardings: Any, kind: str) -> Any:
  """The same NamedShardings in memory `kind`: "pinned_host" (a state kept
  in host memory between steps) or "device"."""
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def _axes_of(entry) -> tuple[str, ...]:
  """A rule's or a spec's entry (None, one mesh axis or several) as a
  tuple of mesh axes."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes the logical "batch" axis is split over under `rules`
  (data and fsdp by default)."""
  return _axes_of(nn.logical_to_mesh_axes(("batch",), tuple(rules))[0])


def without_axes(shardings: Any, axes: Sequence[str]) -> Any:
  """The same NamedShardings with `axes` removed from every spec: the layout
  of a copy gathered over those axes (split over the others still)."""
  def one(s):
    entries = []
    for entry in s.spec:
      kept = [a for a in _axes_of(entry) if a not in axes]
      entries.append(None if not kept else kept[0] if len(kept) == 1
                     else tuple(kept))
    return NamedSharding(s.mesh, PartitionSpec(*entries),
                         memory_kind=s.memory_kind)
  return jax.tree.map(one, shardings,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def rules_without(rules, axes: Sequence[str]) -> tuple:
  """Logical rules that map nothing onto `axes`: for a model traced per
  shard of those axes (under vmap's spmd_axis_name), or the sampler's
  weights, replicated over the axes its batch is split over."""
  return tuple((name, tuple(a for a in _axes_of(entry) if a not in axes)
                or None) for name, entry in rules)


def device_memory(mesh: Mesh) -> int | None:
  """Memory in bytes of this process's first mesh device; None where JAX
  does not say (CPU) or no device is local (an AOT topology)."""
  local = set(jax.local_devices())
  mine = [d for d in mesh.devices.flat if d in local]
  stats = mine[0].memory_stats() if mine else None
  return (stats or {}).get("bytes_limit")


def check_state_fits(state_bytes: int, mesh: Mesh, max_fraction: float,
                     memory: int | None, gathered_bytes: int = 0) -> None:
  """A state (params + optimizer) over max_fraction of a device fails here.

  `state_bytes` is what the device holds of it (`bytes_by_memory_kind`'s
  "device": optimizer state offloaded to host memory does not count);
  `gathered_bytes`, the step's gathered weights and gradient accumulator
  (train.weight_gather="per_step"), counts with it. Activations need the
  rest of the memory. `memory` None (CPU, unknown) skips the check.
  """
  total = state_bytes + gathered_bytes
  if memory is None or total <= max_fraction * memory:
    return
  gathered = (
      f" (of them {gathered_bytes / 2**30:.1f} GiB the gathered weights and "
      "gradient accumulator of train.weight_gather='per_step'; "
      "'per_micro_batch' does without)" if gathered_bytes else "")
  raise ValueError(
      f"Params + optimizer state take {total / 2**30:.1f} GiB per device"
      f"{gathered} on mesh.shape={tuple(mesh.shape.values())} "
      f"{dict(mesh.shape)}, over "
      f"mesh.max_state_fraction={max_fraction} of the device's "
      f"{memory / 2**30:.1f} GiB. Shard the state over more devices with "
      "fsdp, e.g. --config.mesh.shape='(1,-1,1,1)', keep the optimizer "
      "state in host memory (train.optimizer_offload=True), or raise "
      "mesh.max_state_fraction if activations need less.")
