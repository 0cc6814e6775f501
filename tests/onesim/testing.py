"""The test kit: pytest fixtures and operator-style helpers around onesim.

Owns: the `onesim` fixture (a fresh in-process simulator under tmp_path,
short delays, stopped afterwards), the `one` fixture (a pyone client as
oneadmin over HTTP), helpers that act through the API like an operator
would (register an image from bytes, instantiate a VM, a proxy VM, wait for
states), where a test finds a VM's disk files and guest devices, a ZeroMQ
subscription helper, and where the shared reference data lives.
Must not: reach into the simulator's objects except to locate files.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyone
import pytest
import zmq

from tests.onesim.simulator import Simulator

FAST = 0.01  # seconds per driver phase in the fixture


# ---------------------------------------------------------------------------
# fixtures (exported by tests/conftest.py)
# ---------------------------------------------------------------------------

@pytest.fixture
def onesim(tmp_path: Path) -> Iterator[Simulator]:
    """A fresh simulated cloud (version 7.4.0), stopped after the test."""
    sim = Simulator.start(tmp_path / "onesim", delay=FAST)
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def one(onesim: Simulator) -> Any:
    """pyone client for oneadmin."""
    return client(onesim)


def client(sim: Simulator, user: str | None = None, password: str | None = None) -> Any:
    """A pyone client for `user` (default: oneadmin)."""
    session = sim.credentials if user is None else f"{user}:{password}"
    return pyone.OneServer(sim.endpoint, session=session)


def shared_dir() -> Path | None:
    """../shared next to the repository root, if present."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists():
            shared = parent.parent / "shared"
            return shared if shared.is_dir() else None
    return None


# ---------------------------------------------------------------------------
# waiting
# ---------------------------------------------------------------------------

def _state_number(value: int | str, table: Any) -> int:
    return int(value) if isinstance(value, int) else int(table[value].value)


def wait_vm(one: Any, vm_id: int, state: int | str, lcm: int | str | None = None,
            timeout: float = 10.0) -> Any:
    """Poll one.vm.info until STATE (and LCM_STATE) match; return the VM."""
    from tests.onesim.constants import Lcm, VmState
    want = _state_number(state, VmState)
    want_lcm = None if lcm is None else _state_number(lcm, Lcm)
    deadline = time.monotonic() + timeout
    vm = one.vm.info(vm_id)
    while True:
        if vm.STATE == want and (want_lcm is None or vm.LCM_STATE == want_lcm):
            return vm
        if time.monotonic() > deadline:
            raise TimeoutError(f"VM {vm_id} is {vm.STATE}/{vm.LCM_STATE}, "
                               f"wanted {want}/{want_lcm}")
        time.sleep(0.005)
        vm = one.vm.info(vm_id)


def wait_image(one: Any, image_id: int, state: int | str = "READY",
               timeout: float = 10.0) -> Any:
    """Poll one.image.info until its STATE matches; return the image."""
    from tests.onesim.constants import ImageState
    want = _state_number(state, ImageState)
    deadline = time.monotonic() + timeout
    img = one.image.info(image_id)
    while img.STATE != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"image {image_id} is {img.STATE}, wanted {want}")
        time.sleep(0.005)
        img = one.image.info(image_id)
    return img


