"""Running and measuring one child process, and the two tools oneback is compared with.

`run` drops the page cache first (when allowed), times the command, and takes
its peak RSS from GNU time: a wait4 from this Python process would also count
the parent's own high-water mark, which Linux carries into the child across
fork and exec. `Restic` and `Borg` each own a repository in the work directory
and back up the image from standard input, as a disk image is backed up with
them in practice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench_support.image import BLOCK

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass
class Measured:
    wall: float
    rss_kib: int | None
    rc: int
    out: str
    err: str

    def last_error(self) -> str:
        lines = (self.err.strip() or self.out.strip()).splitlines()
        return f"failed (exit {self.rc}): {lines[-1][:100] if lines else 'no output'}"


def drop_caches() -> bool:
    """Flush dirty pages, then drop the page cache; False when not allowed (warm caches)."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        stdin: Path | None = None, sync_after: bool = False, cold: bool = True) -> Measured:
    """Run `cmd` (after dropping caches when `cold`). With `sync_after` the wall time
    includes a final sync, so written data is on disk as with `dd conv=fsync`."""
    if cold:
        drop_caches()
    else:
        os.sync()
    gnu_time = shutil.which("time")
    fd, rss_name = tempfile.mkstemp(prefix="bench-rss-")
    os.close(fd)
    timed = [gnu_time, "-f", "%M", "-o", rss_name, *cmd] if gnu_time else cmd
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            open(stdin or os.devnull, "rb") as fin:
        start = time.perf_counter()
        proc = subprocess.run(timed, stdin=fin, stdout=out, stderr=err, cwd=cwd,
                              env={**os.environ, **(env or {})}, check=False)
        if sync_after:
            os.sync()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        words = Path(rss_name).read_text().split()
        os.unlink(rss_name)
        rss = int(words[-1]) if words and words[-1].isdigit() else None
        return Measured(wall, rss, proc.returncode,
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def du(*paths: Path) -> int:
    """Allocated bytes of the files at and under `paths`, as `du` counts them."""
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_blocks * 512
        for root, _, files in os.walk(p):
            total += sum(os.lstat(os.path.join(root, f)).st_blocks * 512 for f in files)
    return total


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            h.update(chunk)
    return h.hexdigest()


def ensure_tools() -> dict[str, str]:
    """Install restic, borgbackup and GNU time from Debian's packages when missing.

    Returns tool -> why its rows are skipped."""
    wanted = {"restic": "restic", "borg": "borgbackup", "time": "time"}
    missing = [pkg for exe, pkg in wanted.items() if not shutil.which(exe)]
    if missing and (not shutil.which("apt-get") or os.geteuid() != 0):
        print(f"bench: apt-get is not available (or not root): cannot install"
              f" {' '.join(missing)}; what needs them is skipped")
    elif missing:
        print(f"bench: installing {' '.join(missing)} from Debian's packages")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False,
                       stdout=subprocess.DEVNULL)
    if not shutil.which("time"):
        print("bench: GNU time is missing: peak RSS is not measured")
    return {exe: f"{exe} is not installed" for exe in ("restic", "borg")
            if not shutil.which(exe)}


class Restic:
    """restic, repository format 2 (compressed, `auto`), always encrypted."""

    name = "restic"
    key, label = "restic", ""
    note = "always encrypted (AES-256-CTR, Poly1305-AES), zstd auto"

    def __init__(self, work: Path) -> None:
        self.repo = work / "restic-repo"
        self.env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "restic-cache"),
                    "RESTIC_REPOSITORY": str(self.repo)}
        subprocess.run(["restic", "init", "--repository-version", "2", "-q"], check=True,
                       env={**os.environ, **self.env}, stdout=subprocess.DEVNULL)

    def stored(self) -> int:
        return du(self.repo)

    def backup(self, image: Path, label: str) -> Measured:
        return run(["restic", "backup", "-q", "--stdin", "--stdin-filename", "disk.img",
                    "--host", "bench", "--tag", label], env=self.env, stdin=image)

    def restore(self, target: Path) -> tuple[Measured, Path]:
        m = run(["restic", "restore", "-q", "latest", "--target", str(target)],
                env=self.env, sync_after=True)
        return m, target / "disk.img"


class Borg:
    """borg 1.x, fixed 4 MiB chunker, zstd, no encryption (its fastest setting)."""

    name = "borg"
    key, label = "borg", ""
    note = "not encrypted, zstd"

    def __init__(self, work: Path) -> None:
        self.repo = work / "borg-repo"
        self.env = {"BORG_BASE_DIR": str(work / "borg-home"), "BORG_PASSPHRASE": "",
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
        subprocess.run(["borg", "init", "--encryption", "none", str(self.repo)], check=True,
                       env={**os.environ, **self.env})
        self.last = ""

    def stored(self) -> int:
        return du(self.repo)

    def backup(self, image: Path, label: str) -> Measured:
        self.last = label
        return run(["borg", "create", "--chunker-params", "fixed,4194304", "--compression",
                    "zstd", f"{self.repo}::{label}", "-"], env=self.env, stdin=image)

    def restore(self, target: Path) -> tuple[Measured, Path]:
        target.mkdir(parents=True, exist_ok=True)
        m = run(["borg", "extract", f"{self.repo}::{self.last}"], env=self.env, cwd=target,
                sync_after=True)
        return m, target / "stdin"
