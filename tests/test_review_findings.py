"""Findings of the hostile review of issues 9 and 10, each driven through
the real CLI and pyone over HTTP to onesim."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from agent.events import parse_message
from tests.agentkit import Cloud, MiB, pattern
from tests.onesim.testing import wait_until, wait_vm

DISK = 1 * MiB


def proxy_disks(c: Cloud) -> dict[int, Any]:
    disks = c.one.vm.info(c.proxy_id).TEMPLATE.get("DISK", [])
    return {int(d["DISK_ID"]): d for d in (disks if isinstance(disks, list) else [disks])}


def test_a_run_never_detaches_another_attachment_that_took_its_disk_id(cloud: Cloud) -> None:
    """oned gives an attached disk the highest DISK_ID + 1
    (VirtualMachineDisks::set_up_attach), so once a run's attachment is gone
    (an operator's detach, another agent's cleanup), the next disk attached
    to the proxy VM gets the same id. The run's own detach must then leave
    that disk alone: it is another agent's attachment, found by its SERIAL."""
    vm = cloud.vm("victim", [cloud.image("victim-disk", pattern(DISK, 5))])
    other = cloud.image("other-agent-disk", pattern(DISK, 6))
    cloud.config.write_text(cloud.config.read_text().replace("device_timeout = 5",
                                                             "device_timeout = 15"))
    # the guest does not show the run's disk before its device_timeout ends
    cloud.sim.faults.slow_driver("plug", 60.0, count=1, vm_id=cloud.proxy_id)
    before = set(proxy_disks(cloud))
    proc = cloud.spawn("backup", str(vm))
    try:
        ours = wait_until(lambda: (set(proxy_disks(cloud)) - before) or None, timeout=30,
                          interval=0.02)
        (disk_id,) = ours
        wait_vm(cloud.one, cloud.proxy_id, "ACTIVE", "RUNNING", timeout=20)
        # someone else detaches it, and another agent attaches its own disk
        cloud.one.vm.detach(cloud.proxy_id, disk_id)
        wait_until(lambda: disk_id not in proxy_disks(cloud), timeout=20, interval=0.02)
        wait_vm(cloud.one, cloud.proxy_id, "ACTIVE", "RUNNING", timeout=20)
        cloud.one.vm.attach(cloud.proxy_id,
                            f'DISK=[IMAGE_ID="{other}",SERIAL="otheragent-0001",'
                            f'DEV_PREFIX="vd"]')
        wait_until(lambda: proxy_disks(cloud).get(disk_id, {}).get("SERIAL")
                   == "otheragent-0001", timeout=20, interval=0.02)
        assert proc.poll() is None, "the run ended before the other attach: test too slow"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, (out, err)
    serials = {d.get("SERIAL") for d in proxy_disks(cloud).values()}
    assert "otheragent-0001" in serials, (serials, err)


@pytest.mark.parametrize("closes", ["</PARAMETERS>", "</PARAMETERS></CALL_INFO>"])
def test_a_split_parameters_element_does_not_forge_the_instantiated_vm(
        cloud: Cloud, closes: str) -> None:
    """oned writes IN values unescaped (ParamListXRPC::api_value), the OUT
    answer after them (retval_xml). An extra template value that closes
    <PARAMETERS> (or <CALL_INFO> too) and opens another puts a fake OUT 2 in
    the first one: the VM id must be the last OUT 2 of the whole message,
    the one oned wrote after every user value."""
    opens = "<CALL_INFO><PARAMETERS>" if "CALL_INFO" in closes else "<PARAMETERS>"

    victim = cloud.vm("victim", [cloud.image("victim-disk", pattern(DISK, 7))])
    tid = cloud.one.template.allocate('NAME="plain" CPU="1" MEMORY="64"')
    fake = (f"x</VALUE></PARAMETER><PARAMETER><POSITION>2</POSITION><TYPE>OUT</TYPE>"
            f"<VALUE>{victim}</VALUE></PARAMETER>{closes}{opens}<PARAMETER><VALUE>")
    new = cloud.one.template.instantiate(tid, "mine", False, f'NOTE="{fake}"', False)
    assert new != victim
    key = "EVENT API one.template.instantiate 1"
    body = wait_until(lambda: next((xml for k, xml in cloud.sim.bus.published()
                                    if k == key and fake in xml), None), timeout=10)

    t = parse_message(key.encode(), base64.b64encode(body.encode()))
    assert t is not None and t.vm_id == new, t


