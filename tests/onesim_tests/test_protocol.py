"""XML-RPC as oned speaks it: answers, error shapes, faults, API events."""

from __future__ import annotations

import urllib.error
import urllib.request
import xmlrpc.client
from typing import Any

import pyone
import pytest

from tests.onesim import Simulator
from tests.onesim.testing import Subscription, client, create_vm, decode


def raw(sim: Simulator) -> Any:
    return xmlrpc.client.ServerProxy(sim.endpoint)


def test_success_and_failure_arrays(onesim: Simulator) -> None:
    proxy = raw(onesim)
    assert proxy.one.system.version(onesim.credentials) == [True, "7.4.0", 0]
    assert proxy.one.vm.info(onesim.credentials, 42) == [
        False, "[one.vm.info] Error getting virtual machine [42].", 1024, 42, -1]
    assert proxy.one.vm.info("oneadmin:nope", 0) == [
        False, "[one.vm.info] User couldn't be authenticated, aborting call.", 256, -1, -1]


def test_pyone_maps_codes_to_exceptions(one: Any) -> None:
    with pytest.raises(pyone.OneNoExistsException):
        one.image.info(9)
    with pytest.raises(pyone.OneActionException, match=r'Action "dance" is not supported'):
        create = one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
        one.vm.action("dance", one.template.instantiate(create, "v", True, "", False))
    with pytest.raises(pyone.OneApiException, match="Incorrect filter_flag"):
        one.vmpool.info(-9, -1, -1, -1)
    with pytest.raises(pyone.OneApiException, match="Incorrect state filter 12"):
        one.vmpool.info(-2, -1, -1, 12)
    with pytest.raises(pyone.OneInternalException, match="JSON query search is not supported"):
        one.vmpool.info(-2, -1, -1, -1, "NAME=x")


def test_unknown_method_and_bad_parameters_are_xmlrpc_faults(onesim: Simulator) -> None:
    proxy = raw(onesim)
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.one.vm.fly(onesim.credentials, 1)
    assert fault.value.faultCode == -506
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.one.vm.info(onesim.credentials, "zero")
    assert fault.value.faultCode == -501
    assert "supposed to be integer" in fault.value.faultString
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.one.vm.disksaveas(onesim.credentials, 0, 0, "name", "")  # P5 is mandatory
    assert fault.value.faultString == "Not enough parameters"
    one = client(onesim)
    with pytest.raises(pyone.OneException):
        one.vm.detach(0)


def test_only_post_to_rpc2(onesim: Simulator) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(onesim.endpoint, timeout=5)
    assert err.value.code == 405
    req = urllib.request.Request(onesim.endpoint.replace("/RPC2", "/other"), data=b"x")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 404


def test_api_events_mask_the_session_and_skip_info_calls(one: Any, onesim: Simulator) -> None:
    sub = Subscription(onesim.events, ("EVENT API ",))
    try:
        one.vmpool.info(-2, -1, -1, -1)
        one.datastore.info(0)
        one.hookpool.info(-2, -1, -1)
        one.system.version()
        with pytest.raises(pyone.OneNoExistsException):
            one.vm.action("poweroff", 77)
        messages = sub.collect(until="EVENT API one.vm.action 0", timeout=3)
    finally:
        sub.close()
    assert [k for k, _ in messages] == ["EVENT API one.system.version 1",
                                        "EVENT API one.vm.action 0"]
    failed = decode(messages[1][1])
    assert "<VALUE>****</VALUE>" in failed and onesim.credentials not in failed
    assert ("<PARAMETER><POSITION>2</POSITION><TYPE>OUT</TYPE><VALUE>[one.vm.action] Error "
            "getting virtual machine [77].</VALUE></PARAMETER>") in failed
    assert "<POSITION>4</POSITION><TYPE>OUT</TYPE><VALUE>77</VALUE>" in failed


def test_authentication_failures_publish_nothing(onesim: Simulator) -> None:
    sub = Subscription(onesim.events)
    try:
        bad = client(onesim, "oneadmin", "wrong")
        with pytest.raises(pyone.OneAuthenticationException):
            bad.system.version()
        assert sub.next(timeout=0.3) is None
    finally:
        sub.close()


