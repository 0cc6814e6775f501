"""The restore use cases: a whole VM, one disk as an image, or one disk to a file.

Owns: the order of a restore — disks first (excluded disks become empty
images of the same size; data disks are written through the proxy VM into a
new empty image, saved as the final image, detached, and the empty image
deleted; volatile disks are recreated from their definition), then a template
from the saved VM document, instantiated (deployed into the chosen SYSTEM
datastore), the template deleted, and the VM waited for until RUNNING. If any
step fails, everything this restore created is removed and the error names
the step. Must not: print, or talk to pyone, SQL or /dev directly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent import policy, vmtemplate, writer, xmldoc
from agent.attach import Journal, Workspace
from agent.backup import Settings
from agent.cloud import IMAGE_TYPES, Cloud
from agent.errors import CloudError, NotFound, OnebackError, StateError, UsageError
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
    vm_id: int
    name: str
    template_deleted: bool
    images: tuple[RestoredImage, ...]


class RestoreFailed(CloudError):
    """A restore step failed; what the restore created was removed."""


@contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except RestoreFailed:
        raise
    except OnebackError as e:
        err = type(e)(f"restore failed while {what}: {e.message};"
                      f" everything this restore created was removed")
        raise err from e


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

    def empty_image(self, stack: ExitStack, disk: DiskBackup, name: str, ds: int) -> int:
        """A new empty DATABLOCK of the disk's size, kept if the restore succeeds."""
        size_mb = max(1, -(-disk.size // MiB))
        return stack.enter_context(self.workspace.provisional(
            JournalKind.IMAGE, name,
            lambda: self.cloud.image_allocate(
                {"NAME": name, "TYPE": "DATABLOCK", "SIZE": str(size_mb)}, ds),
            self.cloud.image_delete))

    def data_image(self, stack: ExitStack, disk: DiskBackup, name: str, ds: int) -> RestoredImage:
        """Write the backup's blocks through the proxy VM into a new image."""
        size_mb = max(1, -(-disk.size // MiB))
        tmp_name = self.workspace.name(f"r{self.backup.id}-d{disk.disk_id}")
        image_type, persistent = self.original(disk)
        self.progress.phase(disk.disk_id, "create")
        with self.workspace.temporary(
                JournalKind.IMAGE, tmp_name,
                lambda: self.cloud.image_allocate(
                    {"NAME": tmp_name, "TYPE": "DATABLOCK", "SIZE": str(size_mb)}, ds),
                self.cloud.image_delete) as tmp_id:
            self.progress.phase(disk.disk_id, "attach")
            with self.workspace.attached(tmp_id, gone=self.settings.device_gone) as proxy_disk:
                path = self.settings.device(proxy_disk, self.cancel)
                self.progress.disk_size(disk.disk_id, disk.size)
                self.progress.phase(disk.disk_id, "write")
                written = writer.write_disk(
                    path, self.catalog.blocks(self.backup.id, disk.disk_id), self.store,
                    size=disk.size, block_size=disk.block_size, workers=self.settings.workers,
                    progress=self.progress.advanced, cancel=self.cancel,
                    where=f"backup {self.backup.id} disk {disk.disk_id}")
                self.progress.phase(disk.disk_id, "save-as")
                image_id = stack.enter_context(self.workspace.provisional(
                    JournalKind.IMAGE, name,
                    lambda: self.cloud.disk_saveas(self.settings.proxy_vm_id,
                                                   proxy_disk.disk_id, name, -1, image_type),
                    self.cloud.image_delete))
                self.progress.phase(disk.disk_id, "detach")
        if persistent:
            self.cloud.image_persistent(image_id, True)
        return RestoredImage(disk.disk_id, image_id, written)


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
    """Restore backup `backup_id` as a new VM, RUNNING on return."""
    r = _restorer(backup_id, cloud=cloud, catalog=catalog, store=store, workspace=workspace,
                  settings=settings, progress=progress, cancel=cancel)
    vm_name = name or f"{r.backup.vm_name}-restored-{r.backup.id}"
    if system_ds is not None:
        with _step(f"checking SYSTEM datastore {system_ds}"):
            if cloud.datastore(system_ds).type != 1:
                raise UsageError(f"datastore {system_ds} is not a SYSTEM datastore:"
                                 f" pass a SYSTEM datastore id to --system-ds")
    if image_ds is not None:
        with _step(f"checking IMAGE datastore {image_ds}"):
            if cloud.datastore(image_ds).type != 0:
                raise UsageError(f"datastore {image_ds} is not an IMAGE datastore:"
                                 f" pass an IMAGE datastore id to --image-ds")
    disk_names = {d.disk_id: f"{vm_name}-disk{d.disk_id}" for d in r.backup.disks
                  if _kind(d) in ("data", "excluded")}
    _check_names_free(cloud, list(disk_names.values()))
    sources: dict[int, vmtemplate.DiskSource] = {}
    images: list[RestoredImage] = []
    with ExitStack() as stack:
        for disk in r.backup.disks:
            kind = _kind(disk)
            ds = r.target_datastore(disk, image_ds)
            if kind == "volatile":
                sources[disk.disk_id] = vmtemplate.DiskSource(None)
            elif kind == "readonly":
                sources[disk.disk_id] = vmtemplate.DiskSource(disk.image_id)
            elif kind == "excluded":
                with _step(f"creating empty disk {disk.disk_id}"):
                    image_id = r.empty_image(stack, disk, disk_names[disk.disk_id], ds)
                images.append(RestoredImage(disk.disk_id, image_id, 0))
                sources[disk.disk_id] = vmtemplate.DiskSource(image_id)
            else:
                with _step(f"restoring disk {disk.disk_id}"):
                    restored = r.data_image(stack, disk, disk_names[disk.disk_id], ds)
                images.append(restored)
                sources[disk.disk_id] = vmtemplate.DiskSource(restored.image_id)
            r.progress.phase(disk.disk_id, "done")

        tmpl_name = workspace.name(f"r{backup_id}-template")
        text = vmtemplate.build(catalog.vm_document(backup_id), tmpl_name, sources)
        with _step("creating the VM template"), workspace.temporary(
                JournalKind.TEMPLATE, tmpl_name, lambda: cloud.template_allocate(text),
                cloud.template_delete) as template_id:
            with _step("instantiating the VM"):
                vm_id = stack.enter_context(workspace.provisional(
                    JournalKind.VM, vm_name,
                    lambda: cloud.template_instantiate(template_id, vm_name,
                                                       hold=system_ds is not None),
                    cloud.terminate))
        if system_ds is not None:
            with _step(f"deploying the VM into SYSTEM datastore {system_ds}"):
                cloud.wait_settled(vm_id)
                hosts = [h for h in cloud.hosts() if h[2] == MONITORED]
                if not hosts:
                    raise StateError("no MONITORED host to deploy the restored VM on")
                cloud.deploy(vm_id, hosts[0][0], system_ds)
        with _step("waiting for the VM to run"):
            vm = cloud.wait_vm(
                vm_id, lambda v: (v.state == VM_ACTIVE and v.lcm_state == LCM_RUNNING)
                or v.lcm_state in range(36, 51) or v.state in (6, 11),
                f"restored VM {vm_id} to reach RUNNING")
            if not (vm.state == VM_ACTIVE and vm.lcm_state == LCM_RUNNING):
                raise CloudError(f"restored VM {vm_id} ended {vm.state_name}"
                                 f"{': ' + vm.error if vm.error else ''}")
    return RestoreResult(vm_id, vm_name, True, tuple(images))


def restore_disk(backup_id: int, disk_id: int, *, cloud: Cloud, catalog: RestoreCatalog,
                 store: ChunkStore, workspace: Workspace, settings: Settings,
                 image_ds: int | None = None, name: str | None = None,
                 progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> RestoredImage:
    """Restore one disk of a backup as a new image."""
    r = _restorer(backup_id, cloud=cloud, catalog=catalog, store=store, workspace=workspace,
                  settings=settings, progress=progress, cancel=cancel)
    disk = next((d for d in r.backup.disks if d.disk_id == disk_id), None)
    if disk is None:
        raise NotFound(f"backup {backup_id} has no disk {disk_id}; 'oneback show {backup_id}'"
                       f" lists its disks")
    if _kind(disk) != "data":
        raise UsageError(f"disk {disk_id} of backup {backup_id} holds no data ({_kind(disk)})")
    image_name = name or f"{r.backup.vm_name}-restored-{backup_id}-disk{disk_id}"
    _check_names_free(cloud, [image_name])
    with ExitStack() as stack, _step(f"restoring disk {disk_id}"):
        return r.data_image(stack, disk, image_name, r.target_datastore(disk, image_ds))


def export_disk(backup_id: int, disk_id: int, output: Path, *, catalog: RestoreCatalog,
                store: ChunkStore, workers: int, progress: Progress | None = None,
                cancel: threading.Event | None = None) -> int:
    """Write one disk of a backup to a sparse raw file (no cloud needed)."""
    backup = catalog.get_backup(backup_id)
    disk = next((d for d in backup.disks if d.disk_id == disk_id), None)
    if disk is None:
        raise NotFound(f"backup {backup_id} has no disk {disk_id}; 'oneback show {backup_id}'"
                       f" lists its disks")
    if _kind(disk) != "data":
        raise UsageError(f"disk {disk_id} of backup {backup_id} holds no data ({_kind(disk)})")
    if output.exists() and not output.is_file():
        raise UsageError(f"{output} exists and is not a regular file: choose another -o FILE")
    return writer.export_file(output, catalog.blocks(backup_id, disk_id), store,
                              size=disk.size, block_size=disk.block_size, workers=workers,
                              progress=(progress or Quiet()).advanced, cancel=cancel,
                              where=f"backup {backup_id} disk {disk_id}")
