"""The `oneback` command line: validate flags, call one engine function, render.

Owns: argument parsing, wiring concrete objects (config -> cloud, catalog,
store, lease), rendering for people or as one JSON document (`--json`), the
progress bar, signal handling (SIGTERM/SIGINT become `Interrupted` so the
engine's cleanup runs), and the single mapping of errors to exit codes.
Must not: contain engine logic.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from agent import __version__
from agent import config as config_mod
from agent.errors import (
    EXIT_CODES,
    CloudError,
    InternalError,
    Interrupted,
    OnebackError,
    UsageError,
)
from agent.hookdefs import DEFAULT_COMMAND, HOOKS
from agent.model import ONE_ID_MAX
from agent.render import (
    JsonLogFormatter,
    ProgressBar,
    backoff_json,
    backup_json,
    damage_line,
    delete_json,
    disk_restore_json,
    emit_json,
    human_bytes,
    init_json,
    job_json,
    rebuild_json,
    render_remarks,
    restore_json,
    set_json,
    verify_json,
    verify_progress_json,
    verify_progress_lines,
)

# Commands that never talk to the cloud (--version, --help, list, show,
# exit-codes, export) must start at once: the modules that need the cloud,
# the agent's daemon or ZeroMQ are imported inside the commands that use
# them (tests/test_speed.py holds this).
if TYPE_CHECKING:
    from agent.attach import Workspace
    from agent.backup import BackupResult, Settings
    from agent.catalog import Catalog
    from agent.cloud import Cloud
    from agent.lease import Lease
    from agent.snapshots import DeleteResult
    from agent.store.local import LocalStore

F = TypeVar("F", bound=Callable[..., Any])

# A restore that succeeded but left temporary objects behind (a failed detach,
# say) exits with this code, as `cleanup` does when it cannot remove something.
RESTORE_LEFTOVERS_EXIT = 4


@dataclass
class Runtime:
    cfg: config_mod.Config
    connection: Cloud | None   # None for commands that work from the catalog alone
    catalog: Catalog
    store: LocalStore
    lease: Lease

    @property
    def cloud(self) -> Cloud:
        if self.connection is None:
            raise InternalError("this command was wired without an OpenNebula connection")
        return self.connection

    def settings(self) -> Settings:
        from agent.backup import Settings
        return Settings.from_config(self.cfg)

    def workspace(self) -> Workspace:
        from agent.attach import Workspace
        return Workspace(self.cloud, self.catalog, self.lease.owner, self.cfg.proxy.vm_id,
                         attach_slots=threading.Semaphore(self.cfg.agent.max_attached))


@contextmanager
def runtime(config_file: str | None, *, cloud: bool = True) -> Iterator[Runtime]:
    from agent import repository
    from agent.lease import Lease
    cfg = config_mod.load(config_file)
    one = None
    if cloud:
        from agent.cloud import Cloud
        one = Cloud(cfg.opennebula.endpoint, cfg.opennebula.read_credentials(),
                    timeout=cfg.opennebula.timeout,
                    operation_timeout=cfg.opennebula.operation_timeout,
                    poll_interval=cfg.opennebula.poll_interval)
    catalog, store = repository.open_checked(cfg.storage.repository, cfg.storage.catalog)
    try:
        lease = Lease.acquire(cfg.storage.catalog)
        try:
            yield Runtime(cfg, one, catalog, store, lease)
        finally:
            lease.release()
    finally:
        catalog.close()


# -- signals -----------------------------------------------------------------


@contextmanager
def interruptible(cancel: threading.Event) -> Iterator[None]:
    """First SIGTERM/SIGINT: stop cleanly (the engine undoes its work).
    Second: exit at once."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if cancel.is_set():
            raise SystemExit(130)
        cancel.set()
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; cleaning up")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- ids ---------------------------------------------------------------------------


class IdType(click.ParamType[int]):
    """A whole number in [minimum, maximum]: OpenNebula ids (VMs, disks,
    datastores) are C ints, 0 .. 2^31-1; backup ids are the catalog's SQLite
    rowids, 1 .. 2^63-1. Anything else is refused before any work (exit 2)."""

    name = "id"

    def __init__(self, what: str, minimum: int, maximum: int) -> None:
        self.what, self.minimum, self.maximum = what, minimum, maximum

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number: int | None = value
        else:
            text = str(value).strip()
            number = int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None
        if number is None or not self.minimum <= number <= self.maximum:
            shown = str(value) if len(str(value)) <= 24 else str(value)[:21] + "..."
            self.fail(f"{shown!r} is not {self.what}: use a whole number from {self.minimum}"
                      f" to {self.maximum}", param, ctx)
        return number


