"""Disk operations on a VM: attach, detach, disk snapshots, save-as.

Owns: DispatchManager::attach/detach/disk_snapshot_* and the disk part of
VirtualMachine (set_up_attach_disk, set_saveas_state/disk), their driver
phases (`vm.attach`, `vm.detach`, `vm.snapshot`, `vm.saveas` engine
operations) with oned's success and failure handling
(LifeCycleStates.cc trigger_attach_*/detach_*/disk_snapshot_*/saveas_*),
and the bytes they move: disk files, snapshot copies, save-as copies, the
guest's device links.
Must not: check permissions or parse requests (api_vm).
"""

from __future__ import annotations

from typing import Any

from tests.onesim import dataplane
from tests.onesim.constants import Action, ImageState, Lcm, VmState, state_str
from tests.onesim.disks import (
    DiskError,
    acquire_disk,
    allow_orphans,
    assign_target,
    datastore_disk_attribute,
    is_volatile,
    next_disk_id,
    record_transfer,
    used_targets,
)
from tests.onesim.lifecycle import Lifecycle, WrongState, close_cp_history
from tests.onesim.model import Image, Snapshots, Vm, now
from tests.onesim.oned import Caller, Oned
from tests.onesim.templates import Template

TM_ERROR = "Error executing image transfer script"


