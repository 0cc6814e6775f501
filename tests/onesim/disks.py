"""The DISK attributes of a VM, filled in as oned fills them.

Owns: ImagePool::acquire_disk (image or volatile disk, size checks, SERIAL
"auto"), Image::disk_attribute and Datastore::disk_attribute (IMAGE,
SOURCE, SIZE, ORIGINAL_SIZE, FORMAT/DRIVER, CLONE/SAVE/PERSISTENT,
DATASTORE, TM_MAD, inherited DISK_TYPE/ALLOW_ORPHANS ...), target
assignment (VirtualMachineDisks::get_images / assign_disk_targets /
set_up_attach) and the disk's Snapshots mode (VirtualMachineDisk::allow_orphans).
Must not: change VM states or create files.
"""

from __future__ import annotations

from tests.onesim.constants import TM_MAD_CONF, DatastoreType, ImageType
from tests.onesim.model import Datastore, Image, Snapshots, Vm
from tests.onesim.oned import Oned, OneError

DEFAULT_DEV_PREFIX = "sd"  # oned.conf DEFAULT_DEVICE_PREFIX
INHERIT_DS_ATTRS = ("DISK_TYPE", "ALLOW_ORPHANS", "PERSISTENT_SNAPSHOTS")


class DiskError(Exception):
    """A disk oned cannot set up; str(e) is oned's reason."""


def ds_driver(ds: Datastore) -> str:
    """Datastore::get_ds_driver: TM_MAD_CONF's DRIVER, else the template's."""
    return TM_MAD_CONF.get(ds.tm_mad, {}).get("DRIVER") or ds.template.get("DRIVER") or ""


def is_volatile(disk: dict[str, str]) -> bool:
    return disk.get("TYPE", "").upper() in ("FS", "SWAP") and "IMAGE_ID" not in disk


def find_image(core: Oned, disk: dict[str, str], uid: int) -> Image:
    if "IMAGE_ID" in disk:
        try:
            iid = int(disk["IMAGE_ID"])
        except ValueError:
            iid = -1
        img = core.store.images.get(iid)
        if img is None:
            raise DiskError(f"Image with ID: {disk['IMAGE_ID']} does not exist")
        return img
    name = disk["IMAGE"]
    owner = uid
    if "IMAGE_UID" in disk:
        owner = int(disk["IMAGE_UID"])
    elif "IMAGE_UNAME" in disk:
        owner = next((u.id for u in core.store.users.values()
                      if u.name == disk["IMAGE_UNAME"]), -1)
    for img in core.store.images.values():
        if img.name == name and img.uid == owner:
            return img
    raise DiskError(f"User {owner} does not own an image with name: {name} . Set IMAGE_UNAME"
                    " or IMAGE_UID of owner in DISK.")


def acquire_disk(core: Oned, vm_id: int, uid: int, disk: dict[str, str], disk_id: int,
                 attach: bool) -> tuple[int, str, Snapshots | None]:
    """Returns (image type, dev prefix, snapshots copied from the image)."""
    snaps: Snapshots | None = None
    if "IMAGE_ID" in disk or "IMAGE" in disk:
        img = find_image(core, disk, uid)
        try:
            core.acquire_image(vm_id, img, attach)
        except OneError as exc:
            raise DiskError(exc.message) from exc
        size = disk.get("SIZE")
        if size:
            wanted = int(size)
            problem = None
            if img.persistent and wanted != img.size:
                problem = f"SIZE attribute is not supported for persistent image [{img.id}]."
            elif img.type == ImageType.CDROM and wanted != img.size:
                problem = f"SIZE attribute is not supported for CDROM image [{img.id}]."
            elif wanted < img.size:
                problem = (f"SIZE of {wanted}MB is less than the image [{img.id}] size of "
                           f"{img.size}MB.")
            if problem:
                core.release_image(vm_id, img.id)
                raise DiskError(problem)
        dev_prefix = image_disk_attribute(img, disk)
        ds = core.store.datastores.get(img.datastore_id)
        if ds is None:
            core.release_image(vm_id, img.id)
            raise DiskError("Associated datastore for the image does not exist")
        datastore_disk_attribute(core, ds.id, disk)
        if img.snapshots.snaps:
            snaps = Snapshots(disk_id, img.snapshots.allow_orphans, img.snapshots.next_snapshot,
                              img.snapshots.current_base, [dict(s) for s in img.snapshots.snaps])
        img_type = img.type
    else:
        kind = disk.get("TYPE", "").upper()
        if kind not in ("SWAP", "FS"):
            raise DiskError(f"Unknown disk type {kind}")
        try:
            size_mb = int(disk.get("SIZE", ""))
        except ValueError:
            size_mb = 0
        if size_mb <= 0:
            raise DiskError("SIZE attribute must be a positive integer value.")
        img_type = ImageType.DATABLOCK
        dev_prefix = disk.get("DEV_PREFIX", "")
        if not dev_prefix:
            dev_prefix = DEFAULT_DEV_PREFIX
            disk["DEV_PREFIX"] = dev_prefix
    if disk.get("SERIAL") == "auto":
        disk["SERIAL"] = f"{vm_id}-{disk_id}"
    disk["DISK_ID"] = str(disk_id)
    return img_type, dev_prefix, snaps


