"""Pure decisions: which disks of a VM a backup reads, skips or excludes.

Owns: the interpretation of exclusion flags and of the VM's
`ONEBACK_EXCLUDE_DISKS` attribute, the rules for disks that cannot be
saved as images, and which disk snapshots oned will never delete (and so
how such a disk is read). Must not: do I/O. Everything here is a function of the VM
document and the request, so it can be re-decided from a fresh `one.vm.info`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.errors import UsageError
from agent.model import (
    VM_POWEROFF,
    VM_SUSPENDED,
    DiskInfo,
    PermanentSnapshot,
    ReadVia,
    VmInfo,
)
from agent.retention import KeepPolicy
from agent.retention import parse as parse_keep

EXCLUDE_ATTRIBUTE = "ONEBACK_EXCLUDE_DISKS"


def shown(text: str, limit: int = 40) -> str:
    """A value quoted for a message: tags are the owner's, and may be megabytes."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def parse_disk_ids(text: str, where: str) -> frozenset[int]:
    """`"1,3"` -> {1, 3}. Empty means none. Raises UsageError naming `where`."""
    text = text.strip()
    if not text:
        return frozenset()
    if not re.fullmatch(r"[0-9]{1,9}(\s*,\s*[0-9]{1,9})*", text):
        raise UsageError(
            f"{where} is {shown(text)}: it must be a comma-separated list of disk ids,"
            f" e.g. \"1,3\""
        )
    return frozenset(int(p) for p in text.split(","))


def is_readonly(attributes: Mapping[str, str]) -> bool:
    """Read-only and CD-ROM disks: nothing to back up, the image itself is reused."""
    return (attributes.get("READONLY", "").upper() == "YES"
            or attributes.get("TYPE", "").upper() in ("CDROM", "RBD_CDROM", "FILESYSTEM"))


# ---------------------------------------------------------------------------
# Snapshots oned will never delete (Snapshots::test_delete): snapshot 0 of a
# persistent disk whose snapshots form a tree or a line (ALLOW_ORPHANS NO or
# LINEAR). The TM's ALLOW_ORPHANS="FORMAT" is NO for every format but raw
# (VirtualMachineDisk::allow_orphans): every persistent qcow2 image on the
# shared, qcow2 and local TMs, and every persistent disk on the dummy TM.

BASE_SNAPSHOT = "oneback-base"
QCOW2_BASE_ATTRIBUTE = "ONEBACK_QCOW2_BASE"
_NO_ORPHANS = ("NO", "LINEAR")


def snapshot_mode(vm: VmInfo, disk: DiskInfo) -> str:
    """How oned links `disk`'s snapshots: its SNAPSHOTS' ALLOW_ORPHANS when
    it has one, else what oned will pick for the first snapshot from the
    DISK's ALLOW_ORPHANS and FORMAT (VirtualMachineDisk::allow_orphans)."""
    tree = vm.snapshot_trees.get(disk.disk_id)
    if tree is not None:
        return tree.allow_orphans.upper()
    mode = disk.attributes.get("ALLOW_ORPHANS", "NO").upper()
    if mode == "FORMAT":
        return "YES" if disk.attributes.get("FORMAT", "").lower() == "raw" else "NO"
    return mode if mode in ("YES", "NO", "MIXED", "LINEAR") else "NO"


def next_snapshot_id(vm: VmInfo, disk: DiskInfo) -> int:
    tree = vm.snapshot_trees.get(disk.disk_id)
    return tree.next_snapshot if tree is not None else 0


def permanent_reason(vm: VmInfo, disk: DiskInfo) -> str:
    """Why snapshot 0 of `disk` can never be deleted (empty if it can)."""
    mode = snapshot_mode(vm, disk)
    if not disk.persistent or mode not in _NO_ORPHANS:
        return ""
    fmt = disk.attributes.get("FORMAT", "") or "unknown-format"
    tm = disk.attributes.get("TM_MAD", "") or "its"
    return (f"disk {disk.disk_id} is a persistent {fmt} image on the {tm} TM whose snapshots"
            f" allow no orphans (ALLOW_ORPHANS {mode}): OpenNebula never deletes its"
            f" snapshot 0")


def first_snapshot_permanent(vm: VmInfo, disk: DiskInfo) -> str:
    """The reason the next snapshot of `disk` could never be deleted (it
    would be snapshot 0 of a disk as in `permanent_reason`), or ""."""
    if next_snapshot_id(vm, disk) != 0:
        return ""
    return permanent_reason(vm, disk)


def permanent_snapshot(vm: VmInfo, disk_id: int, snapshot_id: int, name: str = "",
                       ) -> PermanentSnapshot | None:
    """The existing snapshot, if oned will refuse to delete it."""
    disk = vm.disk(disk_id)
    if disk is None or snapshot_id != 0:
        return None
    reason = permanent_reason(vm, disk)
    if not reason:
        return None
    return PermanentSnapshot(vm.id, disk_id, snapshot_id, name, reason)


