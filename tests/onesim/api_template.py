"""VM templates and the creation of VMs (one.template.*, one.vm.allocate).

Owns: TemplateAPI (allocate with per-owner unique names, info, delete,
instantiate with name / hold / extra template merged over the template) and
VirtualMachine::insert as far as a backup tool sees it: VMID, TEMPLATE_ID,
the default name "<template>-<id>", CPU/MEMORY/VCPU checks, what goes to
TEMPLATE vs USER_TEMPLATE, OS UUID/MACHINE, disks acquired with their
targets (OS disks, then CD-ROMs and the context, then datablocks), the
CONTEXT variables ($VMID..., TOKEN -> ONEGATE_ENDPOINT/VMID), automatic
requirements, BACKUP_CONFIG, and CLONING while an image is still LOCKED.
Must not: run the VM (lifecycle/scheduler do).
"""

from __future__ import annotations

import re
import uuid

from tests.onesim import auth
from tests.onesim.auth import CREATE, MANAGE, USE, Check, authorize, of
from tests.onesim.constants import ErrorCode, ImageState, ImageType, VmState
from tests.onesim.disks import DiskError, acquire_disk, assign_target, vm_clusters
from tests.onesim.dispatch import Ctx, method
from tests.onesim.documents import pool_xml, vmtemplate_xml
from tests.onesim.model import Vm, VmTemplate, now
from tests.onesim.oned import Caller, Oned, OneError, no_exists
from tests.onesim.templates import Template, TemplateError, parse_str_or_xml

TEMPLATE_ATTRS = {
    "CPU", "MEMORY", "VCPU", "VCPU_MAX", "MEMORY_MAX", "MEMORY_SLOTS", "MEMORY_RESIZE_MODE",
    "DISK", "NIC", "NIC_ALIAS", "NIC_DEFAULT", "CONTEXT", "OS", "GRAPHICS", "VIDEO", "FEATURES",
    "INPUT", "RAW", "TOPOLOGY", "NUMA_NODE", "PCI", "EMULATOR", "CPU_MODEL", "SPICE_OPTIONS",
    "HYPERV_OPTIONS", "CLONING_TEMPLATE_ID", "CPU_COST", "MEMORY_COST", "DISK_COST", "TPM",
    "IOMMU", "SUBMIT_ON_HOLD",
}


def _parse(text: str, code: int = ErrorCode.INTERNAL) -> Template:
    try:
        return parse_str_or_xml(text)
    except TemplateError as exc:
        raise OneError(code, str(exc)) from exc


@method("one.template.allocate", "s", obj="TEMPLATE")
def template_allocate(core: Oned, ctx: Ctx, text: str) -> int:
    tmpl = _parse(text)
    authorize(ctx.caller, Check(CREATE, "TEMPLATE"))
    name = tmpl.get("NAME") or ""
    if not name:
        raise OneError(ErrorCode.INTERNAL, "No NAME in template.")
    for t in core.store.templates.values():
        if t.name == name and t.uid == ctx.caller.uid:
            raise OneError(ErrorCode.INTERNAL, f"NAME is already taken by TEMPLATE {t.id}.")
    tmpl.erase("NAME")
    c = ctx.caller
    vt = VmTemplate(core.store.next_id("templates"), c.uid, c.gid, c.uname, c.gname, name,
                    core.new_perms(c), now(), tmpl)
    core.store.templates[vt.id] = vt
    ctx.extra_xml = vmtemplate_xml(vt)
    return vt.id


def _template(core: Oned, tid: int) -> VmTemplate:
    vt = core.store.templates.get(tid)
    if vt is None:
        raise no_exists("TEMPLATE", tid)
    return vt


@method("one.template.info", "ibb", 1, obj="TEMPLATE", info=True)
def template_info(core: Oned, ctx: Ctx, tid: int, extended: bool = False,
                  decrypt: bool = False) -> str:
    vt = _template(core, tid)
    authorize(ctx.caller, of(vt, "TEMPLATE", USE))
    return vmtemplate_xml(vt)


@method("one.templatepool.info", "iii", obj="TEMPLATE", info=True)
def templatepool_info(core: Oned, ctx: Ctx, flag: int, start: int, end: int) -> str:
    if flag < -4:
        raise OneError(ErrorCode.RPC_API, "Incorrect filter_flag")
    ts = auth.pool_filter(ctx.caller, list(core.store.templates.values()), "TEMPLATE", flag)
    return pool_xml("VMTEMPLATE_POOL", [vmtemplate_xml(t) for t in auth.id_range(ts, start, end)])


