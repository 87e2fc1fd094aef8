"""Random Llama weights drawn by numpy, for tests and benchmarks.

Compiling Flax's init costs seconds on a CPU (minutes at 1B), and what a
test or a timing needs is only weights of the right shapes: these come from
the shapes alone (jax.eval_shape of the init) and a seeded numpy generator,
so the same seed gives the same weights on any machine.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codeclm.model import sharding

# How each leaf is drawn (N: a standard normal draw per entry):
#   "fan_in"   N / sqrt(shape[0]) on arrays of 2+ dims, 1 + N on vectors.
#   "by_role"  norm scales U(0.5, 1.5), the embedding N, every other weight
#              N / sqrt(emb_dim): roughly a trained model's spread, with norm
#              scales away from 1.
SCHEMES = ("fan_in", "by_role")


def params(model: nn.Module, seed: int | np.random.Generator = 0, *,
           scheme: str = "fan_in", mesh: jax.sharding.Mesh | None = None,
           rules=sharding.DEFAULT_RULES) -> Any:
  """Random params of `model` (a llama.Llama) in its param dtype.

  seed: an int, or a numpy Generator to draw from (it is advanced).
  Returns numpy arrays on the host; given `mesh`, jax arrays laid out on it
  by the logical `rules` (as training lays out the real ones).
  """
  if scheme not in SCHEMES:
    raise ValueError(f"Unknown scheme {scheme!r}; use one of {SCHEMES}.")
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         jnp.zeros((1, 1), jnp.int32))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if scheme == "fan_in":
      value = rng.normal(size=x.shape) / np.sqrt(
          x.shape[0] if x.ndim > 1 else 1) + (x.ndim == 1)
    else:
      name = jax.tree_util.keystr(path)
      if "scale" in name:
        value = rng.uniform(0.5, 1.5, x.shape)
      else:
        std = 1.0 if "embedding" in name else model.config.emb_dim ** -0.5
        value = std * rng.normal(size=x.shape)
    return value.astype(x.dtype)

  drawn = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(boxed))
  if mesh is None:
    return drawn
  return jax.device_put(drawn, sharding.logical_shardings(boxed, mesh, rules))
