"""one.image.*, one.imagepool.info and one.datastore*: storage objects.

Owns: the XML-RPC face of ImageAPI / ImageAllocateAPI (template checks,
size from PATH or SIZE, capacity, name uniqueness per owner, the datastore
type rules of ImagePool::allocate, Image::insert's template cleaning,
delete refusals) and of DatastoreAPI.
Must not: copy files (imaging) or touch VMs.
"""

from __future__ import annotations

import math
from pathlib import Path

from tests.onesim import auth
from tests.onesim.auth import CREATE, MANAGE, USE, Check, authorize, of
from tests.onesim.constants import (
    TM_MAD_CONF,
    DatastoreType,
    ErrorCode,
    ImageState,
    ImageType,
)
from tests.onesim.disks import ds_driver
from tests.onesim.dispatch import Ctx, method
from tests.onesim.documents import datastore_xml, image_xml, pool_xml
from tests.onesim.model import Datastore, Image, now
from tests.onesim.oned import Oned, OneError, no_exists
from tests.onesim.ownership import apply_chown, check_name, chown_object, chown_targets
from tests.onesim.templates import Template, TemplateError, parse_str_or_xml

MIB = 1024 * 1024


def check_image_name(core: Oned, name: str, uid: int) -> None:
    """PoolObjectSQL::name_is_valid + ImagePool's per-owner uniqueness."""
    if not name:
        raise OneError(ErrorCode.ALLOCATE, "Invalid NAME, it cannot be empty", obj="IMAGE")
    for bad in ("&", "|", ":", "\\", '"', "'", "#", ";", "<", ">"):
        if bad in name:
            raise OneError(ErrorCode.ALLOCATE, f"Invalid NAME, char '{bad}' is not allowed",
                           obj="IMAGE")
    for img in core.store.images.values():
        if img.name == name and img.uid == uid:
            raise OneError(ErrorCode.ALLOCATE, f"NAME is already taken by IMAGE {img.id}.",
                           obj="IMAGE")


def _parse(text: str, code: int = ErrorCode.INTERNAL) -> Template:
    try:
        return parse_str_or_xml(text)
    except TemplateError as exc:
        raise OneError(code, str(exc)) from exc


def _yes(value: str | None) -> bool:
    return (value or "").strip().upper() in ("YES", "TRUE", "1")


@method("one.image.allocate", "sib", 2, obj="IMAGE")
def image_allocate(core: Oned, ctx: Ctx, text: str, ds_id: int, skip_check: bool = False) -> int:
    tmpl = _parse(text)
    ds = core.store.datastores.get(ds_id)
    if ds is None:
        raise OneError(ErrorCode.NO_EXISTS, "", ds_id, "DATASTORE")
    if ds.type in (DatastoreType.SYSTEM_DS, DatastoreType.BACKUP_DS):
        raise OneError(ErrorCode.ALLOCATE,
                       "New images can only be allocated in a files or image datastore.")
    kind = (tmpl.get("TYPE") or "OS").strip().upper()
    path = tmpl.get("PATH") or ""
    source = tmpl.get("SOURCE") or ""
    size_mb = _stat(kind, tmpl, path, source)
    if skip_check and not ctx.caller.is_admin:
        skip_check = False
    if not skip_check and size_mb > core.ds_free_mb(ds):
        raise OneError(ErrorCode.ACTION, "Not enough space in datastore")
    authorize(ctx.caller, Check(CREATE, "IMAGE"), of(ds, "DATASTORE", USE))
    persistent = _yes(tmpl.get("PERSISTENT"))
    name = tmpl.get("NAME") or ""
    if kind not in ImageType.__members__:
        raise OneError(ErrorCode.ALLOCATE, f"Unknown image type: {kind}")
    itype = ImageType[kind]
    if itype in (ImageType.OS, ImageType.DATABLOCK, ImageType.CDROM, ImageType.FILESYSTEM) \
            and ds.type != DatastoreType.IMAGE_DS:
        raise OneError(ErrorCode.ALLOCATE, "Only IMAGES of type KERNEL, RAMDISK and CONTEXT can"
                                           " be registered in a FILE_DS datastore")
    if itype in (ImageType.KERNEL, ImageType.RAMDISK, ImageType.CONTEXT) \
            and ds.type != DatastoreType.FILE_DS:
        raise OneError(ErrorCode.ALLOCATE, "IMAGES of type KERNEL, RAMDISK and CONTEXT cannot be"
                                           " registered in an IMAGE_DS datastore")
    check_image_name(core, name, ctx.caller.uid)
    if path and source:
        raise OneError(ErrorCode.ALLOCATE, "PATH and SOURCE cannot be both set.")
    fmt = ""
    if source:
        fmt = (tmpl.get("FORMAT") or "").lower()
        if not fmt:
            raise OneError(ErrorCode.ALLOCATE, "SOURCE needs FORMAT to be set.")
    elif not path and itype in (ImageType.DATABLOCK, ImageType.OS):
        # Image::insert, an mkfs image: the datastore's driver (TM_MAD_CONF
        # DRIVER, then the DS template's) is forced, else FORMAT, else raw.
        fmt = ds_driver(ds) or (tmpl.get("FORMAT") or "raw").lower()
    c = ctx.caller
    img = Image(core.store.next_id("images"), c.uid, c.gid, c.uname, c.gname, name, itype,
                ds.id, ds.name, perms=core.new_perms(c), disk_type=ds.disk_type,
                persistent=int(persistent), regtime=now(), modtime=now(), path=path,
                format=fmt, size=size_mb, state=ImageState.LOCKED, prev_state=ImageState.INIT)
    for attr in ("NAME", "TYPE", "PERSISTENT", "SIZE", "FS", "DRIVER", "PATH", "SOURCE",
                 "FORMAT", "TM_MAD"):
        tmpl.erase(attr)
    if not path and not source and itype in (ImageType.DATABLOCK, ImageType.OS) \
            and ds_driver(ds):
        tmpl.add("DRIVER", ds_driver(ds))
    if itype in (ImageType.OS, ImageType.DATABLOCK) and not tmpl.get("DEV_PREFIX"):
        tmpl.add("DEV_PREFIX", "sd")
    elif itype not in (ImageType.OS, ImageType.DATABLOCK):
        tmpl.erase("DEV_PREFIX")
    img.template = tmpl
    core.store.images[img.id] = img
    ds.images.append(img.id)
    ctx.extra_xml = image_xml(img)
    if source:
        img.source = source
        img.state = ImageState.READY
    else:
        ctx.sim.imaging.register(img, path)
    return img.id


