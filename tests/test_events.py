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


def message(method: str, params: list[tuple[str, int, str]], result: int = 1,
            pretty: bool = False) -> bytes:
    """A HOOK_MESSAGE as HookAPI::format_message writes it: values unescaped."""
    nl = "\n  " if pretty else ""
    body = "".join(f"<PARAMETER>{nl}<POSITION>{pos}</POSITION><TYPE>{kind}</TYPE>"
                   f"<VALUE>{value}</VALUE></PARAMETER>{nl}" for kind, pos, value in params)
    xml = (f"<HOOK_MESSAGE><HOOK_TYPE>API</HOOK_TYPE><CALL>{method}</CALL><CALL_INFO>{nl}"
           f"<RESULT>{result}</RESULT>{nl}<PARAMETERS>{body}</PARAMETERS><EXTRA></EXTRA>"
           "</CALL_INFO></HOOK_MESSAGE>")
    return base64.b64encode(xml.encode())


def test_only_successful_calls_count_and_the_body_must_agree() -> None:
    refused = message("one.vm.update", [("IN", 1, "****"), ("IN", 2, "7")], result=0)
    assert parse_message(b"EVENT API one.vm.update 0", refused) is None
    t = parse_message(b"EVENT API one.vm.update 1", refused)     # topic and body disagree
    assert t is not None and t.vm_id is None
    other = message("one.vm.attach", [("IN", 1, "****"), ("IN", 2, "7")])
    t = parse_message(b"EVENT API one.vm.update 1", other)
    assert t is not None and t.vm_id is None


def test_the_vm_id_comes_from_the_calls_parameter_not_from_injected_text() -> None:
    # one.vm.update's template (3rd) is the caller's text: it cannot precede the 2nd
    update = message("one.vm.update", [("IN", 1, "****"), ("IN", 2, "7"),
                                       ("IN", 3, "A=1"), ("IN", 2, "9")], pretty=True)
    t = parse_message(b"EVENT API one.vm.update 1", update)
    assert t is not None and t.vm_id == 7
    action = message("one.vm.action", [("IN", 1, "****"), ("IN", 2, "poweroff"),
                                       ("IN", 3, "12")])
    t = parse_message(b"EVENT API one.vm.action 1", action)
    assert t is not None and t.vm_id == 12
    # instantiate: a name may carry a fake answer, the real one is written last
    inst = message("one.template.instantiate",
                   [("IN", 1, "****"), ("IN", 2, "0"), ("OUT", 2, "5"), ("IN", 3, "0"),
                    ("OUT", 1, "true"), ("OUT", 2, "31"), ("OUT", 3, "0")])
    t = parse_message(b"EVENT API one.template.instantiate 1", inst)
    assert t is not None and t.vm_id == 31
    # markup that breaks the document (oned does not escape): look at everything
    raw = base64.b64encode(b"<HOOK_MESSAGE><HOOK_TYPE>API</HOOK_TYPE><CALL>one.vm.update"
                           b"</CALL><CALL_INFO><RESULT>1</RESULT><PARAMETERS><PARAMETER>"
                           b"<POSITION>2</POSITION><TYPE>IN</TYPE><VALUE>a & <b></VALUE>")
    t = parse_message(b"EVENT API one.vm.update 1", raw)
    assert t is not None and t.vm_id is None


@pytest.mark.parametrize("value", [str(2**31), str(2**31 + 5), "-1", "1e3", " 7", "0x10",
                                   "9" * 40])
def test_ids_outside_oneds_range_mean_look_at_everything(value: str) -> None:
    body = message("one.vm.update", [("IN", 1, "****"), ("IN", 2, value)])
    t = parse_message(b"EVENT API one.vm.update 1", body)
    assert t is not None and t.vm_id is None
    t = parse_message(f"EVENT VM {value}/ACTIVE/RUNNING ".encode(), b"")
    assert t is not None and t.vm_id is None


def test_the_largest_id_is_accepted() -> None:
    top = 2**31 - 1
    t = parse_message(f"EVENT VM {top}/ACTIVE/RUNNING ".encode(), b"")
    assert t is not None and t.vm_id == top
    assert parse_hook_request({"vm_id": top}).vm_id == top


@pytest.mark.parametrize("doc", [{"vm_id": 2**31}, {"vm_id": 2**31 + 5}, {"vm_id": 10**40},
                                 {"vm_id": 1.0}, {"vm_id": 1, "ttl": 10**30},
                                 {"vm_id": 1, "ttl": True}])
def test_hook_requests_outside_the_range_are_refused_clearly(doc: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"(vm_id must be an OpenNebula id \(an integer "
                                         r"0 \.\. 2147483647\))|(ttl must be)"):
        parse_hook_request(doc)