def wait_until(check: Any, timeout: float = 10.0, interval: float = 0.005) -> Any:
    """Call `check()` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# acting like an operator
# ---------------------------------------------------------------------------

def create_image(one: Any, sim: Simulator, name: str, data: bytes | str | Path, ds: int = 1,
                 persistent: bool = False, dev_prefix: str | None = None,
                 image_type: str = "DATABLOCK", wait: bool = True) -> int:
    """Register an image from bytes or a file (image.allocate with PATH) and
    wait until it is READY. Bytes are written under ROOT/uploads first."""
    if isinstance(data, bytes):
        uploads = Path(sim.root) / "uploads"
        uploads.mkdir(exist_ok=True)
        path = uploads / f"{name}.img"
        path.write_bytes(data)
    else:
        path = Path(data)
    lines = [f'NAME="{name}"', f'TYPE="{image_type}"', f'PATH="{path}"',
             f'PERSISTENT="{"YES" if persistent else "NO"}"']
    if dev_prefix:
        lines.append(f'DEV_PREFIX="{dev_prefix}"')
    image_id = int(one.image.allocate("\n".join(lines), ds, False))
    if wait:
        wait_image(one, image_id, "READY")
    return image_id


def create_datablock(one: Any, name: str, size_mb: int, ds: int = 1, persistent: bool = False,
                     dev_prefix: str | None = None, wait: bool = True) -> int:
    """An empty DATABLOCK of `size_mb` MiB (a sparse file of zeros)."""
    lines = [f'NAME="{name}"', 'TYPE="DATABLOCK"', f'SIZE="{size_mb}"', 'FORMAT="raw"',
             f'PERSISTENT="{"YES" if persistent else "NO"}"']
    if dev_prefix:
        lines.append(f'DEV_PREFIX="{dev_prefix}"')
    image_id = int(one.image.allocate("\n".join(lines), ds, False))
    if wait:
        wait_image(one, image_id, "READY")
    return image_id


def _disk_text(disk: int | dict[str, Any]) -> str:
    if isinstance(disk, int):
        return f'DISK=[IMAGE_ID="{disk}"]'
    inner = ", ".join(f'{k}="{v}"' for k, v in disk.items())
    return f"DISK=[{inner}]"


def create_vm(one: Any, sim: Simulator, name: str, disks: list[int | dict[str, Any]] | None = None,
              wait_running: bool = True, context: bool = True, memory: int = 64,
              cpu: float = 0.1, extra: str = "", timeout: float = 10.0) -> int:
    """Allocate a template with these disks (image ids, or DISK attributes such
    as {"TYPE": "fs", "SIZE": 4}), instantiate it, and wait for RUNNING."""
    lines = [f'NAME="{name}-tpl-{time.monotonic_ns()}"', f'CPU="{cpu}"', f'MEMORY="{memory}"']
    lines += [_disk_text(d) for d in disks or []]
    if context:
        lines.append('CONTEXT=[NETWORK="YES", TOKEN="YES"]')
    if extra:
        lines.append(extra)
    template_id = int(one.template.allocate("\n".join(lines)))
    vm_id = int(one.template.instantiate(template_id, name, False, "", False))
    if wait_running:
        wait_vm(one, vm_id, "ACTIVE", "RUNNING", timeout=timeout)
    return vm_id


def create_proxy_vm(one: Any, sim: Simulator, name: str = "proxy", size_mb: int = 4,
                    ds: int = 1) -> int:
    """A RUNNING VM with its own small virtio disk (vda) and context; its guest
    devices appear under guest_dev_dir(sim, id). Its disk's image lives in
    datastore `ds`, so the scheduler places it in a cluster of that datastore."""
    image_id = create_datablock(one, f"{name}-os-{time.monotonic_ns()}", size_mb,
                                dev_prefix="vd", ds=ds)
    return create_vm(one, sim, name, [image_id])


def create_cluster(one: Any, name: str, system_ds: int = 0) -> tuple[int, int, int]:
    """A cluster with one KVM host and one image datastore of its own (TM
    local, like datastore 1), sharing system datastore `system_ds` (added to
    the cluster). Returns (cluster id, host id, image datastore id)."""
    cid = int(one.cluster.allocate(name))
    hid = int(one.host.allocate(f"{name}-host", "kvm", "kvm", cid))
    ds = int(one.datastore.allocate(
        f'NAME="{name}-images"\nTYPE="IMAGE_DS"\nDS_MAD="fs"\nTM_MAD="local"', cid))
    one.cluster.adddatastore(cid, system_ds)
    return cid, hid, ds


def guest_dev_dir(sim: Simulator, vm_id: int) -> Path:
    """The simulated guest's /dev (TARGET links and disk/by-id)."""
    return Path(sim.root) / "vms" / str(vm_id) / "dev"


def guest_context_file(sim: Simulator, vm_id: int) -> Path:
    """The guest's /run/one-context/one_env."""
    return Path(sim.root) / "vms" / str(vm_id) / "run" / "one-context" / "one_env"


def guest_disk_path(sim: Simulator, vm_id: int, disk_id: int) -> Path:
    """The file behind a VM's disk (datastores/SYS/VM/disk.N): write into it
    to act as the guest."""
    with sim.store.lock:
        ds = sim.store.vms[vm_id].system_ds()
    return Path(sim.root) / "datastores" / str(ds) / str(vm_id) / f"disk.{disk_id}"


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------

class Subscription:
    """A real ZeroMQ SUB socket on the simulator's event bus."""

    def __init__(self, endpoint: str, prefixes: tuple[str, ...] = ("",)) -> None:
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        for prefix in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.sock.connect(endpoint)
        time.sleep(0.1)  # the slow joiner: give the subscription time to arrive

    def next(self, timeout: float = 5.0) -> tuple[str, str] | None:
        """(key, body text) of the next message, or None on timeout."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        key, body = self.sock.recv_multipart()
        return key.decode(), body.decode()

    def collect(self, until: str | None = None, timeout: float = 5.0) -> list[tuple[str, str]]:
        """Messages until one whose key equals `until` (included), or until
        nothing arrives for `timeout` seconds."""
        out: list[tuple[str, str]] = []
        while True:
            msg = self.next(timeout)
            if msg is None:
                return out
            out.append(msg)
            if until is not None and msg[0] == until:
                return out

    def close(self) -> None:
        self.sock.close(0)
        self._ctx.term()


def decode(body: str) -> str:
    """The HOOK_MESSAGE XML of an event body."""
    return base64.b64decode(body).decode()


# ---------------------------------------------------------------------------
# schemas
# ---------------------------------------------------------------------------

XSD_NS = "http://opennebula.org/XMLSchema"
_SCHEMAS: dict[str, Any] = {}


def xsd_errors(xml_text: str, schema: str) -> list[str]:
    """Validate an oned document against ../shared/opennebula/xsd/<schema>
    (elements moved into OpenNebula's namespace first); return the errors."""
    from lxml import etree

    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared (OpenNebula schemas) is not present")
    if schema not in _SCHEMAS:
        path = shared / "opennebula" / "xsd" / schema
        _SCHEMAS[schema] = etree.XMLSchema(etree.parse(str(path)))
    doc = etree.fromstring(xml_text.encode())
    for el in doc.iter():
        if isinstance(el.tag, str) and not el.tag.startswith("{"):
            el.tag = f"{{{XSD_NS}}}{el.tag}"
    validator = _SCHEMAS[schema]
    if validator.validate(doc):
        return []
    return [str(e) for e in validator.error_log]