def test_a_restore_killed_between_its_renames_leaves_no_image_behind(cloud: Cloud) -> None:
    """restore_vm renames its images to their final names, then the VM (the
    commit). Killed in between, the VM still has its temporary name, so the
    sweep terminates it, but the images already renamed count as
    'committed': they stay forever under the names the restore wanted, and a
    second restore with that name is refused (names taken)."""
    app = cloud.vm("app", [cloud.image("app0", pattern(DISK, 2)),
                           cloud.image("app1", pattern(DISK, 3))])
    r = cloud.call("backup", str(app), "--json")
    assert r.code == 0, r.err
    backup = r.json()["backup_id"]
    # the process dies while its VM rename waits in oned, which never does it
    cloud.sim.faults.delay_call("one.vm.rename", 3.0, count=1)
    cloud.sim.faults.fail_call("one.vm.rename", "never done", count=1)
    cloud.kill_during("one.vm.rename", "restore", str(backup), "--name", "again")
    time.sleep(3.5)
    r = cloud.call("cleanup", "--json")
    assert r.code == 0, r.err
    names = {i.NAME for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE}
    assert not names & {"again-disk0", "again-disk1"}, (names, r.json())


def test_a_vm_with_a_long_name_restores_without_name(cloud: Cloud) -> None:
    """oned refuses a name of more than 128 bytes (PoolObjectSQL::name_is_valid,
    at rename too): the default names of a restore (`<vm>-restored-<id>`,
    `<vm>-disk<n>`) of a VM with a long name must be cut to fit, and a
    --name that is too long refused at once, not after all data is copied."""
    long_name = "é" * 60   # 120 bytes: a name oned accepts
    vm = cloud.vm(long_name, [cloud.image("long-disk", pattern(DISK, 9))])
    r = cloud.call("backup", str(vm), "--json")
    assert r.code == 0, r.err
    backup = r.json()["backup_id"]
    r = cloud.call("restore", str(backup), "--json")
    assert r.code == 0, r.err
    info = cloud.one.vm.info(r.json()["vm_id"])
    assert info.NAME.startswith("é" * 50) and info.NAME.endswith(f"-restored-{backup}")
    assert len(info.NAME.encode()) <= 128
    disks = info.TEMPLATE.get("DISK", [])
    for d in disks if isinstance(disks, list) else [disks]:
        name = cloud.one.image.info(int(d["IMAGE_ID"])).NAME
        assert name.endswith(f"-disk{d['DISK_ID']}") and len(name.encode()) <= 128, name
    r = cloud.call("restore-disk", str(backup), "0", "--json")
    assert r.code == 0, r.err
    r = cloud.call("restore", str(backup), "--name", "n" * 129)
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and "at most 128" in r.err


def test_an_update_with_an_ampersand_names_its_vm(cloud: Cloud) -> None:
    """oned publishes one.vm.update's template unescaped: a tenant's
    `URL="http://x/?a=1&b=2"` makes the body malformed XML. The VM id (IN 2)
    comes before any user text, so it is still readable (libxml2 recovers
    what follows, as oned's own hook manager does with Nokogiri); the agent
    must not answer every such update with a pass over every VM."""
    vm = cloud.vm("web", [cloud.image("web-disk", pattern(DISK, 4))])
    cloud.one.vm.update(vm, 'URL="http://example.com/?a=1&b=<2>"', 1)
    key = "EVENT API one.vm.update 1"
    body = wait_until(lambda: next((xml for k, xml in cloud.sim.bus.published()
                                    if k == key and "a=1&b" in xml), None), timeout=10)
    t = parse_message(key.encode(), base64.b64encode(body.encode()))
    assert t is not None and t.vm_id == vm, t


def test_cleanup_leaves_a_tenants_snapshot_that_only_starts_like_oneback_s(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """Snapshots have no owner to check: before, `cleanup` deleted every disk
    snapshot whose name started with `oneback-tmp-`, including one a tenant
    chose. Now only the exact shape oneback gives a backup snapshot of that
    disk counts as a leftover."""
    vm = cloud.vm("tenant", [cloud.image("tenant0", pattern(MiB, 31)),
                             cloud.image("tenant1", pattern(MiB, 32))])
    names = {0: "oneback-tmp-mine", 1: "oneback-tmp-0badc0de-1234abcd-d0"}   # wrong disk
    for disk, name in names.items():
        cloud.one.vm.disksnapshotcreate(vm, disk, name)
        wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    leftover = "oneback-tmp-0badc0de-1234abcd-d1"
    cloud.one.vm.disksnapshotcreate(vm, 1, leftover)
    wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    r = cloud.run("cleanup", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert any(leftover in x for x in r.json()["removed"])
    left = {str(s.NAME) for d in cloud.one.vm.info(vm).SNAPSHOTS for s in d.SNAPSHOT}
    assert left == set(names.values())
