"""one.vm.* and one.vmpool.*: parameter lists, checks and answers.

Owns: the XML-RPC face of VirtualMachineAPI (src/rm/api/VirtualMachineAPI.cc,
VirtualMachinePoolAPI.cc): which checks run in which order, which error code
and resp_id each refusal carries, and what a success returns. State
transitions are delegated to lifecycle and hotplug.
Must not: change states or files directly.
"""

from __future__ import annotations

import re

from tests.onesim import auth
from tests.onesim.auth import ADMIN, MANAGE, USE, Check, authorize, of
from tests.onesim.constants import (
    VM_ADMIN_ACTIONS,
    DatastoreType,
    ErrorCode,
    ImageState,
    ImageType,
    Lcm,
    VmState,
    state_str,
)
from tests.onesim.dispatch import Ctx, driver, method
from tests.onesim.documents import pool_xml, vm_short_xml, vm_xml
from tests.onesim.lifecycle import WrongState, close_cp_history
from tests.onesim.model import Image, Vm, now
from tests.onesim.oned import Oned, OneError, no_exists
from tests.onesim.ownership import apply_chown, check_name, chown_object, chown_targets
from tests.onesim.templates import Template, TemplateError, parse_str_or_xml


def get_vm(core: Oned, ctx: Ctx, vid: int, op: str) -> Vm:
    """vm_authorization: NO_EXISTS (resp_id = id) or AUTHORIZATION."""
    vm = core.vm(vid)
    authorize(ctx.caller, of(vm, "VM", op))
    return vm


@method("one.vm.info", "ib", 1, info=True)
def vm_info(core: Oned, ctx: Ctx, vid: int, decrypt: bool = False) -> str:
    return vm_xml(get_vm(core, ctx, vid, USE))


def _pool(core: Oned, ctx: Ctx, flag: int, start: int, end: int, state: int, query: str,
          extended: bool) -> str:
    if flag < -4:
        raise OneError(ErrorCode.RPC_API, "Incorrect filter_flag")
    if state < -2 or state > VmState.CLONING_FAILURE:
        raise OneError(ErrorCode.RPC_API, f"Incorrect state filter {state}")
    if query:
        raise OneError(ErrorCode.INTERNAL,
                       "JSON query search is not supported by the SQL backend")
    vms = list(core.store.vms.values())
    if state == -1:
        vms = [v for v in vms if v.state != VmState.DONE]
    elif state >= 0:
        vms = [v for v in vms if v.state == state]
    vms = auth.id_range(auth.pool_filter(ctx.caller, vms, "VM", flag), start, end)
    render = vm_xml if extended else vm_short_xml
    return pool_xml("VM_POOL", [render(v) for v in vms])


@method("one.vmpool.info", "iiiis", 4, info=True)
def vmpool_info(core: Oned, ctx: Ctx, flag: int, start: int, end: int, state: int,
                query: str = "") -> str:
    return _pool(core, ctx, flag, start, end, state, query, extended=False)


@method("one.vmpool.infoextended", "iiiis", 4, info=True)
def vmpool_infoextended(core: Oned, ctx: Ctx, flag: int, start: int, end: int, state: int,
                        query: str = "") -> str:
    return _pool(core, ctx, flag, start, end, state, query, extended=True)


