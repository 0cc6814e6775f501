"""Pure decisions: which disks of a VM a backup reads, skips or excludes.

Owns: the interpretation of exclusion flags and of the VM's
`ONEBACK_EXCLUDE_DISKS` attribute, and the rules for disks that cannot be
saved as images. Must not: do I/O. Everything here is a function of the VM
document and the request, so it can be re-decided from a fresh `one.vm.info`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.errors import UsageError
from agent.model import DiskInfo, VmInfo

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


@dataclass(frozen=True)
class DiskPlan:
    read: tuple[DiskInfo, ...]       # saved and read through the proxy VM
    excluded: tuple[DiskInfo, ...]   # by flag or attribute: restored as empty disks
    volatile: tuple[DiskInfo, ...]   # no image: definition kept, data not saved
    skipped: tuple[DiskInfo, ...]    # read-only/CD-ROM disks: the image itself is kept
    warnings: tuple[str, ...]


def plan_disks(vm: VmInfo, exclude: Iterable[int] = ()) -> DiskPlan:
    """Split `vm`'s disks by what a backup does with each."""
    excluded_ids = set(exclude) | set(
        parse_disk_ids(vm.user_template.get(EXCLUDE_ATTRIBUTE, ""),
                       f"VM {vm.id}'s {EXCLUDE_ATTRIBUTE}"))
    warnings: list[str] = []
    known = {d.disk_id for d in vm.disks}
    for missing in sorted(excluded_ids - known):
        warnings.append(f"disk {missing} was excluded but VM {vm.id} has no such disk")
    read, excluded, volatile, skipped = [], [], [], []
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
        else:
            read.append(disk)
    return DiskPlan(tuple(read), tuple(excluded), tuple(volatile), tuple(skipped),
                    tuple(warnings))


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
    keep: int | None
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
        if re.fullmatch(r"[0-9]{1,9}", k) and int(k) > 0:
            keep = int(k)
        else:
            errors.append(f"ONEBACK_KEEP is {shown(k)}: it must be a positive number of"
                          f" backups")
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