@method("one.template.delete", "ib", 1, obj="TEMPLATE")
def template_delete(core: Oned, ctx: Ctx, tid: int, recursive: bool = False) -> int:
    vt = _template(core, tid)
    ctx.extra_xml = vmtemplate_xml(vt)
    authorize(ctx.caller, of(vt, "TEMPLATE", MANAGE))
    del core.store.templates[tid]
    return tid


@method("one.template.update", "isi", 2, obj="TEMPLATE")
def template_update(core: Oned, ctx: Ctx, tid: int, text: str, mode: int = 0) -> int:
    vt = _template(core, tid)
    authorize(ctx.caller, of(vt, "TEMPLATE", MANAGE))
    if mode not in (0, 1):
        raise OneError(ErrorCode.RPC_API, "Wrong update type")
    new = _parse(text)
    if mode == 1:
        vt.template.merge(new)
    else:
        vt.template = new
    return tid


@method("one.template.chmod", "iiiiiiiiiib", 10, obj="TEMPLATE")
def template_chmod(core: Oned, ctx: Ctx, tid: int, *bits: int) -> int:
    vt = _template(core, tid)
    authorize(ctx.caller, of(vt, "TEMPLATE", MANAGE))
    vt.perms.bits = [o if n == -1 else n for o, n in zip(vt.perms.bits, bits[:9], strict=True)]
    return tid


@method("one.template.instantiate", "isbsb", 2, obj="TEMPLATE")
def template_instantiate(core: Oned, ctx: Ctx, tid: int, name: str, hold: bool = False,
                         extra: str = "", persistent: bool = False) -> int:
    vt = _template(core, tid)
    tmpl = vt.template.copy()
    extra_tmpl = _parse(extra)
    tmpl.merge(extra_tmpl)
    for attr in ("NAME", "TEMPLATE_NAME", "TEMPLATE_ID"):
        tmpl.erase(attr)
    tmpl.add("TEMPLATE_NAME", vt.name)
    tmpl.add("TEMPLATE_ID", str(tid))
    if name:
        tmpl.add("NAME", name)
    checks = [of(vt, "TEMPLATE", USE), Check(CREATE, "VM")]
    if len(extra_tmpl):
        checks.append(Check(CREATE, "TEMPLATE"))
    checks += _image_checks(core, tmpl, ctx.caller)
    authorize(ctx.caller, *checks)
    return create_vm(core, ctx, tmpl, hold).id


@method("one.vm.allocate", "sb", 1)
def vm_allocate(core: Oned, ctx: Ctx, text: str, hold: bool = False) -> int:
    tmpl = _parse(text)
    authorize(ctx.caller, Check(CREATE, "VM"), *_image_checks(core, tmpl, ctx.caller))
    try:
        return create_vm(core, ctx, tmpl, hold).id
    except OneError as err:
        if err.code == ErrorCode.ALLOCATE:  # pool_allocate: rc < 0 -> INTERNAL
            raise OneError(ErrorCode.INTERNAL, err.message) from err
        raise


def _image_checks(core: Oned, tmpl: Template, caller: Caller) -> list[Check]:
    checks = []
    for disk in tmpl.vectors("DISK"):
        iid = disk.get("IMAGE_ID")
        img = core.store.images.get(int(iid)) if iid and iid.lstrip("-").isdigit() else None
        if img is not None:
            checks.append(of(img, "IMAGE", USE))
    return checks


class InsertError(Exception):
    """VirtualMachine::insert failed (its error_str)."""


def create_vm(core: Oned, ctx: Ctx, tmpl: Template, hold: bool) -> Vm:
    """VirtualMachinePool::allocate -> PoolSQL::allocate: the id is taken
    before VirtualMachine::insert runs; a failed insert puts last_oid back to
    max(id - 1, 0), so a refused *first* VM (id 0) consumes its id. A refused
    insert is ALLOCATE here; vm.allocate answers it as INTERNAL
    (VirtualMachineAllocateAPI::pool_allocate)."""
    vid = core.store.next_ids["vms"]
    try:
        return _insert_vm(core, ctx, tmpl, hold, vid)
    except InsertError as exc:
        if vid == 0:
            core.store.next_ids["vms"] = 1
        raise OneError(ErrorCode.ALLOCATE, str(exc)) from exc


