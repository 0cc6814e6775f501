"""Hooks: oned's checks on hook templates, and execution as the HEM does it."""

from __future__ import annotations

import base64
import re
import xmlrpc.client
from pathlib import Path
from typing import Any

import pyone
import pytest
from lxml import etree

from tests.onesim import Simulator
from tests.onesim.testing import (
    Subscription,
    client,
    create_datablock,
    create_vm,
    decode,
    wait_until,
    wait_vm,
)


def test_a_record_that_is_not_xml_is_not_stored(one: Any, onesim: Simulator) -> None:
    """HookLog::add validates the record: a COMMAND with '>' or '&' breaks it
    (the HEM does not escape), and oned drops it, as here."""
    hid = one.hook.allocate('NAME="amp"\nTYPE="api"\nCALL="one.template.allocate"\n'
                            'COMMAND="/bin/sh -c \'true && true\'"')
    one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
    onesim.wait_idle()
    assert one.hook.info(hid).HOOKLOG.HOOK_EXECUTION_RECORD == []


def records(one: Any, hook_id: int, count: int = 1) -> list[Any]:
    def enough() -> Any:
        log = one.hook.info(hook_id).HOOKLOG
        found = log.HOOK_EXECUTION_RECORD if log is not None else []
        return found if len(found) >= count else None
    return list(wait_until(enough, timeout=10))


def b64out(text: str) -> str:
    return base64.b64decode(text).decode()


@pytest.mark.parametrize("template, message", [
    ('NAME="bad"\nTYPE="state"\nRESOURCE="VM"\nON="FOO"\nCOMMAND="/bin/true"',
     "[one.hook.allocate] Unkown state condition: FOO"),
    ('NAME="x"\nTYPE="other"\nCOMMAND="/bin/true"', "[one.hook.allocate] Invalid Hook type: other"),
    ('NAME="x"\nTYPE="api"\nCALL="one.vm.attach"', "[one.hook.allocate] No COMMAND in template "
                                                   "for Hook."),
    ('NAME="x"\nTYPE="api"\nCALL="one.vm.info"\nCOMMAND="/bin/true"',
     "[one.hook.allocate] API call does not exist or is not supported: one.vm.info"),
    ('NAME="x"\nTYPE="state"\nCOMMAND="/bin/true"',
     "[one.hook.allocate] RESOURCE attribute is required for STATE hooks."),
    ('NAME="x"\nTYPE="state"\nRESOURCE="VM"\nON="CUSTOM"\nSTATE="ACTIVE"\nLCM_STATE="NAP"\n'
     'COMMAND="/bin/true"', "[one.hook.allocate] Wrong LCM_STATE: NAP"),
])
def test_refused_hook_templates(one: Any, template: str, message: str) -> None:
    with pytest.raises(pyone.OneInternalException) as err:
        one.hook.allocate(template)
    assert str(err.value) == message


def test_templates_are_normalised(one: Any) -> None:
    hid = one.hook.allocate('NAME="r"\nTYPE="STATE"\nRESOURCE="VM"\nON="RUNNING"\n'
                            'COMMAND="/bin/true"')
    hook = one.hook.info(hid)
    assert (hook.NAME, hook.TYPE) == ("r", "state")
    assert hook.TEMPLATE == {"COMMAND": "/bin/true", "LCM_STATE": "RUNNING", "REMOTE": "NO",
                             "RESOURCE": "VM", "STATE": "ACTIVE"}
    assert [h.ID for h in one.hookpool.info(-2, -1, -1).HOOK] == [hid]
    one.hook.delete(hid)
    with pytest.raises(pyone.OneNoExistsException, match=r"Error getting hook \[0\]."):
        one.hook.info(hid)


def test_state_hook_gets_the_vm_as_template(one: Any, onesim: Simulator, tmp_path: Path) -> None:
    out = tmp_path / "args"
    hid = one.hook.allocate('NAME="running"\nTYPE="state"\nRESOURCE="VM"\nON="RUNNING"\n'
                            f'COMMAND="/bin/sh -c \'echo $1 > {out}; echo done\' sh"\n'
                            'ARGUMENTS="$TEMPLATE"')
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    rec = records(one, hid)[0]
    vm = etree.fromstring(base64.b64decode(out.read_text().strip()))
    assert vm.tag == "VM" and vm.findtext("ID") == str(vid) and vm.findtext("LCM_STATE") == "3"
    assert (rec.HOOK_ID, rec.EXECUTION_ID, rec.EXECUTION_RESULT.CODE) == (hid, 0, "0")
    assert b64out(rec.EXECUTION_RESULT.STDOUT) == "done\n"
    assert rec.ARGUMENTS == out.read_text().strip()