@method("one.vm.action", "si")
def vm_action(core: Oned, ctx: Ctx, action: str, vid: int) -> int:
    vm = core.vm(vid)
    op = ADMIN if action in VM_ADMIN_ACTIONS else MANAGE
    authorize(ctx.caller, of(vm, "VM", op))
    life = ctx.sim.lifecycle
    caller = ctx.caller
    try:
        if action in ("terminate", "terminate-hard"):
            life.terminate(vm, action.endswith("hard"), caller)
        elif action == "hold":
            life.hold(vm)
        elif action == "release":
            life.release(vm)
        elif action == "suspend":
            life.suspend(vm, caller)
        elif action == "resume":
            life.resume(vm, caller)
        elif action in ("poweroff", "poweroff-hard"):
            life.poweroff(vm, action.endswith("hard"), caller)
        elif action in ("undeploy", "undeploy-hard"):
            life.undeploy(vm, action.endswith("hard"), caller)
        elif action == "stop":
            life.stop(vm, caller)
        elif action in ("reboot", "reboot-hard"):
            if not (vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING):
                raise WrongState("This action is not available for state "
                                 f"{state_str(vm.state, vm.lcm)}")
            vm.resched = 0
        elif action in ("resched", "unresched"):
            if not (vm.state == VmState.POWEROFF or (vm.state == VmState.ACTIVE and vm.lcm in (
                    Lcm.RUNNING, Lcm.UNKNOWN))):
                raise WrongState("This action is not available for state "
                                 f"{state_str(vm.state, vm.lcm)}")
            vm.resched = 1 if action == "resched" else 0
        else:
            raise OneError(ErrorCode.ACTION, f'Action "{action}" is not supported')
    except WrongState as exc:
        raise OneError(ErrorCode.ACTION, f'Error performing action "{action}": {exc}') from exc
    return vid


@method("one.vm.update", "isi", 2)
def vm_update(core: Oned, ctx: Ctx, vid: int, text: str, mode: int = 0) -> int:
    vm = get_vm(core, ctx, vid, MANAGE)
    if mode not in (0, 1):
        raise OneError(ErrorCode.RPC_API, "Wrong update type")
    try:
        new = parse_str_or_xml(text)
    except TemplateError as exc:
        raise OneError(ErrorCode.ACTION, str(exc)) from exc
    if mode == 1:
        vm.user_template.merge(new)
    else:
        vm.user_template = new
    core.update_vm(vm)
    return vid


_UPDATECONF_VECTORS = ("OS", "FEATURES", "INPUT", "GRAPHICS", "RAW", "CONTEXT", "CPU_MODEL",
                       "BACKUP_CONFIG", "VIDEO")


@method("one.vm.updateconf", "isi", 2)
def vm_updateconf(core: Oned, ctx: Ctx, vid: int, text: str, mode: int = 0) -> int:
    vm = get_vm(core, ctx, vid, MANAGE)
    if vm.state in (VmState.SUSPENDED, VmState.STOPPED, VmState.DONE) or (
            vm.state == VmState.ACTIVE and vm.lcm != Lcm.RUNNING):
        raise OneError(ErrorCode.ACTION, f"Could not update configuration for VM {vid}, wrong "
                                         f"state {state_str(vm.state, vm.lcm)}.")
    try:
        new = parse_str_or_xml(text)
    except TemplateError as exc:
        raise OneError(ErrorCode.INTERNAL, str(exc)) from exc
    for name in _UPDATECONF_VECTORS:
        value = new.vector(name)
        if value is None:
            continue
        if name == "BACKUP_CONFIG":
            for key, val in value.items():
                if mode == 1 or key:
                    vm.backup_config.replace(key, val)
        else:
            vm.template.replace(name, value)
    core.update_vm(vm)
    return vid


@method("one.vm.rename", "is")
def vm_rename(core: Oned, ctx: Ctx, vid: int, name: str) -> int:
    """SharedAPI::rename: same name is a no-op; VM names need not be unique
    (VirtualMachineAPI::exist is -1); PoolObjectSQL::set_name checks the name."""
    vm = get_vm(core, ctx, vid, MANAGE)
    if name == vm.name:
        return vid
    check_name(name)
    vm.name = name
    core.update_vm(vm)
    return vid


@method("one.vm.chmod", "iiiiiiiiii")
def vm_chmod(core: Oned, ctx: Ctx, vid: int, *bits: int) -> int:
    vm = get_vm(core, ctx, vid, MANAGE)
    if any(b == 1 for b in (bits[2], bits[5], bits[8])):
        authorize(ctx.caller, of(vm, "VM", ADMIN))
    vm.perms.bits = [old if new == -1 else new for old, new in zip(vm.perms.bits, bits,
                                                                     strict=True)]
    core.update_vm(vm)
    return vid


