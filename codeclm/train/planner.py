"""The layout planner: picks the "auto" fields of a config for a device count.

A layout is the mesh (data, fsdp, context, tensor), train.grad_accum,
model.remat_policy, train.optimizer_offload, train.weight_gather and
train.param_offload. Finding
one by trial compiles costs minutes each (--mode=compile); this module
estimates, by arithmetic on the model's shapes, each candidate's memory per
chip (HBM and pinned host) and the collective bytes a chip moves per step,
and keeps the candidate with the fewest collective bytes among those that
fit the chip's HBM with a safety margin. Fields set explicitly are kept.

The memory model's constants are fitted to XLA's numbers for real layouts
(benchmarks/RESULTS.md, "Fit on TPU slices"; tests/test_planner.py holds the
rows and the tolerance); the collectives model counts passes of the bf16
weights per micro-batch as hlo_stats counted them in the same compiles. It is
a planner's estimate: `--mode=compile` prints it beside XLA's number, which
is the verdict.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
from typing import Iterator

from absl import logging
import ml_collections

from codeclm.model import sharding

GIB = 2**30
AUTO = "auto"
# The fields the planner may choose, as (config section, key).
FIELDS = (("mesh", "shape"), ("train", "grad_accum"),
          ("model", "remat_policy"), ("train", "optimizer_offload"),
          ("train", "weight_gather"), ("train", "param_offload"))
REMAT_CHOICES = ("full", "offload_layer_inputs")
WEIGHT_GATHERS = ("per_micro_batch", "per_step")
# Estimates must leave this share of HBM free: the fitted model is within
# ~15% of XLA's totals (tests/test_planner.py), and XLA keeps some HBM
# itself (15.75 of a v5e's 16 GiB).
MARGIN = 0.12
# Host memory per chip of the TPU VMs (Cloud TPU machine types: v4 and v5p
# 4 chips with ~400-450 GiB, v5e 4-8 chips with 48 GiB each, v6e 4-8 with
# ~180 GiB each); the planner offloads into at most half of it.
HOST_BYTES_PER_CHIP = {"v4": 100 * GIB, "v5p": 112 * GIB, "v5e": 48 * GIB,
                       "v6e": 180 * GIB}
HOST_SHARE = 0.5

# Memory constants, fitted by least squares (non-negative) to the 23
# train-step rows of benchmarks/RESULTS.md that tests/test_planner.py holds;
# each multiplies a term of `estimate` (bytes per element, or copies).
_GRAD_COPIES = 4.4       # fp32 gradient-sized buffers per param shard:
                         # the gradients, accumulator and AdamW update
_LAYER_WEIGHT_COPIES = 8.9  # bf16 weights of one layer gathered at a time
_ROW_BYTES_PER_D = 15.7  # one layer's working set, per token per emb_dim
_ROW_BYTES_PER_MLP = 0.9  # ... and per token per MLP unit (over tensor)
_WINDOW_BYTES = 6.2      # per token per window token: grows with the window
                         # squared at a fixed token count (not explained;
                         # the 32K rows need it)
_LOGITS_COPIES = 3.0     # fp32 [rows, length, vocab] loss temporaries
_XLA_SCORE_COPIES = 1.47  # fp32 [rows, heads, T, S] scores (xla attention)
_CODE_BYTES = 0.05 * GIB
# weight_gather="per_step": a micro-batch's whole gradients and their
# temporaries, bytes per parameter (Avc-LM 7B on v5p-16: 57 GiB more
# temporaries than per_micro_batch, 36 of them the copy and accumulator).
_STEP_GRAD_BYTES = 3.1
# The share of the offloaded AdamW moments back in HBM as temporaries during
# the update: none in the one compile with optimizer_offload (Avc-LM 7B on
# v5e-16, benchmarks/RESULTS.md "The layout planner"), where XLA's
# temporaries were below this model's even without them.
_OFFLOAD_BACK = 0.0
# param_offload: the fp32 accumulator, a micro-batch's compute-dtype
# gradients and the update's temporaries, bytes per parameter (shard), in
# place of the gradient copies above: on the safe side of the two v5e-8
# compiles that have it (Avc-LM 7B 1x1x8x1 and Jpeg-LM 7B 1x8x1x1, both
# offloads; benchmarks/RESULTS.md, "Weights in host memory").
_HOST_PARAMS_GRAD_BYTES = 10.1
# Collectives: passes of the bf16 layer weights per micro-batch, as counted
# (forward and backward gathers; the gradient reduction is a third pass).
_GATHER_PASSES = 2.16
_REDUCE_PASSES = 1.0
_KV_PASSES = 5.0         # context: K/V gathered fwd, recomputed, bwd + dK/dV


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the estimate reads of a run: model dims and the step's tokens."""
  num_layers: int
  emb_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab: int
  seq_len: int
  batch_size: int
  attention: str = "splash"  # the resolved kernel: "xla" keeps the scores

  @property
  def layer_params(self) -> int:
    d, f = self.emb_dim, self.head_dim
    return (2 * d * self.num_heads * f + 2 * d * self.num_kv_heads * f
            + 3 * d * self.mlp_dim + 2 * d)

  @property
  def params(self) -> int:
    return (self.num_layers * self.layer_params
            + 2 * self.vocab * self.emb_dim + self.emb_dim)


