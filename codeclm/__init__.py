"""codeclm: plain Llama models that write images and videos as codec file bytes."""

# gs:// paths go through gcsfs, whatever was imported first and whatever the
# environment says (codeclm/runtime/storage.py): registered on any import.
from codeclm.runtime import storage as _storage
del _storage  # Imported for the registration only.
