"""The train and eval steps: loss terms, micro-batches, the optimizer update.

`train_step` scans `grad_accum` micro-batches and applies one update. Where
the weights and the optimizer state live during the step is a `Placement`
(made by loop.build from the config's train section):

  weight_gather "per_micro_batch"  each micro-batch uses the fsdp-sharded
      weights, so XLA all-gathers every layer's weights in its forward and
      again in its (remat'd) backward, and reduces its gradients:
      about 3 passes of the weights per micro-batch.
  weight_gather "per_step"  the weights are cast to the compute dtype and
      gathered once per step (the batch mesh axes removed from their
      sharding); each micro-batch's gradients are kept per batch shard (a
      leading axis over the batch mesh axes, made by vmap with
      spmd_axis_name) and summed in fp32 in that layout, and one reduction
      after the scan puts them on the params' sharding (XLA: an all-reduce
      of the fp32 gradient). Costs a full copy of the weights in the compute
      dtype, a full fp32 gradient accumulator and one micro-batch's full
      gradient per device; needs mesh context 1.
  optimizer_offload  the optimizer state lives in pinned host memory between
      steps; the step brings it to the device for the update and its
      out_shardings send it back.
  param_offload  the fp32 weights live in pinned host memory too. The step
      brings them in once cast to the compute dtype (the matrices; still
      sharded as trained), differentiates with respect to that copy, so a
      micro-batch's gradients are in the compute dtype as well, sums them in
      fp32, and brings the fp32 weights in again for the update. The
      gradients are the same numbers (the cast's transpose is a cast); HBM
      holds half-size weights and micro-batch gradients during the
      micro-batches. "per_micro_batch" only.

Functions take the config's sections (`tc`: train, `data`: data), never the
whole config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

WEIGHT_GATHERS = ("per_micro_batch", "per_step")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the step keeps weights, gradients and optimizer state.

  gathered: per-param NamedShardings of the once-per-step copy (None: the
    weights are used as sharded, "per_micro_batch"); sharded: the params'
    own shardings, where the summed gradients go. cast: per-param bools,
    True where the model casts the weight to the compute dtype anyway (the
    matrices), so the copy is cast before the gather. batch_axes: the mesh
    axes the batch is split over (the per-shard gradient axis).
    inner_rules: the logical rules without those axes, for the model traced
    per batch shard. opt_device: the optimizer state's device shardings
    when it is kept in host memory between steps (None: kept on device).
    params_device: the params' device shardings when they are kept in host
    memory between steps (param_offload; None: kept on device).
  """
  gathered: Any = None
  sharded: Any = None
  cast: Any = None
  batch_axes: tuple[str, ...] = ()
  inner_rules: tuple = ()
  opt_device: Any = None
  params_device: Any = None


def loss_terms(model, params, batch, use_segments: bool, z_loss: float,
               token_bytes: jax.Array):
  """Summed (not averaged) loss terms of one batch, so micro-batches add up."""
  logits = model.apply(
      {"params": params}, batch["inputs"], batch["positions"],
      batch["segment_ids"] if use_segments else None)
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(
      logits, batch["targets"][..., None], axis=-1)[..., 0]
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = jnp.sum((logz - target_logit) * mask)
  objective = nll + z_loss * jnp.sum(jnp.square(logz) * mask)
  target_bytes = jnp.asarray(token_bytes)[batch["targets"]]
  return objective, dict(nll=nll, tokens=jnp.sum(mask),
                         bytes=jnp.sum(target_bytes * mask))


def summarize(sums) -> dict:
  return dict(loss=sums["nll"] / sums["tokens"],
              bits_per_byte=sums["nll"] / math.log(2) / sums["bytes"])


def train_step(state: TrainState, batch, *, model, tx, schedule, tc, data,
               token_bytes, placement: Placement = Placement()):
  """One optimizer step over `grad_accum` micro-batches (scanned); `tc` and
  `data` are the config's train and data sections."""
  use_segments = data.packing == "pack"
  grad_fn = jax.grad(
      functools.partial(loss_terms, model, use_segments=use_segments,
                        z_loss=tc.z_loss, token_bytes=token_bytes),
      has_aux=True)
  micro = jax.tree.map(lambda x: micro_batches(x, tc.grad_accum), batch)
  sums0 = dict(nll=0.0, tokens=0.0, bytes=0.0)
  params = state.params
  if placement.params_device is not None:
    # Each micro-batch's gradients with respect to the compute-dtype copy of
    # the host-resident weights, summed in fp32 on the params' shardings.
    on_params = lambda tree: jax.tree.map(jax.lax.with_sharding_constraint,
                                          tree, placement.params_device)
    grads, sums = _summed_grads(
        compute_copy(state.params, placement, model.config.dtype),
        jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), state.params),
        micro, grad_fn, sums0, on_params)
    # The fp32 weights again for the update, fetched after the micro-batches
    # (the barrier keeps XLA from sharing one early copy with the cast).
    params, grads = jax.lax.optimization_barrier((state.params, grads))
    params = jax.device_put(params, placement.params_device)
  elif placement.gathered is None:
    grads, sums = _summed_grads(
        state.params, jax.tree.map(jnp.zeros_like, state.params), micro,
        grad_fn, sums0)
  else:
    grads, sums = _gathered_grads(state.params, micro, grad_fn, placement,
                                  model.config.dtype, sums0)
  grads = jax.tree.map(lambda g: g / sums["tokens"], grads)
  opt_state = state.opt_state
  if placement.opt_device is not None:  # Host -> device for the update.
    opt_state = jax.device_put(opt_state, placement.opt_device)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = dict(summarize(sums), grad_norm=optax.global_norm(grads),
                 learning_rate=schedule(state.step))
  return TrainState(state.step + 1, params, opt_state), metrics