def _insert_vm(core: Oned, ctx: Ctx, tmpl: Template, hold: bool, vid: int) -> Vm:
    c = ctx.caller
    vm = Vm(vid, c.uid, c.gid, c.uname, c.gname, "", perms=core.new_perms(c),
            state=VmState.HOLD if hold else VmState.PENDING, stime=now())
    vm.prev_state = vm.state
    user = tmpl.copy()
    user.erase("VMID")
    vm.template.add("VMID", str(vid))
    tid = user.get("TEMPLATE_ID")
    user.erase("TEMPLATE_ID")
    if tid is not None:
        vm.template.add("TEMPLATE_ID", tid)
    name = user.get("NAME") or ""
    prefix = user.get("TEMPLATE_NAME") or "one"
    user.erase("NAME")
    user.erase("TEMPLATE_NAME")
    vm.name = name or f"{prefix}-{vid}"
    err = _check_numbers(user)
    if err:
        raise InsertError(err)
    for attr, value in list(user.attrs):
        if attr in TEMPLATE_ATTRS:
            vm.template.add(attr, value)
    for attr in TEMPLATE_ATTRS:
        user.erase(attr)
    bconf = user.vector("BACKUP_CONFIG")
    user.erase("BACKUP_CONFIG")
    if bconf:
        for key, value in sorted(bconf.items()):
            vm.backup_config.add(key, value)
    user.erase("SCHED_ACTION")
    if hold:
        vm.template.replace("SUBMIT_ON_HOLD", "YES")
    vm.user_template = user
    _parse_os(vm)
    try:
        _get_disk_images(core, vm)
    except DiskError as exc:
        raise InsertError(str(exc)) from exc
    try:
        _parse_context(core, vm)
    except InsertError:  # error_context: release_disk_images
        for disk in vm.disks():
            if "IMAGE_ID" in disk:
                core.release_image(vid, int(disk["IMAGE_ID"]))
        raise
    # VirtualMachine::automatic_requirements: the clusters every image disk's
    # datastore is in (get_cluster_requirements intersects the disks'
    # CLUSTER_ID); onesim has no NICs, and a VM without image disks keeps the
    # default cluster's requirements as before.
    clusters = vm_clusters(vm) or [0]
    ds_req = " | ".join(f'"CLUSTERS/ID" @> {c}' for c in clusters)
    host_req = " | ".join(f"CLUSTER_ID = {c}" for c in clusters)
    for key, value in (("AUTOMATIC_DS_REQUIREMENTS", f"({ds_req})"),
                       ("AUTOMATIC_NIC_REQUIREMENTS", f"({ds_req})"),
                       ("AUTOMATIC_REQUIREMENTS", f"({host_req}) & !(PIN_POLICY = PINNED)")):
        vm.template.replace(key, value)
    if any(d.get("CLONING") == "YES" for d in vm.disks()):
        vm.state = vm.prev_state = VmState.CLONING
    core.store.next_ids["vms"] = vid + 1
    core.store.vms[vid] = vm
    core.allocated_vm(vm)
    return vm


def _check_numbers(tmpl: Template) -> str | None:
    try:
        memory = int(tmpl.get("MEMORY") or "")
        if memory <= 0:
            raise ValueError
    except ValueError:
        return "MEMORY attribute must be a positive integer value."
    try:
        if float(tmpl.get("CPU") or "") <= 0:
            raise ValueError
    except ValueError:
        return "CPU attribute must be a positive float or integer value."
    vcpu = tmpl.get("VCPU")
    if vcpu is not None:
        try:
            if int(vcpu) <= 0:
                raise ValueError
        except ValueError:
            return "VCPU attribute must be a positive integer value."
    return None


def _parse_os(vm: Vm) -> None:
    os_attr = dict(vm.template.vector("OS") or {})
    os_attr.setdefault("UUID", str(uuid.uuid4()))
    os_attr.setdefault("MACHINE", "q35")
    vm.template.replace("OS", os_attr)


