"""Snapshot sets: one disk snapshot per disk of a VM, taken together, under one name.

Owns: creating, listing, reverting, deleting and expiring sets. A set is
found again from the VM document alone: each of its snapshots is named
`oneback-set:NAME` (plus `;expires=EPOCH` when it has a TTL), so a lost
catalog loses nothing. Disk operations run one disk after another, never in
parallel (oned refuses concurrent disk-snapshot operations on a VM). A
member oned will never delete (policy.permanent_snapshot) is only taken on
request, and deleting or expiring its set keeps it, says so once and drops
its expiry. A revert stops the VM the way the running oned allows (suspend
up to 6.6.2, hard poweroff from 6.6.3 on), reverts disk by disk, and brings
the VM back.
Must not: print, or decide which VMs to snapshot (the agent's policy does).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from agent.attach import Journal
from agent.cloud import Cloud
from agent.errors import CloudError, NotFound, OnebackError, StateError, UsageError
from agent.model import (
    LCM_RUNNING,
    OBJECT_PREFIX,
    VM_ACTIVE,
    VM_POWEROFF,
    VM_SUSPENDED,
    JournalKind,
    PermanentSnapshot,
    VmInfo,
)
from agent.policy import first_snapshot_permanent, permanent_snapshot

SET_PREFIX = OBJECT_PREFIX + "set:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SNAP = re.compile(r"^" + re.escape(SET_PREFIX) + r"(?P<name>[^;]+)(?:;expires=(?P<exp>\d+))?$")

# oned reverts disk snapshots in SUSPENDED up to 6.6.2 and only in POWEROFF
# from 6.6.3 on (DispatchManager::disk_snapshot_revert, commit 156cd04ba5,
# first released in 6.6.3 and 6.8.0) -- earlier than the 6.10 our notes said.
REVERT_IN_POWEROFF_SINCE = (6, 6, 3)


@dataclass(frozen=True)
class SetDisk:
    disk_id: int
    snapshot_id: int
    size_mb: int


@dataclass(frozen=True)
class SnapshotSet:
    vm_id: int
    name: str
    created: int
    expires: int | None
    disks: tuple[SetDisk, ...]

    @property
    def size_mb(self) -> int:
        return sum(d.size_mb for d in self.disks)


@dataclass(frozen=True)
class CreateResult:
    set: SnapshotSet
    skipped: tuple[str, ...]   # disks that cannot have snapshots, and why


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"snapshot set name {name!r} is not allowed: use 1-63 letters, digits, '.', '_'"
            f" or '-', starting with a letter or digit")
    return name


def snapshot_name(name: str, expires: int | None) -> str:
    return SET_PREFIX + name + (f";expires={expires}" if expires else "")


def sets_of(vm: VmInfo) -> list[SnapshotSet]:
    """Every snapshot set on the VM, oldest first, read from its document."""
    found: dict[str, list[tuple[int, SetDisk, int | None]]] = {}
    for snap in vm.snapshots:
        m = _SNAP.match(snap.name)
        if not m:
            continue
        exp = int(m.group("exp")) if m.group("exp") else None
        found.setdefault(m.group("name"), []).append(
            (snap.date, SetDisk(snap.disk_id, snap.snapshot_id, snap.size_mb), exp))
    sets = []
    for name, items in found.items():
        sets.append(SnapshotSet(
            vm_id=vm.id, name=name, created=min(i[0] for i in items),
            expires=next((i[2] for i in items if i[2] is not None), None),
            disks=tuple(sorted((i[1] for i in items), key=lambda d: d.disk_id))))
    return sorted(sets, key=lambda s: (s.created, s.name))


def find_set(vm: VmInfo, name: str) -> SnapshotSet:
    for s in sets_of(vm):
        if s.name == name:
            return s
    raise NotFound(f"VM {vm.id} has no snapshot set named {name!r};"
                   f" 'oneback snapshot list {vm.id}' shows its sets")


def create_set(cloud: Cloud, journal: Journal, owner: str, vm_id: int, name: str | None = None,
               ttl: int | None = None, now: float | None = None,
               allow_permanent: bool = False) -> CreateResult:
    """Snapshot every disk that can have one, one after another. All or
    nothing: if one disk fails, the snapshots already taken are deleted and
    the error names the disk. Each snapshot is journaled before it is taken,
    so a crash mid-way is undone by the next sweep. A member oned could never
    delete (snapshot 0 of a persistent qcow2 disk ...) is refused before
    anything is taken unless `allow_permanent`."""
    now = time.time() if now is None else now
    name = check_name(name or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime(now)))
    vm = cloud.wait_settled(vm_id)
    if not ((vm.state == VM_ACTIVE and vm.lcm_state == LCM_RUNNING)
            or vm.state in (VM_POWEROFF, VM_SUSPENDED)):
        raise StateError(f"VM {vm_id} is {vm.state_name}; snapshots need it RUNNING,"
                         f" POWEROFF or SUSPENDED")
    if any(s.name == name for s in sets_of(vm)):
        raise UsageError(f"VM {vm_id} already has a snapshot set named {name!r}:"
                         f" choose another --name or delete it first")
    snap_name = snapshot_name(name, int(now + ttl) if ttl else None)
    permanent = [why for disk in vm.disks if not disk.volatile
                 and disk.attributes.get("READONLY", "").upper() != "YES"
                 and (why := first_snapshot_permanent(vm, disk))]
    if permanent and not allow_permanent:
        raise UsageError(
            f"snapshot set {name!r} of VM {vm_id} would have a permanent member: "
            + "; ".join(permanent) + ". Deleting or expiring the set would leave that"
            " snapshot behind; pass --allow-permanent to take the set anyway")
    skipped: list[str] = []
    taken: list[tuple[int, int, int]] = []  # (journal entry, disk, snapshot)
    try:
        for disk in vm.disks:
            if disk.volatile:
                skipped.append(f"disk {disk.disk_id} is volatile ({disk.type}): OpenNebula"
                               f" cannot snapshot it")
                continue
            if disk.attributes.get("READONLY", "").upper() == "YES":
                skipped.append(f"disk {disk.disk_id} is read-only: nothing to snapshot")
                continue
            entry = journal.journal_record(JournalKind.SNAPSHOT, snap_name, owner,
                                           vm_id=vm_id, disk_id=disk.disk_id)
            try:
                snap_id = cloud.snapshot_create(vm_id, disk.disk_id, snap_name)
            except OnebackError as e:
                journal.journal_done(entry.id)
                raise CloudError(f"snapshot set {name!r} of VM {vm_id}: disk {disk.disk_id}"
                                 f" failed: {e}; the disks already taken were rolled back",
                                 transient=getattr(e, "transient", False)) from e
            taken.append((entry.id, disk.disk_id, snap_id))
    except BaseException:
        for entry_id, disk_id, snap_id in reversed(taken):
            try:
                cloud.snapshot_delete(vm_id, disk_id, snap_id)
            except OnebackError:
                continue  # stays journaled: the next sweep removes it
            journal.journal_done(entry_id)
        raise
    for entry_id, _, _ in taken:
        journal.journal_done(entry_id)
    return CreateResult(find_set(cloud.vm(vm_id), name), tuple(skipped))


def list_sets(cloud: Cloud, vm_id: int) -> list[SnapshotSet]:
    return sets_of(cloud.vm(vm_id))


@dataclass(frozen=True)
class DeleteResult:
    """What deleting a set did: every member is deleted, kept (oned will
    never delete it: reported, and a kept member's expiry is dropped so that
    expiry does not try it again), or failed (reported; tried again later)."""

    set: SnapshotSet
    deleted: tuple[SetDisk, ...]
    kept: tuple[PermanentSnapshot, ...]
    failed: tuple[str, ...]

    @property
    def vm_id(self) -> int:
        return self.set.vm_id

    @property
    def name(self) -> str:
        return self.set.name


def delete_set(cloud: Cloud, vm_id: int, name: str) -> DeleteResult:
    """Delete every snapshot of the set that still exists (disks detached
    since are simply absent), one after another; a member that fails does
    not stop the others. Idempotent per disk. Never raises for a member."""
    vm = cloud.wait_settled(vm_id)
    target = find_set(vm, name)
    full_name = snapshot_name(name, target.expires)
    deleted: list[SetDisk] = []
    kept: list[PermanentSnapshot] = []
    failed: list[str] = []
    for d in target.disks:
        permanent = permanent_snapshot(vm, d.disk_id, d.snapshot_id, full_name)
        if permanent is not None:
            kept.append(permanent)
            continue
        try:
            cloud.snapshot_delete(vm_id, d.disk_id, d.snapshot_id)
        except OnebackError as e:
            failed.append(f"disk {d.disk_id} snapshot {d.snapshot_id}: {e}")
        else:
            deleted.append(d)
    if target.expires is not None:
        for k in kept:   # it stays: so that expiry reports it once, not at every pass
            try:
                cloud.snapshot_rename(vm_id, k.disk_id, k.snapshot_id, snapshot_name(name, None))
            except OnebackError as e:
                failed.append(f"disk {k.disk_id} snapshot {k.snapshot_id}: keeping it"
                              f" without its expiry failed: {e}")
    return DeleteResult(target, tuple(deleted), tuple(kept), tuple(failed))


def expire_sets(cloud: Cloud, now: float | None = None,
                vms: list[VmInfo] | None = None) -> list[DeleteResult]:
    """Delete every set on every VM (`vms`, else the whole pool) whose TTL
    has passed: what can be deleted is, the rest is reported in the results.
    A set whose delete fails for one VM does not stop the others."""
    now = time.time() if now is None else now
    expired = []
    for vm in cloud.vms() if vms is None else vms:
        for s in sets_of(vm):
            if s.expires is not None and s.expires <= now:
                try:
                    expired.append(delete_set(cloud, vm.id, s.name))
                except NotFound:
                    continue   # gone meanwhile
                except OnebackError as e:
                    expired.append(DeleteResult(s, (), (), (f"VM {vm.id}: {e}",)))
    return expired


@dataclass(frozen=True)
class RevertResult:
    set: SnapshotSet
    stopped_as: str        # "suspend", "poweroff-hard" or "" (already POWEROFF)
    final_state: str


def _bring_back(cloud: Cloud, vm_id: int, stop: str, failure: CloudError | None) -> VmInfo:
    """Resume a VM the revert stopped (waiting until it is RUNNING again);
    a resume that fails is raised with how to finish by hand."""
    if not stop:
        return cloud.vm(vm_id)
    try:
        return cloud.action("resume", vm_id)
    except OnebackError as e:
        before = f"{failure}; and then " if failure is not None else ""
        raise CloudError(
            f"{before}VM {vm_id} could not be resumed after the revert: {e}; resume it with"
            f" 'onevm resume {vm_id}'") from e


def revert_set(cloud: Cloud, vm_id: int, name: str) -> RevertResult:
    """Stop the VM as this oned requires, revert each disk of the set in
    turn (each waited for), then bring the VM back to the state it was in.
    On failure the VM is brought back too, and the error names the disk that
    failed and the disks already reverted."""
    vm = cloud.wait_settled(vm_id)
    target = find_set(vm, name)
    poweroff_only = cloud.version() >= REVERT_IN_POWEROFF_SINCE
    running = vm.state == VM_ACTIVE and vm.lcm_state == LCM_RUNNING
    if vm.state == VM_POWEROFF:
        stop = ""
    elif running:
        stop = "poweroff-hard" if poweroff_only else "suspend"
    elif vm.state == VM_SUSPENDED and not poweroff_only:
        stop = ""
    else:
        raise StateError(
            f"VM {vm_id} is {vm.state_name}; OpenNebula "
            f"{'.'.join(map(str, cloud.version()))} reverts disks only in "
            f"{'POWEROFF' if poweroff_only else 'POWEROFF or SUSPENDED'}:"
            f" resume it or power it off first")
    present = {d.disk_id for d in vm.disks}
    if stop:
        try:
            cloud.action(stop, vm_id)   # waits until the VM *is* POWEROFF / SUSPENDED
        except OnebackError as e:
            raise CloudError(
                f"reverting VM {vm_id} to snapshot set {name!r}: could not stop it with"
                f" {stop}: {e}; nothing was reverted") from e
    reverted: list[int] = []
    failure: CloudError | None = None
    try:
        for d in target.disks:
            if d.disk_id not in present:
                continue
            try:
                cloud.snapshot_revert(vm_id, d.disk_id, d.snapshot_id)
            except OnebackError as e:
                done = ", ".join(map(str, reverted)) or "none"
                failure = CloudError(
                    f"reverting VM {vm_id} to snapshot set {name!r} failed at disk"
                    f" {d.disk_id}: {e}; disks already reverted: {done}")
                failure.__cause__ = e
                break
            reverted.append(d.disk_id)
    finally:
        final = _bring_back(cloud, vm_id, stop, failure)
    if failure is not None:
        raise failure
    return RevertResult(target, stop, final.state_name)
