"""Rendering for people and for `--json`: the engine's values as text,
JSON documents, a progress bar and JSON log lines. Must not: decide or do
anything; the CLI calls these with what the engine returned."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from agent.model import Backoff, BackupRecord, Damage, Job, VerifyProgress

if TYPE_CHECKING:  # types only: the CLI's offline commands must not import the engine
    from agent.copy import Copied, CopyReport, Lag
    from agent.prune import PruneReport
    from agent.repository import ForgetPlan, InitResult, RebuildReport
    from agent.restore import DiskRestoreResult, RestoreResult
    from agent.snapshots import DeleteResult, SnapshotSet
    from agent.verify import VerifyReport


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def backup_json(record: BackupRecord) -> dict[str, Any]:
    return {
        "backup_id": record.id,
        "vm_id": record.vm_id,
        "vm_name": record.vm_name,
        "kind": record.kind,
        "started": record.started,
        "finished": record.finished,
        "vm_gone": record.vm_gone,
        "disks": [
            {"disk_id": d.disk_id, "size": d.size, "bytes_read": d.bytes_read,
             "bytes_changed": d.bytes_changed, "bytes_stored": d.bytes_stored,
             "excluded": d.excluded, "volatile": d.volatile, "image_id": d.image_id}
            for d in record.disks
        ],
        "warnings": list(record.warnings),
    }


def damage_line(d: Damage) -> str:
    """One damaged block (or manifest) for people."""
    who = (f"backup {d.backup_id}" if d.backup_id is not None
           else f"backup of another catalog ({d.manifest})")
    if d.problem == "manifest":
        return f"{who}: manifest {d.manifest or '(none)'}: {d.detail}"
    extra = "; quarantined" if d.quarantined else ""
    return (f"{who} (VM {d.vm_id}) disk {d.disk_id} block {d.block}: chunk {d.chunk}"
            f" {d.problem}{extra}")


def verify_json(r: VerifyReport) -> dict[str, Any]:
    return {"read_data": r.read_data, "sample_percent": r.sample, "manifests": r.manifests,
            "chunks": r.chunks, "checked": r.checked, "bytes_read": r.bytes_read,
            "seconds": round(r.seconds, 3), "clean": not r.damage,
            "damaged_backups": r.damaged_backups, "quarantined": list(r.quarantined),
            "damage": [asdict(d) for d in r.damage]}


def verify_progress_json(p: VerifyProgress) -> dict[str, Any]:
    doc: dict[str, Any] = {"last_run": p.last_run, "checked": p.checked,
                           "bytes_read": p.bytes_read, "read_data": p.read_data,
                           "damage": [asdict(d) for d in p.damage]}
    if p.key == "background":
        doc.update(pass_started=p.pass_started, pass_checked=p.pass_checked,
                   pass_share=round(int.from_bytes(p.cursor, "big") / 2 ** 256, 4)
                   if p.cursor else 0.0,
                   last_pass_finished=p.last_pass_finished)
    return doc


def verify_progress_lines(p: VerifyProgress) -> list[str]:
    """`oneback status`'s lines on the last verify."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.last_run))
    if p.key == "background":
        done = (int.from_bytes(p.cursor, "big") * 100 // 2 ** 256) if p.cursor else 0
        last = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.last_pass_finished))
                if p.last_pass_finished else "never")
        head = (f"verify (background): last step {when} read {p.checked} chunk(s)"
                f" ({human_bytes(p.bytes_read)}); this pass {done}% done, {p.pass_checked}"
                f" chunk(s); last whole pass {last}")
    else:
        how = "read back" if p.read_data else "found"
        head = f"verify (last `oneback verify`): {when}, {p.checked} chunk(s) {how}"
    lines = [f"{head}; damage found: {len(p.damage) or 'none'}"]
    lines += [f"  {damage_line(d)}" for d in p.damage]
    return lines


def restore_json(r: RestoreResult) -> dict[str, Any]:
    return {"vm_id": r.vm_id, "name": r.name, "template_deleted": r.template_deleted,
            "images": [asdict(i) for i in r.images], "warnings": list(r.warnings),
            "notes": list(r.notes)}


def disk_restore_json(r: DiskRestoreResult) -> dict[str, Any]:
    return {**asdict(r.image), "name": r.name, "warnings": list(r.warnings),
            "notes": list(r.notes)}


def render_remarks(notes: tuple[str, ...], warnings: tuple[str, ...], *,
                   as_json: bool = False) -> None:
    """A restore's notes and warnings (leftovers) for people, and in any
    case one line on stderr with the way out when something was left behind."""
    if not as_json:
        for n in notes:
            click.echo(f"  note: {n}")
        for w in warnings:
            click.echo(f"  warning: {w}")
    if warnings:
        click.echo("oneback: the restore succeeded but left temporary objects behind;"
                   " 'oneback cleanup' removes them", err=True)


