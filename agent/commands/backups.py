"""Commands on backups of VMs: `backup`, `list`, `show`, `cleanup`,
`restore`, `restore-disk`, `export`."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.render import (
    ProgressBar,
    backup_json,
    disk_restore_json,
    emit_json,
    human_bytes,
    render_remarks,
    restore_json,
)

if TYPE_CHECKING:
    from agent.backup import BackupResult
from agent.commands import (
    BACKUP_ID,
    ONE_ID,
    RESTORE_LEFTOVERS_EXIT,
    Runtime,
    cli,
    config_option,
    interruptible,
    json_option,
    runtime,
)


@cli.command()
@click.argument("vm_id", type=ONE_ID)
@click.option("--full", is_flag=True, help="Ignore earlier checksums and read every block.")
@click.option("--exclude-disk", "exclude", type=ONE_ID, multiple=True,
              help="Disk id to leave out (repeatable); adds to ONEBACK_EXCLUDE_DISKS.")
@config_option
@json_option
def backup(vm_id: int, full: bool, exclude: tuple[int, ...], config_file: str | None,
           as_json: bool) -> None:
    """Back up VM_ID: snapshot, save, attach, read changed blocks, clean up."""
    from agent import vmlease
    from agent.attach import sweep
    from agent.backup import BackupOptions, backup_vm, exclusive
    from agent.errors import Interrupted, LeaseLost
    cancel = threading.Event()
    bar = ProgressBar(enabled=not as_json and sys.stderr.isatty())
    with runtime(config_file) as rt, interruptible(cancel):
        sweep(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id)
        try:
            # one backup of the VM at a time: in this catalog, then among the
            # agents sharing the repository (its lease)
            with exclusive(rt.cfg.storage.catalog, vm_id), vmlease.holding(
                    rt.store, vm_id, rt.catalog.catalog_id, rt.cfg.agent.lease_time, cancel,
                    agent=f"proxy VM {rt.cfg.proxy.vm_id}", process=rt.lease.owner) as held:
                try:
                    result: BackupResult = backup_vm(
                        vm_id, BackupOptions(full=full, exclude=frozenset(exclude)),
                        cloud=rt.cloud, catalog=rt.catalog, store=rt.store,
                        workspace=rt.workspace(), settings=rt.settings(), progress=bar,
                        cancel=cancel)
                except Interrupted as e:
                    if held is not None and held.lost:
                        raise LeaseLost(held.lost_message()) from e
                    raise
        finally:
            bar.finish()
    rec = result.record
    if as_json:
        doc = backup_json(rec)
        doc["cloud_seconds"] = round(result.cloud_seconds, 3)
        doc["scan_seconds"] = round(result.scan_seconds, 3)
        doc["cloud_bytes_copied"] = result.cloud_bytes_copied
        emit_json(doc)
        return
    click.echo(f"backup {rec.id} of VM {rec.vm_id} ({rec.vm_name}): {rec.kind}")
    for d in rec.disks:
        if d.excluded or d.volatile or not d.bytes_read:
            why = "excluded" if d.excluded else "volatile" if d.volatile else "not read"
            click.echo(f"  disk {d.disk_id}: {human_bytes(d.size)}, {why}")
        else:
            click.echo(f"  disk {d.disk_id}: {human_bytes(d.size)}, read"
                       f" {human_bytes(d.bytes_read)}, changed {human_bytes(d.bytes_changed)},"
                       f" stored {human_bytes(d.bytes_stored)}")
    for w in rec.warnings:
        click.echo(f"  warning: {w}")


@cli.command("list")
@click.argument("vm_id", type=ONE_ID, required=False)
@config_option
@json_option
def list_(vm_id: int | None, config_file: str | None, as_json: bool) -> None:
    """List backups, newest last (all VMs, or VM_ID's)."""
    with runtime(config_file, cloud=False) as rt:
        records = rt.catalog.list_backups(vm_id)
    if as_json:
        emit_json([backup_json(r) for r in records])
        return
    if not records:
        click.echo("no backups")
        return
    click.echo(f"{'ID':>5}  {'VM':>5}  {'NAME':<20} {'KIND':<12} {'WHEN':<20} {'STORED':>10}")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.finished))
        stored = sum(d.bytes_stored for d in r.disks)
        gone = " (VM gone)" if r.vm_gone else ""
        click.echo(f"{r.id:>5}  {r.vm_id:>5}  {r.vm_name[:20]:<20} {r.kind:<12} {when:<20}"
                   f" {human_bytes(stored):>10}{gone}")


@cli.command()
@click.argument("backup_id", type=BACKUP_ID)
@config_option
@json_option
def show(backup_id: int, config_file: str | None, as_json: bool) -> None:
    """Show one backup: its disks and warnings."""
    with runtime(config_file, cloud=False) as rt:
        rec = rt.catalog.get_backup(backup_id)
    if as_json:
        emit_json(backup_json(rec))
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.finished))
    click.echo(f"backup {rec.id}: VM {rec.vm_id} ({rec.vm_name}), {rec.kind}, {when}")
    for d in rec.disks:
        flags = ", excluded" if d.excluded else ", volatile" if d.volatile else ""
        click.echo(f"  disk {d.disk_id}: {human_bytes(d.size)}{flags}, stored"
                   f" {human_bytes(d.bytes_stored)}")
    for w in rec.warnings:
        click.echo(f"  warning: {w}")


