"""The bench's single-file-restore rows: `oneback mount` of a backed-up disk,
its time to first byte and its random read rates, as an operator's tools
(debugfs, a loop-mounted filesystem) read it.

Each measurement starts a fresh `oneback mount` process after dropping the
page cache (the repository's chunk files cold, the mount's own cache empty),
reads through the real FUSE file with one reader, then unmounts with
`oneback umount`. `unavailable()` says why it cannot run here, or None.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench_support.tools import drop_caches

MOUNT_TIMEOUT = 60.0


def unavailable() -> str | None:
    try:
        from agent import mount
    except ImportError as e:
        return f"no `oneback mount` here ({e})"
    return mount.unavailable()


@dataclass
class Reads:
    mounted: float        # seconds from starting `oneback mount` until the mount was in place
    first_byte: float     # ... until the first 4 KiB of disk.raw was read
    count: int = 0        # random reads done
    nbytes: int = 0
    seconds: float = 0.0  # their wall time
    rss_kib: int | None = None   # peak RSS of the mount process


def measure(exe: str, config: Path, backup_id: int, mountpoint: Path, size: int, *,
            unit: int, reads: int, budget: float = 20.0, seed: int = 1) -> Reads:
    """Mount disk 0 of `backup_id` cold, read its first 4 KiB, then up to
    `reads` random reads of `unit` bytes (aligned to `unit`, over the whole
    disk) within `budget` seconds; unmount. OSError when it does not mount."""
    from agent import mount

    mountpoint.mkdir(exist_ok=True)
    drop_caches()
    start = time.perf_counter()
    log = mountpoint.parent / "mount.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([exe, "mount", str(backup_id), "0", str(mountpoint),
                                 "--config", str(config)], stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        while not mount.is_mounted(mountpoint):
            if proc.poll() is not None or time.perf_counter() - start > MOUNT_TIMEOUT:
                raise OSError(f"oneback mount did not mount: {log.read_text().strip()}")
            time.sleep(0.002)
        mounted = time.perf_counter() - start
        fd = os.open(mountpoint / mount.FILE_NAME, os.O_RDONLY)
        try:
            os.pread(fd, 4096, 0)
            result = Reads(mounted, time.perf_counter() - start)
            rng = random.Random(seed)
            slots = max(1, size // unit)
            t0 = time.perf_counter()
            while result.count < reads and time.perf_counter() - t0 < budget:
                result.nbytes += len(os.pread(fd, unit, rng.randrange(slots) * unit))
                result.count += 1
            result.seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
        result.rss_kib = _peak_rss_kib(proc.pid)
    finally:
        subprocess.run([exe, "umount", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return result


def _peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