ONE_ID = IdType("an OpenNebula id", 0, ONE_ID_MAX)
BACKUP_ID = IdType("a backup id", 1, 2**63 - 1)


# -- commands --------------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print exactly one JSON document on stdout.")
config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                             default=None, help="Configuration file (else $ONEBACK_CONFIG,"
                             " else /etc/oneback/oneback.toml).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oneback")  # no importlib.metadata scan
def cli() -> None:
    """oneback: backup and recovery for OpenNebula KVM clouds."""


@cli.command("init")
@config_option
@json_option
def init_(config_file: str | None, as_json: bool) -> None:
    """Create the repository and the catalog (or join an existing repository)."""
    from agent import repository
    cfg = config_mod.load(config_file)
    result = repository.init(cfg.storage.repository, cfg.storage.catalog)
    if as_json:
        emit_json(init_json(result))
        return
    if result.created_repository:
        click.echo(f"created repository {result.repository} (id {result.repository_id})"
                   f" and catalog {result.catalog}")
    else:
        click.echo(f"catalog {result.catalog} joined the existing repository"
                   f" {result.repository} (id {result.repository_id})")
        if result.manifests:
            click.echo(f"  the repository holds {result.manifests} backup(s) of other"
                       " catalogs; `oneback catalog rebuild --force` lists them all here")
    if result.backfilled:
        click.echo(f"  wrote manifests for {result.backfilled} backup(s) made before"
                   " manifests existed")


@cli.group("catalog")
def catalog_() -> None:
    """The catalog: a cache of the repository's manifests."""


@catalog_.command("rebuild")
@click.option("--force", is_flag=True, help="Replace an existing catalog (kept beside it).")
@click.option("--as-catalog", "as_catalog", metavar="CATALOG_ID", default=None,
              help="Take over this lost catalog's identity (default: the only catalog the"
                   " manifests name).")
@config_option
@json_option
def catalog_rebuild(force: bool, as_catalog: str | None, config_file: str | None,
                    as_json: bool) -> None:
    """Rebuild the catalog from the repository's manifests alone."""
    from agent import repository
    from agent.store.local import LocalStore
    cfg = config_mod.load(config_file)
    store = LocalStore.open(cfg.storage.repository)
    report = repository.rebuild(store, store.id, cfg.storage.catalog, force=force,
                                as_catalog=as_catalog)
    if as_json:
        emit_json(rebuild_json(report))
    else:
        click.echo(f"rebuilt catalog {report.catalog} from repository"
                   f" {cfg.storage.repository}: {len(report.imported)} backup(s)")
        for i in report.imported:
            moved = (f" (manifest said {i.renumbered_from}; another catalog's)"
                     if i.renumbered_from is not None else "")
            click.echo(f"  backup {i.backup_id}: VM {i.vm_id} {i.kind} {i.manifest}{moved}")
        if report.replaced is not None:
            click.echo(f"  the old catalog is kept as {report.replaced}")
        if report.foreign:
            click.echo(f"  {report.foreign} backup(s) belong to other catalogs sharing the"
                       f" repository (this one is {report.catalog_id}): they list and restore"
                       " here, and forgetting them here keeps them for their own catalog")
        for name, why in report.damaged:
            click.echo(f"  skipped {name}: {why}", err=True)
    error = repository.damaged_error(report)
    if error is not None:
        raise error


class Percent(click.ParamType[float]):
    """A share in percent: more than 0, at most 100."""

    name = "percent"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        text = str(value).strip().removesuffix("%")
        try:
            number = float(text)
        except ValueError:
            number = -1.0
        if not 0 < number <= 100:
            self.fail(f"{str(value)[:24]!r} is not a percentage: use a number above 0 and up"
                      " to 100, e.g. 10", param, ctx)
        return number


@cli.command("verify")
@click.argument("backup_ids", type=BACKUP_ID, nargs=-1)
@click.option("--read-data", is_flag=True,
              help="Read every chunk back and check it (else: that each one exists).")
@click.option("--sample", type=Percent(), default=None,
              help="Check only this percentage of the chunks, drawn at random.")
