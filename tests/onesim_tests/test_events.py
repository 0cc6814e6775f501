"""What the hook manager publishes: keys, bodies, order."""

from __future__ import annotations

from typing import Any

from lxml import etree

from tests.onesim import Simulator
from tests.onesim.testing import Subscription, create_datablock, create_vm, decode


def test_state_messages(one: Any, onesim: Simulator) -> None:
    sub = Subscription(onesim.events, ("EVENT VM ", "EVENT STATE VM/", "EVENT IMAGE "))
    try:
        iid = create_datablock(one, "d", 1)
        vid = create_vm(one, onesim, "vm", [iid])
        msgs = sub.collect(until=f"EVENT STATE VM/ACTIVE/RUNNING/{vid} ", timeout=5)
    finally:
        sub.close()
    keys = [k for k, _ in msgs]
    assert keys[:2] == [f"EVENT IMAGE {iid}/READY/ ", f"EVENT IMAGE {iid}/USED/ "]
    assert keys[2:4] == [f"EVENT VM {vid}/PENDING/LCM_INIT ",
                         f"EVENT STATE VM/PENDING/LCM_INIT/{vid} "]
    body = dict(msgs)
    assert body[keys[2]] == body[keys[3]]  # one message, two keys
    running = etree.fromstring(decode(body[f"EVENT VM {vid}/ACTIVE/RUNNING "]))
    assert [c.tag for c in running] == ["HOOK_TYPE", "HOOK_OBJECT", "STATE", "LCM_STATE",
                                        "RESOURCE_ID", "REMOTE_HOST", "VM"]
    assert running.findtext("REMOTE_HOST") == "localhost"
    vm = running.find("VM")
    assert (vm.findtext("STATE"), vm.findtext("LCM_STATE")) == ("3", "3")
    assert vm.findtext("PREV_LCM_STATE") == "2"  # written before the state is remembered
    assert "<REMOTE_HOST/><VM>" in decode(body[keys[2]])  # no host yet
    image = etree.fromstring(decode(body[keys[0]]))
    assert [c.tag for c in image] == ["HOOK_TYPE", "HOOK_OBJECT", "STATE", "RESOURCE_ID",
                                      "IMAGE"]


def test_service_vms_get_a_third_key(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.update(vid, 'SERVICE_ID="42"', 1)
    sub = Subscription(onesim.events, ("EVENT SERVICE ",))
    try:
        one.vm.action("poweroff", vid)
        assert sub.next(timeout=3)[0] == "EVENT SERVICE 42 "  # type: ignore[index]
    finally:
        sub.close()


def test_allocate_and_delete_carry_the_object(one: Any, onesim: Simulator) -> None:
    sub = Subscription(onesim.events, ("EVENT API one.image.",))
    try:
        iid = create_datablock(one, "d", 1)
        one.image.delete(iid)
        msgs = sub.collect(until="EVENT API one.image.delete 1", timeout=5)
    finally:
        sub.close()
    allocate = etree.fromstring(decode(msgs[0][1]))
    assert allocate.findtext("CALL_INFO/EXTRA/IMAGE/STATE") == "4"  # LOCKED when allocated
    delete = etree.fromstring(decode(msgs[-1][1]))
    assert delete.findtext("CALL_INFO/EXTRA/IMAGE/STATE") == "1"  # READY before deletion
    outs = [p.findtext("VALUE") for p in delete.iter("PARAMETER") if p.findtext("TYPE") == "OUT"]
    assert outs == ["true", str(iid), "0"]


def test_every_vm_change_is_published_once_per_key(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    onesim.wait_idle()
    states = [k for k, _ in onesim.published() if k.startswith(f"EVENT VM {vid}/")]
    assert len(states) == len(set(states)) == 5