@dataclasses.dataclass(frozen=True)
class Layout:
  mesh: tuple[int, int, int, int]  # (data, fsdp, context, tensor)
  grad_accum: int
  remat_policy: str
  optimizer_offload: bool
  weight_gather: str
  param_offload: bool = False


@dataclasses.dataclass(frozen=True)
class Estimate:
  hbm_bytes: float         # per chip
  host_bytes: float        # pinned host memory per chip
  collective_bytes: float  # per chip per step
  parts: dict              # name -> HBM bytes, for the report

  def describe(self) -> str:
    return (f"{self.hbm_bytes / GIB:.2f} GiB HBM, {self.host_bytes / GIB:.2f}"
            f" GiB host, {self.collective_bytes / GIB:.1f} GiB collectives "
            "per chip per step")


def estimate(s: Shape, lay: Layout) -> Estimate:
  """Per-chip memory and per-step collectives of the train step."""
  data, fsdp, context, tensor = lay.mesh
  shards = fsdp * context * tensor  # weights: embed over fsdp x context
  rows = s.batch_size / (data * fsdp * lay.grad_accum)  # per chip, micro
  tokens = rows * s.seq_len / context  # per chip per micro-batch
  kv = s.num_kv_heads * s.head_dim
  layer_bf16 = 2 * s.layer_params / tensor
  host = 0.0
  parts = dict(params=4 * s.params / shards,
               optimizer=8 * s.params / shards,
               gradients=_GRAD_COPIES * 4 * s.params / shards,
               layer_weights=_LAYER_WEIGHT_COPIES * layer_bf16,
               layer_work=tokens * (_ROW_BYTES_PER_D * s.emb_dim
                                    + _ROW_BYTES_PER_MLP * s.mlp_dim / tensor
                                    + _WINDOW_BYTES * s.seq_len),
               logits=_LOGITS_COPIES * 4 * tokens * s.vocab / tensor,
               code=_CODE_BYTES)
  if lay.optimizer_offload:  # Moments brought back in for the update.
    host += parts["optimizer"]
    parts["optimizer"] *= _OFFLOAD_BACK
  if lay.param_offload:  # fp32 weights in host memory; on the device a
    host += parts["params"]  # compute-dtype copy, and the micro-batch
    parts["params"] /= 2     # gradients in that dtype too.
    parts["gradients"] = _HOST_PARAMS_GRAD_BYTES * s.params / shards
  if lay.weight_gather == "per_step":  # Whole on every chip (per tensor):
    parts["all_weights"] = 2 * s.params / tensor  # the bf16 copy,
    parts["accumulator"] = 4 * s.params / tensor  # the fp32 accumulator,
    parts["micro_gradients"] = _STEP_GRAD_BYTES * s.params / tensor
  saved = s.num_layers * tokens * s.emb_dim * 2  # bf16 layer inputs
  if lay.remat_policy == "offload_layer_inputs":
    host += saved
  elif lay.remat_policy in ("full", "nothing_saveable"):
    parts["layer_inputs"] = saved
  else:  # Saves more than inputs per layer; a rough upper estimate.
    parts["layer_inputs"] = s.num_layers * parts["layer_work"]
  if context > 1:  # K/V of the whole window, gathered per layer.
    parts["kv"] = 2 * 2 * rows * s.seq_len * kv / tensor
  if s.attention == "xla":
    parts["scores"] = (_XLA_SCORE_COPIES * 4 * rows * s.num_heads / tensor
                       * s.seq_len / context * s.seq_len)
  # Collectives per step per chip.
  weights = s.num_layers * layer_bf16 + 2 * 2 * s.vocab * s.emb_dim / tensor
  coll = 0.0
  if fsdp * context > 1 and lay.weight_gather == "per_micro_batch":
    coll += lay.grad_accum * (_GATHER_PASSES + _REDUCE_PASSES) * weights
  elif fsdp * context > 1:  # One bf16 gather, one fp32 reduction a step.
    coll += (1 + 2 * _REDUCE_PASSES) * weights
  if data > 1:  # fp32 gradient shards all-reduced once per step.
    coll += 4 * s.params / shards
  if context > 1:
    coll += (lay.grad_accum * _KV_PASSES * s.num_layers * 2 * 2 * rows
             * s.seq_len * kv / tensor)
  if tensor > 1:  # Activations all-reduced: 2 per layer fwd, recompute, bwd.
    coll += lay.grad_accum * 6 * s.num_layers * tokens * s.emb_dim * 2
  return Estimate(sum(parts.values()), host, coll, parts)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def meshes(s: Shape, n: int, balance: bool = True
           ) -> Iterator[tuple[int, int, int, int]]:
  """(data, fsdp, context, tensor) splits of n devices the shapes allow."""
  for data, fsdp, context in itertools.product(_divisors(n), repeat=3):
    if n % (data * fsdp * context):
      continue
    tensor = n // (data * fsdp * context)
    if (s.batch_size % (data * fsdp) or s.num_heads % tensor
        or s.num_kv_heads % tensor or s.mlp_dim % tensor
        or s.emb_dim % (fsdp * context)
        or s.seq_len % ((2 if balance else 1) * context)):
      continue
    yield (data, fsdp, context, tensor)


