"""`python -m tests.bench_support.netdisk IMAGE MOUNTPOINT [--latency S] [--in-flight N]`:
a network disk for the bench, served through FUSE.

Exposes one read-only file, MOUNTPOINT/disk.img, whose bytes are IMAGE's. Every
read request the kernel sends waits `--latency` seconds (2 ms by default) before
it is answered, and at most `--in-flight` requests (32 by default) are served at
once (a semaphore; the others queue): the shape of a Ceph RBD or iSCSI volume,
whose throughput comes from many outstanding requests, not from one stream.
Multi-threaded (libfuse's loop starts a thread per concurrent request), in the
foreground until unmounted (`fusermount -u MOUNTPOINT`) or signalled.

Uses fusepy (ctypes bindings to libfuse 2, pure Python: `pip install fusepy`);
`available()` says why it cannot run here, or None.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

NAME = "disk.img"
DEFAULT_LATENCY = 0.002
DEFAULT_IN_FLIGHT = 32


def available() -> str | None:
    """Why this machine cannot serve a FUSE disk, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible (not root?)"
    if not shutil.which("fusermount") and not shutil.which("fusermount3"):
        return "fusermount is not installed"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: fusepy found no libfuse.so.2
        return f"fusepy cannot be loaded ({e}); pip install fusepy, apt-get install libfuse2"
    return None


def ensure_fusepy() -> None:
    """Install fusepy into this interpreter's environment when it is missing (the bench
    only); failures are left for `available()` to report."""
    try:
        import fuse  # noqa: F401
        return
    except ImportError:
        pass
    except OSError:
        return
    print("bench: installing fusepy (pip) for the network-disk rows", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "fusepy>=3,<4"],
                   check=False, stdout=subprocess.DEVNULL)


def _operations(image: Path, latency: float, in_flight: int) -> Any:
    from fuse import FuseOSError, Operations

    class NetDisk(Operations):  # type: ignore[misc]
        def __init__(self) -> None:
            self.fd = os.open(image, os.O_RDONLY)
            self.size = os.fstat(self.fd).st_size
            self.slots = threading.BoundedSemaphore(in_flight)
            self.now = time.time()

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            common = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": self.now,
                      "st_mtime": self.now, "st_ctime": self.now}
            if path == "/":
                return {**common, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            if path == "/" + NAME:
                return {**common, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1,
                        "st_size": self.size, "st_blocks": (self.size + 511) // 512}
            raise FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", NAME]

        def open(self, path: str, flags: int) -> int:
            if path != "/" + NAME:
                raise FuseOSError(errno.ENOENT)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise FuseOSError(errno.EROFS)
            return 0

        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            with self.slots:  # at most `in_flight` requests served at once
                time.sleep(latency)
                return os.pread(self.fd, size, offset)

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": self.size // 4096,
                    "f_bfree": 0, "f_bavail": 0, "f_namemax": 255}

    return NetDisk()


def serve(image: Path, mountpoint: Path, latency: float, in_flight: int) -> None:
    from fuse import FUSE

    FUSE(_operations(image, latency, in_flight), str(mountpoint), foreground=True,
         nothreads=False, ro=True, fsname="netdisk", allow_other=os.geteuid() == 0)


class Mounted:
    """The server as a child process, mounted on `mountpoint` until `stop()`."""

    def __init__(self, image: Path, mountpoint: Path, *, latency: float = DEFAULT_LATENCY,
                 in_flight: int = DEFAULT_IN_FLIGHT, log: Path | None = None,
                 timeout: float = 10.0) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        self.path = mountpoint / NAME
        self.latency, self.in_flight = latency, in_flight
        out = open(log or os.devnull, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench_support.netdisk", str(image), str(mountpoint),
             "--latency", str(latency), "--in-flight", str(in_flight)],
            stdout=out, stderr=out, cwd=Path(__file__).resolve().parents[2])
        out.close()
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the FUSE server did not mount {mountpoint}"
                              + (f" (see {log})" if log else ""))
            time.sleep(0.05)

    def stop(self) -> None:
        if os.path.ismount(self.mountpoint):
            tool = shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"
            subprocess.run([tool, "-u", str(self.mountpoint)], check=False,
                           stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Mounted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="netdisk", description=__doc__.splitlines()[0])
    p.add_argument("image", type=Path)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--latency", type=float, default=DEFAULT_LATENCY)
    p.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT)
    a = p.parse_args(argv)
    why = available()
    if why:
        sys.exit(f"netdisk: {why}")
    serve(a.image, a.mountpoint, a.latency, a.in_flight)


if __name__ == "__main__":
    main(sys.argv[1:])