def _stat(kind: str, tmpl: Template, path: str, source: str) -> int:
    """ImageManager::stat_image and the fs driver's size in MB (rounded up)."""
    def fail(reason: str) -> OneError:
        return OneError(ErrorCode.INTERNAL, f"Cannot parse image SIZE: {reason}")

    if kind == "FILESYSTEM" and not path:
        raise fail("Missing PATH attribute.")
    if source or (not path and kind in ("OS", "DATABLOCK")):
        try:
            return int(tmpl.get("SIZE") or "")
        except ValueError:
            raise fail("Wrong number or missing SIZE attribute.") from None
    if not path:
        raise fail(f"Either PATH or SOURCE are required for {kind}")
    try:
        size = Path(path).stat().st_size
    except OSError:
        size = 0
    if size == 0:
        raise fail("Runtime error during size estimation")
    return math.ceil(size / MIB)


@method("one.image.info", "ib", 1, obj="IMAGE", info=True)
def image_info(core: Oned, ctx: Ctx, iid: int, decrypt: bool = False) -> str:
    img = core.image(iid)
    authorize(ctx.caller, of(img, "IMAGE", USE))
    return image_xml(img)


@method("one.imagepool.info", "iii", obj="IMAGE", info=True)
def imagepool_info(core: Oned, ctx: Ctx, flag: int, start: int, end: int) -> str:
    if flag < -4:
        raise OneError(ErrorCode.RPC_API, "Incorrect filter_flag")
    imgs = auth.pool_filter(ctx.caller, list(core.store.images.values()), "IMAGE", flag)
    return pool_xml("IMAGE_POOL", [image_xml(i) for i in auth.id_range(imgs, start, end)])


@method("one.image.delete", "ib", 1, obj="IMAGE")
def image_delete(core: Oned, ctx: Ctx, iid: int, force: bool = False) -> int:
    img = core.image(iid)
    ctx.extra_xml = image_xml(img)
    authorize(ctx.caller, of(img, "IMAGE", MANAGE))
    st = ImageState(img.state)
    reason = None
    if st == ImageState.READY and img.running_vms and img.type != ImageType.BACKUP:
        reason = f"There are {img.running_vms} VMs using it."
    elif st == ImageState.CLONE:
        reason = f"There are {img.cloning_ops} active clone operations."
    elif st in (ImageState.USED, ImageState.USED_PERS, ImageState.LOCKED_USED,
                ImageState.LOCKED_USED_PERS):
        reason = f"There are {img.running_vms} VMs using it."
    if reason:
        raise OneError(ErrorCode.ACTION, f"Cannot delete image. {reason}")
    if not img.source:
        ctx.sim.imaging.drop(img)
    else:
        ctx.sim.imaging.delete(img)
    return iid