class Hotplug:
    def __init__(self, core: Oned, life: Lifecycle) -> None:
        self.core = core
        self.life = life
        for name, handler in (("vm.attach", self._attach_done), ("vm.detach", self._detach_done),
                              ("vm.snapshot", self._snapshot_done),
                              ("vm.saveas_mkfs", self._saveas_mkfs),
                              ("vm.saveas", self._saveas_done)):
            core.engine.register(name, handler)

    # -- helpers --------------------------------------------------------------
    def _driver(self, op: str, vm: Vm, fault: str, disk_id: int, **extra: Any) -> None:
        delay = self.core.config.delay + self.core.faults.driver_delay(fault, vm.id, disk_id)
        self.core.schedule({"op": op, "vm": vm.id, "disk": disk_id, "fault": fault, **extra},
                           delay)

    def _error(self, vm: Vm, prefix: str, message: str) -> None:
        if message not in ("", "-"):
            self.core.vm_error(vm, f"{prefix}: {message}")
            # oned writes the VM (no state change, so no event) before moving on

    def _back_to(self, vm: Vm, running: bool) -> None:
        """RUNNING, or DispatchManager::trigger_poweroff_success / suspend_success."""
        if running:
            vm.lcm = Lcm.RUNNING
            return
        vm.history[-1].retime = now()
        vm.state, vm.lcm = VmState.POWEROFF, Lcm.LCM_INIT

    # -- attach -----------------------------------------------------------------
    def attach(self, vm: Vm, tmpl: Template, caller: Caller) -> None:
        if vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING:
            vm.lcm = Lcm.HOTPLUG
        elif vm.state == VmState.POWEROFF:
            vm.state, vm.lcm = VmState.ACTIVE, Lcm.HOTPLUG_PROLOG_POWEROFF
        else:
            raise WrongState(f"Could not attach a new disk to VM {vm.id}, wrong state "
                             f"{state_str(vm.state, vm.lcm)}.")
        vm.resched = 0
        try:
            disk = self._set_up_attach(vm, tmpl)
        except DiskError as exc:
            if vm.lcm == Lcm.HOTPLUG:
                vm.lcm = Lcm.RUNNING
            else:
                vm.state, vm.lcm = VmState.POWEROFF, Lcm.LCM_INIT
            self.core.update_vm(vm)
            raise WrongState(str(exc)) from exc
        close_cp_history(vm, Action.DISK_ATTACH, caller)
        self.core.update_vm(vm)
        self._driver("vm.attach", vm, "attach", int(disk["DISK_ID"]))

    def _set_up_attach(self, vm: Vm, tmpl: Template) -> dict[str, str]:
        vdisk = tmpl.vector("DISK")
        if vdisk is None:
            raise DiskError("Internal error parsing DISK attribute")
        disk = dict(vdisk)
        tsys = vm.template.get("TM_MAD_SYSTEM")
        if tsys:
            disk["TM_MAD_SYSTEM"] = tsys
        else:
            disk.pop("TM_MAD_SYSTEM", None)
        if is_volatile(disk):
            datastore_disk_attribute(self.core, vm.system_ds(), disk)
        used = used_targets(vm)
        disk_id = next_disk_id(vm)
        img_type, prefix, snaps = acquire_disk(self.core, vm.id, vm.uid, disk, disk_id, True)
        if disk.get("TARGET"):
            if disk["TARGET"] in used:
                if "IMAGE_ID" in disk:
                    self.core.release_image(vm.id, int(disk["IMAGE_ID"]))
                raise DiskError(f"Target {disk['TARGET']} is already in use.")
        else:
            if img_type == 1 and not prefix:  # CDROM on a q35 machine
                prefix = "sd"
            disk["TARGET"] = assign_target(prefix, used)
        # VirtualMachineDisks::set_up_attach: the disk's CLUSTER_ID (its
        # datastore's CLUSTERS, Datastore::disk_attribute) must hold the
        # cluster the VM runs in (VirtualMachine::get_cid, its last history).
        clusters = {c.strip() for c in disk.get("CLUSTER_ID", "").split(",") if c.strip()}
        cid = vm.history[-1].cid if vm.history else -1
        if clusters and str(cid) not in clusters:
            if "IMAGE_ID" in disk:
                self.core.release_image(vm.id, int(disk["IMAGE_ID"]))
            raise DiskError(f"Image [{disk.get('IMAGE_ID', '-1')}] is not part of cluster "
                            f"[{cid}]")
        disk["ATTACH"] = "YES"
        vm.template.add("DISK", disk)
        if snaps is not None:
            vm.snapshots[disk_id] = snaps
        return disk

    def _attach_done(self, op: dict[str, Any]) -> None:
        vm = self.core.store.vms.get(op["vm"])
        if vm is None or vm.lcm not in (Lcm.HOTPLUG, Lcm.HOTPLUG_PROLOG_POWEROFF):
            return
        disk = next((d for d in vm.disks() if d.get("ATTACH") == "YES"), None)
        running = vm.lcm == Lcm.HOTPLUG
        message = self.core.faults.take_driver("attach", vm.id, op["disk"])
        if disk is None:
            return
        if message is not None:
            self._error(vm, "ATTACHDISK" if running else TM_ERROR, message)
            self._delete_disk(vm, disk, files=False)
            self._back_to(vm, running)
            self.core.update_vm(vm)
            return
        self.life.create_disk_file(vm, disk)
        disk.pop("ATTACH", None)
        self._back_to(vm, running)
        self.core.update_vm(vm)
        self.core.plug_disk(vm, disk)

    def _delete_disk(self, vm: Vm, disk: dict[str, str], files: bool) -> None:
        """VirtualMachinePool::delete_attach_disk (+ the TM's epilog for files)."""
        disk_id = int(disk["DISK_ID"])
        vm.template.remove_value(disk)
        vm.snapshots.pop(disk_id, None)
        if files:
            self.core.unplug_disk(vm, disk)
            base = self.core.ds_path(vm.system_ds())
            dataplane.remove(dataplane.disk_file(base, vm.id, disk_id))
            dataplane.remove(dataplane.vm_dir(base, vm.id) / f"disk.{disk_id}.snap")
        self.core.update_vm(vm)
        if "IMAGE_ID" in disk:
            iid = int(disk["IMAGE_ID"])
            if not any(d.get("IMAGE_ID") == str(iid) for d in vm.disks()):
                self.core.release_image(vm.id, iid)

    # -- detach -----------------------------------------------------------------
    def detach(self, vm: Vm, disk_id: int, caller: Caller) -> None:
        running = vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING
        if not running and vm.state != VmState.POWEROFF:
            raise WrongState(f"Could not detach disk from VM {vm.id}, wrong state "
                             f"{state_str(vm.state, vm.lcm)}.")
        disk = vm.disk(disk_id)
        if disk is None:
            raise WrongState(f"Disk {disk_id} does not exist")
        disk["ATTACH"] = "YES"
        vm.resched = 0
        close_cp_history(vm, Action.DISK_DETACH, caller)
        if running:
            vm.lcm = Lcm.HOTPLUG
        else:
            vm.state, vm.lcm = VmState.ACTIVE, Lcm.HOTPLUG_EPILOG_POWEROFF
        self.core.update_vm(vm)
        self._driver("vm.detach", vm, "detach", disk_id)

    def _detach_done(self, op: dict[str, Any]) -> None:
        vm = self.core.store.vms.get(op["vm"])
        if vm is None or vm.lcm not in (Lcm.HOTPLUG, Lcm.HOTPLUG_EPILOG_POWEROFF):
            return
        disk = next((d for d in vm.disks() if d.get("ATTACH") == "YES"), None)
        running = vm.lcm == Lcm.HOTPLUG
        if disk is None:
            return
        message = self.core.faults.take_driver("detach", vm.id, op["disk"])
        if message is not None:
            self._error(vm, "DETACHDISK" if running else TM_ERROR, message)
            disk.pop("ATTACH", None)
            self._back_to(vm, running)
            self.core.update_vm(vm)
            return
        if (disk.get("SAVE") or "").upper() == "YES":   # TransferManager: MVDS, else DELETE
            record_transfer(self.core, "mvds", disk, dataplane.file_size(
                dataplane.disk_file(self.core.ds_path(vm.system_ds()), vm.id, op["disk"])))
        self._delete_disk(vm, disk, files=True)
        self._back_to(vm, running)
        self.core.update_vm(vm)

    # -- disk snapshots -----------------------------------------------------------
    def snapshot_create(self, vm: Vm, disk_id: int, name: str, caller: Caller) -> int:
        st, lcm = vm.state, vm.lcm
        if not ((st == VmState.POWEROFF and lcm == 0) or (st == VmState.SUSPENDED and lcm == 0)
                or (st == VmState.ACTIVE and lcm == Lcm.RUNNING)):
            raise WrongState(f"Could not create a new snapshot for VM {vm.id}, wrong state "
                             f"{state_str(st, lcm)}.")
        disk = vm.disk(disk_id)
        assert disk is not None
        if (disk.get("READONLY") or "NO").upper() == "YES":
            raise WrongState("Cannot make snapshots on readonly disks")
        snaps = vm.snapshots.get(disk_id)
        if snaps is None:
            snaps = vm.snapshots[disk_id] = Snapshots(disk_id, allow_orphans(disk))
        snap_id = snaps.next_snapshot
        snap: dict[str, str] = {"DATE": str(now()), "ID": str(snap_id),
                                "SIZE": disk.get("SIZE", "0")}
        if name:
            snap["NAME"] = name
        if snaps.allow_orphans == "NO":
            parent = snaps.active
            snap["PARENT"] = str(parent)
            if parent != -1:
                pnode = snaps.get(parent)
                assert pnode is not None
                pnode["CHILDREN"] = (pnode["CHILDREN"] + "," if pnode.get("CHILDREN") else "") \
                    + str(snap_id)
        elif snaps.allow_orphans == "MIXED":
            snap["PARENT"] = str(snaps.current_base)
        else:
            snap["PARENT"] = "-1"
        snaps.snaps.append(snap)
        snaps.next_snapshot += 1
        disk["DISK_SNAPSHOT_ACTIVE"] = "YES"
        disk["DISK_SNAPSHOT_ID"] = str(snap_id)
        disk["DISK_SNAPSHOT_TOTAL_SIZE"] = str(snaps.total_size())
        vm.state, vm.lcm = VmState.ACTIVE, {VmState.POWEROFF: Lcm.DISK_SNAPSHOT_POWEROFF,
                                            VmState.SUSPENDED: Lcm.DISK_SNAPSHOT_SUSPENDED,
                                            VmState.ACTIVE: Lcm.DISK_SNAPSHOT}[VmState(st)]
        close_cp_history(vm, Action.DISK_SNAPSHOT_CREATE, caller)
        self.core.update_vm(vm)
        self._driver("vm.snapshot", vm, "snapshot_create", disk_id, snap=snap_id)
        return snap_id

    def snapshot_revert(self, vm: Vm, disk_id: int, snap_id: int, caller: Caller) -> None:
        st, lcm = vm.state, vm.lcm
        suspended_ok = self.core.config.version_tuple() < (6, 6, 3)
        if not ((st == VmState.POWEROFF and lcm == 0)
                or (suspended_ok and st == VmState.SUSPENDED and lcm == 0)):
            raise WrongState(f"Could not revert to disk snapshot for VM {vm.id}, wrong state "
                             f"{state_str(st, lcm)}.")
        snaps = vm.snapshots.get(disk_id)
        if snaps is None:
            raise WrongState("Snapshot does not exist")
        disk = vm.disk(disk_id)
        if disk is None or snaps.get(snap_id) is None:
            raise WrongState(f"Disk id ({disk_id}) or snapshot id ({snap_id}) is not valid.")
        disk["DISK_SNAPSHOT_ACTIVE"] = "YES"
        disk["DISK_SNAPSHOT_ID"] = str(snap_id)
        close_cp_history(vm, Action.DISK_SNAPSHOT_REVERT, caller)
        vm.state = VmState.ACTIVE
        vm.lcm = (Lcm.DISK_SNAPSHOT_REVERT_POWEROFF if st == VmState.POWEROFF
                  else Lcm.DISK_SNAPSHOT_REVERT_SUSPENDED)
        self.core.update_vm(vm)
        self._driver("vm.snapshot", vm, "snapshot_revert", disk_id, snap=snap_id)

    def snapshot_delete(self, vm: Vm, disk_id: int, snap_id: int, caller: Caller) -> None:
        st, lcm = vm.state, vm.lcm
        if not ((st == VmState.POWEROFF and lcm == 0) or (st == VmState.SUSPENDED and lcm == 0)
                or (st == VmState.ACTIVE and lcm == Lcm.RUNNING)):
            raise WrongState(f"Could not delete disk snapshot from VM {vm.id}, wrong state "
                             f"{state_str(st, lcm)}.")
        snaps = vm.snapshots.get(disk_id)
        disk = vm.disk(disk_id)
        if snaps is None or disk is None:
            raise WrongState("Snapshot does not exist")
        problem = test_delete(snaps, snap_id, disk.get("PERSISTENT") == "YES")
        if problem:
            raise WrongState(problem)
        disk["DISK_SNAPSHOT_ACTIVE"] = "YES"
        disk["DISK_SNAPSHOT_ID"] = str(snap_id)
        vm.state, vm.lcm = VmState.ACTIVE, {
            VmState.POWEROFF: Lcm.DISK_SNAPSHOT_DELETE_POWEROFF,
            VmState.SUSPENDED: Lcm.DISK_SNAPSHOT_DELETE_SUSPENDED,
            VmState.ACTIVE: Lcm.DISK_SNAPSHOT_DELETE}[VmState(st)]
        close_cp_history(vm, Action.DISK_SNAPSHOT_DELETE, caller)
        self.core.update_vm(vm)
        self._driver("vm.snapshot", vm, "snapshot_delete", disk_id, snap=snap_id)

    def _snapshot_done(self, op: dict[str, Any]) -> None:
        vm = self.core.store.vms.get(op["vm"])
        if vm is None:
            return
        disk_id, snap_id = int(op["disk"]), int(op["snap"])
        disk, snaps = vm.disk(disk_id), vm.snapshots.get(disk_id)
        lcm = vm.lcm
        if disk is None or snaps is None or lcm not in _SNAPSHOT_STATES:
            return
        kind, back = _SNAPSHOT_STATES[Lcm(lcm)]
        message = self.core.faults.take_driver(kind, vm.id, disk_id)
        base = self.core.ds_path(vm.system_ds())
        current = dataplane.disk_file(base, vm.id, disk_id)
        copy = dataplane.snap_file(base, vm.id, disk_id, snap_id)
        if message is None:
            try:
                if kind == "snapshot_create":
                    record_transfer(self.core, "snapshot", disk, dataplane.file_size(current))
                    dataplane.sparse_copy(current, copy)
                elif kind == "snapshot_revert":
                    dataplane.sparse_copy(copy, current)
                else:
                    dataplane.remove(copy)
            except OSError as exc:
                message = str(exc)
        if message is not None:
            prefix = "DISKSNAPSHOTCREATE" if lcm == Lcm.DISK_SNAPSHOT else TM_ERROR
            self._error(vm, prefix, message)
            if kind == "snapshot_create":
                dataplane.remove(copy)
                delete_snapshot(snaps, snap_id)
                disk["DISK_SNAPSHOT_TOTAL_SIZE"] = str(snaps.total_size())
        elif kind == "snapshot_create":
            activate(snaps, snap_id, revert=False)
        elif kind == "snapshot_revert":
            snap = snaps.get(snap_id)
            if snap is not None and snap.get("SIZE") and snap["SIZE"] != disk.get("SIZE"):
                disk["SIZE"] = snap["SIZE"]
            activate(snaps, snap_id, revert=True)
            if snaps.allow_orphans == "LINEAR":
                for younger in [int(s["ID"]) for s in snaps.snaps if int(s["ID"]) > snap_id]:
                    delete_snapshot(snaps, younger)
                    dataplane.remove(dataplane.snap_file(base, vm.id, disk_id, younger))
            disk["DISK_SNAPSHOT_TOTAL_SIZE"] = str(snaps.total_size())
        else:
            delete_snapshot(snaps, snap_id)
            disk["DISK_SNAPSHOT_TOTAL_SIZE"] = str(snaps.total_size())
        disk.pop("DISK_SNAPSHOT_ACTIVE", None)
        disk.pop("DISK_SNAPSHOT_ID", None)
        if back == VmState.ACTIVE:
            vm.lcm = Lcm.RUNNING
        else:
            if back == VmState.POWEROFF:
                vm.history[-1].retime = now()
            else:
                vm.history[-1].retime = now()
            vm.state, vm.lcm = back, Lcm.LCM_INIT
        self.core.update_vm(vm)

    # -- save-as -------------------------------------------------------------------
    def set_saveas_state(self, vm: Vm) -> bool:
        if vm.state == VmState.ACTIVE:
            if vm.lcm != Lcm.RUNNING:
                return False
            vm.lcm = Lcm.HOTPLUG_SAVEAS
            return True
        lcm = {VmState.POWEROFF: Lcm.HOTPLUG_SAVEAS_POWEROFF,
               VmState.SUSPENDED: Lcm.HOTPLUG_SAVEAS_SUSPENDED,
               VmState.UNDEPLOYED: Lcm.HOTPLUG_SAVEAS_UNDEPLOYED,
               VmState.STOPPED: Lcm.HOTPLUG_SAVEAS_STOPPED}.get(VmState(vm.state))
        if lcm is None:
            return False
        vm.state, vm.lcm = VmState.ACTIVE, lcm
        return True

    def clear_saveas_state(self, vm: Vm) -> None:
        back = {Lcm.HOTPLUG_SAVEAS_POWEROFF: VmState.POWEROFF,
                Lcm.HOTPLUG_SAVEAS_SUSPENDED: VmState.SUSPENDED,
                Lcm.HOTPLUG_SAVEAS_UNDEPLOYED: VmState.UNDEPLOYED,
                Lcm.HOTPLUG_SAVEAS_STOPPED: VmState.STOPPED}
        if vm.lcm == Lcm.HOTPLUG_SAVEAS:
            vm.lcm = Lcm.RUNNING
        elif vm.lcm in back:
            vm.state, vm.lcm = back[Lcm(vm.lcm)], Lcm.LCM_INIT

    @staticmethod
    def clear_saveas_disk(vm: Vm) -> dict[str, str] | None:
        for disk in vm.disks():
            if disk.get("HOTPLUG_SAVE_AS_ACTIVE") == "YES":
                for key in ("HOTPLUG_SAVE_AS_ACTIVE", "HOTPLUG_SAVE_AS", "HOTPLUG_SAVE_AS_SOURCE",
                            "HOTPLUG_SAVE_AS_SNAPSHOT_ID"):
                    disk.pop(key, None)
                return disk
        return None

    def start_saveas(self, vm: Vm, disk: dict[str, str], img: Image) -> None:
        """ImageManager::register_image for a saving image: the mkfs driver
        reserves the SOURCE, then the TM copies (CPDS)."""
        self.core.schedule({"op": "vm.saveas_mkfs", "vm": vm.id, "image": img.id,
                            "disk": int(disk["DISK_ID"])}, self.core.config.delay / 4)

    def _saveas_mkfs(self, op: dict[str, Any]) -> None:
        vm, img = self.core.store.vms.get(op["vm"]), self.core.store.images.get(op["image"])
        if vm is None or img is None:
            return
        disk = vm.disk(op["disk"])
        img.source = str(dataplane.new_source(self.core.ds_path(img.datastore_id)))
        img.format = (disk or {}).get("FORMAT") or (disk or {}).get("DRIVER") or "raw"
        self.core.update_image(img)
        if disk is not None:
            disk["HOTPLUG_SAVE_AS"] = str(img.id)
            disk["HOTPLUG_SAVE_AS_SOURCE"] = img.source
        self.core.update_vm(vm)
        self._driver("vm.saveas", vm, "saveas", int(op["disk"]), image=img.id)

    def _saveas_done(self, op: dict[str, Any]) -> None:
        vm, img = self.core.store.vms.get(op["vm"]), self.core.store.images.get(op["image"])
        if vm is None:
            return
        disk = vm.disk(op["disk"])
        message = self.core.faults.take_driver("saveas", vm.id, op["disk"])
        if message is None and disk is not None and img is not None:
            base = self.core.ds_path(vm.system_ds())
            snap = int(disk.get("HOTPLUG_SAVE_AS_SNAPSHOT_ID", "-1"))
            src = (dataplane.snap_file(base, vm.id, op["disk"], snap) if snap != -1
                   else dataplane.disk_file(base, vm.id, op["disk"]))
            try:
                record_transfer(self.core, "cpds", disk, dataplane.file_size(src))
                dataplane.sparse_copy(src, self.core.root / img.source)
            except OSError as exc:
                message = str(exc)
        if message is not None:
            self._error(vm, TM_ERROR, message)
        self.clear_saveas_disk(vm)
        self.clear_saveas_state(vm)
        self.core.update_vm(vm)
        if img is None:
            return
        img.template.erase("SAVE_AS_HOT")
        if message is not None:
            img.state = ImageState.ERROR
        else:
            unlock(img)
        self.core.update_image(img)
        if message is None:
            from tests.onesim.api_template import disk_lock_success
            disk_lock_success(self.core, img.id)


