"""The Llama's KV cache: its layout, and the writes and reads of a step.

Apart from the layers (llama.py) because its layout is set by what XLA
copies, not by the model's math: the notes on why are here, with the code
they explain. The attention layers call `Stacked.write` and `Stacked.read`;
callers only make a cache (`init_cache`) and pass it to `Llama`.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from codeclm.model import llama_config

# Logical names of a KVCache's k and v arrays [L, B, K, S, F].
CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer: [L, B, K, S, F] stacked like the scan,
  or (per_layer, for unrolled layers) a tuple of L arrays [B, K, S, F].

  Head-major (K before S): a decode step's attention dots are batched over
  (B, K), so each head's [S, F] block is contiguous; from [.., S, K, F] XLA
  first gathers every layer into that order, every step (on CPU about half
  the decode speed at 4K context, 100m-sized caches).

  Per layer: a layer's keys are then a buffer of their own that its dots
  read in place. From a stack XLA's CPU backend copies the layer out first,
  every decode step: the whole cache once per token (at batch 8 x 576
  slots, 100m, 40% of a step).
  """
  k: Any  # jax.Array or tuple[jax.Array, ...]
  v: Any

  @property
  def length(self) -> int:
    """Positions it holds (S)."""
    return jax.tree.leaves(self.k)[0].shape[-2]


@flax.struct.dataclass
class Stacked:
  """The cache as the layers carry it, each writing its rows in place.

  A 16-bit float cache travels as its uint16 bits: XLA's CPU backend widens
  every bf16 dynamic-slice / update to fp32 (converting the whole stacked
  cache, per layer and step), while integer ones stay in place. The bits are
  the same, and on GPU / TPU the bitcasts cost nothing.
  """
  k: jax.Array
  v: jax.Array
  dtype: Any = flax.struct.field(pytree_node=False)  # The stored dtype.

  @classmethod
  def of(cls, cache: KVCache) -> Stacked:
    return cls(jax.tree.map(_bits, cache.k), jax.tree.map(_bits, cache.v),
               jax.tree.leaves(cache.k)[0].dtype)

  def cache(self) -> KVCache:
    unbits = lambda a: _constrain(_unbits(a, self.dtype))
    return KVCache(k=jax.tree.map(unbits, self.k),
                   v=jax.tree.map(unbits, self.v))

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array,
            layer: jax.Array | int, prefill: bool) -> Stacked:
    """Layer `layer`'s new keys and values [B, T, K, F] written in.

    prefill: every row is at positions 0..T-1, so one slab write (the
    cache's older contents there are overwritten, and nothing beyond T is
    visible to these queries). Otherwise each row writes at its own
    positions; out-of-range ones are dropped.
    """
    stored = lambda new: _bits(new.astype(self.dtype))
    # One layer's [B, K, S, F], written at index `at` of its leading dims
    # (this layer's in a stack; none in a per-layer cache).
    per_layer = isinstance(self.k, tuple)
    at = () if per_layer else (layer,)
    if prefill:
      write = lambda cache, new: jax.lax.dynamic_update_slice(
          cache, jnp.swapaxes(stored(new), 1, 2)[(None,) * len(at)],
          (*at, 0, 0, 0, 0))
    else:
      # [B, T] indices around the K slice: updates [B, T, K, F]. (On a batch
      # split over the mesh, GSPMD gathers these small update rows and
      # indices; mapping the write over the batch instead makes XLA's CPU
      # backend transpose the whole cache every step.)
      rows = jnp.arange(keys.shape[0])[:, None]
      write = lambda cache, new: cache.at[(*at, rows, slice(None),
                                           positions)].set(stored(new))
    if per_layer:
      update = lambda layers, new: (
          layers[:layer] + (_constrain(write(layers[layer], new)),)
          + layers[layer + 1:])
    else:
      update = lambda cache, new: _constrain(write(cache, new))
    return Stacked(update(self.k, keys), update(self.v, values), self.dtype)

  def read(self, layer: jax.Array | int, dtype
           ) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s keys and values as attention takes them: [B, S, K, F]
    in `dtype`.

    XLA fuses the swap and the astype (free when the cache is in the compute
    dtype) into the one per-head relayout it makes for the attention dots.
    """
    names = ("batch", "length", "kv_heads", "head_dim")
    one = lambda cache: nn.with_logical_constraint(jnp.swapaxes(
        _unbits(cache[layer], self.dtype).astype(dtype), 1, 2), names)
    return one(self.k), one(self.v)


def _constrain(x: jax.Array) -> jax.Array:
  """CACHE_AXES on a stacked cache array, or on one layer's."""
  return nn.with_logical_constraint(x, CACHE_AXES[-x.ndim:])


def _bits(x: jax.Array) -> jax.Array:
  """16-bit floats as uint16 (see Stacked); anything else unchanged."""
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _unbits(x: jax.Array, dtype) -> jax.Array:
  return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def init_cache(config: llama_config.LlamaConfig, batch_size: int,
               max_len: int, dtype=jnp.bfloat16,
               per_layer: bool = False) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_len` positions.

  per_layer: a tuple of one array per layer (unrolled layers only; faster
  decoding on CPU, see KVCache); else stacked [L, B, K, S, F].
  """
  if max_len > config.max_len:
    raise ValueError(f"Cache max_len={max_len} exceeds the model's max_len="
                     f"{config.max_len}; lower it or raise config.max_len.")
  if per_layer and config.scan_layers:
    raise ValueError("A per-layer cache needs unrolled layers "
                     "(scan_layers=False): the scan indexes a stacked one.")
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  if per_layer:
    zeros = lambda: tuple(_constrain(jnp.zeros(shape, dtype))
                          for _ in range(config.num_layers))
  else:
    zeros = lambda: _constrain(jnp.zeros((config.num_layers, *shape), dtype))
  return KVCache(k=zeros(), v=zeros())