@method("one.image.persistent", "ib", obj="IMAGE")
def image_persistent(core: Oned, ctx: Ctx, iid: int, persistent: bool) -> int:
    img = core.image(iid)
    authorize(ctx.caller, of(img, "IMAGE", MANAGE))
    if bool(img.persistent) == persistent:
        return iid
    if img.type in (ImageType.KERNEL, ImageType.RAMDISK, ImageType.CONTEXT):
        raise OneError(ErrorCode.ACTION, "KERNEL, RAMDISK and CONTEXT must be non-persistent")
    if img.state in (ImageState.USED, ImageState.USED_PERS, ImageState.LOCKED_USED,
                     ImageState.LOCKED_USED_PERS, ImageState.CLONE):
        what = "persistent" if persistent else "non-persistent"
        raise OneError(ErrorCode.INTERNAL, f"Could not make image {what}: Image cannot be in "
                                           f"state {ImageState(img.state).name}.")
    img.persistent = int(persistent)
    core.update_image(img)
    return iid


@method("one.image.update", "isi", 2, obj="IMAGE")
def image_update(core: Oned, ctx: Ctx, iid: int, text: str, mode: int = 0) -> int:
    img = core.image(iid)
    authorize(ctx.caller, of(img, "IMAGE", MANAGE))
    if mode not in (0, 1):
        raise OneError(ErrorCode.RPC_API, "Wrong update type")
    new = _parse(text)
    if mode == 1:
        img.template.merge(new)
    else:
        img.template = new
    core.update_image(img)
    return iid


@method("one.image.chmod", "iiiiiiiiii", obj="IMAGE")
def image_chmod(core: Oned, ctx: Ctx, iid: int, *bits: int) -> int:
    img = core.image(iid)
    authorize(ctx.caller, of(img, "IMAGE", MANAGE))
    img.perms.bits = [o if n == -1 else n for o, n in zip(img.perms.bits, bits, strict=True)]
    core.update_image(img)
    return iid


@method("one.image.rename", "is", obj="IMAGE")
def image_rename(core: Oned, ctx: Ctx, iid: int, name: str) -> int:
    """SharedAPI::rename: the same name is a no-op; the name must be free among
    the owner's images (ImagePool::exist), then PoolObjectSQL::set_name checks it."""
    img = core.image(iid)
    if name == img.name:
        return iid
    authorize(ctx.caller, of(img, "IMAGE", MANAGE))
    clash = next((i for i in core.store.images.values()
                  if i.name == name and i.uid == img.uid), None)
    if clash is not None:
        raise OneError(ErrorCode.ACTION, f"image cannot be renamed to {name} because it"
                                         f" collides with image {clash.id}")
    check_name(name)
    img.name = name
    core.update_image(img)
    return iid


@method("one.image.chown", "iii", obj="IMAGE")
def image_chown(core: Oned, ctx: Ctx, iid: int, uid: int, gid: int) -> int:
    """SharedAPI::chown: new user and group exist, then the image; the name
    must be free among the new owner's images (check_name_unique)."""
    user, group = chown_targets(core, uid, gid)
    img = core.image(iid)
    user, group = chown_object(ctx.caller, img, "IMAGE", user, group)
    if user is not None:
        clash = next((i for i in core.store.images.values()
                      if i.name == img.name and i.uid == user.id), None)
        if clash is not None:
            raise OneError(ErrorCode.INTERNAL, f"user [{user.id}] already owns image"
                                               f" [{clash.id}] with NAME {img.name}")
    apply_chown(img, user, group)
    core.update_image(img)
    return iid


# ---------------------------------------------------------------------------
# Datastores
# ---------------------------------------------------------------------------

