"""The image datastore driver: registering and removing image files.

Owns: ImageManager's asynchronous side for images (register_image ->
`image.register` engine operation: copy PATH or mkfs an empty DATABLOCK
into a new SOURCE, LOCKED -> READY or ERROR; delete -> `image.delete`:
remove the file and the object), and the "held LOCKED" fault.
Must not: check requests (api_image) or handle save-as (hotplug).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.onesim import dataplane
from tests.onesim.api_template import disk_lock_success
from tests.onesim.constants import DatastoreType, ImageState, ImageType
from tests.onesim.disks import ds_driver
from tests.onesim.hotplug import unlock
from tests.onesim.model import Datastore, Image
from tests.onesim.oned import Oned


def restricted(ds: Datastore | None, path: str) -> bool:
    """libfs.sh check_restricted: SAFE_DIRS win over RESTRICTED_DIRS."""
    if ds is None:
        return False
    real = os.path.realpath(path)
    for safe in (ds.template.get("SAFE_DIRS") or "").split():
        if real.startswith(safe):
            return False
    return any(real.startswith(r) for r in (ds.template.get("RESTRICTED_DIRS") or "").split())


QCOW2_MAGIC = b"QFI\xfb"


def copied_format(ds: Datastore | None, img: Image, copy: Path) -> str:
    """The FORMAT the fs driver's cp reports: the datastore's DRIVER when it
    converts (DRIVER qcow2 or raw, CONVERT not "no", not a CDROM, not a files
    datastore), else what `qemu-img info` says (qcow2 magic, or raw). onesim
    does not convert the bytes: its disk files always hold the guest's view."""
    if ds is not None:
        driver = ds_driver(ds)
        convert = (ds.template.get("CONVERT") or "yes").lower() != "no"
        if (driver in ("qcow2", "raw") and convert and img.type != ImageType.CDROM
                and ds.type != DatastoreType.FILE_DS):
            return driver
    with open(copy, "rb") as fh:
        return "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"


class Imaging:
    def __init__(self, core: Oned) -> None:
        self.core = core
        core.engine.register("image.register", self._register_done)
        core.engine.register("image.delete", self._delete_done)

    def register(self, img: Image, path: str) -> None:
        delay = self.core.config.delay + self.core.faults.driver_delay("image", None, None)
        self.core.schedule({"op": "image.register", "image": img.id, "path": path}, delay)

    def _register_done(self, op: dict[str, Any]) -> None:
        img = self.core.store.images.get(op["image"])
        if img is None or img.state not in (ImageState.LOCKED, ImageState.LOCKED_USED,
                                            ImageState.LOCKED_USED_PERS):
            return
        if self.core.faults.image_held(img.id):
            self.core.schedule(op, max(self.core.config.delay, 0.02))
            return
        message = self.core.faults.take_driver("image", None, None)
        source = dataplane.new_source(self.core.ds_path(img.datastore_id))
        path = op.get("path") or ""
        if message is None and path and restricted(
                self.core.store.datastores.get(img.datastore_id), path):
            message = f"Not allowed to copy image file {path}"
        if message is None:
            try:
                if path:
                    dataplane.sparse_copy(Path(path), source)
                    img.format = copied_format(
                        self.core.store.datastores.get(img.datastore_id), img, source)
                else:
                    dataplane.make_sparse(source, img.size)
            except OSError as exc:
                message = str(exc)
        if message is not None:
            what = "Error copying image in the datastore" if path else "Error creating datablock"
            self.core.image_error(img, f"{what}: {message}" if message not in ("", "-") else what)
            img.state = ImageState.ERROR
            dataplane.remove(source)
        else:
            img.source = str(source)
            unlock(img)
        self.core.update_image(img)
        if img.state != ImageState.ERROR:
            disk_lock_success(self.core, img.id)

    def delete(self, img: Image) -> None:
        img.state = ImageState.DELETE
        self.core.update_image(img)
        delay = self.core.config.delay + self.core.faults.driver_delay("image_delete", None, None)
        self.core.schedule({"op": "image.delete", "image": img.id}, delay)

    def _delete_done(self, op: dict[str, Any]) -> None:
        img = self.core.store.images.get(op["image"])
        if img is None:
            return
        message = self.core.faults.take_driver("image_delete", None, None)
        if message is not None:
            self.core.image_error(img, f"Error deleting image from datastore: {message}")
            img.state = ImageState.ERROR
            self.core.update_image(img)
            return
        if img.source:
            dataplane.remove(self.core.root / img.source)
        self.drop(img)

    def drop(self, img: Image) -> None:
        ds = self.core.store.datastores.get(img.datastore_id)
        if ds is not None and img.id in ds.images:
            ds.images.remove(img.id)
        self.core.store.images.pop(img.id, None)

    def force_error(self, image_id: int, message: str = "onesim: forced ERROR") -> None:
        img = self.core.store.images.get(image_id)
        if img is None:
            raise KeyError(image_id)
        self.core.image_error(img, message)
        img.state = ImageState.ERROR
        self.core.update_image(img)
