"""Temporary cloud objects: disk snapshot -> image -> attachment to the proxy
VM, and their removal, always journaled.

Owns: the names of everything oneback creates in the cloud (`oneback-...`),
the rule that an object is recorded in the catalog journal *before* the call
that creates it, its removal on success and on failure, and the sweeps that
remove what a crashed run left behind (`sweep`) or anything named
`oneback-tmp-` that no live run owns (`cleanup`) — except a disk snapshot
oned will never delete, which is reported as kept, not as a failure. Must
not: read or write disk data, or decide which disks to back up.

Every object is created under a name no one else uses,
`oneback-tmp-<owner>-<random>-<what>`, and the journal holds that name. The
sweeps only ever remove an object that still carries its journaled unique
name (an object a caller renamed to its final name is committed and left
alone; an image only while a VM uses it) and, when they look objects up by
name, only objects owned by the user oneback runs as: never something a
user named.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from agent.cloud import Cloud
from agent.errors import CloudError, DeviceError, NotFound, OnebackError, StateError
from agent.lease import HotplugBusy, hotplug_lock, is_alive
from agent.model import (
    LCM_RUNNING,
    OBJECT_PREFIX,
    VM_ACTIVE,
    DiskInfo,
    JournalEntry,
    JournalKind,
    PermanentSnapshot,
)
from agent.policy import permanent_snapshot

TEMP_PREFIX = OBJECT_PREFIX + "tmp-"
SERIAL_MAX = 20  # virtio-blk truncates serials to 20 bytes
MiB = 1024 * 1024
# TM_MADs whose clone and snapshot of a qcow2 disk are overlays, not copies
# (src/tm_mad/qcow2/clone `qemu-img create -b`, snap_create[_live]; `shared`
# is a link to `qcow2` in 7.x).
_OVERLAY_TMS = ("qcow2", "shared")


def tm_copied(op: str, disk: Mapping[str, str], size: int) -> int:
    """The bytes OpenNebula's transfer manager copies for one operation on
    a disk of `size` bytes, from what oned shows of the DISK (TM_MAD,
    FORMAT, LN_TARGET, CLONE) and what its drivers do (src/tm_mad/*):
    `snapshot` copies a raw file (`cp`) but overlays a qcow2 one (ceph: an
    rbd snapshot); `cpds` (a save-as) is a full copy; `attach` of a
    non-persistent image is a clone (a copy; a qcow2 overlay on qcow2/shared),
    of a persistent one a link: nothing where LN_TARGET is NONE, else a copy
    into the system datastore and, on detach (`mvds`), one back."""
    tm_mad = disk.get("TM_MAD", "")
    qcow2 = (disk.get("FORMAT") or disk.get("DRIVER") or "").lower() == "qcow2"
    if op == "snapshot":
        return 0 if qcow2 or tm_mad == "ceph" else size
    if op == "cpds":
        return size
    if op == "attach":
        if (disk.get("CLONE") or "").upper() == "YES":
            standalone = (disk.get("QCOW2_STANDALONE") or "").upper() == "YES"
            return 0 if tm_mad in _OVERLAY_TMS and qcow2 and not standalone else size
        if (disk.get("LN_TARGET") or "NONE").upper() == "NONE":
            return 0
        return 2 * size if (disk.get("SAVE") or "").upper() == "YES" else size
    raise ValueError(f"unknown transfer operation {op!r}")


def new_serial() -> str:
    """A SERIAL for one attachment, unique across jobs, processes and agents
    (48 random bits), and whole within virtio-blk's 20 bytes: two disks with
    one serial make udev point the by-id name at the latest, and a backup
    would read another VM's disk."""
    serial = OBJECT_PREFIX + secrets.token_hex((SERIAL_MAX - len(OBJECT_PREFIX)) // 2)
    assert len(serial) <= SERIAL_MAX
    return serial


@contextmanager
def hotplug(cloud: Cloud, catalog_path: Path, vm_id: int) -> Iterator[None]:
    """Hold VM `vm_id`'s hot-plug lock (every oneback process sharing the
    catalog) around one attach or detach: oned refuses a hot-plug while
    another runs ("wrong state HOTPLUG")."""
    try:
        with hotplug_lock(catalog_path, vm_id, cloud.operation_timeout):
            yield
    except HotplugBusy:
        raise CloudError(f"another oneback process has been attaching or detaching a disk"
                         f" of VM {vm_id} for {cloud.operation_timeout:g}s; try again later",
                         transient=True) from None


class Journal(Protocol):
    """The part of the catalog this module needs."""

    def journal_record(self, kind: JournalKind, name: str, job: str,
                       vm_id: int | None = None, disk_id: int | None = None) -> JournalEntry: ...
    def journal_created(self, entry_id: int, one_id: int) -> None: ...
    def journal_done(self, entry_id: int) -> None: ...
    def journal_pending(self) -> list[JournalEntry]: ...
    @property
    def path(self) -> Path:
        """The catalog file; the locks its processes share live beside it."""


@dataclass
class Workspace:
    """The temporary objects of one job (`owner` is its lease). Every
    context manager below undoes what it created on the way out, success or
    failure; an undo that fails is kept in the journal for the next sweep and
    reported in `leftovers`."""

    cloud: Cloud
    journal: Journal
    owner: str
    proxy_vm_id: int
    leftovers: list[str] = field(default_factory=list)
    attach_slots: threading.Semaphore | None = None  # limits disks on the proxy at once
    copies: list[int] = field(default_factory=list)  # bytes OpenNebula copied (tm_copied)

    def copied(self, op: str, disk: Mapping[str, str], size: int) -> None:
        """Count what OpenNebula copies for `op` on a disk (`tm_copied`)."""
        self.copies.append(tm_copied(op, disk, size))

    @property
    def cloud_bytes_copied(self) -> int:
        """The bytes OpenNebula's drivers copied for this job's disks so far."""
        return sum(self.copies)

    def name(self, what: str) -> str:
        """A name for a new object that no other object has:
        `oneback-tmp-<owner>-<random>-<what>`."""
        return f"{TEMP_PREFIX}{self.owner}-{secrets.token_hex(4)}-{what}"

    def _create(self, kind: JournalKind, name: str, create: Callable[[], int],
                vm_id: int | None, disk_id: int | None) -> tuple[JournalEntry, int]:
        """Journal, then create. If creating fails, the call may still have
        been accepted: the object is looked for by name and removed."""
        entry = self.journal.journal_record(kind, name, self.owner, vm_id=vm_id, disk_id=disk_id)
        try:
            one_id = create()
        except BaseException:
            self._undo(entry, lambda: remove_entry(self.cloud, entry, self.proxy_vm_id,
                                                   self.journal.path))
            raise
        self.journal.journal_created(entry.id, one_id)
        return entry, one_id

    @contextmanager
    def _journaled(self, kind: JournalKind, name: str, create: Callable[[], int],
                   remove: Callable[[int], None], vm_id: int | None = None,
                   disk_id: int | None = None) -> Iterator[int]:
        entry, one_id = self._create(kind, name, create, vm_id, disk_id)
        try:
            yield one_id
        finally:
            self._undo(entry, lambda: remove(one_id))

    @contextmanager
    def provisional(self, kind: JournalKind, name: str, create: Callable[[], int],
                    remove: Callable[[int], None], vm_id: int | None = None) -> Iterator[int]:
        """An object that is kept if the block exits normally (its journal
        entry is closed) and removed if it exits with an error."""
        entry, one_id = self._create(kind, name, create, vm_id, None)
        try:
            yield one_id
        except BaseException:
            self._undo(entry, lambda: remove(one_id))
            raise
        self.journal.journal_done(entry.id)

    def temporary(self, kind: JournalKind, name: str, create: Callable[[], int],
                  remove: Callable[[int], None],
                  vm_id: int | None = None) -> AbstractContextManager[int]:
        """An object removed when the block exits, however it exits."""
        return self._journaled(kind, name, create, remove, vm_id=vm_id)

    def _undo(self, entry: JournalEntry, action: Callable[[], object]) -> None:
        try:
            action()
        except (OnebackError, OSError) as e:
            self.leftovers.append(f"{entry.kind.value} {entry.name} was not removed: {e}")
        else:
            self.journal.journal_done(entry.id)

    def snapshot(self, vm_id: int, disk_id: int) -> AbstractContextManager[int]:
        """A disk snapshot of `vm_id`'s disk, deleted on exit. Yields its id."""
        name = self.name(f"d{disk_id}")
        return self._journaled(
            JournalKind.SNAPSHOT, name,
            lambda: self.cloud.snapshot_create(vm_id, disk_id, name),
            lambda snap_id: self.cloud.snapshot_delete(vm_id, disk_id, snap_id),
            vm_id=vm_id, disk_id=disk_id)

    @contextmanager
    def saved_image(self, vm_id: int, disk_id: int, snap_id: int) -> Iterator[int]:
        """The snapshot saved as a new image (the one copy of the disk a
        backup makes), deleted on exit. Yields its id. Made persistent where
        its datastore links persistent images in place (`links_in_place`), so
        its attachment to the proxy is a link, not a clone into the system
        datastore; a persistent image no VM uses is deleted like any other
        (the journal holds it either way)."""
        name = self.name(f"vm{vm_id}-d{disk_id}")
        with self._journaled(
                JournalKind.IMAGE, name,
                lambda: self.cloud.disk_saveas(vm_id, disk_id, name, snap_id),
                self.cloud.image_delete, vm_id=vm_id, disk_id=disk_id) as image_id:
            image = self.cloud.image(image_id)
            self.copied("cpds", {}, image.size_mb * MiB)   # oned's SIZE of the copy
            if not image.persistent and self.cloud.links_in_place(image.datastore_id):
                self.cloud.image_persistent(image_id, True)
            yield image_id

    @contextmanager
    def attached(self, image_id: int, gone: Callable[[str], None] | None = None,
                 readonly: bool = False) -> Iterator[DiskInfo]:
        """The image attached to the proxy VM with a SERIAL of its own
        (`new_serial`, journaled before the attach), READONLY="YES" when
        `readonly`, detached on exit; then `gone(serial)` waits until the
        proxy VM no longer shows it (a DeviceError from it is reported in
        `leftovers`). The yielded disk's `size_mb` is the image's size; what
        OpenNebula copied to attach it (and will copy back on detach) is
        counted in `copies`."""
        with self.attach_slots or nullcontext(), \
                self._attached(image_id, gone, readonly) as disk:
            yield disk

    @contextmanager
    def _attached(self, image_id: int, gone: Callable[[str], None] | None,
                  readonly: bool) -> Iterator[DiskInfo]:
        proxy = self.cloud.wait_settled(self.proxy_vm_id)
        if not (proxy.state == VM_ACTIVE and proxy.lcm_state == LCM_RUNNING):
            raise StateError(
                f"the proxy VM {self.proxy_vm_id} is {proxy.state_name}: it must be RUNNING"
                f" for oneback to read disks through it (check proxy.vm_id)")
        serial = new_serial()
        disks: dict[int, DiskInfo] = {}

        def create() -> int:
            with hotplug(self.cloud, self.journal.path, self.proxy_vm_id):
                disk = self.cloud.attach(self.proxy_vm_id, image_id, serial, readonly)
            if disk.size_mb <= 0:  # oned copies the image's SIZE into the DISK
                disk = replace(disk, size_mb=self.cloud.image(image_id).size_mb)
            self.copied("attach", disk.attributes, disk.size_bytes)
            disks[disk.disk_id] = disk
            return disk.disk_id

        def remove(_disk_id: int) -> None:
            # By SERIAL, never by `disk_id` alone: once this attachment is
            # gone (an operator's detach), oned gives the next disk attached
            # the same DISK_ID, and that is another run's or agent's disk.
            detach_serial(self.cloud, self.journal.path, self.proxy_vm_id, serial)
            if gone is not None:
                try:
                    gone(serial)
                except DeviceError as e:
                    self.leftovers.append(f"attachment {serial} was detached, but {e}")

        with self._journaled(JournalKind.ATTACHMENT, serial, create, remove,
                             vm_id=self.proxy_vm_id) as disk_id:
            yield disks[disk_id]


def detach_serial(cloud: Cloud, catalog_path: Path, vm_id: int, serial: str) -> None:
    """Detach from VM `vm_id` every disk with this SERIAL, looked up under
    the hot-plug lock (no other oneback process can attach a disk, and so
    reuse a DISK_ID, in between). Idempotent: no such disk or VM is fine."""
    with hotplug(cloud, catalog_path, vm_id):
        try:
            vm = cloud.vm(vm_id)
        except NotFound:
            return
        for disk in vm.disks:
            if disk.serial == serial:
                cloud.detach(vm_id, disk.disk_id)


def is_temporary(name: str) -> bool:
    """A name `Workspace.name` made (never one a user chose)."""
    return name.startswith(TEMP_PREFIX)


_BACKUP_SNAPSHOT = re.compile(
    re.escape(TEMP_PREFIX) + r"[0-9a-f]{8}-(?:[0-9a-f]{8}-)?d([0-9]{1,9})")


def is_backup_snapshot(name: str, disk_id: int) -> bool:
    """A disk snapshot exactly as `Workspace.snapshot` names it for this disk
    (`oneback-tmp-<owner>-<random>-d<disk>`, or an older oneback's
    `oneback-tmp-<owner>-d<disk>`). Snapshots have no owner to check, so a
    lost catalog's leftovers are recognised by this shape alone: a tenant's
    snapshot that merely starts with `oneback-tmp-` is never touched."""
    m = _BACKUP_SNAPSHOT.fullmatch(name)
    return m is not None and int(m.group(1)) == disk_id


def _left(entry: JournalEntry, why: str) -> str:
    one_id = f" (id {entry.one_id})" if entry.one_id is not None else ""
    return f"{entry.kind.value} {entry.name}{one_id}: {why}"


def _kept(p: PermanentSnapshot) -> str:
    return (f"snapshot {p.name} (id {p.snapshot_id}) of VM {p.vm_id}: {p.reason}; it stays"
            f" until the disk is deleted, and is not counted as a failure")


_RENAMED = "renamed to its final name since, so committed: left alone"


def remove_entry(cloud: Cloud, entry: JournalEntry, proxy_vm_id: int,
                 catalog_path: Path) -> list[str]:
    """Remove the cloud object a journal entry stands for. Images, templates
    and VMs are found by id when known and removed only if they still carry
    the entry's unique temporary name (renamed means committed, except an
    image no VM uses: its restore's VM never got its final name); else by that
    name among the objects of oneback's own user. A disk snapshot oned will
    never delete is left alone. Returns why each object left alone was kept
    (empty: nothing of the entry remains). An attachment is found by its
    SERIAL only (unique; oned reuses a disk id for the next disk attached,
    which may be another run's). Idempotent: an object already gone is fine."""
    kind = entry.kind
    if kind is JournalKind.ATTACHMENT:
        detach_serial(cloud, catalog_path,
                      entry.vm_id if entry.vm_id is not None else proxy_vm_id, entry.name)
        return []
    if kind is JournalKind.SNAPSHOT:
        if entry.vm_id is None:
            return []
        if not entry.name.startswith(OBJECT_PREFIX):
            return [_left(entry, "not a name oneback makes: left alone")]
        try:
            vm = cloud.vm(entry.vm_id)
        except NotFound:
            return []
        kept = []
        for snap in vm.snapshots:
            if snap.name == entry.name and (entry.disk_id is None or snap.disk_id == entry.disk_id):
                permanent = permanent_snapshot(vm, snap.disk_id, snap.snapshot_id, snap.name)
                if permanent is not None:
                    kept.append(_kept(permanent))
                else:
                    cloud.snapshot_delete(entry.vm_id, snap.disk_id, snap.snapshot_id)
        return kept
    if not is_temporary(entry.name):
        # an entry of an older oneback under a user's name: never match it
        return [_left(entry, "not a temporary name: left alone")]
    me = cloud.user_id()
    if kind is JournalKind.IMAGE:
        if entry.one_id is not None:
            try:
                image = cloud.image(entry.one_id)
            except NotFound:
                return []
            if image.name != entry.name and image.running_vms > 0:
                return [_left(entry, _RENAMED)]
            # Renamed, yet its run died before closing the entry, and no VM
            # uses it: restore_vm renames its images before its VM (the
            # commit), and the sweep has just terminated that VM, which
            # still had its temporary name. Rolled back with it.
            cloud.image_delete(image.id)
            return []
        for image in cloud.images():
            if image.name == entry.name and image.uid == me:
                cloud.image_delete(image.id)
        return []
    if kind is JournalKind.TEMPLATE:
        for template_id, name, uid in cloud.templates():
            if (template_id == entry.one_id if entry.one_id is not None
                    else uid == me) and name == entry.name:
                cloud.template_delete(template_id)
        return []
    if entry.one_id is not None:  # a VM
        try:
            vm = cloud.vm(entry.one_id)
        except NotFound:
            return []
        if vm.name != entry.name:
            return [_left(entry, _RENAMED)]
        cloud.terminate(vm.id)
        return []
    for vm in cloud.vms():
        if vm.name == entry.name and vm.uid == me:
            cloud.terminate(vm.id)
    return []


# Attachments go before images (an attached image cannot be deleted); VMs
# before the images they use.
_ORDER = {JournalKind.ATTACHMENT: 0, JournalKind.VM: 1, JournalKind.TEMPLATE: 2,
          JournalKind.IMAGE: 3, JournalKind.SNAPSHOT: 4}


@dataclass(frozen=True)
class SweepReport:
    removed: tuple[str, ...]
    failed: tuple[str, ...]
    skipped_live: int
    kept: tuple[str, ...] = ()   # left alone, with why: renamed (committed) objects,
                                 # snapshots oned will never delete


def sweep(cloud: Cloud, journal: Journal, catalog_path: Path, proxy_vm_id: int) -> SweepReport:
    """Remove every journaled object whose owner is no longer running.
    Idempotent; what cannot be removed now stays journaled."""
    removed: list[str] = []
    failed: list[str] = []
    kept: list[str] = []
    live = 0
    entries = sorted(journal.journal_pending(), key=lambda e: (_ORDER[e.kind], -e.id))
    for entry in entries:
        if is_alive(catalog_path, entry.job):
            live += 1
            continue
        try:
            left = remove_entry(cloud, entry, proxy_vm_id, catalog_path)
        except (OnebackError, OSError) as e:
            failed.append(f"{entry.kind.value} {entry.name}: {e}")
            continue
        journal.journal_done(entry.id)   # kept objects: nothing more can be done
        if left:
            kept.extend(left)
        else:
            removed.append(f"{entry.kind.value} {entry.name}")
    return SweepReport(tuple(removed), tuple(failed), live, tuple(kept))


def cleanup(cloud: Cloud, journal: Journal, catalog_path: Path,
            proxy_vm_id: int, also_live: Callable[[str], bool] | None = None) -> SweepReport:
    """`sweep`, then remove anything in the cloud named `oneback-tmp-...`
    that no live run owns — also what a lost catalog no longer knows about:
    proxy attachments, disk snapshots on any VM, and the images, VM
    templates and VMs of oneback's own user. `also_live(owner)`: whether
    a run of another catalog (an agent sharing the repository, holding a
    VM's lease) owns the objects named after `owner`."""
    first = sweep(cloud, journal, catalog_path, proxy_vm_id)
    removed, failed, kept = list(first.removed), list(first.failed), list(first.kept)
    live_names = {e.name for e in journal.journal_pending() if is_alive(catalog_path, e.job)}

    def owned_by_live(name: str) -> bool:
        if name in live_names:
            return True
        owner = name.removeprefix(TEMP_PREFIX).split("-", 1)[0]
        return is_alive(catalog_path, owner) or (also_live is not None and also_live(owner))

    def attempt(what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except (OnebackError, OSError) as e:
            failed.append(f"{what}: {e}")
        else:
            removed.append(what)

    try:
        proxy = cloud.vm(proxy_vm_id)
    except NotFound:
        proxy = None

    def detach(disk_id: int) -> None:
        with hotplug(cloud, catalog_path, proxy_vm_id):
            cloud.detach(proxy_vm_id, disk_id)

    if proxy is not None:
        for disk in proxy.disks:
            # oneback's attachments: a random `oneback-` SERIAL, or an image
            # named `oneback-tmp-<owner>-...`. Live while journaled by a live
            # run, or while the image's owner runs (a serial names no owner).
            image_name = disk.attributes.get("IMAGE", "")
            if disk.serial.startswith(OBJECT_PREFIX) or image_name.startswith(TEMP_PREFIX):
                if disk.serial in live_names or (
                        image_name.startswith(TEMP_PREFIX) and owned_by_live(image_name)):
                    continue
                # by SERIAL when it has one: between the listing above and the
                # detach, another cleanup may detach this disk and a live run
                # attach its own under the same DISK_ID
                attempt(f"attachment {disk.serial or image_name}",
                        partial(detach_serial, cloud, catalog_path, proxy_vm_id, disk.serial)
                        if disk.serial else partial(detach, disk.disk_id))
    me = cloud.user_id()
    vms = cloud.vms()
    for vm in vms:
        if is_temporary(vm.name) and vm.uid == me and not owned_by_live(vm.name):
            attempt(f"vm {vm.name}", partial(cloud.terminate, vm.id))
    for template_id, name, uid in cloud.templates():
        if is_temporary(name) and uid == me and not owned_by_live(name):
            attempt(f"template {name}", partial(cloud.template_delete, template_id))
    for image in cloud.images():
        if is_temporary(image.name) and image.uid == me and not owned_by_live(image.name):
            attempt(f"image {image.name}", partial(cloud.image_delete, image.id))
    for vm in vms:
        for snap in vm.snapshots:
            if is_backup_snapshot(snap.name, snap.disk_id) and not owned_by_live(snap.name):
                permanent = permanent_snapshot(vm, snap.disk_id, snap.snapshot_id, snap.name)
                if permanent is not None:   # reported once, never tried
                    if _kept(permanent) not in kept:
                        kept.append(_kept(permanent))
                    continue
                attempt(f"snapshot {snap.name} of VM {vm.id}",
                        partial(cloud.snapshot_delete, vm.id, snap.disk_id, snap.snapshot_id))
    return SweepReport(tuple(removed), tuple(failed), first.skipped_live, tuple(kept))

