"""The shipped hooks, end to end: onesim's hook execution manager runs the
real hooks/oneback-hook with oned's arguments (Nokogiri's pretty-printed
$API / $TEMPLATE) against a real agent process; and forged ids on the event
bus or in a signed hook request never take the agent down."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.control import sign
from agent.hookdefs import DEFAULT_COMMAND
from tests.agentkit import REPO, Cloud, MiB, pattern
from tests.agentproc import AgentProcess, wait_backups
from tests.onesim.testing import client, wait_until

DISK = 1 * MiB
HOOK = REPO / "hooks" / "oneback-hook"
FORGED = 2**31 + 5

def hook_conf(cloud: Cloud, a: AgentProcess, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "hook.conf"
    conf.write_text(f"url = {a.control_url}\nsecret_file = {cloud.tmp / 'hook_secret'}\n")
    monkeypatch.setenv("ONEBACK_HOOK_CONF", str(conf))


def hook_records(cloud: Cloud, hook_id: int, count: int) -> list[Any]:
    def enough() -> list[Any] | None:
        log = cloud.one.hook.info(hook_id).HOOKLOG
        found = list(log.HOOK_EXECUTION_RECORD) if log is not None else []
        return found if len(found) >= count else None
    return list(wait_until(enough, timeout=20, interval=0.05))


def out(record: Any) -> str:
    return base64.b64decode(record.EXECUTION_RESULT.STDOUT).decode()


def sets(cloud: Cloud, vm: int) -> list[str]:
    r = cloud.call("snapshot", "list", str(vm), "--json")
    assert r.code == 0, r.err
    return [s["name"] for s in r.json()]


def test_shipped_resize_hook_snapshots_on_a_resize_and_never_on_a_refused_one(
        cloud: Cloud, agent: Callable[..., AgentProcess], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    vm = cloud.vm("rz", [cloud.image("rz0", pattern(DISK, 41))])
    a = agent(events="tcp://127.0.0.1:9", reconcile=3600)   # only the hooks wake it
    hook_conf(cloud, a, tmp_path, monkeypatch)
    r = cloud.call("hooks", "install", "--command", str(HOOK), "--json")
    assert r.code == 0, r.err
    shipped = (REPO / "hooks" / "oneback-snapshot-on-resize.hook").read_text()
    resize_hook = cloud.one.hook.allocate(shipped.replace(DEFAULT_COMMAND, str(HOOK)))
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)              # via oneback-vm-update
    wait_backups(cloud, vm, 1)

    # A user with no right on the VM asks to resize it: oned refuses, its
    # hook manager runs the hook anyway (RESULT 0), and nothing is forwarded.
    cloud.one.user.allocate("mallory", "secret", "core", [])
    mallory = client(cloud.sim, "mallory", "secret")
    with pytest.raises(Exception, match="Not authorized"):
        mallory.vm.resize(vm, 'CPU="4"', True)
    refused = hook_records(cloud, resize_hook, 1)[0]
    assert refused.EXECUTION_RESULT.CODE == "0"
    assert "nothing forwarded: oned refused one.vm.resize" in out(refused)
    time.sleep(0.5)
    assert not a.events("job.queued") or all(j["kind"] != "snapshot"
                                              for j in a.events("job.queued"))
    assert sets(cloud, vm) == []

    # The owner's resize succeeds: a snapshot set named by the hook is taken.
    cloud.one.vm.resize(vm, 'CPU="2"\nMEMORY="128"', True)
    done = hook_records(cloud, resize_hook, 2)[1]
    assert done.EXECUTION_RESULT.CODE == "0", base64.b64decode(done.EXECUTION_RESULT.STDERR)
    assert f"forwarded api one.vm.resize of VM {vm}" in out(done)
    assert wait_until(lambda: sets(cloud, vm), 30, 0.2) == ["on-resize"]
    # every shipped hook that ran exited 0
    for h in r.json():
        log = cloud.one.hook.info(h["id"]).HOOKLOG
        for rec in (log.HOOK_EXECUTION_RECORD if log is not None else []):
            assert rec.EXECUTION_RESULT.CODE == "0", (h["name"], out(rec))


def test_state_and_action_hooks_read_oneds_documents(
        cloud: Cloud, agent: Callable[..., AgentProcess], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """The poweroff STATE hook ($TEMPLATE, pretty-printed VM) and an API hook
    on one.vm.action (the VM is the 3rd parameter) reach the agent."""
    vm = cloud.vm("st", [cloud.image("st0", pattern(DISK, 42))])
    a = agent(events="tcp://127.0.0.1:9", reconcile=3600)
    hook_conf(cloud, a, tmp_path, monkeypatch)
    r = cloud.call("hooks", "install", "--command", str(HOOK), "--json")
    assert r.code == 0, r.err
    action = cloud.one.hook.allocate(
        f'NAME="act"\nTYPE="api"\nCALL="one.vm.action"\nCOMMAND="{HOOK}"\n'
        'ARGUMENTS="api one.vm.action $API"')
    cloud.one.vm.action("poweroff", vm)
    a.wait_event("hook.accepted", where=lambda x: x.get("reason") == "hook api one.vm.action"
                 and x.get("vm_id") == vm)
    a.wait_event("hook.accepted", where=lambda x: x.get("vm_id") == vm
                 and str(x.get("reason")).startswith("hook state 8/"))
    assert hook_records(cloud, action, 1)[0].EXECUTION_RESULT.CODE == "0"


def post_hook(url: str, secret: bytes, doc: dict[str, Any]) -> tuple[int, str]:
    body = json.dumps(doc).encode()
    ts, nonce = str(int(time.time())), secrets.token_hex(16)
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Oneback-Timestamp": ts,
        "X-Oneback-Nonce": nonce, "X-Oneback-Signature": sign(secret, ts, nonce, body)})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def api_message(method: str, vm_id: int, result: int = 1) -> str:
    return ("<HOOK_MESSAGE><HOOK_TYPE>API</HOOK_TYPE>"
            f"<CALL>{method}</CALL><CALL_INFO><RESULT>{result}</RESULT><PARAMETERS>"
            "<PARAMETER><POSITION>1</POSITION><TYPE>IN</TYPE><VALUE>****</VALUE></PARAMETER>"
            f"<PARAMETER><POSITION>2</POSITION><TYPE>IN</TYPE><VALUE>{vm_id}</VALUE>"
            "</PARAMETER></PARAMETERS><EXTRA></EXTRA></CALL_INFO></HOOK_MESSAGE>")


def test_forged_ids_on_the_bus_and_in_hook_requests_do_not_stop_the_agent(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("fg", [cloud.image("fg0", pattern(DISK, 43))])
    a = agent(reconcile=3600)
    a.wait_event("events.connected")
    bus = cloud.sim.bus
    b64 = base64.b64encode
    bus.inject(f"EVENT VM {FORGED}/ACTIVE/RUNNING ", "")
    bus.inject("EVENT VM 99999999999999999999999/POWEROFF/LCM_INIT ", "")
    bus.inject("EVENT API one.vm.update 1", b64(api_message("one.vm.update", FORGED).encode())
               .decode())
    bus.inject("EVENT API one.vm.update 1", b64(b"<HOOK_MESSAGE><CALL>one.vm.upd").decode())
    # Still alive and still working: an opt-in by event is backed up.
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    wait_backups(cloud, vm, 1)
    assert a.proc.poll() is None

    secret = (cloud.tmp / "hook_secret").read_bytes().strip()
    code, text = post_hook(a.control_url, secret, {"vm_id": FORGED, "event": "x"})
    assert code == 400 and "0 .. 2147483647" in text
    code, _ = post_hook(a.control_url, secret, {"vm_id": FORGED, "snapshot": "s", "ttl": 60})
    assert code == 400
    code, _ = post_hook(a.control_url, secret, {"vm_id": vm, "snapshot": "s", "ttl": 10**30})
    assert code == 400
    # the hook script refuses such an id before it signs anything
    doc = base64.b64encode(f"<VM>\n  <ID>{FORGED}</ID>\n</VM>".encode()).decode()
    p = run_hook("state", doc)
    assert p.returncode == 1 and "is not an OpenNebula id (0 .. 2147483647)" in p.stderr
    assert p.stderr.count("\n") == 1

    # and a good request after the forged ones is still served
    code, _ = post_hook(a.control_url, secret, {"vm_id": vm, "snapshot": "after", "ttl": 60})
    assert code == 202
    assert wait_until(lambda: sets(cloud, vm), 30, 0.2) == ["after"]
    assert a.proc.poll() is None
    assert not [x for x in a.lines if "Traceback" in json.dumps(x)]


def test_older_hook_arguments_and_stdin_still_work(
        cloud: Cloud, agent: Callable[..., AgentProcess], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Hooks registered before the call was named in ARGUMENTS ("api $API")
    keep working for calls whose VM is the 2nd parameter; ARGUMENTS_STDIN
    feeds the same words on standard input."""
    vm = cloud.vm("old", [cloud.image("old0", pattern(DISK, 44))])
    a = agent(events="tcp://127.0.0.1:9", reconcile=3600)
    hook_conf(cloud, a, tmp_path, monkeypatch)
    legacy = cloud.one.hook.allocate(f'NAME="legacy"\nTYPE="api"\nCALL="one.vm.rename"\n'
                                     f'COMMAND="{HOOK}"\nARGUMENTS="api $API"')
    stdin = cloud.one.hook.allocate(f'NAME="stdin"\nTYPE="api"\nCALL="one.vm.rename"\n'
                                    f'COMMAND="{HOOK}"\nARGUMENTS="api one.vm.rename $API"\n'
                                    'ARGUMENTS_STDIN="yes"')
    cloud.one.vm.rename(vm, "renamed")
    for hid in (legacy, stdin):
        rec = hook_records(cloud, hid, 1)[0]
        assert rec.EXECUTION_RESULT.CODE == "0", base64.b64decode(rec.EXECUTION_RESULT.STDERR)
    reasons = {x["reason"] for x in a.events("hook.accepted") if x.get("vm_id") == vm}
    assert reasons == {"hook api ?", "hook api one.vm.rename"}