@config_option
@json_option
def verify_(backup_ids: tuple[int, ...], read_data: bool, sample: float | None,
            config_file: str | None, as_json: bool) -> None:
    """Check backups (all, or BACKUP_IDS): manifests read, chunks there (and whole)."""
    from agent import verify
    cancel = threading.Event()
    with runtime(config_file, cloud=False) as rt, interruptible(cancel):
        report = verify.verify(rt.store, rt.catalog, backup_ids, read_data=read_data,
                               sample=sample, workers=max(rt.cfg.storage.workers,
                                                          rt.cfg.storage.read_depth),
                               cancel=cancel)
        rt.catalog.verify_record(verify.as_progress(report))
    if as_json:
        emit_json(verify_json(report))
    else:
        what = "read back" if read_data else "found"
        share = f" (a {sample:g}% sample)" if sample is not None else ""
        click.echo(f"verified {report.manifests} backup(s): {report.checked} of"
                   f" {report.chunks} chunk(s){share} {what}"
                   + (f", {human_bytes(report.bytes_read)}" if read_data else "")
                   + f" in {report.seconds:.1f}s: "
                   + (f"{len(report.damage)} problem(s)" if report.damage else "no damage"))
        for d in report.damage:
            click.echo(f"  {damage_line(d)}")
    error = verify.damage_error(report)
    if error is not None:
        raise error


@cli.command("forget")
@click.argument("backup_ids", metavar="[BACKUP_ID]...", type=BACKUP_ID, nargs=-1)
@click.option("--vm", "vm_ids", type=ONE_ID, multiple=True,
              help="Apply the keep rules to this VM's backups only (repeatable).")
@click.option("--keep-last", type=click.IntRange(0), default=0, help="Keep the N newest.")
@click.option("--keep-hourly", type=click.IntRange(0), default=0,
              help="Keep the newest of each of the last N hours (UTC) with a backup.")
@click.option("--keep-daily", type=click.IntRange(0), default=0, help="... of N days.")
@click.option("--keep-weekly", type=click.IntRange(0), default=0, help="... of N ISO weeks.")
@click.option("--keep-monthly", type=click.IntRange(0), default=0, help="... of N months.")
@click.option("--keep-yearly", type=click.IntRange(0), default=0, help="... of N years.")
@click.option("--dry-run", is_flag=True, help="Show what would be forgotten; change nothing.")
@config_option
@json_option
def forget_(backup_ids: tuple[int, ...], vm_ids: tuple[int, ...], keep_last: int,
            keep_hourly: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
            keep_yearly: int, dry_run: bool, config_file: str | None, as_json: bool) -> None:
    """Forget backups: the ones named, or those the keep rules do not keep.
    Their chunks are freed by `oneback prune`."""
    from agent import repository
    from agent.render import forget_json
    from agent.retention import Decision, KeepPolicy
    policy = KeepPolicy(last=keep_last, hourly=keep_hourly, daily=keep_daily,
                        weekly=keep_weekly, monthly=keep_monthly, yearly=keep_yearly)
    if backup_ids and (not policy.empty or vm_ids):
        raise UsageError("give backup ids or keep rules (--keep-* with an optional --vm),"
                         " not both")
    if not backup_ids and policy.empty:
        raise UsageError("nothing to forget: give backup ids, or keep rules such as"
                         " --keep-last 7 or --keep-daily 7 --keep-weekly 4")
    with runtime(config_file, cloud=False) as rt:
        if backup_ids:
            decisions = []
            for b in dict.fromkeys(backup_ids):
                record = rt.catalog.get_backup(b)   # NotFound before anything is forgotten
                decisions.append((record.vm_id, Decision(b, record.started, ())))
            plan = repository.ForgetPlan(tuple(decisions))
        else:
            plan = repository.plan_forget(rt.catalog, policy, list(vm_ids) or None)
        forgotten = plan.forget if dry_run else repository.forget(
            rt.catalog, rt.store, plan.forget)
    if as_json:
        emit_json(forget_json(plan, forgotten, dry_run))
        return
    verb = "would forget" if dry_run else "forgot"
    for vm, d in plan.decisions:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(d.started))
        why = f"keep ({', '.join(d.reasons)})" if d.keep else verb
        click.echo(f"VM {vm} backup {d.backup_id} {when}: {why}")
    click.echo(f"{verb} {len(forgotten)} backup(s); `oneback prune` frees their chunks")