@method("one.vm.chown", "iii")
def vm_chown(core: Oned, ctx: Ctx, vid: int, uid: int, gid: int) -> int:
    """SharedAPI::chown: the new user and group must exist (checked first),
    a chown to the current user or group is ignored; VM names need not be
    unique per owner (VirtualMachineAPI::check_name_unique)."""
    user, group = chown_targets(core, uid, gid)
    vm = core.vm(vid)
    user, group = chown_object(ctx.caller, vm, "VM", user, group)
    apply_chown(vm, user, group)
    core.update_vm(vm)
    return vid


@method("one.vm.deploy", "iibis", 2)
def vm_deploy(core: Oned, ctx: Ctx, vid: int, hid: int, enforce: bool = False,
              ds_id: int = -1, extra: str = "") -> int:
    host = core.store.hosts.get(hid)
    if host is None:
        raise no_exists("HOST", hid)
    vm = core.vm(vid)
    if ds_id == -1:
        if vm.history and vm.history[-1].action in (9, 5, 6):  # STOP, UNDEPLOY(-HARD)
            ds_id = vm.system_ds()
        else:
            system = sorted(d.id for d in core.store.datastores.values()
                            if d.type == DatastoreType.SYSTEM_DS
                            and host.cluster_id in d.cluster_ids)
            if not system:
                raise OneError(ErrorCode.ACTION, f"cluster [{host.cluster_id}] does not have "
                                                 "any datastore of type SYSTEM_DS.")
            ds_id = system[0]
    ds = core.store.datastores.get(ds_id)
    if ds is None:
        raise no_exists("DATASTORE", ds_id)
    if ds.type != DatastoreType.SYSTEM_DS:
        raise OneError(ErrorCode.INTERNAL, f"Trying to use datastore [{ds_id}] to deploy the VM,"
                                           " but it is not of type system datastore.")
    if host.cluster_id not in ds.cluster_ids:
        raise OneError(ErrorCode.ACTION, f"datastore [{ds_id}] and host [{hid}] are not in the "
                                         f"same cluster [{host.cluster_id}].")
    authorize(ctx.caller, of(vm, "VM", ADMIN), Check(MANAGE, "HOST", hid, 0, 0, None),
              of(ds, "DATASTORE", USE))
    if vm.state not in (VmState.PENDING, VmState.HOLD, VmState.STOPPED, VmState.UNDEPLOYED):
        raise OneError(ErrorCode.ACTION, "Deploy action is not available for state "
                                         f"{state_str(vm.state, vm.lcm)}")
    ctx.sim.lifecycle.deploy(vm, hid, ds_id, ctx.caller)
    return vid


# ---------------------------------------------------------------------------
# Disks
# ---------------------------------------------------------------------------

@method("one.vm.attach", "is")
def vm_attach(core: Oned, ctx: Ctx, vid: int, text: str) -> int:
    vm = core.vm(vid)
    if not vm.history:
        raise OneError(ErrorCode.ACTION, "VM is not running in any host")
    try:
        tmpl = parse_str_or_xml(text)
    except TemplateError as exc:
        raise OneError(ErrorCode.INTERNAL, str(exc)) from exc
    checks = [of(vm, "VM", MANAGE)]
    for disk in tmpl.vectors("DISK"):
        iid = disk.get("IMAGE_ID")
        img = core.store.images.get(int(iid)) if iid and iid.lstrip("-").isdigit() else None
        if img is not None:
            checks.append(of(img, "IMAGE", USE))
    authorize(ctx.caller, *checks)
    try:
        ctx.sim.hotplug.attach(vm, tmpl, ctx.caller)
    except WrongState as exc:
        raise OneError(ErrorCode.ACTION, str(exc)) from exc
    return vid


@method("one.vm.detach", "ii")
def vm_detach(core: Oned, ctx: Ctx, vid: int, disk_id: int) -> int:
    vm = get_vm(core, ctx, vid, MANAGE)
    if vm.disk(disk_id) is None:
        raise OneError(ErrorCode.ACTION, "VM disk does not exist")
    try:
        ctx.sim.hotplug.detach(vm, disk_id, ctx.caller)
    except WrongState as exc:
        raise OneError(ErrorCode.ACTION, str(exc)) from exc
    return vid


