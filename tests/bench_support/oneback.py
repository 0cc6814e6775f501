"""Drive oneback through its real path for the bench: onesim, a VM, a proxy VM, the CLI.

Starts `python -m tests.onesim serve` as a child process (its disk copies are
then not counted in the bench's own process), creates with onesim's testing
helpers an image from the bench image, a VM using it and a proxy VM, writes a
oneback configuration, and builds the command lines the bench measures.
Raises OnebackUnavailable with a reason when any of that is not possible, so
the bench can skip oneback's rows and still run.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

from tests.bench_support.tools import du

if TYPE_CHECKING:
    from tests.bench_support.s3 import Bucket

STARTUP_TIMEOUT = 60.0
SETUP_TIMEOUT = 600.0


class OnebackUnavailable(Exception):
    """oneback or onesim cannot run here; the message says why."""


class MeasuredLike(Protocol):
    rc: int
    out: str


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        lines.put(proc.stdout.readline())

    threading.Thread(target=reader, daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


class Oneback:
    def __init__(self, work: Path, sim: subprocess.Popen[str], info: dict[str, Any],
                 name: str = "oneback") -> None:
        self.work, self.sim, self.info = work, sim, info
        self.root = Path(info["root"])
        self.exe = str(Path(sys.executable).parent / "oneback")
        self.config = work / f"{name}.toml"
        self.repository = work / f"{name}-repo"
        self.catalog = work / f"{name}-catalog.sqlite"
        self.passphrase: Path | None = None   # set: the repository is encrypted
        self.bucket: Bucket | None = None     # set: the repository is under s3://BUCKET/NAME
        self.label = ""                       # the variant in row names: ", S3 encrypted"
        self.key = "oneback"                  # the variant in row keys: "oneback.s3.encrypted"
        self.vm_id = -1
        self.proxy_id = -1
        self.guest_disk = Path()
        self.last_backup: int | None = None

    @classmethod
    def start(cls, work: Path, image: Path) -> Oneback:
        """Start onesim on WORK/sim, create the VMs from `image`, write the config."""
        if not Path(__file__).resolve().parents[1].joinpath("onesim", "__main__.py").exists():
            raise OnebackUnavailable("tests/onesim does not exist yet")
        root = work / "sim"
        root.mkdir()
        # Byte-compile the agent as installing a package does (pip, Debian's
        # python3 packages: restic is a binary, borg ships its .pyc files): with
        # PYTHONDONTWRITEBYTECODE set, every oneback command would compile its
        # modules again.
        subprocess.run([sys.executable, "-m", "compileall", "-q",
                        str(Path(__file__).resolve().parents[2] / "agent")],
                       env={k: v for k, v in os.environ.items()
                            if k != "PYTHONDONTWRITEBYTECODE"}, check=False)
        with open(work / "onesim.log", "w") as log:
            sim = subprocess.Popen(
                [sys.executable, "-m", "tests.onesim", "serve", "--root", str(root),
                 "--delay", "0.01"], stdout=subprocess.PIPE, stderr=log, text=True,
                cwd=Path(__file__).resolve().parents[2])
        line = _first_line(sim, STARTUP_TIMEOUT)
        try:
            info = json.loads(line)
        except json.JSONDecodeError:
            sim.terminate()
            sim.wait()
            raise OnebackUnavailable(
                f"onesim did not start (see {work / 'onesim.log'} with --keep)") from None
        ob = cls(work, sim, info)
        try:
            ob._setup(image)
        except OnebackUnavailable:
            ob.stop()
            raise
        except Exception as e:
            ob.stop()
            raise OnebackUnavailable(f"setting up VMs in onesim failed: {e!r}") from e
        return ob

    def _setup(self, image: Path) -> None:
        """As an operator would, through pyone (with onesim's testing helpers): register
        the image from its path, a VM using it and a proxy VM, and wait for them."""
        try:
            from tests.onesim import testing
        except ImportError as e:
            raise OnebackUnavailable(f"tests.onesim.testing cannot be imported: {e}") from e
        # The helpers take an in-process Simulator; of it they only use these attributes.
        sim: Any = SimpleNamespace(root=str(self.root), endpoint=self.info["endpoint"],
                                   credentials=self.info["credentials"])
        one = testing.client(sim)
        image_id = testing.create_image(one, sim, "bench-disk", image, image_type="OS",
                                        wait=False)
        testing.wait_image(one, image_id, "READY", timeout=SETUP_TIMEOUT)
        self.vm_id = testing.create_vm(one, sim, "bench-vm", [image_id], timeout=SETUP_TIMEOUT)
        self.proxy_id = testing.create_proxy_vm(one, sim, "bench-proxy")
        self.guest_disk = self.disk_file(self.vm_id)
        self.write_config()

    def disk_file(self, vm_id: int, disk_id: int = 0) -> Path:
        """The guest's view of its disk: the VM's disk file in its SYSTEM datastore."""
        found = sorted(self.root.glob(f"datastores/*/{vm_id}/disk.{disk_id}"))
        if not found:
            raise OnebackUnavailable(f"no disk file for VM {vm_id} under {self.root}")
        return found[0]

    def encrypted(self) -> Oneback:
        """The same cloud, VM and proxy VM, backed up into a second repository,
        encrypted (`oneback init --encryption`), with its own catalog."""
        return self.variant(encrypted=True)

    def variant(self, *, encrypted: bool = False, bucket: Bucket | None = None) -> Oneback:
        """The same cloud, VM and proxy VM, backed up into another repository
        with its own catalog: encrypted (`oneback init --encryption`), and/or
        under `s3://BUCKET/NAME` on the bench's S3 server."""
        name = "oneback" + ("-s3" if bucket else "") + ("-encrypted" if encrypted else "")
        other = Oneback(self.work, self.sim, self.info, name=name)
        other.vm_id, other.proxy_id, other.guest_disk = self.vm_id, self.proxy_id, self.guest_disk
        other.bucket = bucket
        other.label = ", " + " ".join(
            w for w, on in (("S3", bucket), ("encrypted", encrypted)) if on)
        other.key = "oneback" + (".s3" if bucket else "") + (".encrypted" if encrypted else "")
        if encrypted:
            other.passphrase = self.work / "passphrase"
            other.passphrase.write_text("bench passphrase, not a secret\n")
            other.passphrase.chmod(0o600)
        other.write_config()
        return other

    def write_config(self) -> None:
        cred = self.work / "one_auth"
        cred.write_text(self.info["credentials"] + "\n")
        cred.chmod(0o600)
        self.config.write_text(
            "[opennebula]\n"
            f'endpoint = "{self.info["endpoint"]}"\n'
            f'credentials_file = "{cred}"\n'
            f'events = "{self.info["events"]}"\n'
            "[proxy]\n"
            f"vm_id = {self.proxy_id}\n"
            f'dev_root = "{self.root / "vms" / str(self.proxy_id) / "dev"}"\n'
            "[storage]\n"
            f'catalog = "{self.catalog}"\n'
            f"block_size = {4 * 1024 * 1024}\n"
            + (f'passphrase_file = "{self.passphrase}"\n' if self.passphrase else "")
            + (self.bucket.storage_lines(self.work, self.repository.name) if self.bucket
               else f'repository = "{self.repository}"\n'))
        init = subprocess.run([self.exe, "init", "--config", str(self.config),
                               *(["--encryption"] if self.passphrase else [])],
                              capture_output=True, text=True)
        if init.returncode != 0:
            raise OnebackUnavailable(f"oneback init failed: {init.stderr.strip()}")

    def scan_cmd(self, read_depth: int = 16, direct: bool = True,
                 path: Path | None = None) -> list[str]:
        """oneback's read-and-scan phase alone on the VM's disk, or on `path` holding the
        same bytes (the network disk), against the disk's last backup
        (tests/bench_support/scan.py)."""
        return [sys.executable, "-m", "tests.bench_support.scan", str(self.catalog),
                str(self.vm_id), "0", str(path or self.guest_disk), str(4 * 1024 * 1024),
                str(read_depth), "direct" if direct else "buffered"]

    def list_args(self) -> list[str]:
        return ["list", "--config", str(self.config)]

    def fullstore_cmd(self, repo: Path | str, mode: str) -> list[str]:
        """A full read-and-store of the VM's disk into `repo`, a directory or
        s3://BUCKET/PREFIX (tests/bench_support/fullstore.py)."""
        return [sys.executable, "-m", "tests.bench_support.fullstore", str(self.guest_disk),
                str(4 * 1024 * 1024), str(repo), mode]

    def backup_cmd(self) -> list[str]:
        return [self.exe, "backup", str(self.vm_id), "--json", "--config", str(self.config)]

    def _has(self, command: str) -> bool:
        probe = subprocess.run([self.exe, command, "--help"], capture_output=True)
        return probe.returncode == 0 and self.last_backup is not None

    def restore_cmd(self) -> list[str] | None:
        """`oneback restore` of the latest backup, or None without that command."""
        if not self._has("restore"):
            return None
        return [self.exe, "restore", str(self.last_backup), "--json", "--config",
                str(self.config)]

    def export_cmd(self, target: Path) -> list[str] | None:
        """`oneback export` of the latest backup's disk 0, or None without that command."""
        if not self._has("export"):
            return None
        return [self.exe, "export", str(self.last_backup), "0", "-o", str(target), "--json",
                "--config", str(self.config)]

    def parse(self, m: MeasuredLike) -> dict[str, Any] | None:
        """The command's JSON document, or None when it failed."""
        if m.rc != 0:
            return None
        try:
            doc: dict[str, Any] = json.loads(m.out)
        except json.JSONDecodeError:
            return None
        if "backup_id" in doc:
            self.last_backup = int(doc["backup_id"])
        return doc

    def restored_disk(self, doc: dict[str, Any]) -> Path | None:
        """The restored VM's first disk, to compare with the image."""
        try:
            return self.disk_file(int(doc["vm_id"]))
        except (KeyError, ValueError, OnebackUnavailable):
            return None

    def stored(self) -> int:
        """Allocated bytes of the repository and the catalog (with its -wal and
        -shm); in S3, the bytes of the repository's objects and the catalog's."""
        catalog = self.catalog.parent.glob(self.catalog.name + "*")
        if self.bucket:
            return self.bucket.stored(self.repository.name) + du(*catalog)
        return du(self.repository, *catalog)

    def stop(self) -> None:
        if self.sim.poll() is None:
            self.sim.terminate()
            try:
                self.sim.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait()