@cli.command("cleanup")
@config_option
@json_option
def cleanup_(config_file: str | None, as_json: bool) -> None:
    """Remove every leftover oneback- temporary object from the cloud."""
    from agent import vmlease
    from agent.attach import cleanup
    from agent.backup import restoring_owners
    with runtime(config_file) as rt:
        # what another agent sharing the repository works on is not a leftover:
        # its backups (VM leases) and its restores (running/ markers)
        live = (vmlease.live_processes(rt.store, rt.cfg.agent.lease_time)
                | restoring_owners(rt.store))
        report = cleanup(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id,
                         also_live=live.__contains__)
    if as_json:
        emit_json(asdict(report))
    else:
        for r in report.removed:
            click.echo(f"removed {r}")
        for k in report.kept:
            click.echo(f"kept {k}")
        for f in report.failed:
            click.echo(f"not removed: {f}", err=True)
        if not report.removed and not report.failed and not report.kept:
            click.echo("nothing to clean up")
    if report.failed:
        raise SystemExit(4)


@contextmanager
def _restore_session(config_file: str | None, as_json: bool
                     ) -> Iterator[tuple[Runtime, ProgressBar, threading.Event]]:
    """What `restore` and `restore-disk` run in: the wiring, signals, the
    start-up sweep of earlier leftovers, a progress bar, and a running marker
    in the repository (`oneback cleanup` on another proxy spares its objects)."""
    from agent.attach import sweep
    from agent.backup import restoring
    cancel = threading.Event()
    bar = ProgressBar(enabled=not as_json and sys.stderr.isatty())
    with runtime(config_file) as rt, interruptible(cancel):
        sweep(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id)
        try:
            with restoring(rt.store, rt.lease.owner):
                yield rt, bar, cancel
        finally:
            bar.finish()


@cli.command()
@click.argument("backup_id", type=BACKUP_ID)
@click.option("--image-ds", type=ONE_ID, default=None,
              help="IMAGE datastore for the restored disks (default: each image's own).")
@click.option("--system-ds", type=ONE_ID, default=None,
              help="SYSTEM datastore to deploy the VM into (default: the scheduler's choice).")
@click.option("--name", default=None, help="Name of the new VM (default: NAME-restored-ID).")
@config_option
@json_option
def restore(backup_id: int, image_ds: int | None, system_ds: int | None, name: str | None,
            config_file: str | None, as_json: bool) -> None:
    """Restore BACKUP_ID as a new VM: disks first, then the VM, left RUNNING."""
    from agent.restore import restore_vm
    with _restore_session(config_file, as_json) as (rt, bar, cancel):
        result = restore_vm(backup_id, cloud=rt.cloud, catalog=rt.catalog, store=rt.store,
                            workspace=rt.workspace(), settings=rt.settings(),
                            image_ds=image_ds, system_ds=system_ds, name=name, progress=bar,
                            cancel=cancel)
    if as_json:
        emit_json(restore_json(result))
    else:
        click.echo(f"restored backup {backup_id} as VM {result.vm_id} ({result.name}), RUNNING")
        for i in result.images:
            click.echo(f"  disk {i.disk_id}: image {i.image_id},"
                       f" wrote {human_bytes(i.bytes_written)}")
    render_remarks(result.notes, result.warnings, as_json=as_json)
    if result.warnings:
        raise SystemExit(RESTORE_LEFTOVERS_EXIT)


@cli.command("restore-disk")
@click.argument("backup_id", type=BACKUP_ID)
@click.argument("disk_id", type=ONE_ID)
@click.option("--image-ds", type=ONE_ID, default=None,
              help="IMAGE datastore for the new image (default: the original image's).")
@click.option("--name", default=None, help="Name of the new image.")
@config_option
@json_option
def restore_disk_(backup_id: int, disk_id: int, image_ds: int | None, name: str | None,
                  config_file: str | None, as_json: bool) -> None:
    """Restore one disk of BACKUP_ID as a new image."""
    from agent.restore import restore_disk
    with _restore_session(config_file, as_json) as (rt, bar, cancel):
        result = restore_disk(backup_id, disk_id, cloud=rt.cloud, catalog=rt.catalog,
                              store=rt.store, workspace=rt.workspace(),
                              settings=rt.settings(), image_ds=image_ds, name=name,
                              progress=bar, cancel=cancel)
    if as_json:
        emit_json(disk_restore_json(result))
    else:
        click.echo(f"restored disk {disk_id} of backup {backup_id} as image"
                   f" {result.image.image_id} ({result.name})")
    render_remarks(result.notes, result.warnings, as_json=as_json)
    if result.warnings:
        raise SystemExit(RESTORE_LEFTOVERS_EXIT)


@cli.command("export")
@click.argument("backup_id", type=BACKUP_ID)
@click.argument("disk_id", type=ONE_ID)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="The raw file to write (sparse).")
@config_option
@json_option
def export_(backup_id: int, disk_id: int, output: str, config_file: str | None,
            as_json: bool) -> None:
    """Write one disk of BACKUP_ID to a sparse raw file (no cloud needed)."""
    from agent.export import export_disk
    cancel = threading.Event()
    with runtime(config_file, cloud=False) as rt, interruptible(cancel):
        written = export_disk(backup_id, disk_id, Path(output), catalog=rt.catalog,
                              store=rt.store, workers=rt.cfg.storage.workers, cancel=cancel)
    if as_json:
        emit_json({"backup_id": backup_id, "disk_id": disk_id, "output": output,
                   "bytes_written": written})
    else:
        click.echo(f"wrote disk {disk_id} of backup {backup_id} to {output}"
                   f" ({human_bytes(written)} of data)")
