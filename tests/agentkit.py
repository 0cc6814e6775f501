"""Test kit for the agent's own tests: a simulated cloud with a proxy VM, a
configuration file pointing at it, and a way to run `oneback` commands.

Owns: the `cloud` fixture (onesim + proxy VM + config + credentials), running
the CLI in-process (`Cloud.run`) or as a real process (`Cloud.spawn`), and
`leftovers()`, the check that nothing `oneback-` is left in the cloud.
Must not: reach into oneback's modules except through the CLI and the public
API functions tests are about.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main as cli_main
from tests.onesim.dataplane import guest_dir
from tests.onesim.simulator import Simulator
from tests.onesim.testing import (
    FAST,
    client,
    create_image,
    create_proxy_vm,
    create_vm,
    guest_dev_dir,
    guest_disk_path,
)
from tests.s3server import BACKENDS, RepoView, S3RepoView, storage_lines

REPO = Path(__file__).resolve().parents[1]
BLOCK = 1024 * 1024   # the smallest storage.block_size oneback accepts
MiB = 1024 * 1024


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cloud:
    sim: Simulator
    one: Any
    proxy_id: int
    config: Path
    tmp: Path
    repo: RepoView = None  # type: ignore[assignment]   # set by make_cloud

    def __post_init__(self) -> None:
        if self.repo is None:
            self.repo = RepoView(self.tmp / "repo")

    # -- running oneback -------------------------------------------------------

    def run(self, *args: str, capsys: pytest.CaptureFixture[str] | None = None) -> Result:
        """Run `oneback ARGS --config CONFIG` in this process."""
        from agent.cli import main

        argv = [*args, "--config", str(self.config)]
        if capsys is not None:
            capsys.readouterr()
        try:
            main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
        else:  # pragma: no cover - main always exits
            code = 0
        out, err = capsys.readouterr() if capsys is not None else ("", "")
        return Result(code, out, err)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "agent", *args, "--config", str(self.config)]

    def spawn(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        """Start `oneback ARGS` as a real process."""
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, **kw)

    def kill_during(self, method: str, *args: str) -> None:
        """Run `oneback ARGS` as a real process and kill -9 it while its call
        `method` is held in onesim (arm `sim.faults.delay_call(method, ...)`
        first): oned goes on with the call the dead process made."""
        from tests.onesim.testing import wait_until
        seen = self.sim.faults.delayed(method)
        proc = self.spawn(*args)
        try:
            wait_until(lambda: self.sim.faults.delayed(method) > seen or proc.poll() is not None,
                       timeout=60, interval=0.02)
            assert proc.poll() is None, f"oneback {' '.join(args)} ended before {method}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def call(self, *args: str, timeout: float = 120) -> Result:
        """Run `oneback ARGS` as a real process and wait for it."""
        p = subprocess.run(self.command(*args), capture_output=True, text=True, cwd=REPO,
                           timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    # -- building the world ---------------------------------------------------

    def image(self, name: str, data: bytes, **kw: Any) -> int:
        return create_image(self.one, self.sim, name, data, **kw)

    def vm(self, name: str, disks: list[int | dict[str, Any]], **kw: Any) -> int:
        return create_vm(self.one, self.sim, name, disks, **kw)

    def disk_path(self, vm_id: int, disk_id: int) -> Path:
        return guest_disk_path(self.sim, vm_id, disk_id)

    # -- checks ------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Everything named oneback-tmp in the cloud, and any disk attached to
        the proxy VM besides its own."""
        found = []
        pool = self.one.imagepool.info(-2, -1, -1)
        for img in pool.IMAGE:
            if img.NAME.startswith("oneback-"):
                found.append(f"image {img.ID} {img.NAME}")
        for listed in self.one.vmpool.info(-2, -1, -1, -1).VM:
            vm = self.one.vm.info(listed.ID)
            for snaps in vm.SNAPSHOTS or []:
                for s in snaps.SNAPSHOT:
                    if (s.NAME or "").startswith("oneback-tmp"):
                        found.append(f"snapshot {s.NAME} of VM {vm.ID}")
        proxy = self.one.vm.info(self.proxy_id)
        disks = proxy.TEMPLATE.get("DISK", [])
        disks = disks if isinstance(disks, list) else [disks]
        for d in disks:
            if d.get("DISK_ID") != "0":
                found.append(f"proxy disk {d.get('DISK_ID')} ({d.get('IMAGE')})")
        devdir = guest_dev_dir(self.sim, self.proxy_id) / "disk" / "by-id"
        if devdir.exists():
            for link in devdir.iterdir():
                if link.name.startswith("virtio-oneback"):
                    found.append(f"proxy device {link.name}")
        return found


def write_config(tmp: Path, sim: Simulator, proxy_id: int, *, block_size: int = BLOCK,
                 extra: str = "", backend: str = "local") -> Path:
    """The configuration (and an initialised repository on `backend`, local
    or s3; the view of it is `repo_view(cfg)`)."""
    repository, s3_table, view = storage_lines(backend, tmp)
    auth = tmp / "one_auth"
    auth.write_text(sim.credentials + "\n")
    auth.chmod(0o600)
    cfg = tmp / "oneback.toml"
    cfg.write_text(f"""
[opennebula]
endpoint = "{sim.endpoint}"
credentials_file = "{auth}"
events = "{sim.events}"
timeout = 10
operation_timeout = 30
poll_interval = 0.01
[proxy]
vm_id = {proxy_id}
dev_root = "{guest_dev_dir(sim, proxy_id)}"
sys_root = "{guest_dir(Path(sim.root), proxy_id) / 'sys'}"
device_timeout = 5
[storage]
repository = "{repository}"
catalog = "{tmp / 'catalog.sqlite'}"
block_size = {block_size}
workers = 2
{extra}
{s3_table}""")
    if isinstance(view, S3RepoView):
        view.config_file = cfg
    _views[cfg] = view
    init_repository(cfg)
    return cfg