@cli.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@config_option
@json_option
def prune_(dry_run: bool, config_file: str | None, as_json: bool) -> None:
    """Delete the chunks no backup's manifest references (safe beside running backups)."""
    from agent import prune
    from agent.render import prune_json
    with runtime(config_file, cloud=False) as rt:
        report = prune.prune(rt.store, dry_run=dry_run)
    if as_json:
        emit_json(prune_json(report))
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {report.deleted} chunk(s), {human_bytes(report.freed)}; "
               f"{report.referenced} referenced by {report.manifests} backup(s)")
    if report.kept_recent:
        click.echo(f"  kept {report.kept_recent} unreferenced chunk(s) newer than the cut-off"
                   f" ({len(report.running)} backup(s) running); a later prune frees them")
    if report.stale:
        click.echo(f"  ignored {len(report.stale)} stale running marker(s) of crashed"
                   " processes" + ("" if dry_run else " (removed)"))


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
    from agent.attach import sweep
    from agent.backup import BackupOptions, backup_vm, exclusive
    cancel = threading.Event()
    bar = ProgressBar(enabled=not as_json and sys.stderr.isatty())
    with runtime(config_file) as rt, interruptible(cancel):
        sweep(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id)
        try:
            with exclusive(rt.cfg.storage.catalog, vm_id):
                result: BackupResult = backup_vm(
                    vm_id, BackupOptions(full=full, exclude=frozenset(exclude)),
                    cloud=rt.cloud, catalog=rt.catalog, store=rt.store,
                    workspace=rt.workspace(), settings=rt.settings(), progress=bar,
                    cancel=cancel)
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
    from agent.attach import cleanup
    with runtime(config_file) as rt:
        report = cleanup(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id)
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
    from agent.attach import sweep
    from agent.restore import restore_vm
    cancel = threading.Event()
    bar = ProgressBar(enabled=not as_json and sys.stderr.isatty())
    with runtime(config_file) as rt, interruptible(cancel):
        sweep(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id)
        try:
            result = restore_vm(backup_id, cloud=rt.cloud, catalog=rt.catalog, store=rt.store,
                                workspace=rt.workspace(), settings=rt.settings(),
                                image_ds=image_ds, system_ds=system_ds, name=name,
                                progress=bar, cancel=cancel)
        finally:
            bar.finish()
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
    from agent.attach import sweep
    from agent.restore import restore_disk
    cancel = threading.Event()
    bar = ProgressBar(enabled=not as_json and sys.stderr.isatty())
    with runtime(config_file) as rt, interruptible(cancel):
        sweep(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id)
        try:
            result = restore_disk(backup_id, disk_id, cloud=rt.cloud, catalog=rt.catalog,
                                 store=rt.store, workspace=rt.workspace(),
                                 settings=rt.settings(), image_ds=image_ds, name=name,
                                 progress=bar, cancel=cancel)
        finally:
            bar.finish()
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


@cli.group()
def snapshot() -> None:
    """Snapshot sets: one disk snapshot per disk of a VM, under one name."""


@snapshot.command("create")
@click.argument("vm_id", type=ONE_ID)
@click.option("--name", default=None, help="Name of the set (default: snap-DATE-TIME).")
@click.option("--ttl", default=None, help="Expire the set after this long (30m, 48h, 7d).")
@click.option("--allow-permanent", is_flag=True,
              help="Take the set even if a member can never be deleted (snapshot 0 of a"
                   " persistent qcow2 disk, see README).")
@config_option
@json_option
def snapshot_create(vm_id: int, name: str | None, ttl: str | None, allow_permanent: bool,
                    config_file: str | None, as_json: bool) -> None:
    """Snapshot every disk of VM_ID, one after another."""
    from agent.attach import sweep
    from agent.policy import parse_duration
    from agent.snapshots import create_set
    seconds = parse_duration(ttl, "--ttl") if ttl else None
    cancel = threading.Event()
    with runtime(config_file) as rt, interruptible(cancel):
        sweep(rt.cloud, rt.catalog, rt.cfg.storage.catalog, rt.cfg.proxy.vm_id)
        result = create_set(rt.cloud, rt.catalog, rt.lease.owner, vm_id, name, seconds,
                            allow_permanent=allow_permanent)
    if as_json:
        doc = set_json(result.set)
        doc["skipped"] = list(result.skipped)
        emit_json(doc)
        return
    click.echo(f"snapshot set {result.set.name!r} of VM {vm_id}:"
               f" disks {', '.join(str(d.disk_id) for d in result.set.disks)}")
    for s in result.skipped:
        click.echo(f"  skipped: {s}")


