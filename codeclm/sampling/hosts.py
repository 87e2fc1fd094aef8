"""The sampler across processes and devices: rows, agreement, layouts.

Under jax.distributed a sampler call is collective, but no process needs
another's prompts or outputs: the global batch is assembled from the rows
each process's devices hold (`owners`, `put`) and each reads back only those
(`local_rows`). The processes agree on shapes with one small all-gather
(`distributed.gather_ints`). Requests are split into contiguous shares (`share`) with
global ids, and `gather_bytes` collects what every share drew. The weights'
decode layout (`decode_shardings`) drops the mesh axes the batch is split
over, so a decode step gathers no weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from codeclm.model import llama
from codeclm.model import sharding
from codeclm.runtime import distributed


def decode_shardings(model: llama.Llama, mesh: jax.sharding.Mesh,
                     rules: Sequence) -> Any:
  """The params' decode layout: the rules without the batch's mesh axes.

  Replicated over the axes the batch is split over (the decode is data
  parallel there), split over the others (tensor) as in training.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Nothing concrete: the mesh may be a TPU topology's (--mode=compile).
    boxed = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  return sharding.logical_shardings(
      boxed, mesh, sharding.rules_without(rules, sharding.batch_axes(rules)))


def owners(row_sharding: jax.sharding.Sharding,
           batch: int) -> dict[int, set[int]]:
  """Row -> the processes whose devices hold it, in a `batch`-row array."""
  found: dict[int, set[int]] = {}
  for device, index in row_sharding.devices_indices_map((batch,)).items():
    for r in range(*index[0].indices(batch)):
      found.setdefault(r, set()).add(device.process_index)
  return found


def put(x: np.ndarray, where: jax.sharding.Sharding) -> jax.Array:
  """A global array from host `x`; each process fills only its own shards
  (the callback sees only those), so other processes' rows may be padding."""
  return jax.make_array_from_callback(x.shape, where, lambda idx: x[idx])


def local_rows(out: jax.Array) -> dict[int, np.ndarray]:
  """Global row -> row of `out` for the rows this process's devices hold
  (each whole: rows are split over the batch axes only)."""
  held = {}
  for shard in out.addressable_shards:
    data = np.asarray(shard.data)
    for j, r in enumerate(range(*shard.index[0].indices(out.shape[0]))):
      held[r] = data[j]
  return held


def share(num: int, index: int | None = None,
          count: int | None = None) -> range:
  """Process `index` of `count`'s contiguous share of `num` requests.

  [index*num//count, (index+1)*num//count); default: this process of all.
  Ids stay global (the share's start + i), so what a request draws does not
  depend on the number of processes.
  """
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return range(index * num // count, (index + 1) * num // count)


def gather_bytes(local: Sequence[bytes], num: int) -> list[bytes]:
  """Every process's `share(num)` byte strings, in global order (collective
  under jax.distributed; `local` itself in a single process)."""
  count = jax.process_count()
  if count == 1:
    return list(local)
  most = -(-num // count)
  lengths = np.zeros(most, np.int32)
  lengths[:len(local)] = [len(x) for x in local]
  width = max(1, int(distributed.gather_ints(
      [lengths.max(initial=0)]).max()))
  padded = np.zeros((most, width), np.uint8)
  for j, x in enumerate(local):
    padded[j, :len(x)] = np.frombuffer(x, np.uint8)
  every, sizes = (np.asarray(x) for x in multihost_utils.process_allgather(
      (padded, lengths)))
  return [every[p, j, :sizes[p, j]].tobytes() for p in range(count)
          for j in range(len(share(num, p, count)))]