# ROWS_NOTE: micro-batches of more than one row per chip are left out unless
# grad_accum is set: the memory model misses by -24% to -36% there with the
# offloads (Jpeg-LM 7B on v5p-8, 8 and 16 rows per chip) while every
# layout of one row per chip or less compiled within its tolerance.


def candidates(s: Shape, n: int, fixed: dict, balance: bool = True
               ) -> Iterator[Layout]:
  """Every layout of n devices with the `fixed` fields as given: at most
  one row per chip per micro-batch unless grad_accum is fixed (ROWS_NOTE).

  fixed: field name (Layout's) -> value, for the fields not "auto".
  """
  mesh_list = ([fixed["mesh"]] if "mesh" in fixed
               else list(meshes(s, n, balance)))
  for mesh in mesh_list:
    rows = s.batch_size // (mesh[0] * mesh[1])
    accums = ([fixed["grad_accum"]] if "grad_accum" in fixed
              else _divisors(rows))
    for accum, remat, offload, gather, params in itertools.product(
        accums,
        [fixed["remat_policy"]] if "remat_policy" in fixed
        else REMAT_CHOICES,
        [fixed["optimizer_offload"]] if "optimizer_offload" in fixed
        else (False, True),
        [fixed["weight_gather"]] if "weight_gather" in fixed
        else WEIGHT_GATHERS,
        [fixed["param_offload"]] if "param_offload" in fixed
        else (False, True)):
      if gather == "per_step" and "weight_gather" not in fixed and (
          accum == 1 or mesh[2] > 1):
        continue  # Nothing to share a gather with; refused with context.
      if params and gather == "per_step":
        continue  # Refused: per_step keeps a device copy anyway.
      if "grad_accum" not in fixed and rows > accum:
        continue  # One row per chip per micro-batch at most (see ROWS_NOTE).
      yield Layout(tuple(mesh), accum, remat, offload, gather, params)


def _cost(lay: Layout, est: Estimate):
  """Fewest collectives; then less host traffic, fewer micro-batches."""
  return (round(est.collective_bytes), round(est.host_bytes),
          lay.grad_accum, est.hbm_bytes)


