"""The HTTP face: XML-RPC over HTTP POST at /RPC2, one thread per connection.

Owns: the threaded HTTP server (stdlib http.server), routing POST /RPC2 to
the dispatcher, HTTP errors for anything else, and a clean shutdown.
Must not: know XML-RPC methods.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server_version = "Xmlrpc-c_Abyss/1.60.5"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        if self.path.split("?")[0] != "/RPC2":
            self.send_error(404, "Not Found")
            return
        length = int(self.headers.get("Content-Length", "0") or 0)
        body = self.rfile.read(length)
        reply = self.server.handle_body(body)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self) -> None:  # noqa: N802
        self.send_error(405, "Method Not Allowed")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class RpcServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, handle_body: Callable[[bytes], bytes]) -> None:
        super().__init__((host, port), _Handler)
        self.handle_body = handle_body
        self._thread = threading.Thread(target=self.serve_forever, name="onesim-http",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