def _snapshot_disk(vm: Vm, disk_id: int, create: bool) -> dict[str, str]:
    disk = vm.disk(disk_id)
    if disk is None:
        raise OneError(ErrorCode.ACTION, "VM disk does not exist")
    if disk.get("TYPE", "").upper() in ("FS", "SWAP") and "IMAGE_ID" not in disk:
        what = "Cannot make snapshots" if create else "Snapshots are not supported"
        raise OneError(ErrorCode.ACTION, f"{what} on disks of type: {disk.get('TYPE', '')}")
    return disk


@method("one.vm.disksnapshotcreate", "iis")
def vm_disksnapshotcreate(core: Oned, ctx: Ctx, vid: int, disk_id: int, name: str) -> int:
    vm = core.vm(vid)
    if (vm.backup_config.get("MODE") or "").upper() == "INCREMENT":
        raise OneError(ErrorCode.ACTION, 'Action "disk-snapshot-create" is not compatible with '
                                         "incremental backups")
    _snapshot_disk(vm, disk_id, create=True)
    authorize(ctx.caller, of(vm, "VM", MANAGE))
    try:
        return int(ctx.sim.hotplug.snapshot_create(vm, disk_id, name, ctx.caller))
    except WrongState as exc:
        raise OneError(ErrorCode.ACTION, str(exc)) from exc


@method("one.vm.disksnapshotrevert", "iii")
def vm_disksnapshotrevert(core: Oned, ctx: Ctx, vid: int, disk_id: int, snap_id: int) -> int:
    vm = core.store.vms.get(vid)
    if vm is not None:
        _snapshot_disk(vm, disk_id, create=False)
    vm = get_vm(core, ctx, vid, MANAGE)
    try:
        ctx.sim.hotplug.snapshot_revert(vm, disk_id, snap_id, ctx.caller)
    except WrongState as exc:
        raise OneError(ErrorCode.ACTION, str(exc)) from exc
    return vid


@method("one.vm.disksnapshotdelete", "iii")
def vm_disksnapshotdelete(core: Oned, ctx: Ctx, vid: int, disk_id: int, snap_id: int) -> int:
    vm = core.vm(vid)
    _snapshot_disk(vm, disk_id, create=False)
    authorize(ctx.caller, of(vm, "VM", MANAGE))
    try:
        ctx.sim.hotplug.snapshot_delete(vm, disk_id, snap_id, ctx.caller)
    except WrongState as exc:
        raise OneError(ErrorCode.ACTION, str(exc)) from exc
    return vid


@method("one.vm.disksnapshotrename", "iiis")
def vm_disksnapshotrename(core: Oned, ctx: Ctx, vid: int, disk_id: int, snap_id: int,
                          name: str) -> int:
    vm = get_vm(core, ctx, vid, MANAGE)
    _snapshot_disk(vm, disk_id, create=False)
    snaps = vm.snapshots.get(disk_id)
    snap = snaps.get(snap_id) if snaps is not None else None
    if snap is None:
        raise OneError(ErrorCode.ACTION, "Snapshot does not exist")
    snap["NAME"] = name
    core.update_vm(vm)
    return vid


@method("one.vm.disksaveas", "iissi")
def vm_disksaveas(core: Oned, ctx: Ctx, vid: int, disk_id: int, name: str, img_type: str,
                  snap_id: int) -> int:
    """VirtualMachineAPI::disk_save_as: every refusal carries resp_id = the VM."""
    hot = ctx.sim.hotplug
    vm = core.store.vms.get(vid)
    if vm is None:
        raise OneError(ErrorCode.NO_EXISTS, "", vid, "VM")
    saved_state = (vm.state, vm.lcm)
    if not hot.set_saveas_state(vm):
        raise OneError(ErrorCode.INTERNAL,
                       "VM has to be RUNNING, POWEROFF or SUSPENDED to save disks.", vid)
    disk = vm.disk(disk_id)
    problem = None
    if disk is None:
        problem = "DISK does not exist."
    elif "IMAGE_ID" not in disk:
        problem = "DISK does not have a valid IMAGE_ID."
    elif snap_id != -1 and (vm.snapshots.get(disk_id) is None
                            or vm.snapshots[disk_id].get(snap_id) is None):
        problem = "Snapshot does not exist."
    if problem or disk is None:
        vm.state, vm.lcm = saved_state
        raise OneError(ErrorCode.INTERNAL, f"Cannot use DISK. {problem}", vid)
    disk["HOTPLUG_SAVE_AS_ACTIVE"] = "YES"
    disk["HOTPLUG_SAVE_AS_SNAPSHOT_ID"] = str(snap_id)
    core.update_vm(vm)
    try:
        img = _saveas_image(core, ctx, vm, disk, name, img_type)
    except OneError as err:
        err.resp_id = vid if err.code != ErrorCode.NO_EXISTS or err.obj != "IMAGE" \
            else err.resp_id
        hot.clear_saveas_state(vm)
        hot.clear_saveas_disk(vm)
        core.update_vm(vm)
        raise
    hot.start_saveas(vm, disk, img)
    return img.id