def plan(s: Shape, n: int, hbm_bytes: int, fixed: dict | None = None, *,
         host_bytes: float = 0.0, margin: float = MARGIN,
         balance: bool = True) -> tuple[Layout, Estimate]:
  """The fitting layout with the fewest collective bytes per step.

  A layout fits when its HBM estimate is within (1 - margin) * hbm_bytes
  and what it offloads within HOST_SHARE * host_bytes (host memory per
  chip; 0: offload nothing). The weights go to host memory (param_offload)
  only where no layout without that fits: its saving was measured on two
  layouts and reversed on a third (benchmarks/RESULTS.md). Raises
  ValueError naming the smallest estimate and what to change when none
  fits.
  """
  fixed = fixed or {}
  if "param_offload" not in fixed:
    try:
      return plan(s, n, hbm_bytes, {**fixed, "param_offload": False},
                  host_bytes=host_bytes, margin=margin, balance=balance)
    except ValueError:
      fixed = {**fixed, "param_offload": True}
  budget = (1 - margin) * hbm_bytes
  best, smallest = None, None
  for lay in candidates(s, n, fixed, balance):
    est = estimate(s, lay)
    if est.host_bytes > HOST_SHARE * host_bytes:
      continue
    if smallest is None or est.hbm_bytes < smallest[1].hbm_bytes:
      smallest = (lay, est)
    if est.hbm_bytes <= budget and (
        best is None or _cost(lay, est) < _cost(*best)):
      best = (lay, est)
  if best is not None:
    return best
  if smallest is None:
    raise ValueError(
        f"No layout of {n} devices splits batch {s.batch_size}, "
        f"{s.num_heads} heads and seq_len {s.seq_len} with "
        f"{_named(fixed)}; change the fixed fields or the device count.")
  lay, est = smallest
  raise ValueError(
      f"No layout fits {n} devices of {hbm_bytes / GIB:.1f} GiB "
      f"(estimates kept under {1 - margin:.0%}); the smallest is "
      f"{est.hbm_bytes / GIB:.1f} GiB per chip with {_named(lay)}. Use more "
      "chips (a larger slice), a shorter window (seq_len) or a smaller "
      "batch_size, or leave more fields at 'auto'.")


def _named(obj) -> str:
  items = (dataclasses.asdict(obj) if dataclasses.is_dataclass(obj)
           else obj).items()
  return ", ".join(f"{k}={v}" for k, v in items) or "nothing fixed"


def is_auto(value) -> bool:
  return isinstance(value, str) and value == AUTO


def auto_fields(config) -> list[str]:
  """The "section.key" names a config leaves to the planner."""
  return [f"{sec}.{key}" for sec, key in FIELDS
          if is_auto(config[sec].get(key))]


def check_resolved(config) -> None:
  """Code that reads the layout before the planner ran fails here."""
  auto = auto_fields(config)
  if auto:
    raise ValueError(
        f"{', '.join(auto)} {'is' if len(auto) == 1 else 'are'} 'auto': "
        "call planner.resolve first (main and --mode=compile do), or set "
        "them, e.g. --config.mesh.shape='(1,-1,1,1)'.")


def shape_of(model, *, seq_len: int, batch_size: int, vocab: int,
             attention: str) -> Shape:
  """The Shape of a config's model section and step."""
  heads = model.num_heads
  head_dim = model.get("head_dim") or model.emb_dim // heads
  return Shape(model.num_layers, model.emb_dim, heads, model.num_kv_heads,
               head_dim, model.mlp_dim, vocab, seq_len, batch_size,
               "xla" if attention == "xla" else "splash")


