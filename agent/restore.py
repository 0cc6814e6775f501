"""The restore use cases: a whole VM, one disk as an image, or one disk to a file.

Owns: the order of a restore — disks first (excluded disks become empty
images of the same size; data disks are written through the proxy VM into a
new empty persistent image, attached read-write (a link, no clone), detached,
and given the original's persistence; volatile disks are recreated from their
definition), then a template
from the saved VM document, instantiated (deployed into the chosen SYSTEM
datastore), the template deleted, and the VM waited for until RUNNING; then
the VM and images are given to their original owner and group (when these
still exist) and, last, renamed to their final names. Until that rename every
object carries a unique temporary name (`Workspace.name`), so a failure or a
kill at any point removes only what this restore created, never an object a
user named. If any step fails, everything this restore created is removed
and the error names the step and anything that could not be removed. Must
not: print, or talk to pyone, SQL or /dev directly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from agent import policy, vmtemplate, writer, xmldoc
from agent.attach import Journal, Workspace
from agent.backup import Settings
from agent.cloud import IMAGE_TYPES, Cloud
from agent.errors import (
    CloudError,
    NotFound,
    OnebackError,
    StateError,
    UsageError,
)
from agent.model import (
    LCM_RUNNING,
    VM_ACTIVE,
    BackupRecord,
    BlockRecord,
    DiskBackup,
    JournalKind,
)
from agent.progress import Progress, Quiet
from agent.store import ChunkStore

MiB = 1024 * 1024
MONITORED = 2


class RestoreCatalog(Journal, Protocol):
    def get_backup(self, backup_id: int) -> BackupRecord: ...
    def vm_document(self, backup_id: int) -> str: ...
    def image_documents(self, backup_id: int) -> dict[int, str]: ...
    def blocks(self, backup_id: int, disk_id: int) -> Iterator[BlockRecord]: ...


@dataclass(frozen=True)
class RestoredImage:
    disk_id: int
    image_id: int
    bytes_written: int


@dataclass(frozen=True)
class RestoreResult:
    """A restored VM. `warnings`: temporary objects that could not be removed
    (journaled; `oneback cleanup` retries); `notes`: what was not as the
    backup had it (an owner that no longer exists)."""

    vm_id: int
    name: str
    template_deleted: bool
    images: tuple[RestoredImage, ...]
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiskRestoreResult:
    """One disk restored as an image; `warnings` and `notes` as RestoreResult."""

    image: RestoredImage
    name: str
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


# PoolObjectSQL::name_is_valid (src/pool/PoolObjectSQL.cc): oned refuses a VM
# or image name holding any of these, or longer than NAME_MAX bytes.
INVALID_NAME_CHARS = "&|:\\\";/'#{}$<>\t\n\v\f\r"
NAME_MAX = 128


def fit(base: str, suffix: str = "") -> str:
    """`base` + `suffix` as a name oned accepts: every character of `base`
    oned refuses replaced by `_`, and `base` cut (at a character boundary)
    so that the whole is at most NAME_MAX bytes."""
    clean = "".join("_" if c in INVALID_NAME_CHARS else c for c in base)
    room = max(0, NAME_MAX - len(suffix.encode()))
    return clean.encode()[:room].decode(errors="ignore") + suffix


def check_name(name: str, option: str = "--name") -> str:
    """`name` if oned accepts it as a VM or image name, else a UsageError."""
    if not name.strip():
        raise UsageError(f"{option} is empty: give a name")
    bad = next((c for c in name if c in INVALID_NAME_CHARS), None)
    if bad is not None:
        raise UsageError(f"{option} {name!r} holds {bad!r}, which OpenNebula does not allow"
                         f" in a name: choose another {option}")
    if len(name.encode()) > NAME_MAX:
        raise UsageError(f"{option} is {len(name.encode())} bytes long; OpenNebula allows at"
                         f" most {NAME_MAX} in a name: choose a shorter {option}")
    return name


class _Steps:
    """Which step of a restore failed (the innermost), for the error message."""

    def __init__(self) -> None:
        self.failed: str | None = None

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        try:
            yield
        except OnebackError:
            if self.failed is None:
                self.failed = what
            raise


@contextmanager
def _reported(steps: _Steps, workspace: Workspace) -> Iterator[None]:
    """Outermost around a restore: once everything it created was undone,
    an error names the failed step and what could not be removed."""
    try:
        yield
    except OnebackError as e:
        if steps.failed is None:
            raise
        if workspace.leftovers:
            tail = ("not removed (journaled; 'oneback cleanup' retries): "
                    + "; ".join(workspace.leftovers))
        else:
            tail = "everything this restore created was removed"
        raise type(e)(f"restore failed while {steps.failed}: {e.message}; {tail}") from e


@dataclass
class _Restorer:
    backup: BackupRecord
    cloud: Cloud
    catalog: RestoreCatalog
    store: ChunkStore
    workspace: Workspace
    settings: Settings
    progress: Progress
    cancel: threading.Event | None
    image_docs: dict[int, str]
    notes: list[str] = field(default_factory=list)
    _exists: dict[tuple[str, int], bool] = field(default_factory=dict)

    def target_datastore(self, disk: DiskBackup, image_ds: int | None) -> int:
        if image_ds is not None:
            return image_ds
        if disk.image_id is not None and disk.image_id in self.image_docs:
            root = xmldoc.parse(self.image_docs[disk.image_id])
            ds = root.findtext("DATASTORE_ID")
            if ds and ds.lstrip("-").isdigit():
                return int(ds)
        if (ds_attr := disk.attributes.get("DATASTORE_ID", "")).isdigit():
            return int(ds_attr)
        return 1

    def original(self, disk: DiskBackup) -> tuple[str, bool]:
        """(image type name, persistent) of the disk's original image."""
        if disk.image_id is None or disk.image_id not in self.image_docs:
            return "DATABLOCK", False
        root = xmldoc.parse(self.image_docs[disk.image_id])
        type_text = root.findtext("TYPE") or "2"
        image_type = IMAGE_TYPES.get(int(type_text), "DATABLOCK") if type_text.isdigit() \
            else type_text
        return image_type, (root.findtext("PERSISTENT") or "0") == "1"

    def owner_of(self, disk: DiskBackup | None) -> tuple[int, int]:
        """(uid, gid) of the original image (of the VM when `disk` is None
        or its image document was not saved)."""
        doc = None
        if disk is not None and disk.image_id is not None:
            doc = self.image_docs.get(disk.image_id)
        root = xmldoc.parse(doc if doc is not None else self.catalog.vm_document(self.backup.id))
        uid, gid = root.findtext("UID") or "", root.findtext("GID") or ""
        return (int(uid) if uid.isdigit() else -1, int(gid) if gid.isdigit() else -1)

    def empty_image(self, stack: ExitStack, disk: DiskBackup, ds: int) -> int:
        """A new empty DATABLOCK of the disk's size, kept if the restore succeeds."""
        size_mb = max(1, -(-disk.size // MiB))
        name = self.workspace.name(f"r{self.backup.id}-d{disk.disk_id}-image")
        return stack.enter_context(self.workspace.provisional(
            JournalKind.IMAGE, name,
            lambda: self.cloud.image_allocate(
                {"NAME": name, "TYPE": "DATABLOCK", "SIZE": str(size_mb)}, ds),
            self.cloud.image_delete))

    def data_image(self, stack: ExitStack, disk: DiskBackup, ds: int) -> RestoredImage:
        """Write the backup's blocks through the proxy VM into a new image,
        kept (under a temporary name) if the restore succeeds. The image is
        allocated empty and persistent, so its attachment to the proxy is a
        link to the image itself (no clone of it into the system datastore)
        and the blocks are written once, into the image; after the detach it
        takes the original's persistence. No save-as of a written disk."""
        size_mb = max(1, -(-disk.size // MiB))
        name = self.workspace.name(f"r{self.backup.id}-d{disk.disk_id}-image")
        image_type, persistent = self.original(disk)
        # An empty image can be an OS disk or a DATABLOCK (Image::insert's mkfs)
        new_type = image_type if image_type in ("OS", "DATABLOCK") else "DATABLOCK"
        self.progress.phase(disk.disk_id, "create")
        image_id = stack.enter_context(self.workspace.provisional(
            JournalKind.IMAGE, name,
            lambda: self.cloud.image_allocate(
                {"NAME": name, "TYPE": new_type, "SIZE": str(size_mb),
                 "PERSISTENT": "YES"}, ds),
            self.cloud.image_delete))
        self.progress.phase(disk.disk_id, "attach")
        with self.workspace.attached(image_id, gone=self.settings.device_gone) as proxy_disk:
            path = self.settings.device(proxy_disk, self.cancel)
            self.progress.disk_size(disk.disk_id, disk.size)
            self.progress.phase(disk.disk_id, "write")
            written = writer.write_disk(
                path, self.catalog.blocks(self.backup.id, disk.disk_id), self.store,
                size=disk.size, block_size=disk.block_size, workers=self.settings.workers,
                progress=self.progress.advanced, cancel=self.cancel,
                where=f"backup {self.backup.id} disk {disk.disk_id}")
            self.progress.phase(disk.disk_id, "detach")
        if self.cloud.image(image_id).running_vms > 0:
            # its detach failed (in `leftovers`): the written image is still
            # the proxy's disk, and no VM can use it
            raise CloudError(f"image {image_id}, the restored disk {disk.disk_id}, is still"
                             f" attached to the proxy VM {self.settings.proxy_vm_id}: its"
                             f" detach failed", transient=True)
        if not persistent:   # only once no VM uses it (ImageAPI::persistent)
            self.cloud.image_persistent(image_id, False)
        return RestoredImage(disk.disk_id, image_id, written)

    def give(self, what: str, chown: Callable[[int, int], None], uid: int, gid: int) -> None:
        """Give an object to the original user and group where they still
        exist; what cannot be given is a note, never a failure."""
        if uid < 0 and gid < 0:
            return
        try:
            new_uid = uid if uid >= 0 and self.exists("user", uid) else -1
            new_gid = gid if gid >= 0 and self.exists("group", gid) else -1
            if new_uid >= 0 or new_gid >= 0:
                chown(new_uid, new_gid)
        except CloudError as e:
            self.notes.append(f"{what} stays with oneback's user and group: OpenNebula"
                              f" refused to give it to user {uid} and group {gid}: {e}")
            return
        missing = [f"{kind} {i}" for kind, i, new in (("user", uid, new_uid),
                                                      ("group", gid, new_gid))
                   if i >= 0 and new < 0]
        if missing:
            kinds = " and ".join(m.split()[0] for m in missing)
            verb = "exists" if len(missing) == 1 else "exist"
            self.notes.append(f"{what} stays with oneback's {kinds}: the original"
                              f" {' and '.join(missing)} no longer {verb}")

    def exists(self, kind: str, one_id: int) -> bool:
        key = (kind, one_id)
        if key not in self._exists:
            self._exists[key] = (self.cloud.user_exists(one_id) if kind == "user"
                                 else self.cloud.group_exists(one_id))
        return self._exists[key]


def _check_names_free(cloud: Cloud, names: list[str]) -> None:
    taken = {i.name for i in cloud.images()}
    clash = next((n for n in names if n in taken), None)
    if clash:
        raise UsageError(f"an image named {clash!r} already exists: pass another --name")


def _restorer(backup_id: int, *, cloud: Cloud, catalog: RestoreCatalog, store: ChunkStore,
              workspace: Workspace, settings: Settings, progress: Progress | None,
              cancel: threading.Event | None) -> _Restorer:
    backup = catalog.get_backup(backup_id)
    return _Restorer(backup, cloud, catalog, store, workspace, settings, progress or Quiet(),
                     cancel, catalog.image_documents(backup_id))


def _kind(disk: DiskBackup) -> str:
    """'volatile', 'excluded', 'readonly' (the original image is reused) or 'data'."""
    if disk.volatile:
        return "volatile"
    if disk.excluded:
        return "excluded"
    ro = policy.is_readonly(disk.attributes)
    return "readonly" if ro else "data"


def restore_vm(backup_id: int, *, cloud: Cloud, catalog: RestoreCatalog, store: ChunkStore,
               workspace: Workspace, settings: Settings, image_ds: int | None = None,
               system_ds: int | None = None, name: str | None = None,
               progress: Progress | None = None,
               cancel: threading.Event | None = None) -> RestoreResult:
    """Restore backup `backup_id` as a new VM, RUNNING on return, owned by
    the original user and group where they still exist. Every object is
    created under a temporary name and renamed (images, then the VM) only
    once the VM runs; what could not be cleaned up is in `warnings`."""
    r = _restorer(backup_id, cloud=cloud, catalog=catalog, store=store, workspace=workspace,
                  settings=settings, progress=progress, cancel=cancel)
    vm_name = check_name(name) if name is not None \
        else fit(r.backup.vm_name, f"-restored-{r.backup.id}")
    step = _Steps()
    if system_ds is not None:
        with step(f"checking SYSTEM datastore {system_ds}"):
            if cloud.datastore(system_ds).type != 1:
                raise UsageError(f"datastore {system_ds} is not a SYSTEM datastore:"
                                 f" pass a SYSTEM datastore id to --system-ds")
    if image_ds is not None:
        with step(f"checking IMAGE datastore {image_ds}"):
            if cloud.datastore(image_ds).type != 0:
                raise UsageError(f"datastore {image_ds} is not an IMAGE datastore:"
                                 f" pass an IMAGE datastore id to --image-ds")
    disk_names = {d.disk_id: fit(vm_name, f"-disk{d.disk_id}") for d in r.backup.disks
                  if _kind(d) in ("data", "excluded")}
    _check_names_free(cloud, list(disk_names.values()))
    sources: dict[int, vmtemplate.DiskSource] = {}
    images: list[RestoredImage] = []
    with _reported(step, workspace), ExitStack() as stack:
        for disk in r.backup.disks:
            kind = _kind(disk)
            ds = r.target_datastore(disk, image_ds)
            if kind == "volatile":
                sources[disk.disk_id] = vmtemplate.DiskSource(None)
            elif kind == "readonly":
                sources[disk.disk_id] = vmtemplate.DiskSource(disk.image_id)
            elif kind == "excluded":
                with step(f"creating empty disk {disk.disk_id}"):
                    image_id = r.empty_image(stack, disk, ds)
                images.append(RestoredImage(disk.disk_id, image_id, 0))
                sources[disk.disk_id] = vmtemplate.DiskSource(image_id)
            else:
                with step(f"restoring disk {disk.disk_id}"):
                    restored = r.data_image(stack, disk, ds)
                images.append(restored)
                sources[disk.disk_id] = vmtemplate.DiskSource(restored.image_id)
            r.progress.phase(disk.disk_id, "done")

        tmpl_name = workspace.name(f"r{backup_id}-template")
        tmp_vm_name = workspace.name(f"r{backup_id}-vm")
        text = vmtemplate.build(catalog.vm_document(backup_id), tmpl_name, sources)
        with step("creating the VM template"), workspace.temporary(
                JournalKind.TEMPLATE, tmpl_name, lambda: cloud.template_allocate(text),
                cloud.template_delete) as template_id:
            with step("instantiating the VM"):
                vm_id = stack.enter_context(workspace.provisional(
                    JournalKind.VM, tmp_vm_name,
                    lambda: cloud.template_instantiate(template_id, tmp_vm_name,
                                                       hold=system_ds is not None),
                    cloud.terminate))
        if system_ds is not None:
            with step(f"deploying the VM into SYSTEM datastore {system_ds}"):
                cloud.wait_settled(vm_id)
                hosts = [h for h in cloud.hosts() if h[2] == MONITORED]
                if not hosts:
                    raise StateError("no MONITORED host to deploy the restored VM on")
                cloud.deploy(vm_id, hosts[0][0], system_ds)
        with step("waiting for the VM to run"):
            vm = cloud.wait_vm(
                vm_id, lambda v: (v.state == VM_ACTIVE and v.lcm_state == LCM_RUNNING)
                or v.lcm_state in range(36, 51) or v.state in (6, 11),
                f"restored VM {vm_id} to reach RUNNING")
            if not (vm.state == VM_ACTIVE and vm.lcm_state == LCM_RUNNING):
                raise CloudError(f"restored VM {vm_id} ended {vm.state_name}"
                                 f"{': ' + vm.error if vm.error else ''}")
        by_disk = {d.disk_id: d for d in r.backup.disks}
        with step("giving the VM and its images to their owners"):
            for image in images:
                r.give(f"image {image.image_id} (disk {image.disk_id})",
                       partial(cloud.image_chown, image.image_id),
                       *r.owner_of(by_disk[image.disk_id]))
            r.give(f"VM {vm_id}", partial(cloud.vm_chown, vm_id), *r.owner_of(None))
        # The commit: from here on the objects carry their final names and
        # no sweep takes them for leftovers.
        with step("giving the VM and its images their names"):
            for image in images:
                cloud.image_rename(image.image_id, disk_names[image.disk_id])
            cloud.vm_rename(vm_id, vm_name)
    return RestoreResult(vm_id, vm_name, True, tuple(images), tuple(workspace.leftovers),
                         tuple(r.notes))


def restore_disk(backup_id: int, disk_id: int, *, cloud: Cloud, catalog: RestoreCatalog,
                 store: ChunkStore, workspace: Workspace, settings: Settings,
                 image_ds: int | None = None, name: str | None = None,
                 progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> DiskRestoreResult:
    """Restore one disk of a backup as a new image, owned like the original
    image where its user and group still exist; named last, as restore_vm."""
    r = _restorer(backup_id, cloud=cloud, catalog=catalog, store=store, workspace=workspace,
                  settings=settings, progress=progress, cancel=cancel)
    disk = next((d for d in r.backup.disks if d.disk_id == disk_id), None)
    if disk is None:
        raise NotFound(f"backup {backup_id} has no disk {disk_id}; 'oneback show {backup_id}'"
                       f" lists its disks")
    if _kind(disk) != "data":
        raise UsageError(f"disk {disk_id} of backup {backup_id} holds no data ({_kind(disk)})")
    image_name = check_name(name) if name is not None \
        else fit(r.backup.vm_name, f"-restored-{backup_id}-disk{disk_id}")
    _check_names_free(cloud, [image_name])
    step = _Steps()
    with _reported(step, workspace), ExitStack() as stack:
        with step(f"restoring disk {disk_id}"):
            image = r.data_image(stack, disk, r.target_datastore(disk, image_ds))
        with step(f"giving image {image.image_id} to its owner"):
            r.give(f"image {image.image_id}", partial(cloud.image_chown, image.image_id),
                   *r.owner_of(disk))
        with step(f"naming image {image.image_id}"):
            cloud.image_rename(image.image_id, image_name)
    return DiskRestoreResult(image, image_name, tuple(workspace.leftovers), tuple(r.notes))