_views: dict[Path, RepoView] = {}


def repo_view(cfg: Path) -> RepoView:
    """The repository a configuration written here names."""
    return _views[cfg]


def run_with(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """`oneback ARGS --config CFG` in this process (a configuration other than
    a Cloud's own: a copy target, a second catalog)."""
    capsys.readouterr()
    try:
        cli_main([*args, "--config", str(cfg)])
    except SystemExit as e:
        code = int(e.code or 0)
    else:  # pragma: no cover - main always exits
        code = 0
    out, err = capsys.readouterr()
    return Result(code, out, err)


def init_repository(cfg: Path) -> None:
    """`oneback init` for the configuration (in-process, through the CLI)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            cli_main(["init", "--config", str(cfg), "--json"])
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"oneback init --config {cfg} failed ({e.code}): "
                               f"{out.getvalue().strip()}") from None


# Datastore setups (one.datastore.update of the system DS 0 and the image DS 1
# before anything is created; oned applies the TM_MAD_CONF of the default
# oned.conf): the TM, the image format it gives, and the oneback config lines.
STORAGES: dict[str, tuple[str, str, str]] = {
    # fresh onesim: TM local everywhere, images raw (snapshots without a tree)
    "local": ("local", "local", ""),
    # raw images on the shared TM: ALLOW_ORPHANS FORMAT -> YES, any snapshot deletable
    "shared-raw": ("shared", "shared", ""),
    # qcow2 images (DRIVER qcow2) on the qcow2 TM: FORMAT -> NO, snapshots form a
    # tree and snapshot 0 of a persistent disk is never deleted; the operator
    # opted in to a kept oneback-base snapshot for such disks
    "qcow2": ("shared", "qcow2", "[backup]\nqcow2_base = true\n"),
    # the same without the opt-in: oneback's default
    "qcow2-plain": ("shared", "qcow2", ""),
}


@contextmanager
def make_cloud(tmp_path: Path, version: str = "7.4.0", storage: str = "local",
               backend: str = "local") -> Iterator[Cloud]:
    """A simulated cloud (reporting `version`, datastores set up as
    STORAGES[`storage`]) with a RUNNING proxy VM, and a oneback config for
    it whose repository is on `backend` (local, s3); stopped on exit."""
    system_tm, image_tm, extra = STORAGES[storage]
    sim = Simulator.start(tmp_path / "onesim", delay=FAST, version=version)
    try:
        one = client(sim)
        if system_tm != "local":
            one.datastore.update(0, f'TM_MAD="{system_tm}"', 1)
        if image_tm != "local":
            one.datastore.update(1, f'TM_MAD="{image_tm}"', 1)
        proxy = create_proxy_vm(one, sim)
        work = tmp_path / "oneback"
        work.mkdir()
        cfg = write_config(work, sim, proxy, extra=extra, backend=backend)
        yield Cloud(sim, one, proxy, cfg, work, repo_view(cfg))
    finally:
        sim.stop()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    """A simulated 7.4 cloud with a RUNNING proxy VM, and a oneback config for it."""
    with make_cloud(tmp_path) as c:
        yield c


def _cloud_per_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    with make_cloud(tmp_path, storage=request.param) as c:
        yield c


# `from tests.agentkit import cloud_per_storage` in a test module runs its
# `cloud` tests once per datastore setup: raw on the shared TM, qcow2 on the
# qcow2 TM (the backup, snapshot and restore suites).
cloud_per_storage = pytest.fixture(params=["shared-raw", "qcow2"], name="cloud")(
    _cloud_per_storage)


def _cloud_per_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    with make_cloud(tmp_path, backend=request.param) as c:
        yield c


# `from tests.agentkit import cloud_per_backend` in a test module runs its
# `cloud` tests once per repository backend (a directory, an S3 bucket on
# the tests' own S3 server): the repository suites. A test about the local
# filesystem alone narrows it with
# `@pytest.mark.parametrize("cloud", ["local"], indirect=True)`.
cloud_per_backend = pytest.fixture(params=BACKENDS, name="cloud")(_cloud_per_backend)


@pytest.fixture(params=BACKENDS)
def repo_backend(request: pytest.FixtureRequest) -> str:
    """Each repository backend in turn: "local", then "s3"."""
    return str(request.param)


def pattern(size: int, seed: int) -> bytes:
    """Deterministic, incompressible-ish bytes (different per seed)."""
    import hashlib

    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def env_without_oneback() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ONEBACK")}


def offline_config(tmp: Path, storage: str = "", backend: str = "local") -> Path:
    """A configuration for commands that never reach oned (its endpoint is a
    closed port): a repository (on `backend`) and catalog under `tmp`, plus
    `storage` lines. Not initialised; `repo_view(cfg)` is its repository."""
    repository, s3_table, view = storage_lines(backend, tmp)
    auth = tmp / "one_auth"
    auth.write_text("oneadmin:x\n")
    auth.chmod(0o600)
    cfg = tmp / "oneback.toml"
    cfg.write_text(f"""
[opennebula]
endpoint = "http://127.0.0.1:9/RPC2"
credentials_file = "{auth}"
[proxy]
vm_id = 0
[storage]
repository = "{repository}"
catalog = "{tmp / 'catalog.sqlite'}"
{storage}
{s3_table}
""")
    if isinstance(view, S3RepoView):
        view.config_file = cfg
    _views[cfg] = view
    return cfg
