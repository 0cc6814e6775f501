"""Replays the real oned 7.3.80 session of ../shared/opennebula/captures
against onesim, request body for request body, and compares every answer
(success flag, code, exact message, resp_id, ids), the shape of every
returned document, and the whole sequence of ZeroMQ keys."""

from __future__ import annotations

import json
import time
import urllib.request
import xmlrpc.client
from typing import Any

import pytest
from lxml import etree

from tests.onesim import Simulator
from tests.onesim.testing import Subscription, client, shared_dir, wait_until

SHARED = shared_dir()
CAPTURES = SHARED / "opennebula" / "captures" if SHARED else None
pytestmark = pytest.mark.skipif(CAPTURES is None, reason="../shared/opennebula/captures absent")

# Calls onesim does not replay: host 0 already exists in a fresh onesim.
SKIPPED = {8}
# Calls that observe a transient state: sent without waiting for the cloud to settle.
NO_WAIT = {17, 22, 36, 37, 41, 72, 73, 74, 115, 116, 117, 121, 122}
# Documents whose content is monitoring data of the dummy drivers: only the top level.
SHALLOW = {"host.info.monitored.xml", "host.info.with_vms.xml"}
LONG = 0.4  # stands for the capture's injected 2-3 s driver delays
# The capture ran without the hook execution manager: its HOOKLOG is empty,
# onesim's holds the executions of hooks 0 and 1.
HEM_ABSENT = {"hooklog.info.xml"}


def skeleton(node: Any, shallow: bool = False) -> Any:
    """Tag structure of a document, without values; MONITORING is opaque."""
    if shallow or node.tag in ("MONITORING", "PCI_DEVICES", "NUMA_NODES"):
        return node.tag
    return (node.tag, [skeleton(c) for c in node if isinstance(c.tag, str)])


def shape(xml_text: str, shallow: bool = False) -> Any:
    root = etree.fromstring(xml_text.encode())
    if shallow:
        return (root.tag, [skeleton(c, shallow=c.tag != "HOST_SHARE") for c in root])
    return skeleton(root)


def rows() -> list[dict[str, Any]]:
    assert CAPTURES is not None
    return [json.loads(line) for line in (CAPTURES / "index.jsonl").read_text().splitlines()]


def post(sim: Simulator, body: str) -> tuple[Any, ...]:
    body = body.replace("oneadmin:PASSWORD", sim.credentials)
    req = urllib.request.Request(sim.endpoint, data=body.encode(),
                                 headers={"Content-Type": "text/xml"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        params, _ = xmlrpc.client.loads(resp.read())
    return tuple(params[0])


def prepare(sim: Simulator, seq: int) -> None:
    """The faults the capture session injected into its dummy drivers."""
    f = sim.faults
    if seq in (16, 71):
        f.slow_driver("image", LONG)
    elif seq == 35:
        f.slow_driver("saveas", LONG)
    elif seq == 40:
        f.slow_driver("attach", LONG)
    elif seq == 110:
        f.fail_driver("attach", message="-")
    elif seq in (112, 114):
        f.slow_driver("snapshot_create", LONG)
    elif seq == 118:
        f.fail_driver("snapshot_create", message="dummy-snap")
    elif seq == 120:
        f.slow_driver("attach", LONG)
    elif seq == 123:
        f.fail_driver("detach", message="-")


def settle_before(sim: Simulator, one: Any, seq: int) -> None:
    if seq == 37:  # the mkfs step has given the disk its HOTPLUG_SAVE_AS_SOURCE
        wait_until(lambda: "HOTPLUG_SAVE_AS_SOURCE" in str(one.vm.info(0).TEMPLATE["DISK"]))
    elif seq == 122:  # the capture looked again once the slow attach finished
        sim.wait_idle()
    elif seq not in NO_WAIT:
        assert sim.wait_idle(20)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sim = Simulator.start(tmp_path_factory.mktemp("replay"), delay=0.05, sched_delay=0.3,
                          version="7.3.80")
    sub = Subscription(sim.events)
    one = client(sim)
    answers: dict[int, tuple[Any, ...]] = {}
    try:
        for row in rows():
            seq = row["seq"]
            if seq in SKIPPED:
                continue
            settle_before(sim, one, seq)
            prepare(sim, seq)
            answers[seq] = post(sim, (CAPTURES / "raw" / row["raw_request"]).read_text())
        sim.wait_idle(20)
        time.sleep(0.2)
        keys = [k for k, _ in sub.collect(timeout=0.5)]
    finally:
        sub.close()
        sim.stop()
    return {"answers": answers, "keys": keys}


@pytest.mark.parametrize("row", rows() if CAPTURES else [], ids=lambda r: r["label"])
def test_answer_matches_capture(replay: dict[str, Any], row: dict[str, Any]) -> None:
    if row["seq"] in SKIPPED:
        pytest.skip("host 0 exists from the start in onesim")
    got = replay["answers"][row["seq"]]
    assert got[0] is row["ok"]
    assert got[2] == row["code"]
    if not row["ok"]:
        assert got[1] == row["error"]
        assert list(got[3:]) == row["extra_ret"]
        return
    if row["xml_file"]:
        want = (CAPTURES / row["xml_file"]).read_text()
        shallow = row["xml_file"] in SHALLOW
        if row["xml_file"] in HEM_ABSENT:
            records = etree.fromstring(got[1].encode())
            assert records.tag == "HOOKLOG" and len(records) > 0
            assert {r.tag for r in records} == {"HOOK_EXECUTION_RECORD"}
            return
        assert shape(got[1], shallow) == shape(want, shallow), row["xml_file"]
    elif isinstance(row["value"], int):
        assert got[1] == row["value"]
    elif row["method"] == "one.system.version":
        assert got[1] == row["value"]


def captured_keys() -> list[str]:
    assert CAPTURES is not None
    lines = (CAPTURES / "zmq" / "events.jsonl").read_text().splitlines()
    keys = [json.loads(line)["topic"] for line in lines]
    # host.allocate is not replayed: its API event and the host's INIT -> MONITORED
    return [k for k in keys if "HOST" not in k and k != "EVENT API one.host.allocate 1"]


def test_event_keys_match_capture_in_order(replay: dict[str, Any]) -> None:
    assert replay["keys"] == captured_keys()


def test_raw_response_layout_matches_xmlrpc_c(onesim: Simulator) -> None:
    """Byte layout of a success and a failure response, as xmlrpc-c writes them."""
    assert CAPTURES is not None
    for name in ("001_system.version", "087_vm.info.error_missing"):
        want = (CAPTURES / "raw" / f"{name}.response.xml").read_bytes()
        body = (CAPTURES / "raw" / f"{name}.request.xml").read_text()
        req = urllib.request.Request(onesim.endpoint,
                                     data=body.replace("oneadmin:PASSWORD",
                                                       onesim.credentials).encode())
        with urllib.request.urlopen(req, timeout=10) as resp:
            got = resp.read()
        assert got.replace(b"7.4.0", b"7.3.80") == want


def test_documents_of_the_capture_are_what_onesim_renders_for_the_same_cloud() -> None:
    """Sanity of the comparison itself: two different captured documents have
    different shapes, so the shape test can fail."""
    assert CAPTURES is not None
    a = (CAPTURES / "vm.info.pending.xml").read_text()
    b = (CAPTURES / "vm.info.with_disk_snapshot.xml").read_text()
    assert shape(a) != shape(b)