_SNAPSHOT_STATES = {
    Lcm.DISK_SNAPSHOT: ("snapshot_create", VmState.ACTIVE),
    Lcm.DISK_SNAPSHOT_POWEROFF: ("snapshot_create", VmState.POWEROFF),
    Lcm.DISK_SNAPSHOT_SUSPENDED: ("snapshot_create", VmState.SUSPENDED),
    Lcm.DISK_SNAPSHOT_REVERT_POWEROFF: ("snapshot_revert", VmState.POWEROFF),
    Lcm.DISK_SNAPSHOT_REVERT_SUSPENDED: ("snapshot_revert", VmState.SUSPENDED),
    Lcm.DISK_SNAPSHOT_DELETE: ("snapshot_delete", VmState.ACTIVE),
    Lcm.DISK_SNAPSHOT_DELETE_POWEROFF: ("snapshot_delete", VmState.POWEROFF),
    Lcm.DISK_SNAPSHOT_DELETE_SUSPENDED: ("snapshot_delete", VmState.SUSPENDED),
}


def unlock(img: Image) -> None:
    """Image::set_state_unlock."""
    img.state = {ImageState.LOCKED: ImageState.READY,
                 ImageState.LOCKED_USED: ImageState.USED,
                 ImageState.LOCKED_USED_PERS: ImageState.USED_PERS}.get(
        ImageState(img.state), img.state)