def image_disk_attribute(img: Image, disk: dict[str, str]) -> str:
    """Image::disk_attribute; returns the dev prefix."""
    dev_prefix = disk.get("DEV_PREFIX", "")
    if not dev_prefix and img.type not in (ImageType.CDROM, ImageType.FILESYSTEM):
        dev_prefix = img.template.get("DEV_PREFIX") or DEFAULT_DEV_PREFIX
        disk["DEV_PREFIX"] = dev_prefix
    disk["IMAGE"] = img.name
    disk["IMAGE_ID"] = str(img.id)
    disk["SOURCE"] = img.source
    disk["ORIGINAL_SIZE"] = str(img.size)
    if not disk.get("SIZE"):
        disk["SIZE"] = str(img.size)
    disk["DISK_SNAPSHOT_TOTAL_SIZE"] = str(img.snapshots.total_size())
    if img.format:
        disk["DRIVER"] = img.format.lower()
        disk["FORMAT"] = img.format.lower()
    else:
        disk.pop("DRIVER", None)
        disk.pop("FORMAT", None)
    disk["IMAGE_STATE"] = str(img.state)
    ptype = (img.template.get("PERSISTENT_TYPE") or "").upper()
    if img.type == ImageType.CDROM or ptype == "IMMUTABLE":
        disk.update(SAVE="NO", CLONE="NO", READONLY="YES")
    else:
        if "READONLY" not in disk:
            ro = (img.template.get("READONLY") or "NO").upper()
            disk["READONLY"] = "YES" if ro in ("YES", "TRUE", "1") else "NO"
        if img.persistent:
            disk.update(PERSISTENT="YES", CLONE="NO", SAVE="YES")
            if ptype == "SHAREABLE" and img.format in ("raw", "dir"):
                disk["SHAREABLE"] = "YES"
        else:
            disk.update(CLONE="YES", SAVE="NO")
    if img.state in (4, 9, 10):  # LOCKED, LOCKED_USED, LOCKED_USED_PERS
        disk["CLONING"] = "YES"
    else:
        disk.pop("CLONING", None)
    disk["TYPE"] = "CDROM" if img.type == ImageType.CDROM else "FILE"
    if not disk.get("TARGET") and img.template.get("TARGET"):
        disk["TARGET"] = img.template.get("TARGET") or ""
    return dev_prefix


def datastore_disk_attribute(core: Oned, ds_id: int, disk: dict[str, str]) -> None:
    """Datastore::disk_attribute with the default INHERIT_DATASTORE_ATTR."""
    ds = core.store.datastores[ds_id]
    disk["DATASTORE"] = ds.name
    disk["DATASTORE_ID"] = str(ds.id)
    disk["TM_MAD"] = ds.tm_mad
    disk["CLUSTER_ID"] = ",".join(str(c) for c in ds.cluster_ids)
    for attr in ("CLONE_TARGET", "LN_TARGET"):
        value = ds.template.get(attr)
        if value and not disk.get(attr):
            disk[attr] = value
    for attr in INHERIT_DS_ATTRS:
        value = ds.template.get(attr)
        if value and not disk.get(attr):
            disk[attr] = value
    if is_volatile(disk):
        if not disk.get("DISK_TYPE"):
            disk["DISK_TYPE"] = "FILE"
        if disk.get("TYPE", "").upper() == "FS":
            if ds_driver(ds):   # TM_MAD_CONF / system DS DRIVER first
                disk["DRIVER"] = disk["FORMAT"] = ds_driver(ds)
            elif disk.get("FORMAT"):
                disk["DRIVER"] = disk["FORMAT"]
            else:
                disk["DRIVER"] = disk["FORMAT"] = "raw"
        else:
            disk["DRIVER"] = disk["FORMAT"] = "raw"


def volatile_info(core: Oned, vm: Vm, ds_id: int) -> None:
    """The system DS attributes volatile disks get at deploy / attach."""
    if ds_id < 0 or ds_id not in core.store.datastores:
        return
    for disk in vm.disks():
        if is_volatile(disk):
            datastore_disk_attribute(core, ds_id, disk)


