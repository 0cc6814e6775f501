"""Commands for single-file restore: `mount` (one disk of a backup as a
read-only raw file, through FUSE) and `umount`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import click

from agent.commands import BACKUP_ID, ONE_ID, cli, config_option, json_option, runtime
from agent.errors import DeviceError
from agent.render import emit_json, human_bytes

MiB = 1024 * 1024
START_TIMEOUT = 60.0   # seconds a --background mount may take to appear


@cli.command("mount")
@click.argument("backup_id", type=BACKUP_ID)
@click.argument("disk_id", type=ONE_ID)
@click.argument("mountpoint", type=click.Path())
@click.option("--cache", "cache_mib", type=click.IntRange(1, 1024 * 1024), default=32,
              show_default=True, help="MiB of the disk's blocks kept in memory.")
@click.option("--background", is_flag=True,
              help="Return once mounted; serve from a process of its own.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
              help="With --background: append its log lines (failed reads) to this file.")
@config_option
@json_option
def mount_(backup_id: int, disk_id: int, mountpoint: str, cache_mib: int, background: bool,
           log_file: str | None, config_file: str | None, as_json: bool) -> None:
    """Expose disk DISK_ID of BACKUP_ID read-only as MOUNTPOINT/disk.raw (FUSE),
    fetching its chunks on demand; serves until `oneback umount MOUNTPOINT`,
    SIGINT or SIGTERM."""
    from agent import mount as engine
    from agent.diskimage import DiskImage, data_disk

    with runtime(config_file, cloud=False) as rt:
        backup, disk = data_disk(rt.catalog, backup_id, disk_id)
        target = engine.check_mountpoint(Path(mountpoint))
        why = engine.unavailable()
        if why:
            raise DeviceError(f"cannot mount disk {disk_id} of backup {backup_id}: {why}")
        if not background:
            # The map is read once, here; the catalog is closed before serving,
            # so a mount never holds it (backups and prunes go on meanwhile).
            image = DiskImage.from_blocks(
                rt.store, rt.catalog.blocks(backup_id, disk_id), backup_id=backup_id,
                disk_id=disk_id, size=disk.size, block_size=disk.block_size,
                cache_bytes=cache_mib * MiB)
    if background:
        pid = _start_background(backup_id, disk_id, target, cache_mib, log_file, config_file)
    file = target / engine.FILE_NAME
    doc: dict[str, object] = {"backup_id": backup_id, "disk_id": disk_id,
                              "mountpoint": str(target), "file": str(file), "size": disk.size}

    def ready() -> None:
        if as_json:
            emit_json(doc)
        else:
            click.echo(f"mounted disk {disk_id} of backup {backup_id} read-only at {file}"
                       f" ({human_bytes(disk.size)}); `oneback umount {target}`"
                       + (" unmounts it" if background else " or Ctrl-C unmounts it"))

    if background:
        doc["pid"] = pid
        ready()
        return
    if not engine.log.handlers:   # failed reads: one line each on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("oneback mount: %(message)s"))
        engine.log.addHandler(handler)
        engine.log.propagate = False
    engine.serve(image, target, mtime=backup.finished, on_ready=ready)
    if not as_json:
        click.echo(f"unmounted {target}")


@cli.command("umount")
@click.argument("mountpoint", type=click.Path())
@config_option
@json_option
def umount_(mountpoint: str, config_file: str | None, as_json: bool) -> None:
    """Unmount a disk mounted by `oneback mount` (its process then exits).
    (--config is accepted and not needed.)"""
    from agent import mount as engine

    engine.unmount(Path(mountpoint))
    if as_json:
        emit_json({"mountpoint": str(Path(mountpoint).absolute()), "unmounted": True})
    else:
        click.echo(f"unmounted {mountpoint}")


def _start_background(backup_id: int, disk_id: int, target: Path, cache_mib: int,
                      log_file: str | None, config_file: str | None) -> int:
    """Start `oneback mount` in the foreground as a process of its own (a new
    session: the terminal's Ctrl-C does not reach it) and wait until its
    mount is in place. Returns its pid; DeviceError (with its own error line)
    when it ends or does not mount in time."""
    from agent import mount as engine

    argv = [sys.executable, "-m", "agent", "mount", str(backup_id), str(disk_id), str(target),
            "--cache", str(cache_mib), "--json"]
    if config_file is not None:
        argv += ["--config", os.path.abspath(config_file)]
    log: IO[str] = (open(log_file, "a+") if log_file is not None  # noqa: SIM115
                    else tempfile.TemporaryFile("w+"))
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not engine.is_mounted(target):
            code = child.poll()
            if code is not None or time.monotonic() > deadline:
                if code is None:
                    child.kill()
                    child.wait()
                said = _last_line(log)
                raise DeviceError(f"the background mount of disk {disk_id} of backup"
                                  f" {backup_id} did not start: {said or 'no reason given'}")
            time.sleep(0.05)
        return child.pid
    finally:
        log.close()


def _last_line(log: IO[str]) -> str:
    """The last line the child wrote to `log` (its error), without the prefix."""
    try:
        log.flush()
        log.seek(0)
        lines = [line.removeprefix("oneback: ") for line in log.read().splitlines()
                 if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