def compute_copy(params, placement: Placement, dtype):
  """The weights on the device, the matrices cast to the compute dtype
  (param_offload: from host memory; sharded as trained)."""
  params = jax.device_put(params, placement.params_device)
  return jax.tree.map(lambda p, cast: p.astype(dtype) if cast else p,
                      params, placement.cast)


def _summed_grads(weights, zeros, micro, grad_fn, sums0,
                  place=lambda tree: tree):
  """Gradients of every micro-batch (scanned) with respect to `weights`,
  summed into `zeros`' dtype, and the loss sums; `place` lays out the
  running sums (a sharding constraint, or none)."""
  def micro_step(carry, micro_batch):
    grads, sums = carry
    g, aux = grad_fn(weights, micro_batch)
    grads = place(jax.tree.map(lambda acc, x: acc + x.astype(acc.dtype),
                               grads, g))
    return (grads, jax.tree.map(jnp.add, sums, aux)), None

  (grads, sums), _ = jax.lax.scan(micro_step, (place(zeros), sums0), micro)
  return grads, sums


def _gathered_grads(params, micro, grad_fn, placement: Placement, dtype,
                    sums0):
  """Summed gradients (params' shardings) and loss sums of all micro-batches
  from one gathered copy of the weights ("per_step")."""
  constrain = jax.lax.with_sharding_constraint
  copy = jax.tree.map(
      lambda p, cast, s: constrain(p.astype(dtype) if cast else p, s),
      params, placement.cast, placement.gathered)
  axes = placement.batch_axes
  mesh = jax.sharding.get_abstract_mesh()
  shards = math.prod(mesh.shape[a] for a in axes)
  per_shard = lambda s: jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec(axes or None, *s.spec))

  def shard_grads(micro_batch):
    """[shards, rows, ...] -> gradients [shards, *param] and loss sums, one
    entry per batch shard: each device keeps its own partial sums."""
    with nn.logical_axis_rules(placement.inner_rules):
      return jax.vmap(grad_fn, in_axes=(None, 0), spmd_axis_name=axes or None
                      )(copy, micro_batch)

  def micro_step(carry, micro_batch):
    grads, sums = carry
    split = jax.tree.map(lambda x: x.reshape(
        shards, x.shape[0] // shards, *x.shape[1:]), micro_batch)
    g, aux = shard_grads(split)
    grads = jax.tree.map(
        lambda acc, x, s: constrain(acc + x.astype(acc.dtype), per_shard(s)),
        grads, g, placement.gathered)
    aux = jax.tree.map(lambda x: jnp.sum(x, axis=0), aux)
    return (grads, jax.tree.map(jnp.add, sums, aux)), None

  zeros = jax.tree.map(
      lambda p, s: constrain(jnp.zeros((shards, *p.shape), p.dtype),
                             per_shard(s)), params, placement.gathered)
  (grads, sums), _ = jax.lax.scan(micro_step, (zeros, sums0), micro)
  # One reduction of the per-shard sums onto the params' sharding. XLA makes
  # it an all-reduce of the whole fp32 gradient (then keeps each device's
  # slice), not a reduce-scatter: twice a reduce-scatter's bytes, once per
  # step.
  grads = jax.tree.map(lambda g, s: constrain(jnp.sum(g, axis=0), s),
                       grads, placement.sharded)
  return grads, sums


def micro_batches(x: jax.Array, n: int) -> jax.Array:
  """[B, S] -> [n, B/n, S]; micro-batch i is rows i, i + n, i + 2n, ...

  Strided, not contiguous blocks: each device's block of rows holds its
  share of every micro-batch, so a micro-batch keeps the batch's sharding
  over all devices and hosts (contiguous blocks would live on a few devices
  and be all-gathered into every step of the loop).
  """
  strided = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return nn.with_logical_constraint(strided, (None, "batch", "length"))


def eval_step(params, batch, *, model, data, token_bytes,
              micro_batches_per_step: int = 1,
              placement: Placement = Placement()):
  """Loss sums of a global batch, in the train step's micro-batches (scanned):
  its activations are then those the train step fits, not a whole batch's.
  Weights kept in host memory (`placement`) come in as the compute-dtype
  copy the train step uses."""
  if placement.params_device is not None:
    params = compute_copy(params, placement, model.config.dtype)
  loss = functools.partial(loss_terms, model, params,
                           use_segments=data.packing == "pack", z_loss=0.0,
                           token_bytes=token_bytes)
  if micro_batches_per_step == 1:
    return loss(batch)[1]

  def micro_step(sums, micro_batch):
    return jax.tree.map(jnp.add, sums, loss(micro_batch)[1]), None

  micro = jax.tree.map(lambda x: micro_batches(x, micro_batches_per_step),
                       batch)
  sums0 = dict(nll=0.0, tokens=0.0, bytes=0.0)
  return jax.lax.scan(micro_step, sums0, micro)[0]