@snapshot.command("list")
@click.argument("vm_id", type=ONE_ID)
@config_option
@json_option
def snapshot_list(vm_id: int, config_file: str | None, as_json: bool) -> None:
    """List the snapshot sets of VM_ID."""
    from agent.snapshots import list_sets
    with runtime(config_file) as rt:
        sets = list_sets(rt.cloud, vm_id)
    if as_json:
        emit_json([set_json(s) for s in sets])
        return
    if not sets:
        click.echo(f"VM {vm_id} has no snapshot sets")
        return
    click.echo(f"{'NAME':<24} {'CREATED':<20} {'EXPIRES':<20} {'DISKS':<10} {'SIZE':>8}")
    for s in sets:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created))
        expires = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.expires))
                   if s.expires else "never")
        disks = ",".join(str(d.disk_id) for d in s.disks)
        click.echo(f"{s.name:<24} {created:<20} {expires:<20} {disks:<10} {s.size_mb:>5} MB")


@snapshot.command("revert")
@click.argument("vm_id", type=ONE_ID)
@click.argument("name")
@config_option
@json_option
def snapshot_revert(vm_id: int, name: str, config_file: str | None, as_json: bool) -> None:
    """Revert every disk of VM_ID to the set NAME (the VM is stopped meanwhile)."""
    from agent.snapshots import revert_set
    with runtime(config_file) as rt:
        result = revert_set(rt.cloud, vm_id, name)
    if as_json:
        emit_json({"vm_id": vm_id, "name": name, "stopped_as": result.stopped_as,
                   "state": result.final_state,
                   "disks": [d.disk_id for d in result.set.disks]})
    else:
        click.echo(f"VM {vm_id} reverted to snapshot set {name!r}; it is {result.final_state}")


@snapshot.command("delete")
@click.argument("vm_id", type=ONE_ID)
@click.argument("name")
@config_option
@json_option
def snapshot_delete(vm_id: int, name: str, config_file: str | None, as_json: bool) -> None:
    """Delete the snapshot set NAME of VM_ID."""
    from agent.snapshots import delete_set
    with runtime(config_file) as rt:
        result = delete_set(rt.cloud, vm_id, name)
    if as_json:
        emit_json(delete_json(result))
    else:
        _render_delete(result, "deleted")
    if result.failed:
        raise SystemExit(CloudError.exit_code)


@snapshot.command("expire")
@config_option
@json_option
def snapshot_expire(config_file: str | None, as_json: bool) -> None:
    """Delete every snapshot set whose TTL has passed, on every VM."""
    from agent.snapshots import expire_sets
    with runtime(config_file) as rt:
        expired = expire_sets(rt.cloud)
    if as_json:
        emit_json([delete_json(r) for r in expired])
    else:
        for r in expired:
            _render_delete(r, "expired")
        if not expired:
            click.echo("no snapshot set has expired")
    if any(r.failed for r in expired):
        raise SystemExit(CloudError.exit_code)


def _render_delete(result: DeleteResult, verb: str) -> None:
    s = result.set
    if not result.kept and not result.failed:
        click.echo(f"{verb} snapshot set {s.name!r} of VM {s.vm_id}")
        return
    done = ", ".join(str(d.disk_id) for d in result.deleted) or "none"
    click.echo(f"{verb} snapshot set {s.name!r} of VM {s.vm_id} in part: disks deleted: {done}")
    for k in result.kept:
        click.echo(f"  kept for good: disk {k.disk_id} snapshot {k.snapshot_id}: {k.reason}")
    for f in result.failed:
        click.echo(f"  not deleted: {f}", err=True)


@cli.command("agent")
@config_option
def agent_(config_file: str | None) -> None:
    """Run the agent: events, hooks, schedule, jobs (until SIGTERM)."""
    from agent.daemon import Agent
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("oneback")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    should_exit = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if should_exit.is_set():
            os._exit(130)  # second signal: leave now; the next start cleans up
        should_exit.set()

    with runtime(config_file) as rt:
        secret = rt.cfg.agent.read_secret()
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, on_signal)
        Agent(rt.cfg, rt.cloud, rt.catalog, rt.store, rt.lease, secret=secret).run(should_exit)