def set_tm_mad(ds: Datastore, tm_mad: str) -> None:
    """Datastore::set_tm_mad: copy the driver's TM_MAD_CONF into the
    datastore template (replacing what the template said: ALLOW_ORPHANS,
    LN_TARGET, CLONE_TARGET, DRIVER, DISK_TYPE, SHARED ...). Raises oned's
    error; the caller rolls back."""
    if ds.type == DatastoreType.BACKUP_DS:
        return
    if not tm_mad:
        raise OneError(ErrorCode.INTERNAL, "No TM_MAD in template.")
    conf = TM_MAD_CONF.get(tm_mad)
    if conf is None:
        raise OneError(ErrorCode.INTERNAL, f'TM_MAD named "{tm_mad}" is not defined in oned.conf')
    bad = OneError(ErrorCode.INTERNAL, "Attribute shared, ln_target or clone_target in "
                   f"TM_MAD_CONF for {tm_mad} is missing or has wrong value in oned.conf")
    t = ds.template
    if ds.type == DatastoreType.SYSTEM_DS:
        if "SHARED" not in conf:
            raise bad
        t.replace("SHARED", conf["SHARED"])
        t.replace("DS_MIGRATE", conf.get("DS_MIGRATE", "YES"))
        t.replace("DS_LIVE_MIGRATE", conf.get("DS_LIVE_MIGRATE", "NO"))
        t.replace("DS_MIGRATE_SNAP", conf.get("DS_MIGRATE_SNAP", "NO"))
        t.erase("LN_TARGET")
        t.erase("CLONE_TARGET")
    else:
        system = conf.get("TM_MAD_SYSTEM", "")
        if system:
            t.replace("TM_MAD_SYSTEM", system)
            for mode in (m.strip().upper() for m in system.split(",") if m.strip()):
                for attr in (f"LN_TARGET_{mode}", f"CLONE_TARGET_{mode}"):
                    if conf.get(attr, "").upper() not in ("NONE", "SELF", "SYSTEM"):
                        raise bad
                    t.replace(attr, conf[attr])
                if not conf.get(f"DISK_TYPE_{mode}"):
                    raise bad
                t.replace(f"DISK_TYPE_{mode}", conf[f"DISK_TYPE_{mode}"])
        for attr in ("LN_TARGET", "CLONE_TARGET"):
            if conf.get(attr, "").upper() not in ("NONE", "SELF", "SYSTEM"):
                raise bad
            t.replace(attr, conf[attr])
        for attr in ("DRIVER", "DISK_TYPE"):
            if conf.get(attr):
                t.replace(attr, conf[attr])
        t.erase("SHARED")
    t.replace("ALLOW_ORPHANS", conf.get("ALLOW_ORPHANS", "NO"))
    ps = (conf.get("PERSISTENT_SNAPSHOTS") or "YES").upper() in ("YES", "TRUE", "1")
    t.replace("PERSISTENT_SNAPSHOTS", "YES" if ps else "NO")


@method("one.datastore.allocate", "si", 1, obj="DATASTORE")
def datastore_allocate(core: Oned, ctx: Ctx, text: str, cluster_id: int = -1) -> int:
    tmpl = _parse(text)
    authorize(ctx.caller, Check(CREATE, "DATASTORE"))
    name = tmpl.get("NAME") or ""
    kind = (tmpl.get("TYPE") or "IMAGE_DS").upper()
    if kind not in DatastoreType.__members__:
        raise OneError(ErrorCode.ALLOCATE, f"Invalid DATASTORE TYPE: {kind}.")
    ds_mad = tmpl.get("DS_MAD") or ("-" if kind == "SYSTEM_DS" else "")
    tm_mad = tmpl.get("TM_MAD") or ""
    if not name:
        raise OneError(ErrorCode.ALLOCATE, "Invalid NAME, it cannot be empty")
    if any(d.name == name for d in core.store.datastores.values()):
        other = next(d.id for d in core.store.datastores.values() if d.name == name)
        raise OneError(ErrorCode.ALLOCATE, f"NAME is already taken by DATASTORE {other}.")
    if not ds_mad:
        raise OneError(ErrorCode.ALLOCATE, "No DS_MAD in template.")
    tmpl.erase("NAME")
    ds = Datastore(-1, name, DatastoreType[kind], ds_mad, tm_mad, "",
                   total_mb=core.config.datastore_mb)
    ds.template = tmpl
    if kind != "BACKUP_DS":
        try:
            set_tm_mad(ds, tm_mad)      # Datastore::insert
        except OneError as exc:
            raise OneError(ErrorCode.ALLOCATE, exc.message) from exc
    # DatastoreAllocateAPI::allocate: cluster -1 is the default cluster 0
    cid = 0 if cluster_id == -1 else cluster_id
    if cid not in core.store.clusters:
        raise no_exists("CLUSTER", cid)
    ds.cluster_ids = [cid]
    did = core.store.next_id("datastores")
    base = core.ds_path(did)
    base.mkdir(parents=True, exist_ok=True)
    ds.id, ds.base_path = did, str(base)
    defaults = {"DISK_TYPE": "FILE", "RESTRICTED_DIRS": "/",
                "SAFE_DIRS": f"/var/tmp /tmp {core.root}", "TM_MAD": tm_mad, "TYPE": kind}
    if kind != "SYSTEM_DS":
        defaults.update(DS_MAD=ds_mad)
    for key, value in defaults.items():
        if not tmpl.has(key):
            tmpl.add(key, value)
    core.store.datastores[did] = ds
    ctx.extra_xml = datastore_xml(ds, 0)
    return did


