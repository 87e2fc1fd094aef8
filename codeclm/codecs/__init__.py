"""Codecs: the only code that knows file formats.

A codec turns pixels into canonical bytes (headers stripped) and any byte
string back into pixels plus a report of how much of it was valid.
"""

import json

from absl import logging


class CodecError(ValueError):
  """Bad input to a codec: names the input and the fix."""


def from_config(cfg):
  """The codec a config's `codec` section names, e.g. `from_config(config.codec)`."""
  settings = dict(cfg)
  name = settings.pop("name")
  if name == "jpeg":
    from codeclm.codecs import jpeg  # pylint: disable=g-import-not-at-top
    return jpeg.JpegCodec(**settings)
  if name == "avc":
    from codeclm.codecs import avc  # pylint: disable=g-import-not-at-top
    return avc.AvcCodec(**settings)
  raise CodecError(f"Unknown codec {name!r} in config.codec.name; use 'jpeg' "
                   "or 'avc'.")


def from_settings(settings: dict):
  """The codec a manifest's `codec` settings describe (version keys ignored)."""
  name = settings["name"]
  if name == "jpeg":
    from codeclm.codecs import jpeg  # pylint: disable=g-import-not-at-top
    return jpeg.JpegCodec.from_settings(settings)
  if name == "avc":
    from codeclm.codecs import avc  # pylint: disable=g-import-not-at-top
    return avc.AvcCodec.from_settings(settings)
  raise CodecError(f"Unknown codec {name!r} in manifest settings.")


def version_differences(stored_settings: dict, codec) -> dict[str, tuple]:
  """{key: (stored, installed)} for each setting `codec.settings()` changes.

  `codec` is built from `stored_settings` (a manifest's), so what differs is
  the library versions recorded with them (e.g. pillow, libjpeg).
  """
  now = json.loads(json.dumps(codec.settings()))  # Tuples as JSON has them.
  return {k: (stored_settings.get(k), now.get(k))
          for k in sorted(set(stored_settings) | set(now))
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