def _saveas_image(core: Oned, ctx: Ctx, vm: Vm, disk: dict[str, str], name: str,
                  img_type: str) -> Image:
    src = core.store.images.get(int(disk["IMAGE_ID"]))
    if src is None:
        raise no_exists("IMAGE", int(disk["IMAGE_ID"]))
    if src.type not in (ImageType.OS, ImageType.DATABLOCK, ImageType.CDROM):
        raise OneError(ErrorCode.INTERNAL,
                       f"Cannot save an image of type {ImageType(src.type).name}")
    ds = core.store.datastores.get(src.datastore_id)
    if ds is None:
        raise no_exists("DATASTORE", src.datastore_id)
    size = int(disk.get("SIZE", "0") or 0)
    if size > core.ds_free_mb(ds):
        raise OneError(ErrorCode.ACTION, "Not enough space in datastore")
    authorize(ctx.caller, of(vm, "VM", MANAGE), Check("CREATE", "IMAGE"),
              of(ds, "DATASTORE", USE))
    kind = img_type.upper() if img_type else ImageType(src.type).name
    if kind not in ImageType.__members__:
        raise OneError(ErrorCode.ALLOCATE, f"Unknown image type {img_type}", obj="IMAGE")
    from tests.onesim.api_image import check_image_name
    check_image_name(core, name, ctx.caller.uid)
    c = ctx.caller
    img = Image(core.store.next_id("images"), c.uid, c.gid, c.uname, c.gname, name,
                ImageType[kind], ds.id, ds.name, perms=core.new_perms(c),
                disk_type=ds.disk_type, regtime=now(), modtime=now(), format="save_as",
                size=size, state=ImageState.LOCKED, prev_state=ImageState.INIT)
    prefix = src.template.get("DEV_PREFIX")
    if prefix:
        img.template.add("DEV_PREFIX", prefix)
    elif img.type in (ImageType.OS, ImageType.DATABLOCK):
        img.template.add("DEV_PREFIX", "sd")
    if src.template.get("TARGET"):
        img.template.add("TARGET", src.template.get("TARGET") or "")
    img.template.add("SAVED_DISK_ID", disk["DISK_ID"])
    img.template.add("SAVED_IMAGE_ID", str(src.id))
    img.template.add("SAVED_VM_ID", str(vm.id))
    img.template.add("SAVE_AS_HOT", "YES")
    core.store.images[img.id] = img
    ds.images.append(img.id)
    return img


# ---------------------------------------------------------------------------
# one.vm.resize: VirtualMachineAPI::resize (src/rm/api/VirtualMachineAPI.cc)
# and DispatchManager::resize (src/dm/DispatchManagerActions.cc)
# ---------------------------------------------------------------------------

RESIZE_ACTION = 35  # include/VMActions.h
_INT = re.compile(r"\s*[+-]?\d+")
_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _template_number(tmpl: Template, name: str, pattern: re.Pattern[str]) -> float:
    """Template::get(name, T&): 0 when absent; `iss >> value` keeps the
    longest numeric prefix, and 0 when there is none."""
    m = pattern.match(tmpl.get(name) or "")
    return float(m.group(0)) if m else 0.0