def test_api_hook_gets_the_call_info(one: Any, onesim: Simulator, tmp_path: Path) -> None:
    """onehem-server.rb: $API is Base64.strict_encode64 of the first
    <CALL_INFO> as Nokogiri's to_s writes it: pretty-printed, no <CALL>;
    API hooks run for refused calls too (RESULT 0)."""
    hid = one.hook.allocate('NAME="api"\nTYPE="api"\nCALL="one.vm.disksnapshotcreate"\n'
                            'COMMAND="/bin/cat"\nARGUMENTS="$API $ID"\nARGUMENTS_STDIN="yes"')
    vid = create_vm(one, onesim, "vm", [create_datablock(one, "d", 1)])
    one.vm.disksnapshotcreate(vid, 0, "snap")
    with pytest.raises(pyone.OneActionException):
        one.vm.disksnapshotcreate(vid, 7, "no such disk")
    recs = records(one, hid, 2)
    # The HEM runs hooks concurrently: the log is in order of completion.
    stdins = [b64out(r.EXECUTION_RESULT.STDOUT) for r in recs]  # cat echoes its stdin
    assert all(x.split(" ")[1] == "$ID" for x in stdins)  # only $API, $TEMPLATE substituted
    assert all("\n" not in x.split(" ")[0] for x in stdins)   # strict_encode64
    infos = sorted(base64.b64decode(x.split(" ")[0]).decode() for x in stdins)
    ok = [i for i in infos if "<RESULT>1</RESULT>" in i]
    failed = [i for i in infos if "<RESULT>0</RESULT>" in i]
    assert len(ok) == 1 and len(failed) == 1
    assert ok[0].startswith("<CALL_INFO>\n  <RESULT>1</RESULT>\n  <PARAMETERS>\n"
                            "    <PARAMETER>\n      <POSITION>1</POSITION>\n")
    assert ok[0].endswith("\n  <EXTRA/>\n</CALL_INFO>") and "<CALL>" not in ok[0]
    assert "      <VALUE>snap</VALUE>\n" in ok[0]
    values = [(p.findtext("TYPE"), p.findtext("POSITION"), p.findtext("VALUE"))
              for p in etree.fromstring(failed[0]).iter("PARAMETER")]
    assert values[:4] == [("IN", "1", "****"), ("IN", "2", str(vid)), ("IN", "3", "7"),
                          ("IN", "4", "no such disk")]
    assert values[4][:3] == ("OUT", "1", "false")
    assert all(r.EXECUTION_RESULT.COMMAND == "/bin/cat" for r in recs)


def test_unescaped_values_are_recovered_as_nokogiri_does(
        one: Any, onesim: Simulator) -> None:
    """HookAPI::format_message writes parameter values unescaped (the bus
    body is not even XML then); the HEM's Nokogiri parses it in RECOVER mode
    and $API is what libxml2 made of it, with non-ASCII as &#xHEX;."""
    hid = one.hook.allocate('NAME="u"\nTYPE="api"\nCALL="one.vm.update"\n'
                            'COMMAND="/bin/echo"\nARGUMENTS="$API"')
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    forged = ('A="x & y é" B="</VALUE></PARAMETER><PARAMETER><POSITION>2</POSITION>'
              '<TYPE>IN</TYPE><VALUE>999</VALUE></PARAMETER><PARAMETER><VALUE>"')
    one.vm.update(vid, forged, 1)
    bus = [x for k, x in onesim.published() if k == "EVENT API one.vm.update 1"][-1]
    assert forged in bus                                   # as oned writes it
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(bus.encode())
    api = base64.b64decode(b64out(records(one, hid)[0].EXECUTION_RESULT.STDOUT).strip()).decode()
    assert "&#xE9;" in api and "é" not in api and " &amp; " not in api
    root = etree.fromstring(api)
    second = [p.findtext("VALUE") for p in root.iterfind("PARAMETERS/PARAMETER")
              if p.findtext("POSITION") == "2" and p.findtext("TYPE") == "IN"]
    assert second[0] == str(vid) and "999" in second