def activate(snaps: Snapshots, snap_id: int, revert: bool) -> None:
    """Snapshots::active_snapshot."""
    if snap_id == snaps.active:
        return
    snap = snaps.get(snap_id)
    if snap is None:
        return
    if snaps.allow_orphans == "MIXED":
        if not revert:
            return
        snaps.current_base = snap_id
    old = snaps.get(snaps.active)
    snap["ACTIVE"] = "YES"
    if old is not None:
        old.pop("ACTIVE", None)


def delete_snapshot(snaps: Snapshots, snap_id: int) -> None:
    """Snapshots::delete_snapshot."""
    snap = snaps.get(snap_id)
    if snap is None:
        return
    if snaps.allow_orphans in ("NO", "MIXED"):
        parent_id = int(snap.get("PARENT", "-1"))
        parent = snaps.get(parent_id) if parent_id != -1 else None
        if parent is not None:
            children = {int(c) for c in parent.get("CHILDREN", "").split(",") if c}
            children.discard(snap_id)
            mine = [int(c) for c in snap.get("CHILDREN", "").split(",") if c]
            if len(mine) == 1:
                children.add(mine[0])
                child = snaps.get(mine[0])
                if child is not None:
                    child["PARENT"] = str(parent_id)
            if children:
                parent["CHILDREN"] = ",".join(str(c) for c in sorted(children))
            else:
                parent.pop("CHILDREN", None)
            if snap.get("ACTIVE") == "YES":
                parent["ACTIVE"] = "YES"
    snaps.snaps = [s for s in snaps.snaps if s is not snap]