def run_hook(*args: str) -> subprocess.CompletedProcess[str]:
    """The script as the HEM runs it, with no agent configured."""
    return subprocess.run([str(HOOK), *args], capture_output=True, text=True, input="",
                          env={**os.environ, "ONEBACK_HOOK_CONF": "/nonexistent"})


def call_info(result: int, *params: tuple[str, int, str]) -> str:
    body = "".join(f"\n    <PARAMETER>\n      <POSITION>{pos}</POSITION>\n      <TYPE>{kind}"
                   f"</TYPE>\n      <VALUE>{value}</VALUE>\n    </PARAMETER>"
                   for kind, pos, value in params)
    xml = (f"<CALL_INFO>\n  <RESULT>{result}</RESULT>\n  <PARAMETERS>{body}\n  </PARAMETERS>"
           "\n  <EXTRA/>\n</CALL_INFO>")
    return base64.b64encode(xml.encode()).decode()


def test_the_hook_script_refuses_clearly_in_one_line() -> None:
    refused = call_info(0, ("IN", 1, "****"), ("IN", 2, "poweroff"), ("IN", 3, "4"))
    p = run_hook("api", "one.vm.action", refused)
    assert p.returncode == 0 and p.stdout.startswith("nothing forwarded: oned refused "
                                                     "one.vm.action")
    cases = [
        (("snapshot", "s", "1h", "one.template.instantiate",
          call_info(1, ("IN", 1, "****"), ("OUT", 2, "4"))), "cannot be bound to "
                                                             "one.template.instantiate"),
        (("api", "one.vm.resize", call_info(1, ("IN", 1, "****"), ("IN", 2, str(FORGED)))),
         "parameter 2 of one.vm.resize '2147483653' is not an OpenNebula id"),
        (("api", "one.vm.action", call_info(1, ("IN", 2, "poweroff"))),
         "no IN parameter 3 (the VM id)"),
        (("api", "one.vm.resize", "%%%"), "the $API argument is not base64"),
        (("api", "one.vm.resize", base64.b64encode(b"<CALL_INFO>").decode()),
         "the $API document is not XML"),
        (("api", "one.vm.resize", base64.b64encode(
            b'<!DOCTYPE x [<!ENTITY a "1">]><CALL_INFO/>').decode()), "declares a DTD"),
        (("api", "vm.resize;rm", "x"), "is not an API call name"),
        (("snapshot", "s", "99999999w", "one.vm.resize", "x"), "at most ten years"),
        (("state",), "usage: oneback-hook"),
        (("api", "one.vm.resize", call_info(7, ("IN", 2, "4"))), "CALL_INFO/RESULT is '7'"),
    ]
    for args, message in cases:
        p = run_hook(*args)
        assert p.returncode == 1 and message in p.stderr, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
