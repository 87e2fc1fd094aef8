"""What every source kind shares: `Item`, `DataError`, `Source`, `Capped`.

Kept apart from the package's `open_source` so that the kind modules can
import it without importing each other (imports flow downward only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


class DataError(ValueError):
  """Missing or unusable data: the message names the input and the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One source example: `data` goes to the codec, the rest to the manifest.

  `fps` is the frame rate of a video given as a frame array, for the codec to
  resample from; None for images and files (a container has its own), and a
  frame array without it is taken to be at the codec's rate.
  """
  key: str
  data: Any
  label: int | None = None
  fps: float | None = None


# What each codec encodes: picks the synthetic generator, the file extensions
# of folder sources and the TFDS feature.
MEDIA = {"jpeg": "image", "avc": "video"}


class Source(Protocol):
  """What prepare needs of a source."""

  @property
  def label_names(self) -> list[str] | None:
    ...

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Item:
    ...


def check_index(index: int, length: int) -> None:
  """IndexError unless 0 <= index < length (every source's __getitem__)."""
  if not 0 <= index < length:
    raise IndexError(f"Index {index} out of range [0, {length}).")


@dataclasses.dataclass(frozen=True)
class Capped:
  """The first `n` items of a source."""
  source: Any
  n: int

  @property
  def label_names(self):
    return self.source.label_names

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> Item:
    check_index(index, self.n)
    return self.source[index]
