"""oned's XML documents read into `model` value types: pure, no I/O.

Owns: what a `<VM>` document (vm.info, vmpool.infoextended, a hook message)
and an `<IMAGE>` document say, as VmInfo and ImageInfo, with the verbatim
document kept for the catalog; state numbers read as numbers. Must not: call
oned (that is `cloud.py`), or parse XML other than through `xmldoc`.
"""

from __future__ import annotations

from lxml import etree

from agent import xmldoc
from agent.model import (
    DatastoreInfo,
    DiskInfo,
    DiskSnapshots,
    ImageInfo,
    SnapshotInfo,
    VmInfo,
)

IMAGE_TYPES = {0: "OS", 1: "CDROM", 2: "DATABLOCK", 3: "KERNEL", 4: "RAMDISK",
               5: "CONTEXT", 6: "BACKUP", 7: "FILESYSTEM"}


def text_of(el: etree._Element | None, path: str, default: str = "") -> str:
    if el is None:
        return default
    found = el.find(path)
    if found is None or found.text is None:
        return default
    return str(found.text)


def int_of(el: etree._Element | None, path: str, default: int = 0) -> int:
    value = text_of(el, path)
    try:
        return int(value)
    except ValueError:
        return default


def _attributes(el: etree._Element) -> dict[str, str]:
    """A template vector (DISK, CONTEXT ...) as a flat dict of its single values."""
    return {str(c.tag): (c.text or "") for c in el if isinstance(c.tag, str) and len(c) == 0}


def parse_vm(xml: str) -> VmInfo:
    """A `<VM>` document (vm.info, vmpool.infoextended, hook message) -> VmInfo."""
    root = xmldoc.parse(xml) if isinstance(xml, str) else xml
    template = root.find("TEMPLATE")
    disks = []
    for d in template.findall("DISK") if template is not None else []:
        attrs = _attributes(d)
        image_id = attrs.get("IMAGE_ID")
        disks.append(DiskInfo(
            disk_id=int(attrs.get("DISK_ID", "-1")),
            image_id=int(image_id) if image_id not in (None, "") else None,
            size_mb=int(attrs.get("SIZE", "0") or 0),
            target=attrs.get("TARGET", ""),
            serial=attrs.get("SERIAL", ""),
            type=attrs.get("TYPE", ""),
            datastore_id=int(attrs["DATASTORE_ID"]) if attrs.get("DATASTORE_ID") else None,
            persistent=attrs.get("PERSISTENT", "").upper() == "YES",
            attach_pending=attrs.get("ATTACH", "").upper() == "YES",
            attributes=attrs,
        ))
    snapshots = []
    trees = {}
    for s in root.findall("SNAPSHOTS"):
        disk_id = int_of(s, "DISK_ID", -1)
        trees[disk_id] = DiskSnapshots(disk_id, text_of(s, "ALLOW_ORPHANS", "NO").upper(),
                                       int_of(s, "NEXT_SNAPSHOT"))
        for snap in s.findall("SNAPSHOT"):
            snapshots.append(SnapshotInfo(
                disk_id=disk_id,
                snapshot_id=int_of(snap, "ID", -1),
                name=text_of(snap, "NAME"),
                date=int_of(snap, "DATE"),
                active=text_of(snap, "ACTIVE").upper() == "YES",
                size_mb=int_of(snap, "SIZE"),
                parent=int_of(snap, "PARENT", -1),
            ))
    user = root.find("USER_TEMPLATE")
    user_template = _attributes(user) if user is not None else {}
    history = root.findall("HISTORY_RECORDS/HISTORY")
    return VmInfo(
        id=int_of(root, "ID", -1),
        name=text_of(root, "NAME"),
        uid=int_of(root, "UID", -1),
        gid=int_of(root, "GID", -1),
        state=int_of(root, "STATE", -1),
        lcm_state=int_of(root, "LCM_STATE", -1),
        disks=tuple(sorted(disks, key=lambda d: d.disk_id)),
        snapshots=tuple(snapshots),
        user_template=user_template,
        error=user_template.get("ERROR", ""),
        document=xml if isinstance(xml, str) else etree.tostring(root, encoding="unicode"),
        running_end=int_of(history[-1], "RETIME") if history else 0,
        snapshot_trees=trees,
        cluster_id=int_of(history[-1], "CID", -1) if history else -1,
    )


def parse_image(xml: str) -> ImageInfo:
    root = xmldoc.parse(xml)
    return ImageInfo(
        id=int_of(root, "ID", -1),
        name=text_of(root, "NAME"),
        state=int_of(root, "STATE", -1),
        type=IMAGE_TYPES.get(int_of(root, "TYPE", -1), text_of(root, "TYPE")),
        size_mb=int_of(root, "SIZE"),
        datastore_id=int_of(root, "DATASTORE_ID", -1),
        persistent=int_of(root, "PERSISTENT") == 1,
        running_vms=int_of(root, "RUNNING_VMS"),
        document=xml,
        uid=int_of(root, "UID", -1),
    )


def parse_datastore(root: etree._Element) -> DatastoreInfo:
    """A `<DATASTORE>` element (datastore.info, datastorepool.info)."""
    return DatastoreInfo(id=int_of(root, "ID", -1), name=text_of(root, "NAME"),
                         type=int_of(root, "TYPE", -1), free_mb=int_of(root, "FREE_MB"),
                         clusters=tuple(sorted(int(c.text) for c in root.findall("CLUSTERS/ID")
                                               if c.text and c.text.strip().isdigit())))


def image_error(img: ImageInfo) -> str:
    msg = text_of(xmldoc.parse(img.document), "TEMPLATE/ERROR")
    return f": {msg}" if msg else ""