@cli.command("status")
@config_option
@json_option
def status(config_file: str | None, as_json: bool) -> None:
    """The agent's queue, running jobs, last results, and what keeps failing."""
    with runtime(config_file, cloud=False) as rt:
        queued = rt.catalog.jobs(("queued",))
        running = rt.catalog.jobs(("running",))
        recent = rt.catalog.jobs(("done", "failed"), limit=20)
        failing = rt.catalog.backoffs()
        checks = [p for p in (rt.catalog.verify_progress("background"),
                              rt.catalog.verify_progress("command")) if p is not None]
    if as_json:
        emit_json({"queued": [job_json(j) for j in queued],
                   "running": [job_json(j) for j in running],
                   "recent": [job_json(j) for j in recent],
                   "failing": [backoff_json(b) for b in failing],
                   "verify": {p.key: verify_progress_json(p) for p in checks}})
        return
    for title, jobs in (("running", running), ("queued", queued), ("recent", recent)):
        click.echo(f"{title}: {len(jobs)}")
        for j in jobs:
            what = j.error or j.result or j.reason
            click.echo(f"  job {j.id}: VM {j.vm_id} {j.kind} {j.state}"
                       f" (attempt {j.attempts}) {what}")
    click.echo(f"failing (backing off): {len(failing)}")
    now = time.time()
    for b in failing:
        vm = f"VM {b.vm_id} " if b.vm_id is not None else ""
        wait = max(0, int(b.next_try - now))
        click.echo(f"  {vm}{b.what}: failed {b.failures} time(s) in a row, next try in"
                   f" {wait}s: {b.error}")
    for p in checks:
        for line in verify_progress_lines(p):
            click.echo(line)


@cli.group()
def hooks() -> None:
    """OpenNebula hooks that wake the agent."""


@hooks.command("install")
@click.option("--command", "command", default=DEFAULT_COMMAND, show_default=True,
              help="Where hooks/oneback-hook was copied on the front-end.")
@config_option
@json_option
def hooks_install(command: str, config_file: str | None, as_json: bool) -> None:
    """Register oneback's hooks with one.hook.allocate (existing ones are kept)."""
    if not command.startswith("/") or any(c in command for c in "\"'\n $`;|&"):
        raise UsageError(f"--command {command!r} must be an absolute path without spaces"
                         f" or shell characters")
    with runtime(config_file) as rt:
        existing = rt.cloud.hooks()
        done = []
        for h in HOOKS:
            if h.name in existing:
                done.append({"name": h.name, "id": existing[h.name], "created": False})
            else:
                hook_id = rt.cloud.hook_allocate(h.template(command))
                done.append({"name": h.name, "id": hook_id, "created": True})
    if as_json:
        emit_json(done)
    else:
        for d in done:
            click.echo(f"hook {d['id']} {d['name']}: {'created' if d['created'] else 'exists'}")


@cli.command("exit-codes")
@json_option
def exit_codes(as_json: bool) -> None:
    """Print the table of exit codes."""
    table = [(0, "Success", "the command did what it was asked")]
    table += sorted(set(EXIT_CODES))
    if as_json:
        emit_json([{"code": c, "name": n, "meaning": d} for c, n, d in table])
        return
    for code, name, doc in table:
        click.echo(f"{code:>3}  {name}: {doc}")


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the CLI; map OnebackError to its exit code and a one-line message."""
    # Backups hold disk data, VM documents (with their context) and secrets:
    # everything oneback creates is private to its user.
    old_umask = os.umask(0o077)
    try:
        _main(argv)
    finally:
        os.umask(old_umask)


def _main(argv: list[str] | None) -> NoReturn:
    try:
        cli.main(args=argv, prog_name="oneback", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("oneback: aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as e:
        # one line that names the command and the argument, never click's usage block
        where = e.ctx.command_path if isinstance(e, click.UsageError) and e.ctx else "oneback"
        message = " ".join(e.format_message().split())
        click.echo(f"{where}: {message}", err=True)
        raise SystemExit(UsageError.exit_code) from None
    except OnebackError as e:
        prefix = "oneback: internal error (please report): " if e.is_bug else "oneback: "
        click.echo(f"{prefix}{e.message}", err=True)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        click.echo("oneback: interrupted", err=True)
        raise SystemExit(130) from None
    except Exception as e:  # a bug: one line, never a traceback
        click.echo(f"oneback: internal error (please report): {type(e).__name__}: {e}", err=True)
        raise SystemExit(1) from None
    raise SystemExit(0)
