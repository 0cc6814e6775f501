"""Parsing what wakes the agent: ZeroMQ messages (as onesim and the captures
publish them) and hook requests."""

from __future__ import annotations

import base64
import json

import pytest

from agent.events import TOPICS, parse_hook_request, parse_message
from tests.onesim.testing import shared_dir


def api_body(method: str, vm_id: int, out_id: int | None = None) -> bytes:
    out = f"<PARAMETER><POSITION>2</POSITION><TYPE>OUT</TYPE><VALUE>{out_id}</VALUE></PARAMETER>"
    xml = (f"<HOOK_MESSAGE><HOOK_TYPE>API</HOOK_TYPE><CALL>{method}</CALL><CALL_INFO>"
           "<RESULT>1</RESULT><PARAMETERS><PARAMETER><POSITION>1</POSITION><TYPE>IN</TYPE>"
           "<VALUE>****</VALUE></PARAMETER><PARAMETER><POSITION>2</POSITION><TYPE>IN</TYPE>"
           f"<VALUE>{vm_id}</VALUE></PARAMETER>{out if out_id is not None else ''}"
           "</PARAMETERS></CALL_INFO></HOOK_MESSAGE>")
    return base64.b64encode(xml.encode())


def test_topics_end_with_their_separator() -> None:
    for t in TOPICS:
        assert t.endswith(" ") or t.endswith("/"), t
    assert not any(b"EVENT API one.vm.attachnic 1".startswith(t.encode()) for t in TOPICS)
    assert not any(b"EVENT API one.vm.updateconf 1".startswith(t.encode()) for t in TOPICS)


def test_state_and_api_events() -> None:
    t = parse_message(b"EVENT VM 42/POWEROFF/LCM_INIT ", b"")
    assert t is not None and (t.vm_id, t.state) == (42, "POWEROFF/LCM_INIT")
    t = parse_message(b"EVENT API one.vm.update 1", api_body("one.vm.update", 7))
    assert t is not None and t.vm_id == 7
    t = parse_message(b"EVENT API one.template.instantiate 1",
                      api_body("one.template.instantiate", 3, out_id=12))
    assert t is not None and t.vm_id == 12
    assert parse_message(b"EVENT API one.vm.update 0", api_body("one.vm.update", 7)) is None


@pytest.mark.parametrize("topic,body", [
    (b"EVENT API one.vm.update 1", b"%%% not base64 %%%"),
    (b"EVENT API one.vm.update 1", base64.b64encode(b"<HOOK_MESSAGE><CALL>x")),
    (b"\xff\xfe", b""),
    (b"EVENT SOMETHING NEW", b""),
])
def test_unreadable_events_mean_look_at_everything(topic: bytes, body: bytes) -> None:
    t = parse_message(topic, body)
    assert t is not None and t.vm_id is None


def test_every_captured_vm_event_parses() -> None:
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared (OpenNebula captures) is absent")
    path = shared / "opennebula" / "captures" / "zmq" / "events.jsonl"
    seen = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        frames = rec["frames_raw"]
        topic = frames[0].encode()
        if not any(topic.startswith(t.encode()) for t in TOPICS):
            continue
        t = parse_message(topic, frames[1].encode() if len(frames) > 1 else b"")
        if t is not None:
            assert t.vm_id is not None and t.vm_id >= 0, rec["topic"]
            seen += 1
    assert seen > 20


def test_hook_requests_are_validated() -> None:
    t = parse_hook_request({"vm_id": 5, "event": "state POWEROFF/LCM_INIT"})
    assert t.vm_id == 5 and t.snapshot is None
    t = parse_hook_request({"vm_id": 5, "snapshot": "before-x", "ttl": 3600})
    assert (t.snapshot, t.snapshot_ttl) == ("before-x", 3600)
    for bad in ([], {"vm_id": "5"}, {"vm_id": -1}, {"vm_id": True},
                {"vm_id": 1, "snapshot": "../x"}, {"vm_id": 1, "snapshot": "a", "ttl": 0}):
        with pytest.raises(ValueError):
            parse_hook_request(bad)
