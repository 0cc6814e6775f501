"""The core every part of the simulator shares, like oned's Nebula singleton.

Owns: configuration (root, version, delay, loop devices), the bootstrap of
a fresh OpenNebula (users, groups, cluster, host 0, datastores 0/1/2), the
pool `update_*` functions that publish a state event when an object's
state changed since its last write (VirtualMachinePool::update and
friends), image acquire/release (ImageManager), datastore usage, error
messages in templates, and `OneError` (a refused request).
Must not: implement API methods or state transitions.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.onesim import dataplane
from tests.onesim.constants import (
    DatastoreType,
    ErrorCode,
    HostState,
    ImageState,
    ImageType,
    VmState,
    lcm_state_name,
)
from tests.onesim.documents import host_xml, vms_on_host
from tests.onesim.events import (
    Bus,
    host_state_message,
    image_state_message,
    state_keys,
    vm_state_message,
)
from tests.onesim.faults import Faults
from tests.onesim.model import (
    Cluster,
    Datastore,
    Group,
    Host,
    Image,
    Perms,
    Store,
    User,
    Vm,
    now,
)

ONEGATE_ENDPOINT = "http://127.0.0.1:5030"


class OneError(Exception):
    """A request oned refuses: code, the reason (att.resp_msg), resp_id and
    the object named in NO_EXISTS/ALLOCATE messages."""

    def __init__(self, code: int, message: str = "", resp_id: int = -1,
                 obj: str | None = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.resp_id = resp_id
        self.obj = obj


def no_exists(obj: str, oid: int) -> OneError:
    return OneError(ErrorCode.NO_EXISTS, "", oid, obj)


def action_error(message: str) -> OneError:
    return OneError(ErrorCode.ACTION, message)


def log_time(stamp: float | None = None) -> str:
    """one_util::log_time: 'Wed Nov 25 11:42:47 2026'."""
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(stamp))


@dataclass
class Config:
    root: Path
    version: str = "7.4.0"
    delay: float = 0.05
    sched_delay: float | None = None
    loop: bool = False
    datastore_mb: int = 102400
    host: str = "127.0.0.1"
    lcm_delay: float | None = None
    onegate_endpoint: str | None = ONEGATE_ENDPOINT

    @property
    def scheduler_interval(self) -> float:
        return self.delay if self.sched_delay is None else self.sched_delay

    @property
    def lcm_interval(self) -> float:
        """How long after its answer the LCM thread takes up an action."""
        return self.delay if self.lcm_delay is None else self.lcm_delay

    def version_tuple(self) -> tuple[int, ...]:
        parts = []
        for piece in self.version.split("."):
            digits = "".join(ch for ch in piece if ch.isdigit())
            parts.append(int(digits or 0))
        return tuple(parts)


@dataclass
class Caller:
    """The authenticated user of a request (RequestAttributes)."""

    uid: int
    gid: int
    uname: str
    gname: str
    groups: list[int] = field(default_factory=list)
    umask: int = 0o177
    req_id: int = -1

    @property
    def is_admin(self) -> bool:
        return self.uid == 0 or 0 in self.groups


ONEADMIN = Caller(0, 0, "oneadmin", "oneadmin", [0])


class Oned:
    """Shared state and pool operations. Callers hold `store.lock`."""

    def __init__(self, config: Config, store: Store, bus: Bus, faults: Faults) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.faults = faults
        self.root = config.root
        self._engine: Any = None
        self._tls = threading.local()
        self.copies = dataplane.CopyMeter()   # bytes the TM drivers copy (a test probe)

    @property
    def engine(self) -> Any:
        """The Engine, set by the simulator (which resumes pending operations)."""
        return self._engine

    @engine.setter
    def engine(self, engine: Any) -> None:
        self._engine = engine
        engine.register("guest.plug", self._plug_later)
        engine.register("guest.unplug", self._unplug_later)

    # -- deferred work: what oned's LCM does after the request returned ------
    def defer(self, fn: Callable[[], None]) -> None:
        """Queue `fn` for the LCM thread: it runs `config.lcm_interval` after
        the current request was answered (so the caller's next look still
        shows the old state, as on oned), or now outside a request."""
        queue = getattr(self._tls, "deferred", None)
        if queue is None:
            fn()
        else:
            queue.append(fn)

    def begin_request(self) -> None:
        self._tls.deferred = []

    def end_request(self) -> list[Callable[[], None]]:
        queue: list[Callable[[], None]] = getattr(self._tls, "deferred", None) or []
        self._tls.deferred = None
        return queue

    def run_deferred(self, queue: list[Callable[[], None]]) -> None:
        """Hand what a request queued to the LCM thread (DispatchManager's
        lcm->trigger_*: LifeCycleManager::trigger pushes onto its queue and
        the request answers at once)."""
        for fn in queue:
            self.engine.call_later(fn, self.config.lcm_interval)

    def schedule(self, op: dict[str, Any], delay: float) -> None:
        self.engine.schedule(op, delay)

    # -- bootstrap --------------------------------------------------------
    def bootstrap(self) -> None:
        """A fresh OpenNebula: oneadmin/oneadmin, users group, cluster 0,
        KVM host 0 (MONITORED), datastores system/default/files."""
        s = self.store
        s.meta["password"] = secrets.token_hex(12)
        s.groups[0] = Group(0, "oneadmin", [0])
        s.groups[1] = Group(1, "users", [])
        s.next_ids["groups"] = 100
        s.users[0] = User(0, "oneadmin", s.meta["password"], 0, "oneadmin", [0])
        s.users[1] = User(1, "serveradmin", secrets.token_hex(12), 0, "oneadmin", [0],
                          auth_driver="server_cipher")
        s.groups[0].users.append(1)
        s.next_ids["users"] = 2
        # ClusterPool::ClusterPool: cluster 0 "default" holds datastores 0-2;
        # clusters users create start at 100 (set_lastOID(99)).
        s.clusters[0] = Cluster(0, "default")
        s.next_ids["clusters"] = 100
        s.hosts[0] = self.new_host(0, "localhost", 0)
        s.next_ids["hosts"] = 1
        for ds in self._default_datastores():
            s.datastores[ds.id] = ds
            (self.root / "datastores" / str(ds.id)).mkdir(parents=True, exist_ok=True)
        s.next_ids["datastores"] = 100

    def new_host(self, hid: int, name: str, cluster_id: int) -> Host:
        """A KVM host as its first monitoring leaves it (MONITORED)."""
        cluster = self.store.clusters[cluster_id]
        host = Host(hid, name, "kvm", "kvm", state=HostState.MONITORED,
                    prev_state=HostState.MONITORED, cluster_id=cluster.id, cluster=cluster.name)
        for key, value in (("ARCH", "x86_64"), ("CPUSPEED", "3200"), ("HOSTNAME", name),
                           ("HYPERVISOR", "kvm"), ("IM_MAD", "kvm"),
                           ("MODELNAME", "onesim virtual CPU @ 3.2GHz"), ("RESERVED_CPU", ""),
                           ("RESERVED_MEM", ""), ("TOTALCPU", "800"),
                           ("TOTALMEMORY", "16777216"), ("VM_MAD", "kvm")):
            host.template.add(key, value)
        return host

    def _default_datastores(self) -> list[Datastore]:
        base = self.root / "datastores"
        common = [("PERSISTENT_SNAPSHOTS", "YES"), ("RESTRICTED_DIRS", "/"),
                  ("SAFE_DIRS", f"/var/tmp /tmp {self.root}"), ("TM_MAD", "local")]
        system = Datastore(0, "system", DatastoreType.SYSTEM_DS, "-", "local", str(base / "0"),
                           total_mb=self.config.datastore_mb)
        for k, v in [("ALLOW_ORPHANS", "FORMAT"), ("DISK_TYPE", "FILE"),
                     ("DS_LIVE_MIGRATE", "YES"), ("DS_MIGRATE", "YES"),
                     ("DS_MIGRATE_SNAP", "YES"), *common[:3], ("SHARED", "NO"),
                     ("TM_MAD", "local"), ("TYPE", "SYSTEM_DS")]:
            system.template.add(k, v)
        default = Datastore(1, "default", DatastoreType.IMAGE_DS, "fs", "local", str(base / "1"),
                            total_mb=self.config.datastore_mb)
        for k, v in [("ALLOW_ORPHANS", "FORMAT"), ("CLONE_TARGET", "SYSTEM"),
                     ("DISK_TYPE", "FILE"), ("DS_MAD", "fs"), ("LN_TARGET", "SYSTEM"),
                     *common, ("TYPE", "IMAGE_DS")]:
            default.template.add(k, v)
        files = Datastore(2, "files", DatastoreType.FILE_DS, "fs", "local", str(base / "2"),
                          total_mb=self.config.datastore_mb)
        for k, v in [("ALLOW_ORPHANS", "FORMAT"), ("CLONE_TARGET", "SYSTEM"), ("DS_MAD", "fs"),
                     ("LN_TARGET", "SYSTEM"), *common, ("TYPE", "FILE_DS")]:
            files.template.add(k, v)
        return [system, default, files]

    # -- pool updates (publish state changes) -----------------------------
    def update_vm(self, vm: Vm) -> None:
        if (vm.state, vm.lcm) != (vm.prev_state, vm.prev_lcm):
            self.bus.submit(
                state_keys("VM", vm.id, VmState(vm.state).name,
                           _lcm_name(vm.lcm), vm.user_template.get("SERVICE_ID")),
                vm_state_message(vm))
        vm.prev_state, vm.prev_lcm = vm.state, vm.lcm

    def allocated_vm(self, vm: Vm) -> None:
        """VirtualMachinePool::allocate publishes the new VM unconditionally."""
        self.bus.submit(state_keys("VM", vm.id, VmState(vm.state).name, _lcm_name(vm.lcm)),
                        vm_state_message(vm))

    def update_image(self, img: Image) -> None:
        if img.state != img.prev_state:
            self.bus.submit(state_keys("IMAGE", img.id, ImageState(img.state).name),
                            image_state_message(img))
        img.prev_state = img.state

    def update_host(self, host: Host) -> None:
        if host.state != host.prev_state:
            self.bus.submit(state_keys("HOST", host.id, HostState(host.state).name),
                            host_state_message(host, self.host_doc(host)))
        host.prev_state = host.state

    def host_doc(self, host: Host) -> str:
        return host_xml(host, vms_on_host(self.store, host.id), self.host_disk(), now())

    # -- lookups -------------------------------------------------------------
    def vm(self, vid: int) -> Vm:
        vm = self.store.vms.get(vid)
        if vm is None:
            raise no_exists("VM", vid)
        return vm

    def image(self, iid: int) -> Image:
        img = self.store.images.get(iid)
        if img is None:
            raise no_exists("IMAGE", iid)
        return img

    def cluster(self, cid: int) -> Cluster:
        cluster = self.store.clusters.get(cid)
        if cluster is None:
            raise no_exists("CLUSTER", cid)
        return cluster

    def datastore(self, ds_id: int) -> Datastore:
        ds = self.store.datastores.get(ds_id)
        if ds is None:
            raise no_exists("DATASTORE", ds_id)
        return ds

    def ds_path(self, ds_id: int) -> Path:
        return self.root / "datastores" / str(ds_id)

    def new_perms(self, caller: Caller) -> Perms:
        return Perms.from_umask(caller.umask)

    # -- capacity ------------------------------------------------------------
    def ds_used_mb(self, ds: Datastore) -> int:
        s = self.store
        if ds.type == DatastoreType.SYSTEM_DS:
            used = 0
            for vm in s.vms.values():
                if vm.state == VmState.DONE or vm.system_ds() != ds.id:
                    continue
                for disk in vm.disks():
                    if disk.get("CLONE") == "YES" or "IMAGE_ID" not in disk:
                        used += int(disk.get("SIZE", "0") or 0)
                for snaps in vm.snapshots.values():
                    used += snaps.total_size()
            return used
        return sum(img.size for img in s.images.values() if img.datastore_id == ds.id)

    def ds_free_mb(self, ds: Datastore) -> int:
        return max(ds.total_mb - self.ds_used_mb(ds), 0)

    def host_disk(self) -> tuple[int, int, int]:
        system = [d for d in self.store.datastores.values() if d.type == DatastoreType.SYSTEM_DS]
        total = sum(d.total_mb for d in system)
        used = sum(self.ds_used_mb(d) for d in system)
        return total, used, max(total - used, 0)

    # -- messages in templates -----------------------------------------------
    def vm_error(self, vm: Vm, message: str) -> None:
        """VirtualMachine::set_template_error_message."""
        vm.user_template.erase("ERROR")
        if message:
            vm.user_template.add("ERROR", f"{log_time()}: {message}")

    def image_error(self, img: Image, message: str) -> None:
        img.template.erase("ERROR")
        if message:
            img.template.add("ERROR", f"{log_time()}: {message}")

    # -- images used by VMs (ImageManager::acquire_image / release_image) ------
    def acquire_image(self, vm_id: int, img: Image, attach: bool) -> None:
        if img.type in (ImageType.KERNEL, ImageType.RAMDISK, ImageType.CONTEXT,
                        ImageType.BACKUP):
            raise OneError(ErrorCode.ACTION,
                           f"Image {img.id} ({img.name}) of type {ImageType(img.type).name}"
                           " cannot be used as DISK.")
        shareable = (img.template.get("PERSISTENT_TYPE") or "").upper() == "SHAREABLE"
        st = img.state
        if st == ImageState.READY:
            img.running_vms += 1
            img.vms.append(vm_id)
            img.state = ImageState.USED_PERS if img.persistent else ImageState.USED
        elif st in (ImageState.LOCKED, ImageState.LOCKED_USED, ImageState.LOCKED_USED_PERS):
            if st == ImageState.LOCKED_USED_PERS and not shareable:
                raise _acquire_error(f"Cannot acquire image {img.id}, it is persistent "
                                     "and already in use")
            if attach:
                raise _acquire_error(f"Cannot acquire image {img.id}, it is locked")
            img.running_vms += 1
            img.vms.append(vm_id)
            if st == ImageState.LOCKED:
                img.state = (ImageState.LOCKED_USED_PERS if img.persistent
                             else ImageState.LOCKED_USED)
        elif st in (ImageState.USED, ImageState.USED_PERS):
            if st == ImageState.USED_PERS and not shareable:
                raise _acquire_error(f"Cannot acquire image {img.id}, it is persistent "
                                     "and already in use")
            img.running_vms += 1
            img.vms.append(vm_id)
        else:
            raise _acquire_error(f"Cannot acquire image {img.id}, it is in state: "
                                 f"{ImageState(st).name}")
        img.vms.sort()
        self.update_image(img)

    def release_image(self, vm_id: int, iid: int, failed: bool = False) -> None:
        img = self.store.images.get(iid)
        if img is None or img.type not in (ImageType.OS, ImageType.DATABLOCK, ImageType.CDROM,
                                           ImageType.FILESYSTEM):
            return
        if vm_id in img.vms:
            img.vms.remove(vm_id)
        if img.state in (ImageState.USED_PERS, ImageState.LOCKED_USED_PERS,
                         ImageState.USED, ImageState.LOCKED_USED):
            img.running_vms = max(img.running_vms - 1, 0)
            img.modtime = now() if img.persistent else img.modtime
            if failed and img.state in (ImageState.USED_PERS, ImageState.LOCKED_USED_PERS):
                img.state = ImageState.ERROR
            elif img.running_vms == 0 and img.cloning_ops == 0:
                img.state = (ImageState.READY if img.state in (ImageState.USED,
                                                               ImageState.USED_PERS)
                             else ImageState.LOCKED)
            self.update_image(img)

    # -- guest devices -------------------------------------------------------
    def plug_disk(self, vm: Vm, disk: dict[str, str]) -> None:
        """The guest sees the disk: at once, or `seconds` later with the fault
        `slow_driver("plug", seconds)` (libvirt's attach returns, and oned
        leaves HOTPLUG, before the guest kernel has probed the device and
        udev has made its links)."""
        target = disk.get("TARGET")
        if not target or vm.last is None:
            return
        disk_id = int(disk["DISK_ID"])
        delay = self.faults.driver_delay("plug", vm.id, disk_id)
        if delay > 0:
            self.schedule({"op": "guest.plug", "vm": vm.id, "disk": disk_id,
                           "serial": disk.get("SERIAL", "")}, delay)
            return
        path = dataplane.disk_file(self.ds_path(vm.system_ds()), vm.id, disk_id)
        if not path.exists() and not path.is_symlink():
            return
        dataplane.plug(self.root, vm.id, target, disk.get("DEV_PREFIX", "sd"),
                       disk.get("SERIAL"), path, self.config.loop)

    def _plug_later(self, op: dict[str, Any]) -> None:
        vm = self.store.vms.get(op["vm"])
        disk = vm.disk(op["disk"]) if vm is not None else None
        if (vm is None or disk is None or vm.state != VmState.ACTIVE
                or disk.get("ATTACH") == "YES" or disk.get("SERIAL", "") != op["serial"]):
            return  # detached, or the VM left, before the guest saw it
        path = dataplane.disk_file(self.ds_path(vm.system_ds()), vm.id, op["disk"])
        if path.exists() or path.is_symlink():
            dataplane.plug(self.root, vm.id, disk["TARGET"], disk.get("DEV_PREFIX", "sd"),
                           disk.get("SERIAL"), path, self.config.loop)

    def unplug_disk(self, vm: Vm, disk: dict[str, str]) -> None:
        """The disk leaves the guest: at once, or `seconds` after oned's detach
        finished with the fault `slow_driver("unplug", seconds)` (the guest's
        udev has not yet processed the remove event)."""
        target = disk.get("TARGET")
        if not target:
            return
        prefix, serial = disk.get("DEV_PREFIX", "sd"), disk.get("SERIAL")
        delay = self.faults.driver_delay("unplug", vm.id, int(disk["DISK_ID"]))
        if delay > 0:
            self.schedule({"op": "guest.unplug", "vm": vm.id, "target": target,
                           "prefix": prefix, "serial": serial}, delay)
            return
        dataplane.unplug(self.root, vm.id, target, prefix, serial)

    def _unplug_later(self, op: dict[str, Any]) -> None:
        vm = self.store.vms.get(op["vm"])
        target, prefix, serial = op["target"], op["prefix"], op["serial"]
        holder = next((d for d in vm.disks() if d.get("TARGET") == target), None) \
            if vm is not None else None
        if vm is not None and holder is not None:
            # The target went to a disk attached since; its plug replaced the
            # node and the kernel's entry: only the old disk's link claim goes.
            if serial and holder.get("SERIAL") != serial:
                dataplane.udev_release(self.root, vm.id, dataplane.by_id_name(prefix, serial),
                                       target)
            return
        dataplane.unplug(self.root, op["vm"], target, prefix, serial)

    def save(self) -> None:
        self.store.save()


def _acquire_error(message: str) -> OneError:
    return OneError(ErrorCode.ACTION, message)


def _lcm_name(lcm: int) -> str:
    return lcm_state_name(lcm)