def test_delete(snaps: Snapshots, snap_id: int, persistent: bool) -> str | None:
    """Snapshots::test_delete: the reason a snapshot cannot go, or None."""
    snap = snaps.get(snap_id)
    if snap is None:
        return "Snapshot does not exist"
    children = [c for c in snap.get("CHILDREN", "").split(",") if c]
    if snaps.allow_orphans in ("NO", "LINEAR"):
        if persistent and snap_id == 0:
            return "Cannot delete snapshot 0 for persistent disk images"
        if len(children) > 1:
            return "Cannot delete snapshot with more than one children"
        if not children:
            return None
        if snaps.active == snap_id:
            return "Cannot delete the active snapshot with children"
        child = snaps.get(int(children[0]))
        if child is not None:
            grand = [c for c in child.get("CHILDREN", "").split(",") if c]
            if len(grand) > 1 or (len(grand) == 1 and snaps.active == int(children[0])):
                return "Cannot delete snapshot if child has children"
        parent_id = int(snap.get("PARENT", "-1"))
        parent = snaps.get(parent_id) if parent_id != -1 else None
        if parent is not None and len([c for c in parent.get("CHILDREN", "").split(",")
                                       if c]) > 1:
            return "Cannot delete snapshot if parent has more than one child"
    elif snaps.allow_orphans == "MIXED":
        if snap_id == snaps.active:
            return "Cannot delete the active snapshot"
        if children:
            return "Cannot delete snapshot with children"
    return None

