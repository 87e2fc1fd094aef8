"""Codecs: the only code that knows file formats.

A codec turns pixels into canonical bytes (headers stripped) and any byte
string back into pixels plus a report of how much of it was valid.
"""


class CodecError(ValueError):
  """Bad input to a codec: names the input and the fix."""


def from_config(cfg):
  """The codec a config's `codec` section names, e.g. `from_config(config.codec)`."""
  settings = dict(cfg)
  name = settings.pop("name")
  if name == "jpeg":
    from codeclm.codecs import jpeg  # pylint: disable=g-import-not-at-top
    return jpeg.JpegCodec(**settings)
  raise CodecError(f"Unknown codec {name!r} in config.codec.name; use 'jpeg'.")


def from_settings(settings: dict):
  """The codec a manifest's `codec` settings describe (version keys ignored)."""
  name = settings["name"]
  if name == "jpeg":
    from codeclm.codecs import jpeg  # pylint: disable=g-import-not-at-top
    return jpeg.JpegCodec.from_settings(settings)
  raise CodecError(f"Unknown codec {name!r} in manifest settings.")
