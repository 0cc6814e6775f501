"""The control endpoint's authentication: signature, freshness, replay."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from agent.control import ControlServer, Verifier, sign
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