def allow_orphans(disk: dict[str, str]) -> str:
    """VirtualMachineDisk::allow_orphans, as Snapshots spells the mode."""
    mode = disk.get("ALLOW_ORPHANS", "NO").upper()
    if mode == "FORMAT":
        return "YES" if disk.get("FORMAT", "").lower() == "raw" else "NO"
    if mode in ("YES", "NO", "MIXED", "LINEAR"):
        return mode
    return "NO"


def target_name(prefix: str, index: int) -> str:
    """VirtualMachineDisks::assign_disk_targets: a..z, aa..."""
    temp = ""
    remainder, quotient = index % 26, index // 26
    while quotient > 0:
        temp = chr(ord("a") + remainder) + temp
        remainder, quotient = (quotient - 1) % 26, (quotient - 1) // 26
    return prefix + chr(ord("a") + remainder) + temp


def assign_target(prefix: str, used: set[str]) -> str:
    index = 0
    while True:
        target = target_name(prefix, index)
        index += 1
        if target not in used:
            used.add(target)
            return target


def used_targets(vm: Vm) -> set[str]:
    used = {d["TARGET"] for d in vm.disks() if d.get("TARGET")}
    ctx = vm.context()
    if ctx and ctx.get("TARGET"):
        used.add(ctx["TARGET"])
    return used


def next_disk_id(vm: Vm) -> int:
    ids = [int(d.get("DISK_ID", "-1")) for d in vm.disks()]
    ctx = vm.context()
    if ctx and ctx.get("DISK_ID"):
        ids.append(int(ctx["DISK_ID"]))
    return max(ids, default=-1) + 1


def is_image_ds(core: Oned, ds_id: int) -> bool:
    ds = core.store.datastores.get(ds_id)
    return ds is not None and ds.type == DatastoreType.IMAGE_DS


# TM_MADs whose `clone` of a qcow2 image is an overlay (`qemu-img create -b`,
# src/tm_mad/qcow2/clone; `shared` is a link to `qcow2` in 7.x) and whose
# snapshots of a qcow2 disk are overlays too (qcow2/snap_create[_live]).
_QCOW2_OVERLAY_TMS = ("qcow2", "shared")


def transfer_bytes(op: str, disk: dict[str, str], size: int) -> int:
    """The bytes a TM driver copies for one operation on a disk of `size`
    bytes, as its scripts in src/tm_mad/ do:
    - `clone` (a non-persistent image, CLONE=YES): qcow2/shared with a
      qcow2 image make an overlay (0 unless QCOW2_STANDALONE); every other
      driver copies (`cp`, ssh/local `tar`, ceph `rbd copy`, lvm `dd`).
    - `ln` (a persistent image, CLONE=NO): a symlink in place when the
      datastore's LN_TARGET is NONE (qcow2/ln, ceph, lvm...: 0); a copy into
      the system datastore when it is SYSTEM (ssh/ln and local/ln are links
      to their `clone`; fs_lvm's ln makes an LV).
    - `mvds` (detach or epilog of a SAVE=YES disk): qcow2/mvds is `exit 0`
      (0); with LN_TARGET SYSTEM the disk is copied back (ssh/mvds rsync,
      local/mvds tar).
    - `snapshot`: a qcow2 disk gets an overlay (0), ceph an rbd snapshot
      (0); a raw file is copied (`cp` in qcow2/snap_create[_live]).
    - `cpds` (disk save-as): always a full copy (`cp`, `qemu-img convert`).
    """
    tm_mad = disk.get("TM_MAD", "")
    qcow2 = (disk.get("FORMAT") or disk.get("DRIVER") or "").lower() == "qcow2"
    linked_in_place = (disk.get("LN_TARGET") or "NONE").upper() == "NONE"
    if op == "clone":
        standalone = (disk.get("QCOW2_STANDALONE") or "").upper() == "YES"
        return 0 if tm_mad in _QCOW2_OVERLAY_TMS and qcow2 and not standalone else size
    if op in ("ln", "mvds"):
        return 0 if linked_in_place else size
    if op == "snapshot":
        return 0 if qcow2 or tm_mad == "ceph" else size
    if op == "cpds":
        return size
    raise ValueError(f"unknown transfer operation {op!r}")


def record_transfer(core: Oned, op: str, disk: dict[str, str], size: int) -> None:
    """Count one driver operation's copied bytes in `core.copies`."""
    core.copies.add(op, transfer_bytes(op, disk, size))


def vm_clusters(vm: Vm) -> list[int]:
    """The clusters all of the VM's image disks can be used in (the
    intersection of their CLUSTER_ID lists), sorted; [] when no disk says."""
    common: set[int] | None = None
    for disk in vm.disks():
        ids = {int(c) for c in disk.get("CLUSTER_ID", "").split(",") if c.strip().isdigit()}
        if "IMAGE_ID" not in disk or not ids:
            continue
        common = ids if common is None else common & ids
    return sorted(common or ())
