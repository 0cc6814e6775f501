"""The agent's control endpoint: authenticated requests from hook scripts.

Owns: an HTTP listener that accepts `POST /v1/hook` only when signed with the
shared secret (HMAC-SHA256 over timestamp, nonce and body), fresh (timestamp
within `WINDOW` seconds) and not replayed (nonce unseen within the window);
everything else is refused with 401 and reported to the `refused` callback
(the daemon logs it). `GET /v1/health` answers, unauthenticated, only that a
oneback agent listens (`probe`, for `oneback doctor`). An accepted request
only becomes a `Trigger`: it wakes the agent, it never decides.

Strangers can reach the port, so before anything is authenticated: the
`Content-Length` must be present, plain decimal and at most `MAX_BODY`
(checked before a byte of the body is read; no chunked bodies); every
connection has a deadline (`timeout` seconds in all, however slowly it
trickles); at most `max_connections` are served at once (one thread each),
more are closed at once; and nothing a request does puts a traceback into
the log (errors become one `refused` line). Used nonces are kept by the
`remember` callback (the daemon persists them in the catalog, so a replay
after a restart is refused too). Must not: log or echo the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.events import Trigger, parse_hook_request

WINDOW = 300.0
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 16
TIMEOUT = 5.0
_LENGTH = re.compile(r"[0-9]{1,20}")
HEALTH_PATH = "/v1/health"
HEALTH: dict[str, object] = {"service": "oneback-agent"}


def sign(secret: bytes, timestamp: str, nonce: str, body: bytes) -> str:
    """The signature a hook script sends (hooks/oneback-hook computes the same)."""
    return hmac.new(secret, f"{timestamp}\n{nonce}\n".encode() + body,
                    hashlib.sha256).hexdigest()


class Verifier:
    """Checks signature, freshness and replay. Thread-safe.

    `remember(nonce, now, forget_before)` records a nonce and says whether it
    was new, forgetting those seen before `forget_before`; the default keeps
    them in memory (lost at a restart)."""

    def __init__(self, secret: bytes, window: float = WINDOW,
                 remember: Callable[[str, float, float], bool] | None = None) -> None:
        self._secret = secret
        self.window = window
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._remember = remember or self._remember_in_memory

    def _remember_in_memory(self, nonce: str, now: float, forget_before: float) -> bool:
        with self._lock:
            for n, t in list(self._seen.items()):
                if t < forget_before:
                    del self._seen[n]
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True

    def check(self, timestamp: str, nonce: str, signature: str, body: bytes,
              now: float | None = None) -> str | None:
        """None if the request is authentic and fresh, else why not."""
        now = time.time() if now is None else now
        expected = sign(self._secret, timestamp, nonce, body)
        if not hmac.compare_digest(expected.encode(), (signature or "").encode()):
            return "bad signature"
        try:
            ts = float(timestamp)
        except ValueError:
            return "bad timestamp"
        if not abs(now - ts) <= self.window:   # also refuses nan
            return "stale timestamp"
        if not (16 <= len(nonce) <= 128):
            return "bad nonce"
        # Kept for two windows: a replay carries its signed timestamp, which is
        # stale by then.
        if not self._remember(nonce, now, now - 2 * self.window):
            return "replayed request"
        return None


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most `slots` of them, each with a deadline."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int, timeout: float,
                 refused: Callable[[str, str], None]) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        self.deadline = timeout
        self.refused = refused
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        self._last_busy = 0.0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            now = time.monotonic()
            if now - self._last_busy >= 1.0:   # one line a second, not one per connection
                self._last_busy = now
                self.refused(str(client_address[0]), "too many connections")
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open[request] = time.monotonic() + self.deadline
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: socket.socket) -> None:
        with self._open_lock:
            if self._open.pop(request, None) is not None:
                self.slots.release()

    def service_actions(self) -> None:
        """Between two accepts (every poll interval): cut connections past their deadline."""
        now = time.monotonic()
        with self._open_lock:
            late = [s for s, t in self._open.items() if t < now]
        for s in late:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Never a traceback: one line, the peer and the kind of error.
        exc = sys.exc_info()[1]
        self.refused(str(client_address[0]), f"connection failed: {type(exc).__name__}")


class ControlServer:
    """Serves the endpoint on its own thread until `close()`."""

    def __init__(self, host: str, port: int, verifier: Verifier,
                 accepted: Callable[[Trigger], None],
                 refused: Callable[[str, str], None], *,
                 max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT) -> None:
        outer = self

        read_timeout = timeout

        class Handler(BaseHTTPRequestHandler):
            timeout = read_timeout   # each read; the server cuts the whole connection too

            def log_message(self, format: str, *args: object) -> None:
                pass  # the daemon logs what matters

            def _answer(self, code: int, doc: dict[str, object]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def _refuse(self, code: int, why: str) -> None:
                outer.refused(self.client_address[0], why)
                self._answer(code, {"error": why})

            def _length(self) -> int | None:
                """The body's length, or None after refusing the request."""
                values = self.headers.get_all("Content-Length") or []
                if self.headers.get("Transfer-Encoding"):
                    self._refuse(411, "chunked bodies are not accepted: send Content-Length")
                    return None
                if len(values) != 1:
                    self._refuse(411, "Content-Length is required (exactly once)")
                    return None
                if not _LENGTH.fullmatch(values[0].strip()):
                    self._refuse(400, "Content-Length must be a non-negative decimal number")
                    return None
                length = int(values[0])
                if length > MAX_BODY:
                    self._refuse(413, f"request too large (at most {MAX_BODY} bytes)")
                    return None
                return length

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                # Unauthenticated and says nothing but who answers (`probe`).
                if self.path != HEALTH_PATH:
                    self._answer(404, {"error": "not found"})
                    return
                self._answer(200, HEALTH)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                peer = self.client_address[0]
                if self.path != "/v1/hook":
                    self._answer(404, {"error": "not found"})
                    return
                length = self._length()
                if length is None:
                    return
                body = self.rfile.read(length)
                if len(body) != length:
                    outer.refused(peer, "request body cut short")
                    self.close_connection = True
                    return
                why = outer.verifier.check(self.headers.get("X-Oneback-Timestamp", ""),
                                           self.headers.get("X-Oneback-Nonce", ""),
                                           self.headers.get("X-Oneback-Signature", ""), body)
                if why is not None:
                    outer.refused(peer, why)
                    self._answer(401, {"error": "unauthorized"})
                    return
                try:
                    trigger = parse_hook_request(json.loads(body))
                except (ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
                    self._refuse(400, f"bad request: {str(e)[:200]}")
                    return
                try:
                    outer.accepted(trigger)
                except Exception as e:  # the agent's bug: one line, the hook is told
                    self._refuse(500, f"internal error: {type(e).__name__}")
                    return
                self._answer(202, {"accepted": True, "vm_id": trigger.vm_id})

        self.verifier = verifier
        self.accepted = accepted
        self.refused = refused
        self._httpd = _Server((host, port), Handler, max_connections, timeout, refused)
        self.address = f"http://{host}:{self._httpd.server_address[1]}/v1/hook"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.2,),
                                        name="oneback-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def probe(host: str, port: int, timeout: float) -> str | None:
    """None if the oneback agent answers on host:port (GET /v1/health), else
    why not, in a few words (`oneback doctor`)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", HEALTH_PATH)
        answer = conn.getresponse()
        body = answer.read(4096)
    except ConnectionRefusedError:
        return "nothing listens there"
    except (OSError, http.client.HTTPException) as e:
        return f"no answer ({type(e).__name__})"
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if answer.status != 200 or doc != HEALTH:
        return f"something else answers there (HTTP {answer.status})"
    return None
