"""The work of an FID evaluation: slots, sample ids and slices.

Item (seed, slot, i) for slot = a ratio or "uncond" and reference index i.
Its sampler id is round(ratio * 1e4) * 2**18 + i (uncond: code 0), so a
sample depends only on the seed, the ratio and the index: not on the number
of processes, the batch size, or which other ratios or seeds are evaluated.
Process p of n takes the contiguous indices [p*N//n, (p+1)*N//n) for every
seed and slot: its slice.

Guided samples (one per reference, of its class) use slot code GUIDED_CODE
at every guidance scale: the scales share their random streams, so they
differ by the guidance alone.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from codeclm.sampling import hosts

UNCOND = "uncond"
ID_STRIDE = 1 << 18       # Reference indices per slot in the sampler's ids.
RATIO_SCALE = 10_000      # A ratio's slot code: round(ratio * 1e4).
GUIDED_CODE = (1 << 14) - 1  # Above every ratio's; the largest a uint32 id
                             # with ID_STRIDE leaves.


@dataclasses.dataclass(frozen=True)
class Slot:
  """What one group of samples is prompted with: a ratio, or nothing."""
  ratio: float  # 0 = unconditional (from [BOS] alone)

  @property
  def name(self) -> str:
    return UNCOND if not self.ratio else f"r{self.ratio * 100:g}"

  @property
  def code(self) -> int:
    return round(self.ratio * RATIO_SCALE)


def slots_of(ratios: Sequence[float], unconditional: bool) -> list[Slot]:
  """The slots an eval config asks for, checked."""
  slots = []
  for r in ratios:
    if not 0 < r < 1 or abs(r * RATIO_SCALE - round(r * RATIO_SCALE)) > 1e-6:
      raise ValueError(f"eval.ratios holds {r!r}: each ratio must lie in "
                       "(0, 1) and be a multiple of 0.0001, e.g. 0.25.")
    slots.append(Slot(float(r)))
  if len({s.code for s in slots}) != len(slots):
    raise ValueError(f"eval.ratios={tuple(ratios)} repeats a ratio.")
  if unconditional:
    slots.append(Slot(0.0))
  if not slots:
    raise ValueError("Nothing to evaluate: set eval.ratios or "
                     "eval.unconditional=True.")
  return slots


def sample_ids(slot: Slot, indices: Sequence[int]) -> np.ndarray:
  """Global sampler ids: a sample depends on (seed, ratio, index) only."""
  indices = np.asarray(indices, np.int64)
  return (slot.code * ID_STRIDE + indices).astype(np.uint32)


def guided_ids(indices: Sequence[int]) -> np.ndarray:
  """Sampler ids of the guided samples: (seed, index) only, any scale."""
  indices = np.asarray(indices, np.int64)
  return (GUIDED_CODE * ID_STRIDE + indices).astype(np.uint32)


def guided_name(scale: float) -> str:
  """The slice summary's name of a guidance scale: 3.0 -> "guided_s3"."""
  return f"guided_s{float(scale):g}"


def slice_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """Process `index` of `count` takes the contiguous indices [lo, hi)."""
  mine = hosts.share(num_examples, index, count)
  return mine.start, mine.stop


def slice_name(index: int, count: int) -> str:
  return f"slice_{index:05d}_of_{count:05d}"
