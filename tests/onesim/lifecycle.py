"""The VM state machine: deploy, boot, power, suspend, terminate.

Owns: what DispatchManager, LifeCycleManager and the VMM/TM drivers do for
the VM-level actions (src/dm/DispatchManagerActions.cc,
src/lcm/LifeCycleActions.cc / LifeCycleStates.cc): the synchronous state
checks with oned's messages; the LCM triggers, which DispatchManager only
queues (`core.defer`: they run on the LCM thread after the request was
answered, so the first look after a poweroff, suspend, resume, terminate,
undeploy, stop or deploy still shows the old state); the transient LCM states, the driver phases
(`vm.prolog`, `vm.boot`, `vm.save`, `vm.shutdown`, `vm.epilog` engine
operations, each `delay` long and subject to faults), history records
(add/cp/close_cp_history), disk files at PROLOG/EPILOG, the guest's devices
and one_env at boot, and freeing a VM's resources when it is DONE.
Must not: handle disk hot-plug or snapshots (hotplug), or parse requests.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from tests.onesim import dataplane
from tests.onesim.constants import Action, DatastoreType, HostState, Lcm, VmState, state_str
from tests.onesim.disks import is_volatile, record_transfer, vm_clusters, volatile_info
from tests.onesim.model import Datastore, History, Host, Vm, now
from tests.onesim.oned import Caller, Oned

ONEADMIN = Caller(0, 0, "oneadmin", "oneadmin", [0])


class WrongState(Exception):
    """DispatchManager refused the action; str(e) is its error_str."""


# ---------------------------------------------------------------------------
# History records
# ---------------------------------------------------------------------------

def add_history(vm: Vm, host: Host, ds: Datastore) -> None:
    vm.history.append(History(vm.id, len(vm.history), host.name, host.id, host.cluster_id,
                              host.vm_mad, ds.tm_mad, ds.id))


def cp_history(vm: Vm) -> History:
    last = vm.history[-1]
    new = History(vm.id, last.seq + 1, last.hostname, last.hid, last.cid, last.vm_mad,
                  last.tm_mad, last.ds_id)
    vm.history.append(new)
    return new


def set_action(vm: Vm, action: int, caller: Caller) -> None:
    h = vm.history[-1]
    h.action, h.uid, h.gid, h.request_id = int(action), caller.uid, caller.gid, caller.req_id


def clear_action(vm: Vm) -> None:
    h = vm.history[-1]
    h.action, h.uid, h.gid, h.request_id = 0, -1, -1, -1


def close_cp_history(vm: Vm, action: int, caller: Caller) -> None:
    """DispatchManager::close_cp_history: end the record, start a copy."""
    t = now()
    h = vm.history[-1]
    set_retime = h.retime != 0
    if not set_retime:
        h.retime = t
    h.etime = t
    current = h.action
    set_action(vm, action, caller)
    new = cp_history(vm)
    new.action = current
    new.stime = t
    new.rstime = t
    if set_retime:
        new.retime = t


# ---------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------

def _not_available(vm: Vm) -> WrongState:
    return WrongState(f"This action is not available for state {state_str(vm.state, vm.lcm)}")


class Lifecycle:
    def __init__(self, core: Oned) -> None:
        self.core = core
        for name, handler in (("vm.prolog", self._prolog_done), ("vm.boot", self._boot_done),
                              ("vm.save", self._save_done),
                              ("vm.shutdown", self._shutdown_done),
                              ("vm.epilog", self._epilog_done)):
            core.engine.register(name, handler)

    # -- helpers ----------------------------------------------------------
    def _driver(self, op: str, vm: Vm, fault: str, disk_id: int | None = None) -> None:
        delay = self.core.config.delay + self.core.faults.driver_delay(fault, vm.id, disk_id)
        self.core.schedule({"op": op, "vm": vm.id, "fault": fault}, delay)

    def _failed(self, op: dict[str, object], vm: Vm) -> str | None:
        return self.core.faults.take_driver(str(op["fault"]), vm.id, None)

    def _set(self, vm: Vm, state: int | None = None, lcm: int | None = None) -> None:
        if state is not None:
            vm.state = state
        if lcm is not None:
            vm.lcm = lcm

    def vm_dir_base(self, vm: Vm) -> Path:
        return self.core.ds_path(vm.system_ds())

    # -- deploy -----------------------------------------------------------
    def default_system_ds(self, vm: Vm, cluster_id: int = 0) -> int | None:
        """SCHED_DS_REQUIREMENTS "ID=N" (or NAME=...) or the cluster's first
        enabled system datastore (None: the cluster has none)."""
        req = (vm.user_template.get("SCHED_DS_REQUIREMENTS") or "").replace('"', "").strip()
        system = [d for d in sorted(self.core.store.datastores.values(), key=lambda d: d.id)
                  if d.type == DatastoreType.SYSTEM_DS and cluster_id in d.cluster_ids]
        for ds in system:
            if req in (f"ID={ds.id}", f"ID = {ds.id}", f"NAME={ds.name}"):
                return ds.id
        for ds in system:
            if ds.state == 0:
                return ds.id
        return system[0].id if system else None

    def deploy(self, vm: Vm, hid: int, ds_id: int, caller: Caller) -> None:
        """VirtualMachineAPI::deploy after its checks + DispatchManager::deploy."""
        host = self.core.store.hosts[hid]
        ds = self.core.store.datastores[ds_id]
        volatile_info(self.core, vm, ds_id)
        if not vm.template.get("TM_MAD_SYSTEM"):
            vm.template.add("TM_MAD_SYSTEM", ds.tm_mad)
        add_history(vm, host, ds)
        self._set(vm, VmState.ACTIVE)
        self.core.update_vm(vm)
        self.core.defer(lambda: self._trigger_deploy(vm.id))

    def schedule_deploy(self, vid: int) -> None:
        vm = self.core.store.vms.get(vid)
        if vm is None or vm.state != VmState.PENDING:
            return
        placed = self.place(vm)
        if placed is None:
            return   # no host in the VM's clusters: it stays PENDING, as with mm_sched
        hid, default_ds = placed
        ds_id = vm.system_ds() if vm.history and vm.history[-1].action in (
            Action.STOP, Action.UNDEPLOY, Action.UNDEPLOY_HARD) else default_ds
        self.deploy(vm, hid, ds_id, ONEADMIN)

    def place(self, vm: Vm) -> tuple[int, int] | None:
        """What mm_sched decides, simplified: the first MONITORED host (by id)
        whose cluster is in the VM's AUTOMATIC_REQUIREMENTS (the clusters of
        its image disks' datastores, `vm_clusters`) and has a system
        datastore (AUTOMATIC_DS_REQUIREMENTS); that datastore (the one
        SCHED_DS_REQUIREMENTS names, else the first enabled one in the
        cluster). None: no such host."""
        clusters = vm_clusters(vm)
        for host in sorted(self.core.store.hosts.values(), key=lambda h: h.id):
            if host.state != HostState.MONITORED or (clusters and host.cluster_id not in clusters):
                continue
            ds_id = self.default_system_ds(vm, host.cluster_id)
            if ds_id is not None:
                return host.id, ds_id
        return None

    def _trigger_deploy(self, vid: int) -> None:
        vm = self.core.store.vms.get(vid)
        if vm is None or vm.state != VmState.ACTIVE:
            return
        lcm = Lcm.PROLOG
        if len(vm.history) > 1:
            prev = vm.history[-2].action
            if prev == Action.STOP:
                lcm = Lcm.PROLOG_RESUME
            elif prev in (Action.UNDEPLOY, Action.UNDEPLOY_HARD):
                lcm = Lcm.PROLOG_UNDEPLOY
        self._set(vm, lcm=lcm)
        t = now()
        vm.history[-1].stime = t
        vm.history[-1].pstime = t
        self.core.update_vm(vm)
        self._driver("vm.prolog", vm, "deploy_prolog")

    def _prolog_done(self, op: dict[str, object]) -> None:
        vm = self.core.store.vms.get(int(op["vm"]))  # type: ignore[call-overload]
        if vm is None or vm.lcm not in (Lcm.PROLOG, Lcm.PROLOG_RESUME, Lcm.PROLOG_UNDEPLOY):
            return
        if vm.lcm == Lcm.PROLOG:
            self.create_disk_files(vm)
        t = now()
        vm.history[-1].petime = t
        vm.history[-1].rstime = t
        self._set(vm, lcm={Lcm.PROLOG: Lcm.BOOT, Lcm.PROLOG_RESUME: Lcm.BOOT_STOPPED,
                           Lcm.PROLOG_UNDEPLOY: Lcm.BOOT_UNDEPLOY}[Lcm(vm.lcm)])
        self.core.update_vm(vm)
        self._driver("vm.boot", vm, "deploy")

    def create_disk_files(self, vm: Vm) -> None:
        base = self.vm_dir_base(vm)
        for disk in vm.disks():
            self.create_disk_file(vm, disk)
        ctx = vm.context()
        if ctx is not None and ctx.get("DISK_ID"):
            path = dataplane.disk_file(base, vm.id, int(ctx["DISK_ID"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dataplane.context_script(sorted(ctx.items())))

    def create_disk_file(self, vm: Vm, disk: dict[str, str]) -> None:
        """TM clone / ln / mkimage for one disk."""
        target = dataplane.disk_file(self.vm_dir_base(vm), vm.id, int(disk["DISK_ID"]))
        if is_volatile(disk) or "IMAGE_ID" not in disk:
            dataplane.volatile_disk(target, int(disk.get("SIZE", "0") or 0))
            return
        source = self.core.root / disk.get("SOURCE", "") if disk.get("SOURCE") else None
        if source is None or not source.exists():
            dataplane.volatile_disk(target, int(disk.get("SIZE", "0") or 0))
            return
        # the bytes the TM's clone / ln copies (disks.transfer_bytes)
        record_transfer(self.core, "clone" if disk.get("CLONE") == "YES" else "ln", disk,
                        dataplane.file_size(source))
        if disk.get("CLONE") == "YES":
            dataplane.clone_disk(source, target)
            size = int(disk.get("SIZE", "0") or 0)
            if size > int(disk.get("ORIGINAL_SIZE", "0") or 0):  # tm clone's resize
                with open(target, "r+b") as fh:
                    fh.truncate(size * dataplane.MIB)
        else:
            dataplane.link_disk(source, target)

    def _boot_done(self, op: dict[str, object]) -> None:
        vm = self.core.store.vms.get(int(op["vm"]))  # type: ignore[call-overload]
        boots = {Lcm.BOOT: (Lcm.BOOT_FAILURE, "DEPLOY"),
                 Lcm.BOOT_POWEROFF: (None, "DEPLOY"),
                 Lcm.BOOT_SUSPENDED: (None, "RESTORE"),
                 Lcm.BOOT_UNKNOWN: (Lcm.UNKNOWN, "DEPLOY"),
                 Lcm.BOOT_STOPPED: (Lcm.BOOT_STOPPED_FAILURE, "RESTORE"),
                 Lcm.BOOT_UNDEPLOY: (Lcm.BOOT_UNDEPLOY_FAILURE, "DEPLOY")}
        if vm is None or vm.state != VmState.ACTIVE or vm.lcm not in boots:
            return
        fault = "resume" if vm.lcm in (Lcm.BOOT_POWEROFF, Lcm.BOOT_SUSPENDED) else "deploy"
        message = self.core.faults.take_driver(fault, vm.id, None)
        if message is not None:
            failed, name = boots[Lcm(vm.lcm)]
            self.core.vm_error(vm, f"{name}: {message}" if message not in ("", "-") else "")
            if vm.lcm == Lcm.BOOT_POWEROFF:
                self._set(vm, VmState.POWEROFF, Lcm.LCM_INIT)
            elif vm.lcm == Lcm.BOOT_SUSPENDED:
                self._set(vm, VmState.SUSPENDED, Lcm.LCM_INIT)
            else:
                self._set(vm, lcm=failed)
            self.core.update_vm(vm)
            return
        self._set(vm, lcm=Lcm.RUNNING)
        clear_action(vm)
        vm.history[-1].etime = 0
        vm.history[-1].retime = 0
        if not vm.deploy_id:
            vm.deploy_id = f"one-{vm.id}"
        self.core.update_vm(vm)
        for disk in vm.disks():
            self.core.plug_disk(vm, disk)
        self.write_one_env(vm)

    def write_one_env(self, vm: Vm) -> None:
        ctx = vm.context()
        if ctx is None:
            return
        token = base64.b64encode(secrets.token_bytes(24)).decode() if ctx.get(
            "TOKEN", "").upper() == "YES" else ""
        variables = [("TOKENTXT", token), ("VMID", ctx.get("VMID", "")),
                     ("ONEGATE_ENDPOINT", ctx.get("ONEGATE_ENDPOINT", ""))]
        variables += sorted(ctx.items())
        dataplane.write_one_env(self.core.root, vm.id, variables)

    # -- hold / release -----------------------------------------------------
    def hold(self, vm: Vm) -> None:
        if vm.state != VmState.PENDING:
            raise _not_available(vm)
        self._set(vm, VmState.HOLD)
        self.core.update_vm(vm)

    def release(self, vm: Vm) -> None:
        if vm.state != VmState.HOLD:
            raise _not_available(vm)
        self._set(vm, VmState.PENDING)
        self.core.update_vm(vm)

    # -- suspend / resume -------------------------------------------------------
    def suspend(self, vm: Vm, caller: Caller) -> None:
        if not (vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING):
            raise _not_available(vm)
        self.core.defer(lambda: self._trigger_suspend(vm.id, caller))

    def _trigger_suspend(self, vid: int, caller: Caller) -> None:
        vm = self.core.store.vms.get(vid)
        if vm is None or not (vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING):
            return
        self._set(vm, lcm=Lcm.SAVE_SUSPEND)
        vm.resched = 0
        set_action(vm, Action.SUSPEND, caller)
        self.core.update_vm(vm)
        self._driver("vm.save", vm, "suspend")

    def _save_done(self, op: dict[str, object]) -> None:
        vm = self.core.store.vms.get(int(op["vm"]))  # type: ignore[call-overload]
        if vm is None or vm.lcm not in (Lcm.SAVE_SUSPEND, Lcm.SAVE_STOP):
            return
        message = self._failed(op, vm)
        if message is not None:
            self.core.vm_error(vm, f"SAVE: {message}" if message not in ("", "-") else "")
            self._set(vm, lcm=Lcm.RUNNING)
            clear_action(vm)
            self.core.update_vm(vm)
            return
        if vm.lcm == Lcm.SAVE_SUSPEND:
            self._set(vm, VmState.SUSPENDED, Lcm.LCM_INIT)
            vm.history[-1].retime = now()
            self.core.update_vm(vm)
        else:  # SAVE_STOP -> EPILOG_STOP
            t = now()
            vm.history[-1].estime = t
            vm.history[-1].retime = t
            self._set(vm, lcm=Lcm.EPILOG_STOP)
            self.core.update_vm(vm)
            self._driver("vm.epilog", vm, "shutdown")

    def resume(self, vm: Vm, caller: Caller) -> None:
        if vm.state in (VmState.STOPPED, VmState.UNDEPLOYED):
            self._set(vm, VmState.PENDING)
            self.core.update_vm(vm)
        elif vm.state == VmState.SUSPENDED:
            self.core.defer(lambda: self._trigger_boot_from(vm.id, VmState.SUSPENDED,
                                                            Lcm.BOOT_SUSPENDED, caller))
        elif vm.state == VmState.POWEROFF:
            self.core.defer(lambda: self._trigger_boot_from(vm.id, VmState.POWEROFF,
                                                            Lcm.BOOT_POWEROFF, caller))
        elif vm.state == VmState.ACTIVE and vm.lcm == Lcm.UNKNOWN:
            self.core.defer(lambda: self._trigger_boot_unknown(vm.id))
        else:
            raise _not_available(vm)

    def _trigger_boot_unknown(self, vid: int) -> None:
        """LifeCycleManager::trigger_restart from UNKNOWN."""
        vm = self.core.store.vms.get(vid)
        if vm is None or not (vm.state == VmState.ACTIVE and vm.lcm == Lcm.UNKNOWN):
            return
        self._set(vm, lcm=Lcm.BOOT_UNKNOWN)
        self.core.update_vm(vm)
        self._driver("vm.boot", vm, "resume")

    def _trigger_boot_from(self, vid: int, state: int, boot: int, caller: Caller) -> None:
        """LifeCycleManager::trigger_restore / trigger_restart."""
        vm = self.core.store.vms.get(vid)
        if vm is None or vm.state != state:
            return
        t = now()
        self._set(vm, VmState.ACTIVE, boot)
        vm.history[-1].etime = t
        new = cp_history(vm)
        new.stime = t
        new.rstime = t
        set_action(vm, Action.RESUME, caller)
        self.core.update_vm(vm)
        self._driver("vm.boot", vm, "resume")

    # -- poweroff / terminate / undeploy / stop ------------------------------
    def poweroff(self, vm: Vm, hard: bool, caller: Caller) -> None:
        ok = vm.state == VmState.ACTIVE and (vm.lcm in (Lcm.RUNNING, Lcm.UNKNOWN) or (
            hard and vm.lcm == Lcm.SHUTDOWN_POWEROFF))
        if not ok:
            raise _not_available(vm)
        action = Action.POWEROFF_HARD if hard else Action.POWEROFF
        self.core.defer(lambda: self._trigger_shutdown_to(vm.id, Lcm.SHUTDOWN_POWEROFF, action,
                                                          caller, "poweroff"))

    def undeploy(self, vm: Vm, hard: bool, caller: Caller) -> None:
        action = Action.UNDEPLOY_HARD if hard else Action.UNDEPLOY
        if vm.state == VmState.ACTIVE and vm.lcm in (Lcm.RUNNING, Lcm.UNKNOWN):
            self.core.defer(lambda: self._trigger_shutdown_to(vm.id, Lcm.SHUTDOWN_UNDEPLOY,
                                                              action, caller, "shutdown"))
        elif vm.state == VmState.POWEROFF:
            self.core.defer(lambda: self._epilog_from_off(vm.id, Lcm.EPILOG_UNDEPLOY,
                                                          Action.UNDEPLOY, caller))
        else:
            raise _not_available(vm)

    def stop(self, vm: Vm, caller: Caller) -> None:
        if vm.state == VmState.SUSPENDED:
            self.core.defer(lambda: self._epilog_from_off(vm.id, Lcm.EPILOG_STOP, Action.STOP,
                                                          caller))
        elif vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING:
            def trigger() -> None:
                if vm.state == VmState.ACTIVE and vm.lcm == Lcm.RUNNING:
                    self._set(vm, lcm=Lcm.SAVE_STOP)
                    set_action(vm, Action.STOP, caller)
                    self.core.update_vm(vm)
                    self._driver("vm.save", vm, "suspend")
            self.core.defer(trigger)
        else:
            raise _not_available(vm)

    def terminate(self, vm: Vm, hard: bool, caller: Caller) -> None:
        """DispatchManager::terminate."""
        action = Action.TERMINATE_HARD if hard else Action.TERMINATE
        st = vm.state
        if st in (VmState.SUSPENDED, VmState.POWEROFF, VmState.STOPPED, VmState.UNDEPLOYED):
            self.core.defer(lambda: self._epilog_from_off(vm.id, Lcm.EPILOG, Action.TERMINATE,
                                                          caller))
        elif st in (VmState.INIT, VmState.PENDING, VmState.HOLD, VmState.CLONING,
                    VmState.CLONING_FAILURE):
            self.free_vm_resources(vm)
        elif st == VmState.DONE:
            return
        elif vm.lcm in (Lcm.RUNNING, Lcm.UNKNOWN) or (hard and vm.lcm == Lcm.SHUTDOWN):
            self.core.defer(lambda: self._trigger_shutdown_to(vm.id, Lcm.SHUTDOWN, action,
                                                              caller, "shutdown"))
        elif Lcm(vm.lcm).name.endswith("_FAILURE"):
            self.core.defer(lambda: self._cleanup_delete(vm.id))
        else:
            raise WrongState(f"Could not terminate VM {vm.id}, wrong state "
                             f"{state_str(vm.state, vm.lcm)}.")

    def _trigger_shutdown_to(self, vid: int, lcm: int, action: int, caller: Caller,
                             fault: str) -> None:
        vm = self.core.store.vms.get(vid)
        if vm is None or vm.state != VmState.ACTIVE:
            return
        if vm.lcm not in (Lcm.RUNNING, Lcm.UNKNOWN, Lcm.SHUTDOWN, Lcm.SHUTDOWN_POWEROFF,
                          Lcm.SHUTDOWN_UNDEPLOY):
            return
        self._set(vm, lcm=lcm)
        vm.resched = 0
        set_action(vm, action, caller)
        self.core.update_vm(vm)
        self._driver("vm.shutdown", vm, fault)

    def _epilog_from_off(self, vid: int, lcm: int, action: int, caller: Caller) -> None:
        vm = self.core.store.vms.get(vid)
        if vm is None or vm.state not in (VmState.SUSPENDED, VmState.POWEROFF, VmState.STOPPED,
                                          VmState.UNDEPLOYED):
            return
        self._set(vm, VmState.ACTIVE, lcm)
        set_action(vm, action, caller)
        vm.history[-1].estime = now()
        self.core.update_vm(vm)
        self._driver("vm.epilog", vm, "shutdown")

    def _shutdown_done(self, op: dict[str, object]) -> None:
        vm = self.core.store.vms.get(int(op["vm"]))  # type: ignore[call-overload]
        if vm is None or vm.lcm not in (Lcm.SHUTDOWN, Lcm.SHUTDOWN_POWEROFF,
                                        Lcm.SHUTDOWN_UNDEPLOY):
            return
        message = self._failed(op, vm)
        if message is not None:
            name = "CANCEL" if vm.history[-1].action in (
                Action.TERMINATE_HARD, Action.POWEROFF_HARD, Action.UNDEPLOY_HARD) else "SHUTDOWN"
            self.core.vm_error(vm, f"{name}: {message}" if message not in ("", "-") else "")
            self._set(vm, lcm=Lcm.RUNNING)
            clear_action(vm)
            self.core.update_vm(vm)
            return
        t = now()
        if vm.lcm == Lcm.SHUTDOWN_POWEROFF:
            self._set(vm, VmState.POWEROFF, Lcm.LCM_INIT)
            vm.history[-1].retime = t
            self.core.update_vm(vm)
            return
        vm.history[-1].estime = t
        vm.history[-1].retime = t
        self._set(vm, lcm=Lcm.EPILOG if vm.lcm == Lcm.SHUTDOWN else Lcm.EPILOG_UNDEPLOY)
        self.core.update_vm(vm)
        self._driver("vm.epilog", vm, "shutdown")

    def _epilog_done(self, op: dict[str, object]) -> None:
        vm = self.core.store.vms.get(int(op["vm"]))  # type: ignore[call-overload]
        if vm is None or vm.lcm not in (Lcm.EPILOG, Lcm.EPILOG_STOP, Lcm.EPILOG_UNDEPLOY):
            return
        t = now()
        h = vm.history[-1]
        h.eetime = t
        h.etime = t
        if vm.lcm == Lcm.EPILOG:
            self.core.update_vm(vm)
            self.free_vm_resources(vm)
            return
        state = VmState.STOPPED if vm.lcm == Lcm.EPILOG_STOP else VmState.UNDEPLOYED
        self._set(vm, state, Lcm.LCM_INIT)
        dataplane.unplug_all(self.core.root, vm.id)
        self.core.update_vm(vm)

    def _cleanup_delete(self, vid: int) -> None:
        vm = self.core.store.vms.get(vid)
        if vm is not None and vm.state == VmState.ACTIVE:
            self.free_vm_resources(vm)

    def free_vm_resources(self, vm: Vm) -> None:
        """DispatchManager::free_vm_resources: images released, DONE, files gone."""
        for disk in vm.disks():
            if "IMAGE_ID" in disk:
                self.core.release_image(vm.id, int(disk["IMAGE_ID"]))
        self._set(vm, VmState.DONE, Lcm.LCM_INIT)
        t = now()
        vm.etime = t
        if vm.history:
            h = vm.history[-1]
            if h.rstime != 0 and h.retime == 0:
                h.retime = t
            if h.etime == 0:
                h.etime = t
            dataplane.remove(dataplane.vm_dir(self.vm_dir_base(vm), vm.id))
        dataplane.unplug_all(self.core.root, vm.id)
        self.core.update_vm(vm)