def test_state_hook_template_is_pretty_printed_with_cdata(
        one: Any, onesim: Simulator, tmp_path: Path) -> None:
    out = tmp_path / "args"
    one.hook.allocate('NAME="running"\nTYPE="state"\nRESOURCE="VM"\nON="RUNNING"\n'
                      f'COMMAND="/bin/sh -c \'echo $1 > {out}\' sh"\nARGUMENTS="$TEMPLATE"')
    create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    wait_until(lambda: out.exists() and out.read_text().strip(), timeout=10)
    vm = base64.b64decode(out.read_text().strip()).decode()
    assert vm.startswith("<VM>\n  <ID>") and vm.endswith("</VM>")
    assert "<NAME><![CDATA[vm]]></NAME>" in vm or "<NAME>vm</NAME>" in vm


def test_resize(one: Any, onesim: Simulator) -> None:
    """VirtualMachineAPI::resize + DispatchManager::resize: RUNNING goes
    HOTPLUG_RESIZE (old size kept in RESIZE) and back; 0 keeps a value."""
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}], memory=64, cpu=0.5)
    sub = Subscription(onesim.events, (f"EVENT VM {vid}/",))
    try:
        assert one.vm.resize(vid, 'CPU="1.5"\nMEMORY="128"', True) == vid
        wait_vm(one, vid, "ACTIVE", "RUNNING")
        msgs = sub.collect(until=f"EVENT VM {vid}/ACTIVE/RUNNING ")
    finally:
        sub.close()
    assert [k for k, _ in msgs] == [f"EVENT VM {vid}/ACTIVE/HOTPLUG_RESIZE ",
                                    f"EVENT VM {vid}/ACTIVE/RUNNING "]
    during = etree.fromstring(decode(msgs[0][1])).find("VM")
    assert during.findtext("LCM_STATE") == "66"
    assert [(e.tag, e.text) for e in during.find("TEMPLATE/RESIZE")] == [
        ("CPU", "0.5"), ("MEMORY", "64"), ("VCPU", "0")]
    assert during.findtext("TEMPLATE/CPU") == "1.5"   # the new size is set at once
    vm = one.vm.info(vid)
    assert (vm.TEMPLATE["CPU"], vm.TEMPLATE["MEMORY"]) == ("1.5", "128")
    assert "RESIZE" not in vm.TEMPLATE
    assert vm.HISTORY_RECORDS.HISTORY[-2].ACTION == 35             # resize
    before = len(onesim.published())
    one.vm.resize(vid, 'CPU="1.5"', False)                           # nothing to resize
    onesim.wait_idle()
    assert [k for k, _ in onesim.published()[before:]] == ["EVENT API one.vm.resize 1"]
    with pytest.raises(pyone.OneInternalException,
                       match=r"\[one.vm.resize\] MEMORY must be a positive integer value."):
        one.vm.resize(vid, 'MEMORY="-1"', True)
    one.vm.action("poweroff", vid)
    wait_vm(one, vid, "POWEROFF")
    one.vm.resize(vid, 'VCPU="2"', True)
    vm = one.vm.info(vid)
    assert (vm.STATE, vm.TEMPLATE["VCPU"], vm.TEMPLATE["MEMORY"]) == (8, "2", "128")