def wants_qcow2_base(vm: VmInfo) -> bool:
    """The owner's opt-in: ONEBACK_QCOW2_BASE="yes" in the VM's user template."""
    return vm.user_template.get(QCOW2_BASE_ATTRIBUTE, "").strip().lower() in (
        "yes", "true", "1", "on")


@dataclass(frozen=True)
class DiskPlan:
    read: tuple[DiskInfo, ...]       # saved and read through the proxy VM
    excluded: tuple[DiskInfo, ...]   # by flag or attribute: restored as empty disks
    volatile: tuple[DiskInfo, ...]   # no image: definition kept, data not saved
    skipped: tuple[DiskInfo, ...]    # read-only/CD-ROM disks: the image itself is kept
    warnings: tuple[str, ...]
    via: Mapping[int, ReadVia] = field(default_factory=dict)  # how each read disk is read
    refused: tuple[DiskInfo, ...] = ()  # reading them would leave a snapshot forever
    refusals: tuple[str, ...] = ()      # why, and how to opt in (also in `warnings`)

    def how(self, disk: DiskInfo) -> ReadVia:
        return self.via.get(disk.disk_id, ReadVia.SNAPSHOT)


def plan_disks(vm: VmInfo, exclude: Iterable[int] = (), *, qcow2_base: bool = False,
               ) -> DiskPlan:
    """Split `vm`'s disks by what a backup does with each, and decide how
    each read disk is read. A disk whose first snapshot would be permanent
    (`first_snapshot_permanent`) is saved directly when the VM is stopped
    (POWEROFF, SUSPENDED: oned's set_saveas_state accepts both), read
    through a kept `oneback-base` snapshot when the owner
    (ONEBACK_QCOW2_BASE) or the operator (`qcow2_base`) opted in, and
    otherwise refused with a warning that says why and how to opt in."""
    excluded_ids = set(exclude) | set(
        parse_disk_ids(vm.user_template.get(EXCLUDE_ATTRIBUTE, ""),
                       f"VM {vm.id}'s {EXCLUDE_ATTRIBUTE}"))
    warnings: list[str] = []
    known = {d.disk_id for d in vm.disks}
    for missing in sorted(excluded_ids - known):
        warnings.append(f"disk {missing} was excluded but VM {vm.id} has no such disk")
    read, excluded, volatile, skipped, refused = [], [], [], [], []
    refusals: list[str] = []
    via: dict[int, ReadVia] = {}
    stopped = vm.state in (VM_POWEROFF, VM_SUSPENDED)
    base_ok = qcow2_base or wants_qcow2_base(vm)
    for disk in vm.disks:
        if disk.disk_id in excluded_ids:
            excluded.append(disk)
        elif disk.volatile:
            volatile.append(disk)
            warnings.append(
                f"disk {disk.disk_id} is volatile ({disk.type or 'no image'}): its data cannot"
                f" be saved as an image and is not backed up; a restore recreates it empty")
        elif is_readonly(disk.attributes):
            skipped.append(disk)
            warnings.append(
                f"disk {disk.disk_id} is read-only ({disk.type}): not backed up; a restore"
                f" uses image {disk.image_id} as it is")
        elif not (why := first_snapshot_permanent(vm, disk)):
            read.append(disk)
        elif stopped:
            read.append(disk)
            via[disk.disk_id] = ReadVia.DIRECT
        elif base_ok:
            read.append(disk)
            via[disk.disk_id] = ReadVia.BASE
        else:
            refused.append(disk)
            refusals.append(
                f"disk {disk.disk_id} was not backed up (a restore recreates it empty): {why},"
                f" so a backup snapshot of it would stay forever. Either back it up while"
                f" VM {vm.id} is powered off (it is then saved without a snapshot), or opt in"
                f" to a permanent"
                f" {BASE_SNAPSHOT!r} snapshot that later backups build on: set"
                f" {QCOW2_BASE_ATTRIBUTE}=\"yes\" on the VM, or qcow2_base = true in the"
                f" [backup] section of the configuration (README: storage drivers)")
    return DiskPlan(tuple(read), tuple(excluded), tuple(volatile), tuple(skipped),
                    (*warnings, *refusals), via, tuple(refused), tuple(refusals))


