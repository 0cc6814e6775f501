"""The control endpoint's authentication: signature, freshness, replay."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from agent.control import MAX_CONNECTIONS, ControlServer, Verifier, sign
from agent.events import Trigger

SECRET = b"a-shared-secret-of-some-length"


def test_verifier_accepts_once_and_refuses_the_rest() -> None:
    v = Verifier(SECRET, window=300)
    body = b'{"vm_id": 1}'
    nonce = "n" * 32
    good = sign(SECRET, "1000", nonce, body)
    assert v.check("1000", nonce, good, body, now=1000) is None
    assert v.check("1000", nonce, good, body, now=1001) == "replayed request"
    assert v.check("1000", "m" * 32, sign(b"wrong", "1000", "m" * 32, body), body,
                   now=1000) == "bad signature"
    assert v.check("1000", "o" * 32, sign(SECRET, "1000", "o" * 32, body), body + b" ",
                   now=1000) == "bad signature"
    assert v.check("1", "p" * 32, sign(SECRET, "1", "p" * 32, body), body,
                   now=1000) == "stale timestamp"
    assert v.check("1000", "short", sign(SECRET, "1000", "short", body), body,
                   now=1000) == "bad nonce"


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_server_turns_authentic_requests_into_triggers() -> None:
    accepted: list[Trigger] = []
    refused: list[tuple[str, str]] = []
    server = ControlServer("127.0.0.1", 0, Verifier(SECRET), accepted.append,
                           lambda peer, why: refused.append((peer, why)))
    try:
        import time
        body = json.dumps({"vm_id": 9, "event": "test"}).encode()
        ts, nonce = str(int(time.time())), "x" * 32
        headers = {"X-Oneback-Timestamp": ts, "X-Oneback-Nonce": nonce,
                   "X-Oneback-Signature": sign(SECRET, ts, nonce, body)}
        assert post(server.address, body, headers) == 202
        assert post(server.address, body, headers) == 401          # replay
        assert post(server.address, body, {}) == 401               # unsigned
        bad = b'{"vm_id": "nine"}'
        h2 = {"X-Oneback-Timestamp": ts, "X-Oneback-Nonce": "y" * 32,
              "X-Oneback-Signature": sign(SECRET, ts, "y" * 32, bad)}
        assert post(server.address, bad, h2) == 400
    finally:
        server.close()
    assert [t.vm_id for t in accepted] == [9]
    assert [why for _, why in refused][:2] == ["replayed request", "bad signature"]


@pytest.mark.parametrize("path", ["/", "/v1/other"])
def test_unknown_paths_are_404(path: str) -> None:
    server = ControlServer("127.0.0.1", 0, Verifier(SECRET), lambda t: None, lambda p, w: None)
    try:
        assert post(server.address.replace("/v1/hook", path), b"{}", {}) == 404
    finally:
        server.close()


# -- what a stranger can send: raw sockets ---------------------------------------

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from agent.catalog import Catalog  # noqa: E402


def _server(**kw: object) -> tuple[ControlServer, list[tuple[str, str]]]:
    refused: list[tuple[str, str]] = []
    server = ControlServer("127.0.0.1", 0, Verifier(SECRET), lambda t: None,
                           lambda peer, why: refused.append((peer, why)), **kw)  # type: ignore[arg-type]
    return server, refused


def _connect(server: ControlServer) -> socket.socket:
    u = urlsplit(server.address)
    s = socket.create_connection((u.hostname or "", u.port or 0), timeout=5)
    return s


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


@pytest.mark.parametrize("length, code", [("-1", 400), ("abc", 400), ("1e3", 400),
                                          ("99999999999", 413), (str(64 * 1024 + 1), 413),
                                          (None, 411), ("12, 12", 400)])
def test_bad_content_length_is_refused_before_the_body_is_read(
        length: str | None, code: int) -> None:
    """Today `-1` reads until the client hangs up, unauthenticated, and a
    non-numeric one ends in a traceback."""
    server, refused = _server()
    try:
        s = _connect(server)
        head = "POST /v1/hook HTTP/1.1\r\nHost: x\r\n"
        if length is not None:
            head += f"Content-Length: {length}\r\n"
        s.sendall((head + "\r\n").encode())    # no body, and the socket stays open
        s.settimeout(3)
        data = s.recv(4096)
        assert _status(data) == code, data
        s.close()
    finally:
        server.close()
    assert refused and ("Content-Length" in refused[0][1] or "too large" in refused[0][1])


def test_a_silent_or_trickling_client_is_cut_off_at_the_deadline() -> None:
    server, _ = _server(timeout=0.5)
    try:
        silent = _connect(server)
        trickle = _connect(server)
        started = time.monotonic()
        trickle.sendall(b"POST /v1/hook HTTP/1.1\r\n")
        for _ in range(6):        # a header line every 0.2s: no single read times out
            time.sleep(0.2)
            try:
                trickle.sendall(b"X-A: b\r\n")
            except OSError:
                break
        silent.settimeout(5)
        assert silent.recv(100) == b""           # closed by the server
        trickle.settimeout(5)
        try:
            assert trickle.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 4
    finally:
        server.close()


def test_a_hundred_half_open_connections_do_not_make_a_hundred_threads() -> None:
    server, refused = _server()    # the defaults
    before = threading.active_count()
    sockets: list[socket.socket] = []
    try:
        for _ in range(100):
            s = _connect(server)
            s.sendall(b"POST /v1/hook HTTP/1.1\r\n")   # and never more
            sockets.append(s)
        time.sleep(0.5)
        assert threading.active_count() - before <= MAX_CONNECTIONS
        assert any(why == "too many connections" for _, why in refused)
        assert sum(1 for _, why in refused if why == "too many connections") < 10
        for s in sockets:
            s.close()
        # once the half-open ones are gone, a real request is served again
        body = json.dumps({"vm_id": 3}).encode()
        ts, nonce = str(int(time.time())), "z" * 32
        headers = {"X-Oneback-Timestamp": ts, "X-Oneback-Nonce": nonce,
                   "X-Oneback-Signature": sign(SECRET, ts, nonce, body)}
        deadline = time.monotonic() + 5
        while post(server.address, body, headers) != 202:
            assert time.monotonic() < deadline
            nonce = nonce[:-1] + chr(ord(nonce[-1]) - 1)
            headers.update({"X-Oneback-Nonce": nonce,
                            "X-Oneback-Signature": sign(SECRET, ts, nonce, body)})
            time.sleep(0.2)
    finally:
        server.close()


def test_an_error_in_the_agent_is_a_500_and_one_line_not_a_traceback(
        capfd: pytest.CaptureFixture[str]) -> None:
    refused: list[tuple[str, str]] = []

    def broken(trigger: Trigger) -> None:
        raise OverflowError("int exceeds XML-RPC limits")

    server = ControlServer("127.0.0.1", 0, Verifier(SECRET), broken,
                           lambda peer, why: refused.append((peer, why)))
    try:
        body = json.dumps({"vm_id": 1}).encode()
        ts, nonce = str(int(time.time())), "q" * 32
        headers = {"X-Oneback-Timestamp": ts, "X-Oneback-Nonce": nonce,
                   "X-Oneback-Signature": sign(SECRET, ts, nonce, body)}
        assert post(server.address, body, headers) == 500
        s = _connect(server)
        s.sendall(b"\x16\x03\x01\x00\xff garbage\r\n\r\n")
        s.settimeout(3)
        s.recv(100)
        s.close()
    finally:
        server.close()
    assert refused[0][1] == "internal error: OverflowError"
    assert "Traceback" not in capfd.readouterr().err


def test_used_nonces_survive_a_restart(tmp_path: Path) -> None:
    body = json.dumps({"vm_id": 9}).encode()
    ts, nonce = str(int(time.time())), "r" * 32
    headers = {"X-Oneback-Timestamp": ts, "X-Oneback-Nonce": nonce,
               "X-Oneback-Signature": sign(SECRET, ts, nonce, body)}
    for expected in (202, 401):    # the second "agent" has a fresh process's memory
        with Catalog.open(tmp_path / "catalog.sqlite") as cat:
            server = ControlServer("127.0.0.1", 0, Verifier(SECRET, remember=cat.nonce_use),
                                   lambda t: None, lambda p, w: None)
            try:
                assert post(server.address, body, headers) == expected
            finally:
                server.close()
