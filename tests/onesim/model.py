"""The objects oned keeps in its database, and the database itself.

Owns: the plain records (users, groups, hosts, datastores, images, VM
templates, VMs with their history records and disk snapshots, hooks with
their logs), `Store` (the pools, the id counters, the one big lock that
serialises every change like oned's object locks do, and the queue of
driver operations in flight) and its JSON persistence under ROOT.
Must not: decide state transitions (lifecycle), render XML (documents) or
touch disk files (dataplane).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.onesim.templates import Template

STATE_FILE = "onesim-db.json"


def now() -> int:
    return int(time.time())


@dataclass
class Perms:
    """OWNER_U/M/A, GROUP_U/M/A, OTHER_U/M/A."""

    bits: list[int] = field(default_factory=lambda: [1, 1, 0, 0, 0, 0, 0, 0, 0])

    @classmethod
    def from_umask(cls, umask: int = 0o177) -> Perms:
        mode = 0o777 & ~umask
        bits = []
        for shift in (6, 3, 0):
            digit = (mode >> shift) & 7
            bits += [(digit >> 2) & 1, (digit >> 1) & 1, digit & 1]
        return cls(bits)


@dataclass
class User:
    id: int
    name: str
    password: str
    gid: int
    gname: str
    groups: list[int]
    auth_driver: str = "core"
    enabled: bool = True
    template: Template = field(default_factory=Template)


@dataclass
class Group:
    id: int
    name: str
    users: list[int] = field(default_factory=list)
    template: Template = field(default_factory=Template)


@dataclass
class Host:
    id: int
    name: str
    im_mad: str
    vm_mad: str
    state: int = 0
    prev_state: int = 0
    cluster_id: int = 0
    cluster: str = "default"
    vms: list[int] = field(default_factory=list)
    template: Template = field(default_factory=Template)


@dataclass
class Cluster:
    """A cluster (src/cluster/Cluster.cc). Its HOSTS and DATASTORES are not
    kept here: they are derived from each host's CLUSTER_ID and each
    datastore's CLUSTERS, which oned keeps in step with them
    (ClusterPool::add_to_cluster / del_from_cluster)."""

    id: int
    name: str
    template: Template = field(default_factory=Template)


@dataclass
class Datastore:
    id: int
    name: str
    type: int
    ds_mad: str
    tm_mad: str
    base_path: str
    uid: int = 0
    gid: int = 0
    uname: str = "oneadmin"
    gname: str = "oneadmin"
    perms: Perms = field(default_factory=lambda: Perms([1, 1, 0, 1, 0, 0, 0, 0, 0]))
    disk_type: int = 0
    state: int = 0
    cluster_ids: list[int] = field(default_factory=lambda: [0])
    total_mb: int = 0
    images: list[int] = field(default_factory=list)
    template: Template = field(default_factory=Template)


@dataclass
class Snapshots:
    """A disk's (or image's) SNAPSHOTS (src/vm/Snapshots.cc)."""

    disk_id: int
    allow_orphans: str  # NO / YES / MIXED / LINEAR
    next_snapshot: int = 0
    current_base: int = -1
    snaps: list[dict[str, str]] = field(default_factory=list)

    def get(self, snap_id: int) -> dict[str, str] | None:
        for snap in self.snaps:
            if int(snap["ID"]) == snap_id:
                return snap
        return None

    @property
    def active(self) -> int:
        for snap in self.snaps:
            if snap.get("ACTIVE") == "YES":
                return int(snap["ID"])
        return -1

    def total_size(self) -> int:
        return sum(int(s.get("SIZE", "0")) for s in self.snaps)


@dataclass
class Image:
    id: int
    uid: int
    gid: int
    uname: str
    gname: str
    name: str
    type: int
    datastore_id: int
    datastore: str
    perms: Perms = field(default_factory=Perms)
    disk_type: int = 0
    persistent: int = 0
    regtime: int = 0
    modtime: int = 0
    source: str = ""
    path: str = ""
    format: str = ""
    fs: str = ""
    size: int = 0
    state: int = 0
    prev_state: int = 0
    running_vms: int = 0
    cloning_ops: int = 0
    cloning_id: int = -1
    target_snapshot: int = -1
    vms: list[int] = field(default_factory=list)
    template: Template = field(default_factory=Template)
    snapshots: Snapshots = field(default_factory=lambda: Snapshots(-1, "NO"))


@dataclass
class VmTemplate:
    id: int
    uid: int
    gid: int
    uname: str
    gname: str
    name: str
    perms: Perms = field(default_factory=Perms)
    regtime: int = 0
    template: Template = field(default_factory=Template)


@dataclass
class History:
    oid: int
    seq: int
    hostname: str
    hid: int
    cid: int
    vm_mad: str
    tm_mad: str
    ds_id: int
    stime: int = 0
    etime: int = 0
    pstime: int = 0
    petime: int = 0
    rstime: int = 0
    retime: int = 0
    estime: int = 0
    eetime: int = 0
    action: int = 0
    uid: int = -1
    gid: int = -1
    request_id: int = -1


@dataclass
class Vm:
    id: int
    uid: int
    gid: int
    uname: str
    gname: str
    name: str
    perms: Perms = field(default_factory=Perms)
    state: int = 1
    lcm: int = 0
    prev_state: int = 1
    prev_lcm: int = 0
    resched: int = 0
    stime: int = 0
    etime: int = 0
    deploy_id: str = ""
    template: Template = field(default_factory=Template)
    user_template: Template = field(default_factory=Template)
    history: list[History] = field(default_factory=list)
    snapshots: dict[int, Snapshots] = field(default_factory=dict)
    backup_config: Template = field(default_factory=Template)

    def disks(self) -> list[dict[str, str]]:
        return self.template.vectors("DISK")

    def disk(self, disk_id: int) -> dict[str, str] | None:
        for disk in self.disks():
            if disk.get("DISK_ID") == str(disk_id):
                return disk
        return None

    def context(self) -> dict[str, str] | None:
        return self.template.vector("CONTEXT")

    @property
    def last(self) -> History | None:
        return self.history[-1] if self.history else None

    def system_ds(self) -> int:
        return self.history[-1].ds_id if self.history else -1


@dataclass
class Hook:
    id: int
    name: str
    type: str  # "api" | "state"
    template: Template = field(default_factory=Template)
    log: list[str] = field(default_factory=list)  # HOOK_EXECUTION_RECORD bodies
    next_execution: int = 0


# ---------------------------------------------------------------------------
# JSON persistence: dataclasses, Templates and int-keyed maps round-trip
# ---------------------------------------------------------------------------

_TYPES: dict[str, type] = {cls.__name__: cls for cls in (
    Perms, User, Group, Cluster, Host, Datastore, Snapshots, Image, VmTemplate, History, Vm, Hook)}


def _dump(obj: Any) -> Any:
    if isinstance(obj, Template):
        return {"__tmpl__": obj.to_json()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"__type__": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = _dump(getattr(obj, f.name))
        return out
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _dump(v) for k, v in obj.items()}
        return {"__map__": [[k, _dump(v)] for k, v in obj.items()]}
    if isinstance(obj, list):
        return [_dump(v) for v in obj]
    return obj


def _load(data: Any) -> Any:
    if isinstance(data, dict):
        if "__tmpl__" in data:
            return Template.from_json(data["__tmpl__"])
        if "__type__" in data:
            cls = _TYPES[data["__type__"]]
            return cls(**{k: _load(v) for k, v in data.items() if k != "__type__"})
        if "__map__" in data:
            return {k: _load(v) for k, v in data["__map__"]}
        return {k: _load(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_load(v) for v in data]
    return data


POOLS = ("users", "groups", "clusters", "hosts", "datastores", "images", "templates", "vms",
         "hooks")


class Store:
    """oned's database: every pool, the id counters and the pending driver
    operations. All access happens under `lock` (re-entrant)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.users: dict[int, User] = {}
        self.groups: dict[int, Group] = {}
        self.clusters: dict[int, Cluster] = {}
        self.hosts: dict[int, Host] = {}
        self.datastores: dict[int, Datastore] = {}
        self.images: dict[int, Image] = {}
        self.templates: dict[int, VmTemplate] = {}
        self.vms: dict[int, Vm] = {}
        self.hooks: dict[int, Hook] = {}
        self.next_ids: dict[str, int] = {pool: 0 for pool in POOLS}
        self.pending: list[dict[str, Any]] = []  # driver operations in flight
        self.request_id = 1000
        self.meta: dict[str, Any] = {}

    def next_id(self, pool: str) -> int:
        oid = self.next_ids[pool]
        self.next_ids[pool] = oid + 1
        return oid

    def next_request(self) -> int:
        self.request_id += 1
        return self.request_id

    @property
    def path(self) -> Path:
        return self.root / STATE_FILE

    def save(self) -> None:
        """Atomic on return (temp file, rename): a killed simulator restarts
        from the last complete write. Not fsynced: survives the process, not
        the machine (fast enough to write after every change)."""
        data = {pool: _dump(getattr(self, pool)) for pool in POOLS}
        data["next_ids"] = self.next_ids
        data["pending"] = self.pending
        data["request_id"] = self.request_id
        data["meta"] = self.meta
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, self.path)

    def load(self) -> bool:
        if not self.path.exists():
            return False
        data = json.loads(self.path.read_text())
        for pool in POOLS:
            if pool in data:   # a state file older than the pool keeps the default
                setattr(self, pool, _load(data[pool]))
        if not self.clusters:
            self.clusters[0] = Cluster(0, "default")
        self.next_ids = {**{pool: 0 for pool in POOLS}, "clusters": 100, **data["next_ids"]}
        self.pending = data.get("pending", [])
        self.request_id = data.get("request_id", 1000)
        self.meta = data.get("meta", {})
        return True