def _get_disk_images(core: Oned, vm: Vm) -> None:
    """VirtualMachineDisks::get_images: acquire, then targets by kind."""
    tsys = vm.template.get("TM_MAD_SYSTEM")
    disks = vm.template.vectors("DISK")
    used: set[str] = set()
    os_q: list[tuple[str, dict[str, str]]] = []
    cd_q: list[tuple[str, dict[str, str]]] = []
    data_q: list[tuple[str, dict[str, str]]] = []
    acquired: list[int] = []
    try:
        for disk_id, disk in enumerate(disks):
            if tsys:
                disk["TM_MAD_SYSTEM"] = tsys
            try:
                img_type, prefix, snaps = acquire_disk(core, vm.id, vm.uid, disk, disk_id, False)
            except DiskError as exc:
                raise DiskError(f"DISK {disk_id}: {exc}") from exc
            if "IMAGE_ID" in disk:
                acquired.append(int(disk["IMAGE_ID"]))
            if snaps is not None and img_type in (ImageType.OS, ImageType.DATABLOCK):
                vm.snapshots[disk_id] = snaps
            if disk.get("TARGET"):
                if disk["TARGET"] in used:
                    raise DiskError(f"Two disks have defined the same target {disk['TARGET']}")
                used.add(disk["TARGET"])
            elif img_type == ImageType.OS and not os_q:
                os_q.append((prefix, disk))
            elif img_type == ImageType.CDROM:
                cd_q.append((prefix or "sd", disk))
            else:
                data_q.append((prefix, disk))
        for prefix, disk in os_q:
            disk["TARGET"] = assign_target(prefix, used)
        ctx = vm.template.vector("CONTEXT")
        if ctx is not None:
            if ctx.get("TARGET"):
                if ctx["TARGET"] in used:
                    raise DiskError(f"Two disks have defined the same target {ctx['TARGET']}")
                used.add(ctx["TARGET"])
            else:
                cd_q.append((ctx.get("DEV_PREFIX") or "sd", ctx))
            ctx["DISK_ID"] = str(len(disks))
        for prefix, disk in cd_q:
            disk["TARGET"] = assign_target(prefix, used)
        for prefix, disk in data_q:
            disk["TARGET"] = assign_target(prefix, used)
    except DiskError:
        for iid in acquired:
            core.release_image(vm.id, iid)
        raise


_VARIABLE = re.compile(r"\$([A-Z_]+)(?:\[([A-Z_]+)\])?")


def _parse_context(core: Oned, vm: Vm) -> None:
    """parse_context_variables + generate_token_context (no NICs here)."""
    ctx = vm.template.vector("CONTEXT")
    if ctx is None:
        return
    user = core.store.users.get(vm.uid)
    values = {"VMID": str(vm.id), "NAME": vm.name, "UID": str(vm.uid), "UNAME": vm.uname,
              "GID": str(vm.gid), "GNAME": vm.gname,
              "TEMPLATE_ID": vm.template.get("TEMPLATE_ID") or ""}

    def subst(m: re.Match[str]) -> str:
        var, sub = m.group(1), m.group(2)
        if sub and var == "USER" and user is not None:
            return user.template.get(sub) or ""
        if sub:
            attr = vm.template.vector(var) or {}
            return attr.get(sub, "")
        return values.get(var, vm.template.get(var) or vm.user_template.get(var) or "")

    for key, value in list(ctx.items()):
        if "$" in value:
            ctx[key] = _VARIABLE.sub(subst, value)
    ctx.pop("FILES_DS", None)
    if ctx.get("TOKEN", "").upper() in ("YES", "TRUE"):
        # VirtualMachine::generate_token_context (src/vm/VirtualMachineContext.cc)
        endpoint = core.config.onegate_endpoint
        if not endpoint:
            raise InsertError("TOKEN set, but onegate endpoint was not defined in oned.conf.")
        ctx["ONEGATE_ENDPOINT"] = endpoint
        ctx["VMID"] = str(vm.id)
        vm.template.replace("CREATED_BY", str(vm.uid))


def disk_lock_success(core: Oned, image_id: int) -> None:
    """LifeCycleManager::trigger_disk_lock_success for VMs waiting in CLONING."""
    for vm in core.store.vms.values():
        if vm.state != VmState.CLONING:
            continue
        waiting = False
        for disk in vm.disks():
            if disk.get("IMAGE_ID") == str(image_id):
                img = core.store.images.get(image_id)
                if img is not None:
                    disk["IMAGE_STATE"] = str(img.state)
                disk.pop("CLONING", None)
            img = core.store.images.get(int(disk.get("IMAGE_ID", "-1")))
            if img is not None and img.state in (ImageState.LOCKED, ImageState.LOCKED_USED,
                                                 ImageState.LOCKED_USED_PERS):
                waiting = True
        if not waiting:
            hold = vm.template.get("SUBMIT_ON_HOLD") == "YES"
            vm.state = VmState.HOLD if hold else VmState.PENDING
            core.update_vm(vm)