def _cpp(value: float) -> str:
    """A float written by `oss << value` (%g, six digits)."""
    return format(value, ".6g")


@method("one.vm.resize", "isb", 2)
def vm_resize(core: Oned, ctx: Ctx, vid: int, text: str, enforce: bool = True) -> int:
    """Parse, authorise (MANAGE: "resize" is in VM_MANAGE_OPERATIONS), read
    CPU/VCPU/MEMORY (0 keeps the current value), then DispatchManager::resize:
    PENDING/HOLD/POWEROFF/UNDEPLOYED take the new size at once; RUNNING goes
    HOTPLUG_RESIZE with the old size kept in RESIZE until the driver answers;
    other states are refused. onesim's host never runs out of capacity, and
    a resize to the same size succeeds without a state change, as oned."""
    try:
        tmpl = parse_str_or_xml(text)
    except TemplateError as exc:
        raise OneError(ErrorCode.INTERNAL, str(exc)) from exc
    vm = get_vm(core, ctx, vid, MANAGE)
    ncpu = _template_number(tmpl, "CPU", _FLOAT)
    nvcpu = int(_template_number(tmpl, "VCPU", _INT))
    nmemory = int(_template_number(tmpl, "MEMORY", _INT))
    if ncpu < 0:
        raise OneError(ErrorCode.INTERNAL, "CPU must be a positive float or integer value.")
    if nmemory < 0:
        raise OneError(ErrorCode.INTERNAL, "MEMORY must be a positive integer value.")
    if nvcpu < 0:
        raise OneError(ErrorCode.INTERNAL, "VCPU must be a positive integer value.")
    ocpu = _template_number(vm.template, "CPU", _FLOAT)
    ovcpu = int(_template_number(vm.template, "VCPU", _INT))
    omemory = int(_template_number(vm.template, "MEMORY", _INT))
    ncpu, nvcpu, nmemory = ncpu or ocpu, nvcpu or ovcpu, nmemory or omemory

    def apply() -> None:   # VirtualMachine::resize
        if ncpu > 0:
            vm.template.replace("CPU", _cpp(ncpu))
        if nmemory > 0:
            vm.template.replace("MEMORY", str(nmemory))
        if nvcpu > 0:
            vm.template.replace("VCPU", str(nvcpu))

    refused = f"Cannot resize a VM in state {state_str(vm.state, vm.lcm)}"
    if vm.state in (VmState.INIT, VmState.PENDING, VmState.HOLD, VmState.UNDEPLOYED,
                    VmState.CLONING, VmState.CLONING_FAILURE, VmState.POWEROFF):
        apply()
        if vm.state == VmState.POWEROFF and vm.history:
            close_cp_history(vm, RESIZE_ACTION, ctx.caller)
    elif vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING:
        if (ocpu, omemory, ovcpu) == (ncpu, nmemory, nvcpu):
            return vid   # "Nothing to resize": rc 0, the VM is not written
        apply()
        vm.lcm = Lcm.HOTPLUG_RESIZE
        vm.template.erase("RESIZE")
        vm.template.add("RESIZE", {"CPU": _cpp(ocpu), "VCPU": str(ovcpu),
                                   "MEMORY": str(omemory)})
        vm.resched = 0
        close_cp_history(vm, RESIZE_ACTION, ctx.caller)
        delay = core.config.delay + core.faults.driver_delay("resize", vm.id, None)
        core.schedule({"op": "vm.resize", "vm": vm.id}, delay)
    else:
        raise OneError(ErrorCode.ACTION, refused)
    core.update_vm(vm)
    return vid


@driver("vm.resize")
def resize_done(core: Oned, sim: object, op: dict[str, object]) -> None:
    """LifeCycleManager::trigger_resize_success: back to RUNNING, RESIZE gone."""
    vm = core.store.vms.get(int(str(op["vm"])))
    if vm is None or vm.state != VmState.ACTIVE or vm.lcm != Lcm.HOTPLUG_RESIZE:
        return
    vm.lcm = Lcm.RUNNING
    vm.template.erase("RESIZE")
    core.update_vm(vm)