def test_resize_refusals(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.user.allocate("bob", "secret", "core", [])
    bob = client(onesim, "bob", "secret")
    with pytest.raises(pyone.OneAuthorizationException,
                       match=r"\[one.vm.resize\] User \[2\] : Not authorized to perform "
                             rf"MANAGE VM \[{vid}\]."):
        bob.vm.resize(vid, 'CPU="2"', True)
    with pytest.raises(pyone.OneNoExistsException,
                       match=r"\[one.vm.resize\] Error getting virtual machine \[99\]."):
        one.vm.resize(99, 'CPU="2"', True)
    one.vm.action("suspend", vid)
    wait_vm(one, vid, "SUSPENDED")
    with pytest.raises(pyone.OneActionException,
                       match=r"\[one.vm.resize\] Cannot resize a VM in state SUSPENDED"):
        one.vm.resize(vid, 'CPU="2"', True)
    refused = [x for k, x in onesim.published() if k == "EVENT API one.vm.resize 0"]
    assert len(refused) == 3


def test_timeout_and_failure_codes(one: Any, onesim: Simulator, tmp_path: Path) -> None:
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/sh\necho oops >&2\nexit 3\n")
    script.chmod(0o755)
    hid = one.hook.allocate('NAME="slow"\nTYPE="api"\nCALL="one.template.allocate"\n'
                            'COMMAND="/bin/sleep 5"\nTIMEOUT="1"')
    bad = one.hook.allocate('NAME="bad"\nTYPE="api"\nCALL="one.template.allocate"\n'
                            f'COMMAND="{script}"')
    one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
    slow = records(one, hid)[0]
    assert slow.EXECUTION_RESULT.CODE == "255"
    assert b64out(slow.EXECUTION_RESULT.STDERR) == "Timeout executing /bin/sleep 5"
    failed = records(one, bad)[0]
    assert failed.EXECUTION_RESULT.CODE == "3"
    assert b64out(failed.EXECUTION_RESULT.STDERR) == "oops\n"
    # pyone 7.3.80 binds <HOOKLOG> to the wrong class: read the XML
    rpc = xmlrpc.client.ServerProxy(onesim.endpoint).one
    failures = etree.fromstring(rpc.hooklog.info(onesim.credentials, 0, 0, -1, -1)[1])
    assert {int(r.findtext("HOOK_ID")) for r in failures} == {hid, bad}
    successes = etree.fromstring(rpc.hooklog.info(onesim.credentials, 0, 0, -1, 1)[1])
    assert len(successes) == 0


def test_retry_replays_the_stored_arguments(one: Any, onesim: Simulator) -> None:
    hid = one.hook.allocate('NAME="echo"\nTYPE="api"\nCALL="one.template.allocate"\n'
                            'COMMAND="/bin/echo"\nARGUMENTS="first $API"')
    one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
    first = records(one, hid)[0]
    one.hook.retry(hid, first.EXECUTION_ID)
    second = records(one, hid, 2)[1]
    assert (second.EXECUTION_ID, second.RETRY, second.ARGUMENTS) == (1, "yes", first.ARGUMENTS)
    assert b64out(second.EXECUTION_RESULT.STDOUT) == b64out(first.EXECUTION_RESULT.STDOUT)


def test_image_state_hook_and_log_retention(one: Any, onesim: Simulator) -> None:
    hid = one.hook.allocate('NAME="img"\nTYPE="state"\nRESOURCE="IMAGE"\nSTATE="READY"\n'
                            'COMMAND="/bin/true"')
    for i in range(22):
        create_datablock(one, f"d{i}", 1)
    recs = records(one, hid, 20)
    onesim.wait_idle()
    recs = one.hook.info(hid).HOOKLOG.HOOK_EXECUTION_RECORD
    assert len(recs) == 20 and recs[-1].EXECUTION_ID == 21 and recs[0].EXECUTION_ID == 2
    assert re.match(r"^\d+$", str(recs[0].TIMESTAMP))


def test_stop_does_not_wait_for_a_hook_that_never_ends(tmp_path: Path) -> None:
    import time

    from tests.onesim.testing import client
    sim = Simulator.start(tmp_path / "sim", delay=0.01)
    one = client(sim)
    one.hook.allocate('NAME="forever"\nTYPE="api"\nCALL="one.template.allocate"\n'
                      'COMMAND="/bin/sleep 60"')
    one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
    time.sleep(0.2)
    start = time.monotonic()
    sim.stop()
    assert time.monotonic() - start < 5


def test_every_call_the_shipped_hooks_bind_to_is_implemented(one: Any) -> None:
    from tests.onesim.dispatch import REGISTRY

    repo = Path(__file__).resolve().parents[2]
    calls = set()
    for path in sorted((repo / "hooks").glob("*.hook")):
        text = path.read_text()
        m = re.search(r'^CALL = "([^"]+)"', text, re.M)
        if m:
            calls.add(m.group(1))
            assert f"ARGUMENTS = \"api {m.group(1)} $API\"" in text or \
                f" {m.group(1)} $API\"" in text, path.name   # the call is named
        one.hook.allocate(text)
    assert "one.vm.resize" in calls and calls <= set(REGISTRY)
