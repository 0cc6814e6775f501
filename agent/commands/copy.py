"""Commands that copy backups to another repository: `copy`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.commands import (
    BACKUP_ID,
    ONE_ID,
    cli,
    config_option,
    interruptible,
    json_option,
    runtime,
)
from agent.errors import UsageError
from agent.render import copied_line, copy_json, emit_json, human_bytes

if TYPE_CHECKING:
    from agent.copy import Copied


@cli.command("copy")
@click.argument("backup_ids", metavar="[BACKUP_ID]...", type=BACKUP_ID, nargs=-1)
@click.option("--to", "to", type=click.Path(dir_okay=False), required=True,
              help="The configuration file of the target repository (its [storage]).")
@click.option("--vm", "vm_ids", type=ONE_ID, multiple=True,
              help="Copy this VM's backups (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Copy every backup.")
@click.option("--lock-days", type=click.IntRange(1), default=None,
              help="Keep what is copied from deletion for N days (S3 Object Lock).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Chunks copied at once (default: storage.workers).")
@config_option
@json_option
def copy_(backup_ids: tuple[int, ...], to: str, vm_ids: tuple[int, ...], everything: bool,
          lock_days: int | None, workers: int | None, config_file: str | None,
          as_json: bool) -> None:
    """Copy backups (BACKUP_IDs, a VM's, or --all) into another repository:
    only the chunks it lacks, each verified on the way. Idempotent: run it
    again after a failure or a kill to finish."""
    from agent import copy
    if sum((bool(backup_ids), bool(vm_ids), everything)) != 1:
        raise UsageError("say what to copy: BACKUP_IDs, --vm VM_ID or --all (one of them)")
    cancel = threading.Event()

    def done(c: Copied) -> None:
        if not as_json:
            click.echo(copied_line(c))

    with runtime(config_file, cloud=False) as rt, interruptible(cancel):
        wanted = copy.select(rt.catalog, backup_ids, vm_ids)
        with copy.open_target(Path(to), source_id=rt.store.id, lock_days=lock_days) as target:
            report = copy.copy_backups(
                rt.store, wanted, target, workers=workers or rt.cfg.storage.workers,
                cancel=cancel, done=done)
    if as_json:
        doc: dict[str, Any] = copy_json(report)
        emit_json(doc)
    else:
        copied = sum(1 for c in report.backups if c.outcome in ("copied", "registered"))
        click.echo(f"copied {copied} of {len(report.backups)} backup(s) to"
                   f" {report.repository}: {report.sent} chunk(s) sent,"
                   f" {human_bytes(report.bytes_sent)}, in {report.seconds:.1f}s"
                   + ("; chunk ids translated" if report.translated else ""))
    error = copy.failure(report)
    if error is not None:
        raise error
