"""The optimizer: AdamW with clipping, a warmup-cosine schedule, a decay mask.

Weight decay is decided by a parameter's logical axes, not its array rank:
scanning stacks the layers on a leading "layers" axis, so a norm scale is
[L, D] when scanned and [D] when not, and a rank test would decay it in one
model and not the other. A parameter is decayed when it has two or more
logical axes besides "layers": every projection, the embedding and the output
head; norm scales (one "embed" or "head_dim" axis) are not. The embedding is
decayed like the other matrices, as in Llama-2 and Megatron-LM's default
(OLMo 2 exempts it; that would be a one-line change of `decays`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

STACKING_AXES = ("layers",)  # Logical axes that stack parameters, not shape them.


def decays(names: tuple[str | None, ...]) -> bool:
  """Whether a parameter with these logical axis names gets weight decay."""
  return len([n for n in names if n not in STACKING_AXES]) >= 2


def decay_mask(boxed_params: Any) -> Any:
  """True/False per parameter, from the boxed (logically named) params.

  Every parameter must carry logical names (llama.py's `_param` does): a bare
  one is an error rather than a silent guess.
  """
  def one(path, leaf):
    if not isinstance(leaf, nn.LogicallyPartitioned):
      raise ValueError(
          f"Parameter {jax.tree_util.keystr(path)} has no logical axis names; "
          "create it with nn.with_logical_partitioning so weight decay and "
          "sharding know what it is.")
    return decays(tuple(leaf.names))
  return jax.tree_util.tree_map_with_path(
      one, boxed_params,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def make_schedule(tc) -> optax.Schedule:
  """The learning rate of the update at optimizer count c (0-based).

  Linear warmup then cosine decay, shifted by one so that the first update
  (count 0) already uses peak / warmup_steps rather than 0, the update at
  count warmup_steps - 1 uses the peak, and the last (count steps - 1) ends
  at lr * end_lr_ratio.
  """
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.steps, tc.warmup_steps + 1),
      end_value=tc.lr * tc.end_lr_ratio)
  return lambda count: base(count + 1)


def make_optimizer(tc, mask: Any) -> tuple[optax.GradientTransformation,
                                           optax.Schedule]:
  """AdamW (b2 0.95), global-norm clipping; decay where `mask` is True."""
  schedule = make_schedule(tc)
  tx = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps,
                  weight_decay=tc.weight_decay, mask=mask),
  )
  return tx, schedule