def test_pool_ranges_paging_and_order(one: Any, onesim: Simulator) -> None:
    tid = one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
    ids = [one.template.instantiate(tid, f"v{i}", True, "", False) for i in range(5)]
    assert [v.ID for v in one.vmpool.info(-2, -1, -1, -1).VM] == ids[::-1]
    assert [v.ID for v in one.vmpool.info(-2, 1, 3, -1).VM] == [3, 2, 1]
    assert [v.ID for v in one.vmpool.info(-2, 2, -1, -1).VM] == [4, 3, 2]
    assert [v.ID for v in one.vmpool.info(-2, 1, -2, -1).VM] == [3, 2]  # offset 1, 2 items
    assert [v.ID for v in one.vmpool.info(-2, -1, -1, 2).VM] == ids[::-1]  # HOLD
    assert one.vmpool.info(-2, -1, -1, 3).VM == []


def test_short_and_extended_pool_bodies(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.update(vid, 'LABELS="a,b"\nSECRET_NOTE="x"', 1)
    short = one.vmpool.info(-2, -1, -1, -1).VM[0]
    assert getattr(short, "PERMISSIONS", None) is None
    assert short.USER_TEMPLATE == {"LABELS": "a,b"}
    assert set(short.TEMPLATE["DISK"]) == {
        "DISK_ID", "DATASTORE", "DATASTORE_ID", "IMAGE", "IMAGE_ID", "SIZE", "TYPE", "CLONE",
        "CLONE_TARGET", "LN_TARGET", "DISK_SNAPSHOT_TOTAL_SIZE"}
    full = one.vmpool.infoextended(-2, -1, -1, -1).VM[0]
    assert full.USER_TEMPLATE["SECRET_NOTE"] == "x"
    body = raw(onesim).one.vmpool.infoextended(onesim.credentials, -2, -1, -1, -1)[1]
    assert "<PERMISSIONS>" in body and "<HISTORY_RECORDS><HISTORY><OID>" in body


def test_update_replace_and_merge(one: Any, onesim: Simulator) -> None:
    tid = one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"\nLABELS="x"')
    vid = one.template.instantiate(tid, "v", True, "", False)
    one.vm.update(vid, 'BACKUP="yes"\nPOLICY=[A="1", B="2"]', 1)
    one.vm.update(vid, 'POLICY=[C="3"]', 1)
    assert one.vm.info(vid).USER_TEMPLATE == {"BACKUP": "yes", "LABELS": "x",
                                              "POLICY": {"C": "3"}}
    one.vm.update(vid, 'ONLY="this"', 0)
    assert one.vm.info(vid).USER_TEMPLATE == {"ONLY": "this"}
    with pytest.raises(pyone.OneApiException, match="Wrong update type"):
        one.vm.update(vid, 'A="b"', 2)
    with pytest.raises(pyone.OneActionException, match=r"Parse error: syntax error"):
        one.vm.update(vid, 'A=[', 1)


def test_instantiate_names_and_template_split(one: Any, onesim: Simulator) -> None:
    tid = one.template.allocate('NAME="base"\nCPU="0.5"\nMEMORY="32"\nVCPU="2"\n'
                                'SCHED_DS_REQUIREMENTS="ID=0"\nDESCRIPTION="d"')
    vid = one.template.instantiate(tid, "", True, 'MEMORY="48"', False)
    vm = one.vm.info(vid)
    assert vm.NAME == f"base-{vid}"
    assert vm.TEMPLATE["MEMORY"] == "48" and vm.TEMPLATE["TEMPLATE_ID"] == str(tid)
    assert vm.TEMPLATE["VMID"] == str(vid) and vm.TEMPLATE["OS"]["MACHINE"] == "q35"
    assert vm.USER_TEMPLATE == {"DESCRIPTION": "d", "SCHED_DS_REQUIREMENTS": "ID=0"}
    with pytest.raises(pyone.OneException, match="MEMORY attribute must be a positive"):
        one.template.instantiate(tid, "x", True, 'MEMORY="0"', False)
