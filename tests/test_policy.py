"""Pure decisions: tags on a VM, disk plans, what is due."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.errors import UsageError
from agent.model import DiskInfo, VmInfo
from agent.policy import (
    due_work,
    parse_disk_ids,
    parse_duration,
    plan_disks,
    vm_policy,
)


def disk(i: int, image: int | None = 1, **attrs: str) -> DiskInfo:
    return DiskInfo(i, image, 4, f"vd{chr(97 + i)}", "", attrs.get("TYPE", "FILE"), 1, False,
                    False, dict(attrs))


def vm(tags: dict[str, str] | None = None, state: int = 3, lcm: int = 3,
       running_end: int = 0) -> VmInfo:
    return VmInfo(7, "web", 0, 0, state, lcm,
                  (disk(0), disk(1, None, TYPE="fs"), disk(2, 5, READONLY="YES"), disk(3)),
                  (), tags or {}, "", "<VM/>", running_end)


def test_parsers() -> None:
    assert parse_disk_ids(" 1, 3 ", "x") == {1, 3}
    assert parse_disk_ids("", "x") == frozenset()
    assert parse_duration("48h", "x") == 172800 and parse_duration("2w", "x") == 1209600
    for bad in ("1;3", "a", "1,,2"):
        with pytest.raises(UsageError, match="x is"):
            parse_disk_ids(bad, "x")
    for bad in ("", "0h", "5", "1y", "-1d"):
        with pytest.raises(UsageError):
            parse_duration(bad, "x")


def test_plan_splits_disks_by_what_a_backup_does() -> None:
    plan = plan_disks(vm({"ONEBACK_EXCLUDE_DISKS": "3"}), exclude=[9])
    assert [d.disk_id for d in plan.read] == [0]
    assert [d.disk_id for d in plan.volatile] == [1]
    assert [d.disk_id for d in plan.skipped] == [2]
    assert [d.disk_id for d in plan.excluded] == [3]
    assert any("no such disk" in w for w in plan.warnings)


@pytest.mark.parametrize("tags,opted", [
    ({}, False), ({"ONEBACK": "yes"}, True), ({"ONEBACK": "YES"}, True),
    ({"LABELS": "prod,oneback"}, True), ({"LABELS": "team/oneback"}, True),
    ({"LABELS": "onebackup"}, False), ({"LABELS": "oneback", "ONEBACK": "no"}, False),
])
def test_opt_in(tags: dict[str, str], opted: bool) -> None:
    assert vm_policy(vm(tags)).opted_in is opted


def test_bad_tags_become_one_error_not_an_exception() -> None:
    pol = vm_policy(vm({"ONEBACK": "yes", "ONEBACK_INTERVAL": "daily", "ONEBACK_KEEP": "-1",
                        "ONEBACK_ON": "reboot"}))
    assert "ONEBACK_INTERVAL" in pol.error and "ONEBACK_KEEP" in pol.error
    assert "ONEBACK_ON" in pol.error
    assert due_work(vm(), pol, None, 0) == []


def test_due_work_is_level_triggered() -> None:
    on = {"ONEBACK": "yes", "ONEBACK_INTERVAL": "1h"}
    v = vm(on)
    pol = vm_policy(v)
    assert [d.reason for d in due_work(v, pol, None, 1000)] == ["first backup"]
    assert due_work(v, pol, 1000, 1000 + 3599) == []
    assert [d.kind for d in due_work(v, pol, 1000, 1000 + 3600)] == ["backup"]
    held = replace(v, state=2)
    assert due_work(held, pol, None, 1000) == []
    # power-off trigger: due once the VM stopped running after the last backup
    off = vm({**on, "ONEBACK_ON": "poweroff"}, state=8, lcm=0, running_end=1500)
    pol = vm_policy(off)
    assert [d.reason for d in due_work(off, pol, 1000, 1600)] == [
        "powered off since its last backup"]
    assert due_work(off, pol, 1550, 1600) == []
    # oned bumps RETIME when the backup's own operations end on a powered-off
    # VM: a backup that started before and finished after is not repeated
    assert due_work(off, pol, 1400, 1600, last_finished=1501) == []
    # a pre-change snapshot request
    snap = vm({**on, "ONEBACK_SNAPSHOT": "before-x", "ONEBACK_SNAPSHOT_TTL": "2h"})
    work = due_work(snap, vm_policy(snap), 1000, 1001)
    assert [(d.kind, dict(d.params)) for d in work] == [
        ("snapshot", {"name": "before-x", "ttl": "7200"})]


def test_an_interval_below_the_operators_floor_is_raised_and_noted() -> None:
    v = vm({"ONEBACK": "yes", "ONEBACK_INTERVAL": "10m"})
    pol = vm_policy(v, min_interval=3600)
    assert pol.interval == 3600 and not pol.error
    assert pol.note == ("ONEBACK_INTERVAL=10m is below the minimum of 1h set by the operator:"
                        " backed up every 1h")
    assert due_work(v, pol, 1000, 1000 + 3599) == []
    assert vm_policy(vm({"ONEBACK": "yes", "ONEBACK_INTERVAL": "2h"}), 3600).note == ""
    # power cycling does not beat the floor either
    off = vm({"ONEBACK": "yes", "ONEBACK_ON": "poweroff"}, state=8, lcm=0, running_end=1500)
    assert due_work(off, vm_policy(off, 3600), 1000, 1600) == []
    assert [d.kind for d in due_work(off, vm_policy(off, 3600), 1000, 4600)] == ["backup"]


@pytest.mark.parametrize("tag", ["ONEBACK_KEEP", "ONEBACK_INTERVAL", "ONEBACK_EXCLUDE_DISKS",
                                 "ONEBACK_SNAPSHOT_TTL", "ONEBACK_SNAPSHOT", "ONEBACK_ON"])
@pytest.mark.parametrize("value", ["9" * 5000, "9" * 5000 + "h", "\u00b2", "x" * 100_000])
def test_a_huge_or_strange_tag_is_one_short_error(tag: str, value: str) -> None:
    """int() of 5000 digits raises, and so does int("²") after isdigit():
    an owner's tag made vm_policy raise inside the agent's reconcile."""
    tags = {"ONEBACK": "yes", "ONEBACK_SNAPSHOT": "s", tag: value}
    pol = vm_policy(vm(tags))
    assert tag in pol.error and len(pol.error) < 300
