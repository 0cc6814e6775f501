"""The OpenNebula boundary: the only module that talks XML-RPC to oned.

Owns: every XML-RPC call oneback makes, with a real per-call timeout; the
translation of oned's error arrays into `errors` (its documents become
`model` values in `onedoc.py`); and the waits that turn oned's "accepted" into "done":
an operation is complete when the object leaves its transient state, and is
then *checked* (a failed attach silently drops the disk, a failed snapshot
disappears, a failed save-as leaves the image in ERROR). State numbers are
read as numbers (pyone's enums lack LCM 69-71).

Must not: decide policy (which disks, when), touch the catalog or devices, or
log the session string.

The transport is the standard library's `xmlrpc.client` with a per-call
timeout and one connection per call (calls from several threads never share
a socket). Results are taken as oned's raw `[ok, value, code, ...]` arrays:
a backup stores the verbatim documents, and oned's error code decides the
error class. (pyone was used before; its public client parses every document
into generated bindings and drops the error code, its timeout is a
process-wide socket default, and reaching into its private request methods
cost 70 ms of imports on every command.)
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lxml import etree

from agent import xmldoc
from agent.errors import CloudError, CloudTimeout, NotFound, StateError
from agent.model import (
    IMAGE_ERROR,
    IMAGE_LOCKED,
    LCM_RUNNING,
    VM_ACTIVE,
    VM_CLONING,
    VM_DONE,
    VM_HOLD,
    VM_PENDING,
    VM_POWEROFF,
    VM_STOPPED,
    VM_SUSPENDED,
    VM_UNDEPLOYED,
    DatastoreInfo,
    DiskInfo,
    HookInfo,
    ImageInfo,
    VmInfo,
)
from agent.onedoc import IMAGE_TYPES as IMAGE_TYPES  # re-exported
from agent.onedoc import image_error, int_of, parse_datastore, parse_image, parse_vm, text_of
from agent.vmtemplate import quote

AUTHENTICATION, AUTHORIZATION, NO_EXISTS, ACTION, RPC_API, INTERNAL = (
    0x100, 0x200, 0x400, 0x800, 0x1000, 0x2000,
)


# LCM states of a VM in which one of the operations we drive is still running.
SNAPSHOT_BUSY = {51, 52, 53, 54, 55, 56, 57, 58, 59}
SAVEAS_BUSY = {26, 27, 28, 67, 68}
HOTPLUG_BUSY = {17, 33, 34}
# LCM states that end by themselves (a driver or the scheduler is working).
TRANSIENT_LCM = (
    SNAPSHOT_BUSY | SAVEAS_BUSY | HOTPLUG_BUSY
    | {0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 19, 20, 21, 22, 23, 24, 25, 29, 30, 31,
       32, 35, 43, 45, 60, 62, 63, 64, 65, 66, 69, 70, 71}
)
HOTPLUG_RETRIES = 8        # "wrong state" refusals of one attach/detach retried
POLL_FIRST = 0.02  # seconds before the first look again at a settling object
HOTPLUG_BACKOFF_MAX = 5.0  # seconds between two tries, doubling from poll_interval


@dataclass(frozen=True)
class ActionTarget:
    """Where a VM action ends: its STATE (and LCM_STATE when ACTIVE)."""

    name: str
    state: int
    lcm_state: int | None = None
    leave: bool = False  # reached once the VM is no longer in `state`

    def reached(self, vm: VmInfo) -> bool:
        if self.leave:
            return vm.state != self.state
        return vm.state == self.state and (self.lcm_state is None
                                           or vm.lcm_state == self.lcm_state)


_RUNNING = ActionTarget("RUNNING", VM_ACTIVE, LCM_RUNNING)
# The state each action ends in (src/lcm/LifeCycleStates.cc: *_success).
ACTION_TARGETS: dict[str, ActionTarget] = {
    "poweroff": ActionTarget("POWEROFF", VM_POWEROFF),
    "poweroff-hard": ActionTarget("POWEROFF", VM_POWEROFF),
    "suspend": ActionTarget("SUSPENDED", VM_SUSPENDED),
    "resume": _RUNNING,
    "stop": ActionTarget("STOPPED", VM_STOPPED),
    "undeploy": ActionTarget("UNDEPLOYED", VM_UNDEPLOYED),
    "undeploy-hard": ActionTarget("UNDEPLOYED", VM_UNDEPLOYED),
    "terminate": ActionTarget("DONE", VM_DONE),
    "terminate-hard": ActionTarget("DONE", VM_DONE),
    "hold": ActionTarget("HOLD", VM_HOLD),
    "release": ActionTarget("released", VM_HOLD, leave=True),
}


def _in_progress(vm: VmInfo) -> bool:
    """Still on its way: a transient LCM state, or waiting for the scheduler."""
    return (vm.state == VM_ACTIVE and vm.lcm_state in TRANSIENT_LCM) or vm.state in (
        VM_PENDING, VM_CLONING)


class _Timed:
    """HTTP with a timeout on connect and on every read (the standard
    transport uses the process-wide socket default), sent once: the
    standard `request` resends after a dropped connection, which for a
    fresh connection can only repeat a call oned may have carried out."""

    timeout: float

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection = super().make_connection(host)  # type: ignore[misc]
        conn.timeout = self.timeout
        return conn

    def request(self, host: Any, handler: str, request_body: Any,
                verbose: bool = False) -> Any:
        return self.single_request(host, handler, request_body, verbose)  # type: ignore[attr-defined]


class _TimeoutTransport(_Timed, xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout


class _TimeoutSafeTransport(_Timed, xmlrpc.client.SafeTransport):  # type: ignore[misc]
    """HTTPS (certificate and host name verified), timed and sent once."""

    def __init__(self, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self.timeout = timeout


def poll_pauses(poll_interval: float) -> Iterator[float]:
    """The pauses between two looks at an object that is settling: POLL_FIRST,
    then twice as long each time, up to `poll_interval`. Most operations
    (an attach, a disk snapshot of a small disk, an image becoming READY)
    settle in well under a second: a fixed 0.5 s pause made each wait for
    one last about a quarter of a second longer than the operation (two
    seconds of a restore), while a long one is still looked at only every
    `poll_interval`, as configured."""
    pause = min(POLL_FIRST, poll_interval)
    while True:
        yield pause
        pause = min(pause * 2, poll_interval)


class Cloud:
    """One authenticated connection to oned. Thread-safe; operations on the
    same VM are serialised (oned refuses concurrent ones with "wrong state")."""

    def __init__(self, endpoint: str, session: str, *, timeout: float = 30.0,
                 operation_timeout: float = 900.0, poll_interval: float = 0.5,
                 start_timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.operation_timeout = operation_timeout
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout  # seconds an accepted VM action may take to start
        self._session = session
        self._timeout = timeout
        self._tls = ssl.create_default_context() if endpoint.startswith("https:") else None
        self._locks: dict[int, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._uid: int | None = None

    # -- the call ---------------------------------------------------------

    def call(self, method: str, *params: Any) -> Any:
        """Call `one.<method>` and return oned's value, or raise our error."""
        full = "one." + method
        # a connection per call: calls from several threads never share one
        transport: xmlrpc.client.Transport = (
            _TimeoutSafeTransport(self._timeout, self._tls) if self._tls
            else _TimeoutTransport(self._timeout))
        proxy = xmlrpc.client.ServerProxy(self.endpoint, transport=transport)
        try:
            ret = getattr(proxy, full)(self._session, *params)
        except TimeoutError:
            raise CloudTimeout(
                f"OpenNebula at {self.endpoint} did not answer {full} in time"
            ) from None
        except xmlrpc.client.Fault as e:  # wrong parameter types, unknown method
            raise CloudError(f"{full} was rejected by OpenNebula: {e}") from e
        except xml.parsers.expat.ExpatError as e:
            raise CloudError(f"{full}: the answer from {self.endpoint} is not XML-RPC ({e});"
                             f" check opennebula.endpoint") from e
        except (xmlrpc.client.ProtocolError, http.client.HTTPException, OSError) as e:
            raise CloudError(
                f"cannot reach OpenNebula at {self.endpoint} ({type(e).__name__});"
                f" check opennebula.endpoint and that oned is running",
                transient=True,
            ) from e
        finally:
            transport.close()
        if not isinstance(ret, list) or len(ret) < (2 if ret and ret[0] else 3):
            raise CloudError(f"{full}: OpenNebula answered {str(ret)[:80]!r}, not"
                             f" [success, value, code]; is {self.endpoint} oned?")
        if ret[0]:
            return ret[1]
        message, code = str(ret[1]), int(ret[2])
        if code == NO_EXISTS:
            raise NotFound(message)
        if code == AUTHENTICATION:
            raise CloudError(
                f"{message} Check the user:password in the credentials file.", code=code
            )
        transient = code == ACTION and "wrong state" in message
        raise CloudError(message, code=code, transient=transient)

    @contextmanager
    def _vm_lock(self, vm_id: int) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(vm_id, threading.RLock())
        with lock:
            yield

    # -- reads ------------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        text = str(self.call("system.version"))
        parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
        while len(parts) < 3:
            parts.append(0)
        return parts[0], parts[1], parts[2]

    def vm(self, vm_id: int) -> VmInfo:
        return parse_vm(str(self.call("vm.info", vm_id)))

    def vms(self) -> list[VmInfo]:
        """Every VM this user can see that is not DONE, with full documents."""
        root = xmldoc.parse(str(self.call("vmpool.infoextended", -2, -1, -1, -1)))
        return [parse_vm(etree.tostring(v, encoding="unicode")) for v in root.findall("VM")]

    def image(self, image_id: int) -> ImageInfo:
        return parse_image(str(self.call("image.info", image_id)))

    def images(self) -> list[ImageInfo]:
        root = xmldoc.parse(str(self.call("imagepool.info", -2, -1, -1)))
        return [parse_image(etree.tostring(i, encoding="unicode")) for i in root.findall("IMAGE")]

    def find_image(self, name: str) -> ImageInfo | None:
        return next((i for i in self.images() if i.name == name), None)

    def hosts(self) -> list[tuple[int, str, int]]:
        """(id, name, state) of every host; state 2 is MONITORED."""
        root = xmldoc.parse(str(self.call("hostpool.info")))
        return [(int_of(h, "ID", -1), text_of(h, "NAME"), int_of(h, "STATE", -1))
                for h in root.findall("HOST")]

    def hooks(self) -> dict[str, int]:
        """Registered hooks: name -> id."""
        root = xmldoc.parse(str(self.call("hookpool.info", -2, -1, -1)))
        return {text_of(h, "NAME"): int_of(h, "ID", -1) for h in root.findall("HOOK")}

    def hook_allocate(self, template: str) -> int:
        return int(self.call("hook.allocate", template))

    def hook_list(self) -> list[HookInfo]:
        """Every registered hook with its template (one.hookpool.info)."""
        root = xmldoc.parse(str(self.call("hookpool.info", -2, -1, -1)))
        hooks = []
        for h in root.findall("HOOK"):
            tmpl = h.find("TEMPLATE")
            attrs = [] if tmpl is None else [(str(a.tag), a.text or "") for a in tmpl
                                             if isinstance(a.tag, str) and len(a) == 0]
            hooks.append(HookInfo(id=int_of(h, "ID", -1), name=text_of(h, "NAME"),
                                  type=text_of(h, "TYPE"), template=tuple(sorted(attrs))))
        return hooks

    def hook_update(self, hook_id: int, template: str) -> None:
        """Replace a hook's template (one.hook.update, type 0: replace;
        Hook::post_update_template re-reads COMMAND, REMOTE and the
        STATE/LCM_STATE or CALL the template names)."""
        self.call("hook.update", hook_id, template, 0)

    def datastore(self, ds_id: int) -> DatastoreInfo:
        return parse_datastore(xmldoc.parse(str(self.call("datastore.info", ds_id))))

    def datastores(self) -> dict[int, DatastoreInfo]:
        """Every datastore this user can see, by id (with its CLUSTERS)."""
        root = xmldoc.parse(str(self.call("datastorepool.info")))
        return {d.id: d for d in map(parse_datastore, root.findall("DATASTORE"))}

    def links_in_place(self, ds_id: int) -> bool:
        """Whether a persistent image of this datastore is attached by a
        link to the image itself (its TM_MAD_CONF LN_TARGET is NONE: shared,
        qcow2, ceph, lvm...: no byte copied), not by a copy into the system
        datastore that its detach copies back (LN_TARGET SYSTEM: ssh, local,
        fs_lvm...; src/tm_mad/ssh/ln is a link to its clone, ssh/mvds rsyncs
        it back). Datastore::disk_attribute gives every disk this LN_TARGET."""
        root = xmldoc.parse(str(self.call("datastore.info", ds_id)))
        return (root.findtext("TEMPLATE/LN_TARGET") or "NONE").strip().upper() == "NONE"

    # -- waiting ------------------------------------------------------------

    def _wait(self, what: str, probe: Callable[[], Any | None],
              timeout: float | None = None) -> Any:
        """Poll `probe` until it returns something other than None, at the
        pauses of `poll_pauses`."""
        deadline = time.monotonic() + (timeout or self.operation_timeout)
        pauses = poll_pauses(self.poll_interval)
        while True:
            result = probe()
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise CloudTimeout(f"{what} did not finish within "
                                   f"{timeout or self.operation_timeout:g} s")
            time.sleep(next(pauses))

    def wait_vm(self, vm_id: int, until: Callable[[VmInfo], bool], what: str,
                timeout: float | None = None) -> VmInfo:
        def probe() -> VmInfo | None:
            vm = self.vm(vm_id)
            return vm if until(vm) else None
        result: VmInfo = self._wait(what, probe, timeout)
        return result

    def wait_settled(self, vm_id: int, timeout: float | None = None) -> VmInfo:
        """The VM once no operation is running on it (RUNNING, POWEROFF, ...)."""
        return self.wait_vm(
            vm_id,
            lambda v: not (v.state == VM_ACTIVE and v.lcm_state in TRANSIENT_LCM),
            f"VM {vm_id}'s current operation", timeout,
        )

    def _new_error(self, before: VmInfo, after: VmInfo) -> str:
        if after.error and after.error != before.error:
            return f": {after.error}"
        return ""

    # -- disk snapshots --------------------------------------------------------

    def snapshot_create(self, vm_id: int, disk_id: int, name: str) -> int:
        """Take a disk snapshot and wait until it exists. Returns its id."""
        with self._vm_lock(vm_id):
            before = self.wait_settled(vm_id)
            snap_id = int(self.call("vm.disksnapshotcreate", vm_id, disk_id, name))
            after = self.wait_vm(
                vm_id, lambda v: v.lcm_state not in SNAPSHOT_BUSY or v.state != VM_ACTIVE,
                f"disk snapshot {name!r} of VM {vm_id} disk {disk_id}")
            if not any(s.disk_id == disk_id and s.snapshot_id == snap_id
                       for s in after.snapshots):
                raise CloudError(
                    f"OpenNebula failed to snapshot VM {vm_id} disk {disk_id}"
                    f"{self._new_error(before, after)}", transient=True)
            return snap_id

    def snapshot_delete(self, vm_id: int, disk_id: int, snap_id: int) -> None:
        """Delete a disk snapshot and wait until it is gone. Idempotent."""
        with self._vm_lock(vm_id):
            before = self.wait_settled(vm_id)
            if not any(s.disk_id == disk_id and s.snapshot_id == snap_id
                       for s in before.snapshots):
                return
            self.call("vm.disksnapshotdelete", vm_id, disk_id, snap_id)
            after = self.wait_vm(
                vm_id, lambda v: v.lcm_state not in SNAPSHOT_BUSY or v.state != VM_ACTIVE,
                f"deleting snapshot {snap_id} of VM {vm_id} disk {disk_id}")
            if any(s.disk_id == disk_id and s.snapshot_id == snap_id for s in after.snapshots):
                raise CloudError(
                    f"OpenNebula failed to delete snapshot {snap_id} of VM {vm_id} disk"
                    f" {disk_id}{self._new_error(before, after)}", transient=True)

    def snapshot_rename(self, vm_id: int, disk_id: int, snap_id: int, name: str) -> None:
        """Rename a disk snapshot (oned does it at once, in any state)."""
        with self._vm_lock(vm_id):
            self.call("vm.disksnapshotrename", vm_id, disk_id, snap_id, name)

    def snapshot_revert(self, vm_id: int, disk_id: int, snap_id: int) -> None:
        """Revert one disk to a snapshot (the VM must be stopped) and wait."""
        with self._vm_lock(vm_id):
            before = self.wait_settled(vm_id)
            self.call("vm.disksnapshotrevert", vm_id, disk_id, snap_id)
            after = self.wait_vm(
                vm_id, lambda v: v.lcm_state not in SNAPSHOT_BUSY or v.state != VM_ACTIVE,
                f"reverting VM {vm_id} disk {disk_id} to snapshot {snap_id}")
            err = self._new_error(before, after)
            if err:
                raise CloudError(
                    f"OpenNebula failed to revert VM {vm_id} disk {disk_id} to snapshot"
                    f" {snap_id}{err}")

    # -- images ------------------------------------------------------------

    def _wait_image_ready(self, image_id: int, what: str) -> ImageInfo:
        def probe() -> ImageInfo | None:
            img = self.image(image_id)
            return None if img.state in (0, IMAGE_LOCKED) else img
        img: ImageInfo = self._wait(what, probe)
        if img.state == IMAGE_ERROR:
            raise CloudError(f"OpenNebula failed to create image {image_id} ({what})"
                             f"{image_error(img)}")
        return img

    def disk_saveas(self, vm_id: int, disk_id: int, name: str, snap_id: int = -1,
                    image_type: str = "") -> int:
        """Save a disk (or one of its snapshots) as a new image, READY on return.
        `image_type` "" keeps the source image's type."""
        with self._vm_lock(vm_id):
            self.wait_settled(vm_id)
            image_id = int(self.call("vm.disksaveas", vm_id, disk_id, name, image_type,
                                     snap_id))
            self._wait_image_ready(image_id, f"saving VM {vm_id} disk {disk_id} as {name!r}")
            self.wait_vm(vm_id, lambda v: v.lcm_state not in SAVEAS_BUSY or v.state != VM_ACTIVE,
                         f"VM {vm_id} leaving save-as")
            return image_id

    def image_allocate(self, template: Mapping[str, str], datastore_id: int) -> int:
        """Create an image and wait until it is READY."""
        text = "\n".join(f"{k}={quote(v)}" for k, v in template.items())
        image_id = int(self.call("image.allocate", text, datastore_id, False))
        self._wait_image_ready(image_id, f"image {template.get('NAME', '')!r}")
        return image_id

    def image_persistent(self, image_id: int, persistent: bool) -> None:
        self.call("image.persistent", image_id, persistent)

    def image_delete(self, image_id: int) -> None:
        """Delete an image and wait until it is gone. Idempotent. A LOCKED
        image (a copy still running) is waited for first; a failed removal
        (oned sets the image to ERROR) is raised with oned's message."""
        try:
            img = self.image(image_id)
        except NotFound:
            return
        if img.state in (0, IMAGE_LOCKED):
            try:
                self._wait_image_ready(image_id, f"image {image_id} to unlock")
            except CloudError:
                pass  # an image in ERROR can still be deleted
        try:
            self.call("image.delete", image_id, False)
        except NotFound:
            return

        def gone() -> ImageInfo | bool | None:
            try:
                img = self.image(image_id)
            except NotFound:
                return True
            return img if img.state == IMAGE_ERROR else None
        result = self._wait(f"deleting image {image_id}", gone)
        if isinstance(result, ImageInfo):
            raise CloudError(f"OpenNebula failed to delete image {image_id}"
                             f"{image_error(result)}", transient=True)

    # -- attach / detach ---------------------------------------------------------

    def attach(self, vm_id: int, image_id: int, serial: str, readonly: bool = False) -> DiskInfo:
        """Attach an image to a VM with a SERIAL (and READONLY="YES" when
        `readonly`: Image::disk_attribute keeps a READONLY the DISK brings;
        the guest gets a read-only device); returns the new disk once
        present. oned's "wrong state" refusal (another hot-plug, by another
        process or agent, got in between) is retried (`_hotplug`)."""
        ro = ",READONLY=\"YES\"" if readonly else ""
        with self._vm_lock(vm_id):
            before = self._hotplug(
                vm_id, "attach", f"attaching image {image_id} to VM {vm_id}", "vm.attach",
                vm_id, f"DISK=[IMAGE_ID={quote(str(image_id))},SERIAL={quote(serial)},"
                       f"DEV_PREFIX=\"vd\"{ro}]")
            assert before is not None  # only a detach is skipped
            after = self.wait_vm(
                vm_id, lambda v: v.lcm_state not in HOTPLUG_BUSY or v.state != VM_ACTIVE,
                f"attaching image {image_id} to VM {vm_id}")
            disk = next((d for d in after.disks if d.image_id == image_id
                         and d.serial == serial and not d.attach_pending), None)
            if disk is None:
                raise CloudError(
                    f"OpenNebula failed to attach image {image_id} to VM {vm_id}"
                    f"{self._new_error(before, after)}", transient=True)
            return disk

    def detach(self, vm_id: int, disk_id: int) -> None:
        """Detach a disk and wait until it is gone. Idempotent; a "wrong
        state" refusal is retried like attach's."""
        with self._vm_lock(vm_id):
            before = self._hotplug(vm_id, "detach", f"detaching disk {disk_id} from VM {vm_id}",
                                   "vm.detach", vm_id, disk_id, skip_unless_disk=disk_id)
            if before is None:
                return
            after = self.wait_vm(
                vm_id, lambda v: v.lcm_state not in HOTPLUG_BUSY or v.state != VM_ACTIVE,
                f"detaching disk {disk_id} from VM {vm_id}")
            if after.disk(disk_id) is not None:
                raise CloudError(
                    f"OpenNebula failed to detach disk {disk_id} from VM {vm_id}"
                    f"{self._new_error(before, after)}", transient=True)

    def _hotplug(self, vm_id: int, verb: str, what: str, method: str, *params: Any,
                 skip_unless_disk: int | None = None) -> VmInfo | None:
        """Wait until the VM settles, check it can take a hot-plug, and call
        `method`; returns the VM as it was just before the accepted call, or
        None when `skip_unless_disk` names a disk the VM no longer has.
        oned refuses a hot-plug with "wrong state" while another operation
        runs on the VM (DispatchManager::attach/detach check the LCM state
        under the VM's lock): such a refusal is retried after a backoff, at
        most HOTPLUG_RETRIES times and within operation_timeout."""
        deadline = time.monotonic() + self.operation_timeout
        backoff = max(self.poll_interval, 0.01)
        refusals = 0
        while True:
            before = self.wait_settled(vm_id)
            if skip_unless_disk is not None and before.disk(skip_unless_disk) is None:
                return None
            if before.state not in (VM_ACTIVE, VM_POWEROFF) or (
                    before.state == VM_ACTIVE and before.lcm_state != LCM_RUNNING):
                raise StateError(
                    f"VM {vm_id} is {before.state_name}; disks can only be {verb}ed"
                    f" {'to' if verb == 'attach' else 'from'} a RUNNING or POWEROFF VM")
            try:
                self.call(method, *params)
                return before
            except CloudError as e:
                if not (e.code == ACTION and "wrong state" in e.message):
                    raise
                refusals += 1
                if refusals > HOTPLUG_RETRIES or time.monotonic() + backoff > deadline:
                    raise CloudError(f"{e.message} (refused {refusals} times while {what})",
                                     code=e.code, transient=True) from e
            time.sleep(backoff)
            backoff = min(backoff * 2, HOTPLUG_BACKOFF_MAX)

    # -- VM actions -----------------------------------------------------------

    def action(self, action: str, vm_id: int) -> VmInfo:
        """Run a VM action (`poweroff-hard`, `suspend`, `resume` ...) and wait
        until it has *happened*: the VM is in the action's target state
        (ACTION_TARGETS), returned as it then is. oned answers before the VM
        moves (DispatchManager only queues the action for the LifeCycleManager),
        so "settled" right after the answer means nothing. Raises CloudError
        when the action failed: a new USER_TEMPLATE/ERROR, the VM back in a
        settled state other than the target after it moved, or the VM still
        where it was after `start_timeout` (a driver that failed at once and
        left no message). Actions without a known target wait for "settled"."""
        target = ACTION_TARGETS.get(action)
        with self._vm_lock(vm_id):
            before = self.wait_settled(vm_id)
            self.call("vm.action", action, vm_id)
            if target is None:
                return self.wait_settled(vm_id)
            return self._wait_target(vm_id, action, target, before)

    def _wait_target(self, vm_id: int, action: str, target: ActionTarget,
                     before: VmInfo) -> VmInfo:
        start_by = time.monotonic() + self.start_timeout
        moved = False

        def probe() -> VmInfo | None:
            nonlocal moved
            vm = self.vm(vm_id)
            if target.reached(vm):
                return vm
            busy = _in_progress(vm)
            if busy or (vm.state, vm.lcm_state) != (before.state, before.lcm_state):
                moved = True
            if busy:
                return None
            if vm.error and vm.error != before.error:
                raise CloudError(f"OpenNebula failed to {action} VM {vm_id}: {vm.error};"
                                 f" it is {vm.state_name}")
            if moved:
                raise CloudError(f"VM {vm_id} is {vm.state_name} after {action}, not"
                                 f" {target.name}: OpenNebula could not carry it out"
                                 f" (see its log for VM {vm_id})")
            if time.monotonic() > start_by:
                raise CloudError(f"VM {vm_id} is still {vm.state_name} {self.start_timeout:g} s"
                                 f" after OpenNebula accepted {action}: the action failed"
                                 f" or was dropped (see oned's log for VM {vm_id})")
            return None
        result: VmInfo = self._wait(f"{action} of VM {vm_id}", probe)
        return result

    def update_user_template(self, vm_id: int, attributes: Mapping[str, str],
                             merge: bool = True) -> None:
        text = "\n".join(f"{k}={quote(v)}" for k, v in attributes.items())
        self.call("vm.update", vm_id, text, 1 if merge else 0)

    # -- templates / VMs -------------------------------------------------------

    def template_allocate(self, text: str) -> int:
        return int(self.call("template.allocate", text))

    def template_instantiate(self, template_id: int, name: str, hold: bool = False) -> int:
        return int(self.call("template.instantiate", template_id, name, hold, "", False))

    def find_template(self, name: str) -> int | None:
        root = xmldoc.parse(str(self.call("templatepool.info", -2, -1, -1)))
        for t in root.findall("VMTEMPLATE"):
            if text_of(t, "NAME") == name:
                return int_of(t, "ID", -1)
        return None

    def template_delete(self, template_id: int) -> None:
        try:
            self.call("template.delete", template_id, False)
        except NotFound:
            return

    def deploy(self, vm_id: int, host_id: int, datastore_id: int) -> None:
        self.call("vm.deploy", vm_id, host_id, False, datastore_id, "")

    def terminate(self, vm_id: int) -> None:
        """Terminate a VM (hard) and wait until it is DONE. Idempotent."""
        try:
            vm = self.vm(vm_id)
        except NotFound:
            return
        if vm.state == VM_DONE:
            return
        with self._vm_lock(vm_id):
            self.call("vm.action", "terminate-hard", vm_id)
            self.wait_vm(vm_id, lambda v: v.state == VM_DONE, f"terminating VM {vm_id}")

    # -- names and owners --------------------------------------------------------

    def user_id(self) -> int:
        """The id of the user this connection authenticates as (cached)."""
        if self._uid is None:
            self._uid = int_of(xmldoc.parse(str(self.call("user.info", -1))), "ID", -1)
        return self._uid

    def user_exists(self, uid: int) -> bool:
        try:
            self.call("user.info", uid)
        except NotFound:
            return False
        return True

    def group_exists(self, gid: int) -> bool:
        try:
            self.call("group.info", gid)
        except NotFound:
            return False
        return True

    def templates(self) -> list[tuple[int, str, int]]:
        """(id, name, owner's user id) of every VM template this user can see."""
        root = xmldoc.parse(str(self.call("templatepool.info", -2, -1, -1)))
        return [(int_of(t, "ID", -1), text_of(t, "NAME"), int_of(t, "UID", -1))
                for t in root.findall("VMTEMPLATE")]

    def vm_rename(self, vm_id: int, name: str) -> None:
        self.call("vm.rename", vm_id, name)

    def image_rename(self, image_id: int, name: str) -> None:
        self.call("image.rename", image_id, name)

    def vm_chown(self, vm_id: int, uid: int, gid: int) -> None:
        """Give the VM to user `uid` and group `gid` (-1 leaves either as it is)."""
        self.call("vm.chown", vm_id, uid, gid)

    def image_chown(self, image_id: int, uid: int, gid: int) -> None:
        """Give the image to user `uid` and group `gid` (-1 leaves either as it is)."""
        self.call("image.chown", image_id, uid, gid)

    # -- what `oneback doctor` asks ---------------------------------------------

    def whoami(self) -> tuple[int, str]:
        """(id, name) of the user this connection authenticates as
        (`one.user.info -1`): the cheapest call that proves the credentials."""
        root = xmldoc.parse(str(self.call("user.info", -1)))
        return int_of(root, "ID", -1), text_of(root, "NAME")

    def vm_cluster(self, vm_id: int) -> tuple[int, str, int, str] | None:
        """(cluster id, its name, host id, host name) where the VM was last
        deployed: its last HISTORY record (HistoryRecord's CID, HID, HOSTNAME)
        and that host's CLUSTER (Host::to_xml); None if it never was."""
        root = xmldoc.parse(str(self.call("vm.info", vm_id)))
        records = root.findall("HISTORY_RECORDS/HISTORY")
        if not records:
            return None
        last = records[-1]
        cid, hid = int_of(last, "CID", -1), int_of(last, "HID", -1)
        try:
            name = text_of(xmldoc.parse(str(self.call("host.info", hid))), "CLUSTER")
        except NotFound:   # the host was deleted since
            name = ""
        return cid, name, hid, text_of(last, "HOSTNAME")
