"""The agent as a real process: ZeroMQ events from onesim, hooks executed by
onesim's hook manager, tags on VMs, the durable job queue, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agentkit import REPO, Cloud, MiB, pattern
from tests.agentproc import AgentProcess, backups, user_template, wait_backups
from tests.onesim.testing import wait_until, wait_vm

DISK = 1 * MiB
HOOK = REPO / "hooks" / "oneback-hook"


def test_tagged_vm_is_backed_up_untagged_never(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    tagged = cloud.vm("tagged", [cloud.image("t0", pattern(DISK, 1))])
    untagged = cloud.vm("untagged", [cloud.image("u0", pattern(DISK, 2))])
    labelled = cloud.vm("labelled", [cloud.image("l0", pattern(DISK, 3))])
    a = agent(reconcile=60)
    cloud.one.vm.update(tagged, 'ONEBACK="yes"', 1)
    cloud.one.vm.update(labelled, 'LABELS="prod,oneback"', 1)
    wait_backups(cloud, tagged, 1)
    wait_backups(cloud, labelled, 1)
    assert backups(cloud, tagged)[0]["kind"] == "full"
    wait_until(lambda: user_template(cloud, tagged).get("ONEBACK_STATUS") == "ok", 10, 0.1)
    tags = user_template(cloud, tagged)
    assert tags["ONEBACK_STATUS"] == "ok"
    assert "backup 1" in tags["ONEBACK_LAST_BACKUP"] or "backup 2" in tags["ONEBACK_LAST_BACKUP"]
    time.sleep(1.5)
    assert backups(cloud, untagged) == []
    assert "ONEBACK_STATUS" not in user_template(cloud, untagged)
    # its own status updates did not start more work
    assert len(backups(cloud, tagged)) == 1
    assert cloud.leftovers() == []
    assert a.stop() == 0


def test_poweroff_trigger(cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("p", [cloud.image("p0", pattern(DISK, 4))])
    cloud.one.vm.update(vm, 'ONEBACK="yes"\nONEBACK_ON="poweroff"\nONEBACK_INTERVAL="24h"', 1)
    agent(reconcile=60, extra="min_interval = 1")   # the operator's floor, out of the way
    wait_backups(cloud, vm, 1)
    time.sleep(1.1)  # RETIME has a one-second resolution
    cloud.one.vm.action("poweroff", vm)
    found = wait_backups(cloud, vm, 2)
    assert len(found) == 2
    wait_vm(cloud.one, vm, "POWEROFF")
    time.sleep(1.5)
    assert len(backups(cloud, vm)) == 2   # once per power-off, not again


def test_hundred_events_for_one_vm_give_one_backup(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("busy", [cloud.image("b0", pattern(DISK, 5))])
    cloud.sim.faults.slow_driver("saveas", 1.0, count=1)
    a = agent(reconcile=60)
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    for i in range(100):
        cloud.one.vm.update(vm, f'NOTE="{i}"', 1)
    wait_backups(cloud, vm, 1)
    time.sleep(2)
    assert len(backups(cloud, vm)) == 1
    assert len(a.events("job.queued")) == 1


def test_bad_tags_report_an_error_on_the_vm(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("bad", [cloud.image("bad0", pattern(DISK, 6))])
    agent(reconcile=60)
    cloud.one.vm.update(vm, 'ONEBACK="yes"\nONEBACK_INTERVAL="often"', 1)
    status = wait_until(lambda: user_template(cloud, vm).get("ONEBACK_STATUS", "")
                        .startswith("error") and user_template(cloud, vm)["ONEBACK_STATUS"],
                        10, 0.1)
    assert "ONEBACK_INTERVAL" in status
    assert backups(cloud, vm) == []


def test_dropped_events_are_made_up_by_the_reconcile_loop(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("quiet", [cloud.image("q0", pattern(DISK, 7))])
    a = agent(reconcile=1.0)
    cloud.sim.faults.drop_events(count=None, prefix="EVENT")
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    wait_backups(cloud, vm, 1, timeout=20)
    assert any(x.get("reason") == "first backup" for x in a.events("job.queued"))


def test_pre_change_snapshot_is_taken_cleared_and_expires(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("s", [cloud.image("s0", pattern(DISK, 8))])
    agent(reconcile=1.0)
    cloud.one.vm.update(vm, 'ONEBACK="yes"\nONEBACK_SNAPSHOT="before-upgrade"\n'
                            'ONEBACK_SNAPSHOT_TTL="3s"', 1)
    def sets() -> list[str]:
        return [s["name"] for s in cloud.call("snapshot", "list", str(vm), "--json").json()]

    assert wait_until(sets, 60, 0.1) == ["before-upgrade"]
    wait_until(lambda: not user_template(cloud, vm).get("ONEBACK_SNAPSHOT"), 30, 0.1)
    wait_until(lambda: sets() == [], 60, 0.2)   # expired after its TTL


def test_registered_hook_reaches_the_agent_and_a_wrong_secret_is_refused(
        cloud: Cloud, agent: Callable[..., AgentProcess], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    vm = cloud.vm("h", [cloud.image("h0", pattern(DISK, 9))])
    # No event bus for this agent: only the hook can wake it.
    a = agent(events="tcp://127.0.0.1:9", reconcile=3600)
    conf = tmp_path / "hook.conf"
    conf.write_text(f"url = {a.control_url}\nsecret_file = {cloud.tmp / 'hook_secret'}\n")
    monkeypatch.setenv("ONEBACK_HOOK_CONF", str(conf))
    r = cloud.call("hooks", "install", "--command", str(HOOK), "--json")
    assert r.code == 0, r.err
    names = {h["name"] for h in r.json()}
    assert {"oneback-vm-update", "oneback-vm-poweroff"} <= names
    again = cloud.call("hooks", "install", "--command", str(HOOK), "--json").json()
    assert not any(h["created"] for h in again)

    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    a.wait_event("hook.accepted", where=lambda x: x.get("vm_id") == vm)
    wait_backups(cloud, vm, 1)
    hook_id = next(h["id"] for h in r.json() if h["name"] == "oneback-vm-update")
    log = cloud.one.hook.info(hook_id).HOOKLOG.HOOK_EXECUTION_RECORD
    assert log and all(int(x.EXECUTION_RESULT.CODE) == 0 for x in log)

    # a forged request: wrong secret
    bad_secret = tmp_path / "bad_secret"
    bad_secret.write_text("not-the-secret-at-all\n")
    bad_secret.chmod(0o600)
    bad_conf = tmp_path / "bad.conf"
    bad_conf.write_text(f"url = {a.control_url}\nsecret_file = {bad_secret}\n")
    import base64
    doc = base64.b64encode(f"<VM><ID>{vm}</ID><STATE>3</STATE>"
                           "<LCM_STATE>3</LCM_STATE></VM>".encode()).decode()
    p = subprocess.run([str(HOOK), "state", doc], capture_output=True, text=True,
                       env={**os.environ, "ONEBACK_HOOK_CONF": str(bad_conf)})
    assert p.returncode != 0 and "refused" in p.stderr
    refused = a.wait_event("hook.refused")
    assert refused["why"] == "bad signature"
    assert "not-the-secret" not in json.dumps(a.lines)


def test_sigkill_during_backup_then_restart_cleans_up_and_completes(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("k", [cloud.image("k0", pattern(DISK, 10))])
    cloud.sim.faults.slow_driver("saveas", 3.0, count=1)
    a = agent(reconcile=60)
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    a.wait_event("job.started")
    wait_until(lambda: any("image" in x for x in cloud.leftovers()), 20, 0.05)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert cloud.leftovers() != []
    b = agent()
    started = b.wait_event("agent.started")
    assert started["recovered_jobs"] == 1
    wait_backups(cloud, vm, 1)
    wait_until(lambda: cloud.leftovers() == [], 20, 0.1)
    assert len(backups(cloud, vm)) == 1


def test_status_shows_the_queue_and_results(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("st", [cloud.image("st0", pattern(DISK, 11))])
    agent(reconcile=60)
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    wait_backups(cloud, vm, 1)
    doc = wait_until(lambda: (d := cloud.call("status", "--json").json())["recent"] and d,
                     10, 0.1)
    assert doc["recent"][0]["vm_id"] == vm and doc["recent"][0]["state"] == "done"
    assert "credentials" not in json.dumps(doc)


def test_terminated_vm_keeps_its_backups_marked_gone(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("bye", [cloud.image("bye0", pattern(DISK, 12))])
    a = agent(reconcile=60)
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    wait_backups(cloud, vm, 1)
    wait_until(lambda: not a.events("job.started") or a.events("job.done"), 10, 0.1)
    cloud.one.vm.action("terminate-hard", vm)
    a.wait_event("vm.gone", where=lambda x: x.get("vm_id") == vm)
    kept = backups(cloud, vm)
    assert len(kept) == 1 and kept[0]["vm_gone"] is True


def test_transient_failure_is_retried_with_backoff(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("flaky", [cloud.image("fl0", pattern(DISK, 13))])
    cloud.sim.faults.fail_driver("attach", count=1)   # the hot-plug fails once
    a = agent(reconcile=60)
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    failed = a.wait_event("job.failed", where=lambda x: x.get("vm_id") == vm)
    assert failed["retry_at"] is not None
    wait_backups(cloud, vm, 1)
    done = a.wait_event("job.done", where=lambda x: x.get("vm_id") == vm)
    assert done["job"] == failed["job"]
    assert cloud.leftovers() == []


def test_sigterm_undoes_a_running_job_within_the_grace_and_requeues_it(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("grace", [cloud.image("gr0", pattern(DISK, 14))])
    cloud.sim.faults.slow_driver("attach", 4.0, count=1)
    a = agent(reconcile=60)
    text = cloud.config.read_text().replace("shutdown_grace = 10", "shutdown_grace = 0.5")
    cloud.config.write_text(text)
    a.stop()
    a = agent(reconcile=60)   # restarted with the short grace
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    wait_until(lambda: any("proxy disk" in x for x in cloud.leftovers()), 20, 0.02)
    started = time.monotonic()
    assert a.stop() == 0
    assert time.monotonic() - started < 30
    assert a.events("agent.cancelling") and a.events("job.interrupted")
    assert cloud.leftovers() == []
    assert backups(cloud, vm) == []
    b = agent(reconcile=60)
    wait_backups(cloud, vm, 1)
    assert b.wait_event("job.done")["vm_id"] == vm


def test_a_hook_bound_to_any_call_asks_for_a_snapshot_set(
        cloud: Cloud, agent: Callable[..., AgentProcess], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    from agent.hookdefs import snapshot_hook

    vm = cloud.vm("r", [cloud.image("r0", pattern(DISK, 15))])
    other = cloud.vm("r-untagged", [cloud.image("r1", pattern(DISK, 16))])
    a = agent(reconcile=3600)
    conf = tmp_path / "hook.conf"
    conf.write_text(f"url = {a.control_url}\nsecret_file = {cloud.tmp / 'hook_secret'}\n")
    monkeypatch.setenv("ONEBACK_HOOK_CONF", str(conf))
    cloud.one.hook.allocate(snapshot_hook("snap-on-rename", "one.vm.rename", "on-rename",
                                          "2h", command=str(HOOK)))
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    wait_backups(cloud, vm, 1)
    cloud.one.vm.rename(vm, "r-renamed")
    cloud.one.vm.rename(other, "other-renamed")     # not opted in: no snapshot
    sets = wait_until(lambda: cloud.call("snapshot", "list", str(vm), "--json").json(), 20, 0.1)
    assert [s["name"] for s in sets] == ["on-rename"] and sets[0]["expires"]
    a.wait_event("hook.snapshot_refused", where=lambda x: x.get("vm_id") == other)
    assert cloud.call("snapshot", "list", str(other), "--json").json() == []


def test_parallel_jobs_respect_the_limit_on_disks_attached_to_the_proxy(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vms = [cloud.vm(f"p{i}", [cloud.image(f"p{i}d", pattern(DISK, 30 + i))]) for i in range(3)]
    cloud.sim.faults.slow_driver("detach", 0.5, count=None)   # keep each disk attached a while
    a = agent(reconcile=60, extra="max_jobs = 3\nmax_attached = 1")
    for vm in vms:
        cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:   # how many disks besides its own the proxy has, over time
        while not done.is_set():
            disks = cloud.one.vm.info(cloud.proxy_id).TEMPLATE.get("DISK", [])
            seen.append(len(disks if isinstance(disks, list) else [disks]) - 1)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for vm in vms:
            wait_backups(cloud, vm, 1, timeout=60)
    finally:
        done.set()
        watcher.join()
    assert max(seen) == 1
    started = a.events("job.started")
    assert len({x["vm_id"] for x in started}) == 3
