"""gcp-storage-emulator (PyPI) with the generation headers real GCS sends.

  python tests/gcs_emulator.py PORT BUCKET

The emulator leaves `x-goog-generation` off object downloads; TensorStore's
GCS driver (Orbax's arrays) reads it to version what it read, and without it
OCDBT's manifest fails with "Malformed StorageGeneration". Real GCS always
sends it (cloud.google.com/storage/docs/xml-api/reference-headers), so adding
it makes the emulator closer to the service, not looser; so does serving
connections concurrently (below).
"""

import http.server
import sys
import threading

from gcp_storage_emulator.handlers import objects


def _with_generation(download):
  def handler(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
    except Exception:  # pylint: disable=broad-except
      return  # NotFound: the handler already answered 404.
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]
  return handler


objects.download = _with_generation(objects.download)
# Its single-threaded HTTPServer serves one keep-alive connection at a time,
# so a client holding one idle (TensorStore does) stalls every other; GCS
# serves them concurrently.
http.server.HTTPServer = http.server.ThreadingHTTPServer

from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top,wrong-import-position


def _one_at_a_time(handle):
  """Its storage is not thread-safe: saving its metadata iterates dicts that
  another request may be changing ("dictionary changed size during
  iteration", a 500 after the object was written, so the client's retry of a
  finished resumable upload gets 404). Connections stay concurrent; requests
  are handled one at a time, as each object is atomic on GCS."""
  lock = threading.Lock()

  def locked(self, method):
    with lock:
      handle(self, method)
  return locked


server.Router.handle = _one_at_a_time(server.Router.handle)


if __name__ == "__main__":
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server("127.0.0.1", port, in_memory=True,
                       default_bucket=bucket).run()