_DURATION = re.compile(r"^\s*([0-9]{1,9})\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, where: str) -> int:
    """`"48h"` -> 172800 seconds. Units s, m, h, d, w. Raises UsageError naming `where`."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) <= 0:
        raise UsageError(
            f"{where} is {shown(text)}: it must be a positive duration such as 30m, 48h, 7d"
            f" or 2w")
    return int(m.group(1)) * _UNITS[m.group(2)]


# ---------------------------------------------------------------------------
# Opt-in tags on a VM's USER_TEMPLATE (set by its owner) and what is due.

OPT_IN = "ONEBACK"
LABEL = "oneback"
TRIGGERS = frozenset({"poweroff"})
DEFAULT_INTERVAL = 24 * 3600


@dataclass(frozen=True)
class VmPolicy:
    """What a VM's owner asked for, read from its own tags only."""

    opted_in: bool
    interval: int
    keep: KeepPolicy | None       # ONEBACK_KEEP; None: the configured [retention]
    exclude: frozenset[int]
    on: frozenset[str]
    snapshot: str | None          # a requested pre-change snapshot set
    snapshot_ttl: int | None
    error: str                    # a bad tag: reported on the VM, nothing else done
    note: str = ""                # what the agent changed (an interval raised to the floor)
    floor: int = 0                # the operator's min_interval: no backup more often


def _labels(text: str) -> set[str]:
    return {part.strip().lower() for label in text.split(",") for part in label.split("/")}


def format_duration(seconds: int) -> str:
    """3600 -> "1h" (the largest unit that divides it)."""
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def vm_policy(vm: VmInfo, min_interval: int = 0) -> VmPolicy:
    """Read the oneback tags of `vm`. Never raises: a bad value becomes `error`.
    An ONEBACK_INTERVAL below the operator's `min_interval` is raised to it,
    and `note` says so (for ONEBACK_STATUS)."""
    tags = vm.user_template
    value = tags.get(OPT_IN, "").strip().lower()
    opted_in = value in ("yes", "true", "1", "on") or (
        value not in ("no", "false", "0", "off") and LABEL in _labels(tags.get("LABELS", "")))
    errors: list[str] = []
    interval = DEFAULT_INTERVAL
    if tags.get("ONEBACK_INTERVAL", "").strip():
        try:
            interval = parse_duration(tags["ONEBACK_INTERVAL"], "ONEBACK_INTERVAL")
        except UsageError as e:
            errors.append(e.message)
    note = ""
    if interval < min_interval:
        note = (f"ONEBACK_INTERVAL={format_duration(interval)} is below the minimum of"
                f" {format_duration(min_interval)} set by the operator: backed up every"
                f" {format_duration(min_interval)}")
        interval = min_interval
    keep = None
    if (k := tags.get("ONEBACK_KEEP", "").strip()):
        try:
            keep = parse_keep(k, "ONEBACK_KEEP")
        except UsageError as e:
            errors.append(e.message)
    exclude: frozenset[int] = frozenset()
    try:
        exclude = parse_disk_ids(tags.get(EXCLUDE_ATTRIBUTE, ""), EXCLUDE_ATTRIBUTE)
    except UsageError as e:
        errors.append(e.message)
    on = frozenset(t.strip().lower() for t in tags.get("ONEBACK_ON", "").split(",")
                   if t.strip())
    if on - TRIGGERS:
        errors.append(f"ONEBACK_ON has {shown(', '.join(sorted(on - TRIGGERS)))}: the known"
                      f" triggers are {', '.join(sorted(TRIGGERS))}")
    snapshot = tags.get("ONEBACK_SNAPSHOT", "").strip() or None
    if snapshot and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", snapshot):
        errors.append(f"ONEBACK_SNAPSHOT is {shown(snapshot)}: a snapshot set name is 1-63"
                      f" letters, digits, '.', '_' or '-', starting with a letter or digit")
        snapshot = None
    ttl = None
    if snapshot and (t := tags.get("ONEBACK_SNAPSHOT_TTL", "").strip()):
        try:
            ttl = parse_duration(t, "ONEBACK_SNAPSHOT_TTL")
        except UsageError as e:
            errors.append(e.message)
    return VmPolicy(opted_in, interval, keep, exclude, on, snapshot, ttl, "; ".join(errors),
                    note, min_interval)


@dataclass(frozen=True)
class Due:
    """Work the agent should queue for a VM, with why."""

    kind: str          # "backup" | "snapshot"
    reason: str
    params: Mapping[str, str]


def due_work(vm: VmInfo, pol: VmPolicy, last_backup: float | None, now: float,
             last_finished: float | None = None) -> list[Due]:
    """Level-triggered: what is due for `vm` now, from its document, its tags
    and when its last backup started (and finished). The same inputs always
    give the same answer, however often it is asked.

    "Powered off since its last backup" is read from the VM's last HISTORY
    record: oned sets its RETIME when the VM stops running -- and again when
    any operation on a powered-off VM completes (trigger_poweroff_success),
    including the backup's own snapshot and save-as. So it is compared with
    the time the last backup *finished*, after all of its own operations."""
    if not pol.opted_in or pol.error:
        return []
    work: list[Due] = []
    if pol.snapshot:
        params = {"name": pol.snapshot}
        if pol.snapshot_ttl:
            params["ttl"] = str(pol.snapshot_ttl)
        work.append(Due("snapshot", f"ONEBACK_SNAPSHOT={pol.snapshot}", params))
    if vm.state not in (3, 5, 8):  # only ACTIVE, SUSPENDED, POWEROFF VMs take snapshots
        return work
    if last_backup is None:
        work.append(Due("backup", "first backup", {}))
    elif "poweroff" in pol.on and vm.state == 8 and vm.running_end > (
            last_finished if last_finished is not None else last_backup) and (
            now - last_backup >= pol.floor):   # power cycling does not beat the floor
        work.append(Due("backup", "powered off since its last backup", {}))
    elif now - last_backup >= pol.interval:
        work.append(Due("backup", f"last backup older than {pol.interval}s", {}))
    return work
