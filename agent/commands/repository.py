"""Commands that look after the repository and the catalog: `init`,
`catalog rebuild`, `catalog sync`, `verify`, `forget`, `prune`."""

from __future__ import annotations

import threading
import time

import click

from agent import config as config_mod
from agent.commands import (
    BACKUP_ID,
    ONE_ID,
    Percent,
    cli,
    config_option,
    interruptible,
    json_option,
    runtime,
)
from agent.errors import (
    IntegrityError,
    UsageError,
)
from agent.render import (
    damage_line,
    emit_json,
    human_bytes,
    init_json,
    rebuild_json,
    verify_json,
)


@cli.command("init")
@click.option("--encryption", is_flag=True,
              help="Encrypt the new repository (AES-256-GCM) under the passphrase in"
                   " storage.passphrase_file.")
@config_option
@json_option
def init_(encryption: bool, config_file: str | None, as_json: bool) -> None:
    """Create the repository and the catalog (or join an existing repository)."""
    from agent import repository
    cfg = config_mod.load(config_file)
    result = repository.init(cfg.storage, cfg.storage.catalog,
                             encrypt=encryption, secrets=cfg.storage)
    if as_json:
        emit_json(init_json(result))
        return
    if result.created_repository:
        encrypted = "encrypted " if result.encryption != "none" else ""
        click.echo(f"created {encrypted}repository {result.repository} (id"
                   f" {result.repository_id}) and catalog {result.catalog}")
        if encrypted:
            click.echo("  keep its key somewhere safe: `oneback key export --output FILE`;"
                       " without the passphrase or that key the backups cannot be read")
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
    from agent import keys, repository
    cfg = config_mod.load(config_file)
    store = repository.open_store(cfg.storage)
    keys.unlock(store, cfg.storage)
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


@catalog_.command("sync")
@click.argument("vm_id", type=ONE_ID, required=False)
@config_option
@json_option
def catalog_sync(vm_id: int | None, config_file: str | None, as_json: bool) -> None:
    """Import the backups other agents sharing the repository made (all VMs, or VM_ID's)."""
    from agent import repository
    with runtime(config_file, cloud=False) as rt:
        report = repository.sync(rt.catalog, rt.store, vm_id=vm_id)
    if as_json:
        emit_json({"imported": [{"backup_id": i.backup_id, "vm_id": i.vm_id,
                                 "manifest": i.manifest, "kind": i.kind,
                                 "their_id": i.renumbered_from} for i in report.imported],
                   "dropped": [{"backup_id": b, "manifest": n} for b, n in report.dropped],
                   "damaged": [{"manifest": n, "error": why} for n, why in report.damaged],
                   "busy": report.busy, "known": report.known})
    else:
        click.echo(f"imported {len(report.imported)} backup(s) other agents made;"
                   f" {report.known} already known")
        for i in report.imported:
            click.echo(f"  backup {i.backup_id}: VM {i.vm_id} {i.kind} ({i.manifest})")
        for b, n in report.dropped:
            click.echo(f"  dropped backup {b}: its writer forgot it ({n} is gone)")
        for n in report.busy:
            click.echo(f"  later: {n} (a backup of its VM is running here)")
        for n, why in report.damaged:
            click.echo(f"  skipped {n}: {why}", err=True)
    if report.damaged:
        names = ", ".join(n for n, _ in report.damaged)
        raise IntegrityError(f"{len(report.damaged)} damaged manifest(s) skipped: {names};"
                             " `oneback verify` names what they hold")


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
        locked: list[tuple[int, float]] = []
        forgotten = plan.forget if dry_run else repository.forget(
            rt.catalog, rt.store, plan.forget, locked=locked)
    if as_json:
        doc = forget_json(plan, forgotten, dry_run)
        doc["locked"] = [{"backup_id": b, "until": until} for b, until in locked]
        emit_json(doc)
        return
    verb = "would forget" if dry_run else "forgot"
    held = dict(locked)
    for vm, d in plan.decisions:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(d.started))
        why = f"keep ({', '.join(d.reasons)})" if d.keep else verb
        if d.backup_id in held:
            why = f"locked until {_date(held[d.backup_id])}"
        click.echo(f"VM {vm} backup {d.backup_id} {when}: {why}")
    click.echo(f"{verb} {len(forgotten)} backup(s); `oneback prune` frees their chunks")
    if locked:
        click.echo(f"  {len(locked)} backup(s) are locked until"
                   f" {_date(max(held.values()))} (Object Lock) and stay; forget them"
                   " again after that date")


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


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
    if report.locked:
        click.echo(f"  {report.locked} chunk(s) are locked until {_date(report.locked_until)}"
                   " (Object Lock) and stay; a prune after that date frees them")
    if report.stale:
        click.echo(f"  ignored {len(report.stale)} stale running marker(s) of crashed"
                   " processes" + ("" if dry_run else " (removed)"))