def resolve(config, num_devices: int, hbm_bytes: int | None, *,
            host_bytes: float = 0.0, attention: str = "splash"
            ) -> tuple[ml_collections.ConfigDict, Estimate | None]:
  """A copy of config with its "auto" layout fields chosen; and the plan's
  estimate (None when nothing was auto).

  hbm_bytes: memory per device; None (unknown) is an error when something
  is auto. host_bytes: host memory per device (see plan). attention: the
  kernel the step will use (attention.resolve's answer); "xla" costs [T, S]
  scores.
  """
  auto = auto_fields(config)
  if not auto:
    return config, None
  if hbm_bytes is None:
    raise ValueError(
        f"{', '.join(auto)} are 'auto' but the devices do not report their "
        "memory; set them explicitly (e.g. --config.mesh.shape='(-1,1,1,1)'"
        " --config.train.grad_accum=1).")
  train = config.train
  fixed = {}
  if not is_auto(config.mesh.shape):
    fixed["mesh"] = _concrete_mesh(config.mesh.shape, num_devices)
  for key, section in (("grad_accum", train), ("remat_policy", config.model),
                       ("optimizer_offload", train),
                       ("weight_gather", train), ("param_offload", train)):
    if key in section and not is_auto(section[key]):
      fixed[key] = section[key]
  for key, value in (("optimizer_offload", False),
                     ("weight_gather", "per_micro_batch"),
                     ("param_offload", False)):
    if key not in train:  # An older config: the knob is not there to set.
      fixed[key] = value
  lay, est = plan(config_shape(config, attention), num_devices, hbm_bytes,
                  fixed, host_bytes=host_bytes,
                  balance=config.mesh.get("context_load_balance", True))
  out = copy.deepcopy(config)  # Keeps the fields' types; unlocked.
  out.unlock()
  chosen = dict(shape=tuple(lay.mesh), **dataclasses.asdict(lay))
  for sec, key in FIELDS:
    if is_auto(out[sec].get(key)):
      out[sec][key] = chosen[key]
  return out, est


def resolve_for_devices(config) -> ml_collections.ConfigDict:
  """resolve() for this process's devices (training): their memory, or on
  CPU, where devices report none, the host's shared among them."""
  auto = auto_fields(config)
  if not auto:
    return config
  import jax  # pylint: disable=g-import-not-at-top
  from codeclm.model import attention  # pylint: disable=g-import-not-at-top
  device, n = jax.local_devices()[0], jax.device_count()
  hbm = (device.memory_stats() or {}).get("bytes_limit")
  host = host_memory() / jax.local_device_count()
  if hbm is None:  # CPU: nothing to offload to.
    hbm, host = host, 0.0
  impl = attention.resolve(config.model.attention_impl, device.platform,
                           config.model.dtype, config.seq_len, False)
  config, est = resolve(config, n, hbm, host_bytes=host, attention=impl)
  logging.info("Planned %s for %d devices of %.1f GiB: %s; estimate %s.",
               ", ".join(auto), n, hbm / GIB, layout_of(config, n),
               est.describe())
  return config


def host_memory() -> int:
  """This machine's physical memory in bytes."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _concrete_mesh(shape, n: int) -> tuple[int, int, int, int]:
  sharding.check_shape(shape)
  shape = [int(x) for x in shape]
  if -1 in shape:
    shape[shape.index(-1)] = n // -math.prod(shape)
  return tuple(shape)


# What "auto" meant before the planner: fsdp over every device, one
# micro-batch, full remat, nothing offloaded (for tools that want a fixed
# layout, e.g. benchmarks/state_bytes.py).
UNPLANNED = {("mesh", "shape"): (1, -1, 1, 1), ("train", "grad_accum"): 1,
             ("model", "remat_policy"): "full",
             ("train", "optimizer_offload"): False,
             ("train", "weight_gather"): "per_micro_batch",
             ("train", "param_offload"): False}


def unplanned(config) -> ml_collections.ConfigDict:
  """A copy of config with its "auto" fields set to UNPLANNED."""
  out = copy.deepcopy(config)
  out.unlock()
  for (sec, key), value in UNPLANNED.items():
    if is_auto(out[sec].get(key)):
      out[sec][key] = value
  return out


def layout_of(config, num_devices: int) -> Layout:
  """A resolved config's layout (its mesh's -1 filled for num_devices)."""
  check_resolved(config)
  return Layout(_concrete_mesh(config.mesh.shape, num_devices),
                int(config.train.grad_accum), config.model.remat_policy,
                bool(config.train.get("optimizer_offload", False)),
                config.train.get("weight_gather", "per_micro_batch"),
                bool(config.train.get("param_offload", False)))


def config_shape(config, attention: str) -> Shape:
  """The Shape of a config's model and step (vocabulary: BPE + BOS/EOS)."""
  return shape_of(config.model, seq_len=config.seq_len,
                  batch_size=config.batch_size,
                  vocab=config.data.vocab_size + 2, attention=attention)
