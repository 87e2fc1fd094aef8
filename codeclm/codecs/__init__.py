"""Codecs: the only code that knows file formats.

A codec turns pixels into canonical bytes (headers stripped) and any byte
string back into pixels plus a report of how much of it was valid.
"""


class CodecError(ValueError):
  """Bad input to a codec: names the input and the fix."""
