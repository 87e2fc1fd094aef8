"""An HTTP proxy on localhost that makes a storage API fail as a real one can.

  proxy = FaultProxy("http://127.0.0.1:PORT", Faults(seed=0, p503=0.05))
  proxy.start()   # then point STORAGE_EMULATOR_HOST and
                  # TENSORSTORE_GCS_HTTP_URL at proxy.url
  ...
  proxy.counts()  # {"requests": n, "503": k, "429": ..., "outage": ...}
  proxy.stop()

Sits in front of the GCS emulator (tests/gcs_emulator.py) so that both gs://
clients, gcsfs (codeclm's paths, Orbax's metadata) and TensorStore (Orbax's
arrays), meet the same faults. Each request draws, from a seeded generator,
one of: an HTTP 503 or 429 answer with GCS's JSON error body, a connection
reset (RST, no answer), a slow answer (a pause, then forwarded), or none;
`max_per_kind` caps how many of each (a test's retry pauses add up).
Faults are decided before the request is forwarded, so a failed request has
no effect on the store, as a refused one has none on GCS.

One outage window: the first request whose URL (decoded) matches
`outage_on` starts it, and for `outage_s` seconds every request matching
`outage_scope` is reset, or answered with `outage_status` (403: the store
refuses for good, e.g. a permission taken away). `outage_s=math.inf` never
ends it; `end_outage()` does.

Standard library only; serves from a thread of the calling process.
"""

import http.client
import http.server
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.parse

# Headers that describe one connection, not the message (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection",
                         "te", "trailer", "transfer-encoding", "upgrade",
                         "content-length"))
_REASONS = {429: "Too Many Requests", 503: "Service Unavailable",
            403: "Forbidden"}


class Faults:
  """What the proxy injects: per-request probabilities and the outage."""

  def __init__(self, seed: int = 0, p503: float = 0.0, p429: float = 0.0,
               reset: float = 0.0, slow: float = 0.0, slow_s: float = 0.5,
               outage_on: str | None = None, outage_s: float = 0.0,
               outage_scope: str = "", outage_status: int | None = None,
               max_per_kind: float = float("inf")):
    self.seed = seed
    self.max_per_kind = max_per_kind  # Random faults of each kind, at most.
    self.p503, self.p429, self.reset, self.slow = p503, p429, reset, slow
    self.slow_s = slow_s
    self.outage_on = re.compile(outage_on) if outage_on else None
    self.outage_s = outage_s
    self.outage_scope = re.compile(outage_scope)
    self.outage_status = outage_status


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    del request, client_address  # A client that dropped its connection.


class FaultProxy:
  """Forwards to `upstream` (http://host:port), injecting `faults`."""

  def __init__(self, upstream: str, faults: Faults):
    self.upstream = urllib.parse.urlsplit(upstream)
    self.faults = faults
    self._rng = random.Random(faults.seed)
    self._lock = threading.Lock()
    self._counts = {"requests": 0}
    self._outage = None  # (start, end) in time.monotonic() once it began.
    self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    daemon=True)

  def start(self) -> "FaultProxy":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()

  def set_faults(self, faults: Faults) -> None:
    """Starts a new schedule: counts, outage and generator start afresh."""
    with self._lock:
      self.faults = faults
      self._rng = random.Random(faults.seed)
      self._counts = {"requests": 0}
      self._outage = None

  def counts(self) -> dict:
    """Requests seen and faults injected by kind, and the outage's bounds
    (seconds since it began; its length so far if it has not ended)."""
    with self._lock:
      out = dict(self._counts)
      if self._outage:
        start, end = self._outage
        out["outage_seconds"] = round(min(end, time.monotonic()) - start, 2)
      return out

  def outage_started(self) -> bool:
    with self._lock:
      return self._outage is not None

  def end_outage(self) -> None:
    with self._lock:
      if self._outage:
        self._outage = (self._outage[0], time.monotonic())

  def _count(self, kind: str) -> None:
    with self._lock:
      self._counts[kind] = self._counts.get(kind, 0) + 1

  def _decide(self, target: str) -> str | None:
    """The fault for one request ("503", "429", "reset", "slow", "outage")
    or None, and counts it."""
    f = self.faults
    with self._lock:
      self._counts["requests"] += 1
      now = time.monotonic()
      if (self._outage is None and f.outage_on
          and f.outage_on.search(target)):
        self._outage = (now, now + f.outage_s)
      kind = None
      if (self._outage and self._outage[0] <= now < self._outage[1]
          and f.outage_scope.search(target)):
        kind = "outage"
      else:
        draw = self._rng.random()
        for name, p in (("503", f.p503), ("429", f.p429),
                        ("reset", f.reset), ("slow", f.slow)):
          if draw < p:
            if self._counts.get(name, 0) < f.max_per_kind:
              kind = name
            break
          draw -= p
      if kind:
        self._counts[kind] = self._counts.get(kind, 0) + 1
      return kind

  def _handler_class(self):
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # Keep-alive, as both clients use.

      def log_message(self, *args):
        del args

      def do_any(self):
        body = self._read_body()
        target = urllib.parse.unquote(self.path)
        kind = proxy._decide(target)  # pylint: disable=protected-access
        status = proxy.faults.outage_status
        if kind == "outage" and status is None or kind == "reset":
          self._reset()
          return
        if kind == "outage":
          self._error(status)
          return
        if kind in ("503", "429"):
          self._error(int(kind))
          return
        if kind == "slow":
          time.sleep(proxy.faults.slow_s)
        self._forward(body)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_any

      def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if not size:
              while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # Trailers.
              return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

      def _reset(self):
        """Drops the connection with a TCP RST: no answer at all."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        self.connection.close()

      def _error(self, status: int):
        data = json.dumps({"error": {
            "code": status, "message": f"injected by tests/fault_proxy.py "
            f"({_REASONS[status]})"}}).encode()
        self.send_response(status, _REASONS[status])
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
          self.send_header("Retry-After", "1")
        self.end_headers()
        try:
          self.wfile.write(data)
        except OSError:
          pass  # The client gave up on it.

      def _forward(self, body: bytes):
        up = proxy.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=300)
        try:
          headers = {k: v for k, v in self.headers.items()
                     if k.lower() not in _HOP_BY_HOP}
          headers["Host"] = up.netloc
          if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
          conn.request(self.command, self.path, body=body, headers=headers)
          answer = conn.getresponse()
          data = answer.read()
          answer_headers = answer.getheaders()
        except (OSError, http.client.HTTPException):
          # The emulator itself failed: the client sees a reset.
          proxy._count("upstream_error")  # pylint: disable=protected-access
          self._reset()
          return
        finally:
          conn.close()
        # Links the emulator builds (a resumable upload's Location) must
        # lead back through the proxy, not around it.
        mine = urllib.parse.urlsplit(proxy.url).netloc
        if "json" in (answer.getheader("Content-Type") or ""):
          data = data.replace(up.netloc.encode(), mine.encode())
        self.send_response(answer.status, answer.reason)
        for k, v in answer_headers:
          if k.lower() not in _HOP_BY_HOP or (
              k.lower() == "content-length" and self.command == "HEAD"):
            self.send_header(k, v.replace(up.netloc, mine))
        if self.command != "HEAD":
          self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
          try:
            self.wfile.write(data)
          except OSError:
            pass  # The client gave up on it (gcsfs races some lookups).

    return Handler