class ProgressBar:
    """A one-line progress display on stderr (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.total = 0
        self.done = 0
        self.label = ""
        self._last = 0.0
        self._lock = threading.Lock()

    def phase(self, disk_id: int, phase: str) -> None:
        self.label = f"disk {disk_id}: {phase}"
        self._draw(force=True)

    def disk_size(self, disk_id: int, size: int) -> None:
        self.total, self.done = size, 0

    def advanced(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = self.done / self.total if self.total else 0.0
        bar = "#" * int(frac * 30)
        click.echo(f"\r{self.label:<24} [{bar:<30}] {frac * 100:5.1f}%"
                   f" {human_bytes(self.done)}", nl=False, err=True)

    def finish(self) -> None:
        if self.enabled:
            click.echo("\r" + " " * 80 + "\r", nl=False, err=True)


def set_json(s: SnapshotSet) -> dict[str, Any]:
    return {"vm_id": s.vm_id, "name": s.name, "created": s.created, "expires": s.expires,
            "size_mb": s.size_mb,
            "disks": [{"disk_id": d.disk_id, "snapshot_id": d.snapshot_id,
                       "size_mb": d.size_mb} for d in s.disks]}


def delete_json(r: DeleteResult) -> dict[str, Any]:
    """A deleted (or expired) set; `kept` members oned will never delete."""
    return {**set_json(r.set), "deleted": [d.disk_id for d in r.deleted],
            "kept": [{"disk_id": k.disk_id, "snapshot_id": k.snapshot_id, "reason": k.reason}
                     for k in r.kept],
            "failed": list(r.failed)}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc, default=str)


def job_json(j: Job) -> dict[str, Any]:
    return {"id": j.id, "vm_id": j.vm_id, "kind": j.kind, "state": j.state,
            "reason": j.reason, "attempts": j.attempts, "params": dict(j.params),
            "not_before": j.not_before, "updated": j.updated, "result": j.result,
            "error": j.error}


def backoff_json(b: Backoff) -> dict[str, Any]:
    return {"key": b.key, "vm_id": b.vm_id, "what": b.what, "failures": b.failures,
            "error": b.error, "first_failed": b.first_failed, "last_failed": b.last_failed,
            "next_try": b.next_try}


def init_json(r: InitResult) -> dict[str, Any]:
    return {"repository": str(r.repository), "repository_id": r.repository_id,
            "catalog": str(r.catalog), "created_repository": r.created_repository,
            "manifests": r.manifests, "backfilled": r.backfilled, "encryption": r.encryption}


def rebuild_json(r: RebuildReport) -> dict[str, Any]:
    return {"catalog": str(r.catalog), "repository_id": r.repository_id,
            "imported": [asdict(i) for i in r.imported],
            "damaged": [{"manifest": n, "error": why} for n, why in r.damaged],
            "duplicates": list(r.duplicates),
            "replaced": None if r.replaced is None else str(r.replaced),
            "catalog_id": r.catalog_id, "foreign": r.foreign}


def forget_json(plan: ForgetPlan, forgotten: list[int], dry_run: bool) -> dict[str, Any]:
    return {"dry_run": dry_run, "forgotten": forgotten,
            "backups": [{"vm_id": vm, "backup_id": d.backup_id, "started": d.started,
                         "keep": d.keep, "reasons": list(d.reasons)}
                        for vm, d in plan.decisions]}


def prune_json(r: PruneReport) -> dict[str, Any]:
    return asdict(r)


def copied_line(c: Copied) -> str:
    """One backup of a `oneback copy`, for people."""
    head = f"backup {c.backup_id} (VM {c.vm_id})"
    if c.outcome == "failed":
        return f"{head}: FAILED: {c.error}"
    if c.outcome == "present":
        return f"{head}: already in the target (target backup {c.target_backup_id})"
    if c.outcome == "gone":
        return f"{head}: forgotten in the source meanwhile; skipped"
    if c.outcome == "registered":
        return (f"{head}: its copy was complete (an earlier run was stopped); entered as"
                f" target backup {c.target_backup_id}")
    there = f", {c.chunks - c.sent} already there" if c.sent < c.chunks else ""
    return (f"{head} -> target backup {c.target_backup_id}: {c.sent} of {c.chunks} chunk(s)"
            f" sent ({human_bytes(c.bytes_sent)}){there}")


def copy_json(r: CopyReport) -> dict[str, Any]:
    return {"target": r.target, "repository": r.repository, "translated": r.translated,
            "seconds": round(r.seconds, 3), "chunks_sent": r.sent, "bytes_sent": r.bytes_sent,
            "failed": len(r.failed), "backups": [asdict(c) for c in r.backups]}


def lag_json(lag: Lag, error: str | None, now: float) -> dict[str, Any]:
    """`oneback status --json`'s "copy": the target, how many backups it
    lacks, the age of the oldest of them, and the last copy error."""
    return {"target": lag.target, "pending": lag.pending, "oldest_finished": lag.oldest,
            "oldest_age": None if lag.oldest is None else round(max(0.0, now - lag.oldest), 3),
            "target_error": lag.error, "last_error": error}


def lag_lines(lag: Lag, error: str | None, now: float) -> list[str]:
    """`oneback status`'s lines on the copies."""
    if not lag.pending:
        head = f"copy to {lag.target}: up to date (lag 0)"
    else:
        age = int(max(0.0, now - (lag.oldest or now)))
        head = (f"copy to {lag.target}: lag {lag.pending} backup(s), the oldest finished"
                f" {age}s ago")
    lines = [head]
    if lag.error:
        lines.append(f"  target unreadable: {lag.error}")
    if error:
        lines.append(f"  last copy failed: {error}")
    return lines
