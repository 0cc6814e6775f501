"""The agent's control endpoint: authenticated requests from hook scripts.

Owns: an HTTP listener that accepts `POST /v1/hook` only when signed with the
shared secret (HMAC-SHA256 over timestamp, nonce and body), fresh (timestamp
within `WINDOW` seconds) and not replayed (nonce unseen within the window);
everything else is refused with 401 and reported to the `refused` callback
(the daemon logs it). An accepted request only becomes a `Trigger`: it wakes
the agent, it never decides. Must not: log or echo the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.events import Trigger, parse_hook_request

WINDOW = 300.0
MAX_BODY = 64 * 1024


def sign(secret: bytes, timestamp: str, nonce: str, body: bytes) -> str:
    """The signature a hook script sends (hooks/oneback-hook computes the same)."""
    return hmac.new(secret, f"{timestamp}\n{nonce}\n".encode() + body,
                    hashlib.sha256).hexdigest()


class Verifier:
    """Checks signature, freshness and replay. Thread-safe."""

    def __init__(self, secret: bytes, window: float = WINDOW) -> None:
        self._secret = secret
        self.window = window
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, timestamp: str, nonce: str, signature: str, body: bytes,
              now: float | None = None) -> str | None:
        """None if the request is authentic and fresh, else why not."""
        now = time.time() if now is None else now
        expected = sign(self._secret, timestamp, nonce, body)
        if not hmac.compare_digest(expected, signature or ""):
            return "bad signature"
        try:
            ts = float(timestamp)
        except ValueError:
            return "bad timestamp"
        if abs(now - ts) > self.window:
            return "stale timestamp"
        if not (16 <= len(nonce) <= 128):
            return "bad nonce"
        with self._lock:
            for n, t in list(self._seen.items()):
                if t < now - 2 * self.window:
                    del self._seen[n]
            if nonce in self._seen:
                return "replayed request"
            self._seen[nonce] = now
        return None


class ControlServer:
    """Serves the endpoint on its own thread until `close()`."""

    def __init__(self, host: str, port: int, verifier: Verifier,
                 accepted: Callable[[Trigger], None],
                 refused: Callable[[str, str], None]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass  # the daemon logs what matters

            def _answer(self, code: int, doc: dict[str, object]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                peer = self.client_address[0]
                if self.path != "/v1/hook":
                    self._answer(404, {"error": "not found"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    outer.refused(peer, "request too large")
                    self._answer(413, {"error": "request too large"})
                    return
                body = self.rfile.read(length)
                why = outer.verifier.check(self.headers.get("X-Oneback-Timestamp", ""),
                                           self.headers.get("X-Oneback-Nonce", ""),
                                           self.headers.get("X-Oneback-Signature", ""), body)
                if why is not None:
                    outer.refused(peer, why)
                    self._answer(401, {"error": "unauthorized"})
                    return
                try:
                    trigger = parse_hook_request(json.loads(body))
                except (ValueError, json.JSONDecodeError) as e:
                    outer.refused(peer, f"bad request: {e}")
                    self._answer(400, {"error": str(e)})
                    return
                outer.accepted(trigger)
                self._answer(202, {"accepted": True, "vm_id": trigger.vm_id})

        self.verifier = verifier
        self.accepted = accepted
        self.refused = refused
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.address = f"http://{host}:{self._httpd.server_address[1]}/v1/hook"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="oneback-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
