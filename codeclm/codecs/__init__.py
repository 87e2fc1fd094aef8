"""Codecs: the only code that knows file formats.

A codec turns pixels into canonical bytes (headers stripped) and any byte
string back into pixels plus a report of how much of it was valid.

Modules: `jpeg` and `avc` hold the codecs (the registry below names them);
`jpeg_bitstream` and `h264_bitstream` the byte formats (plain Python);
`image_io` (Pillow: pictures in) and `video_io` (PyAV: videos in, x264,
libavcodec, MP4).
"""

import dataclasses
import importlib
import json
import os

from absl import logging
import numpy as np
from PIL import Image


class CodecError(ValueError):
  """Bad input to a codec: names the input and the fix."""


def describe(value, what: str = "image") -> str:
  """How error messages name a codec input: its path, else its type and size.

  what: the kind of data, as in "1234 bytes of video data".
  """
  if isinstance(value, (str, os.PathLike)):
    return repr(os.fspath(value))
  if isinstance(value, (bytes, bytearray, memoryview)):
    return f"{len(value)} bytes of {what} data"
  if isinstance(value, np.ndarray):
    return f"array of shape {value.shape} and dtype {value.dtype}"
  if isinstance(value, Image.Image):
    where = getattr(value, "filename", "") or ""
    return (f"PIL image {where!r} " if where else "PIL image ") + (
        f"(mode {value.mode}, size {value.size})")
  return f"object of type {type(value).__name__}"


def as_bytes(data, codec: str) -> bytes:
  """Model output as bytes; anything else (e.g. token ids) is a CodecError."""
  if isinstance(data, bytes):
    return data
  if isinstance(data, (bytearray, memoryview)):
    return bytes(data)
  raise CodecError(f"{codec} data must be bytes, got {type(data).__name__}; "
                   "detokenize to bytes first.")


# name -> (module, class): imported on first use, so a JPEG run needs no PyAV.
_CODECS = {"jpeg": ("codeclm.codecs.jpeg", "JpegCodec"),
           "avc": ("codeclm.codecs.avc", "AvcCodec")}


def codec_class(name: str, where: str = "config.codec.name"):
  """The codec class called `name` (e.g. "jpeg"); `where` names it in errors."""
  if name not in _CODECS:
    raise CodecError(f"Unknown codec {name!r} in {where}; use one of "
                     f"{sorted(_CODECS)}.")
  module, cls = _CODECS[name]
  return getattr(importlib.import_module(module), cls)


def from_config(cfg):
  """The codec a config's `codec` section names, e.g.
  `from_config(config.codec)`."""
  settings = dict(cfg)
  return codec_class(settings.pop("name"))(**settings)


def from_settings(settings: dict):
  """The codec a manifest's `codec` settings describe (version keys ignored)."""
  return codec_class(settings["name"], "manifest settings").from_settings(
      settings)


def fields_of(cls, settings: dict, version_keys) -> dict:
  """The constructor arguments of codec `cls` in its `settings()` dict.

  Library version keys are dropped (they describe, not configure, a codec);
  any other unknown key or another codec's name is an error.
  """
  settings = dict(settings)
  name = settings.pop("name", cls.name)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(settings) - fields - set(version_keys)
  if name != cls.name or unknown:
    raise CodecError(
        f"Settings {settings} are not {cls.name} codec settings (name="
        f"{name!r}, unknown keys {sorted(unknown)}); expected name="
        f"{cls.name!r} and keys {sorted(fields)}.")
  return {k: v for k, v in settings.items() if k in fields}


def version_differences(stored_settings: dict, codec) -> dict[str, tuple]:
  """{key: (stored, installed)} for each setting `codec.settings()` changes.

  `codec` is built from `stored_settings` (a manifest's), so what differs is
  the library versions recorded with them (e.g. pillow, libjpeg).
  """
  now = json.loads(json.dumps(codec.settings()))  # Tuples as JSON has them.
  # A field newer than the stored settings took its default: not a difference.
  added = {f.name for f in dataclasses.fields(codec)} - set(stored_settings)
  return {k: (stored_settings.get(k), now.get(k))
          for k in sorted(set(stored_settings) | set(now) - added)
          if stored_settings.get(k) != now.get(k)}


def warn_on_version_differences(stored_settings: dict, codec,
                                where: str) -> dict[str, tuple]:
  """Logs one warning if the installed codec libraries are not `where`'s."""
  diff = version_differences(stored_settings, codec)
  if diff:
    logging.warning(
        "The %s codec libraries differ from those recorded in %s: %s. The same "
        "pixels may now encode to different bytes (re-prepared or new data "
        "would not match the training data, nor the stored header) and "
        "decoding may differ. Install the recorded versions to reproduce "
        "exactly, or prepare the data again.", codec.name, where,
        ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items()))
  return diff