@method("one.datastore.update", "isi", 2, obj="DATASTORE")
def datastore_update(core: Oned, ctx: Ctx, ds_id: int, text: str, mode: int = 0) -> int:
    """SharedAPI::update -> PoolObjectSQL::replace_template (0) or
    append_template (1) -> Datastore::post_update_template: TYPE and DS_MAD
    kept when missing, a TM_MAD applies its TM_MAD_CONF (set_tm_mad) and is
    used by every disk set up from then on; disks already on VMs keep theirs.
    Any failure restores the old template."""
    ds = core.datastore(ds_id)
    authorize(ctx.caller, of(ds, "DATASTORE", MANAGE))
    if mode not in (0, 1):
        raise OneError(ErrorCode.RPC_API, "Wrong update type")
    new = _parse(text)
    old_template, old_tm = ds.template, ds.tm_mad
    if mode == 1:
        merged = ds.template.copy()
        merged.merge(new)
        new = merged
    old_type = ds.type
    ds.template = new
    try:
        current = DatastoreType(ds.type)
        wanted = (new.get("TYPE") or "").upper()
        if ds.id == 0:
            kind = DatastoreType.SYSTEM_DS
        elif current == DatastoreType.BACKUP_DS or not wanted:
            kind = current
        else:   # Datastore::str_to_type: anything unknown is an IMAGE_DS
            kind = DatastoreType[wanted] if wanted in DatastoreType.__members__ \
                else DatastoreType.IMAGE_DS
        ds.type = kind
        new.replace("TYPE", kind.name)
        tm_mad = new.get("TM_MAD") or ""
        if tm_mad and kind != DatastoreType.BACKUP_DS:
            set_tm_mad(ds, tm_mad)
            ds.tm_mad = tm_mad
        else:
            new.replace("TM_MAD", ds.tm_mad)
        if kind == DatastoreType.SYSTEM_DS:
            ds.ds_mad = "-"
            new.erase("DS_MAD")
        elif new.get("DS_MAD"):
            ds.ds_mad = new.get("DS_MAD") or ds.ds_mad
        else:
            new.replace("DS_MAD", ds.ds_mad)
    except OneError as exc:
        ds.template, ds.tm_mad, ds.type = old_template, old_tm, old_type
        raise OneError(ErrorCode.INTERNAL, f"Cannot update template. {exc.message}") from exc
    return ds_id


@method("one.datastore.info", "ib", 1, obj="DATASTORE", info=True)
def datastore_info(core: Oned, ctx: Ctx, ds_id: int, decrypt: bool = False) -> str:
    ds = core.datastore(ds_id)
    authorize(ctx.caller, of(ds, "DATASTORE", USE))
    return datastore_xml(ds, core.ds_used_mb(ds))


@method("one.datastorepool.info", "", obj="DATASTORE", info=True)
def datastorepool_info(core: Oned, ctx: Ctx, *_ignored: int) -> str:
    dss = auth.pool_filter(ctx.caller, list(core.store.datastores.values()), "DATASTORE", -2)
    return pool_xml("DATASTORE_POOL", [datastore_xml(d, core.ds_used_mb(d))
                                       for d in auth.id_range(dss, -1, -1)])


@method("one.datastore.enable", "ib", obj="DATASTORE")
def datastore_enable(core: Oned, ctx: Ctx, ds_id: int, enable: bool) -> int:
    ds = core.datastore(ds_id)
    authorize(ctx.caller, of(ds, "DATASTORE", MANAGE))
    if ds.type != DatastoreType.SYSTEM_DS:
        raise OneError(ErrorCode.INTERNAL, "Only SYSTEM_DS can be disabled or enabled")
    ds.state = 0 if enable else 1
    return ds_id
