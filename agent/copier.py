"""The agent's copies: every new backup into the `[copy] to` repository.

Owns: the copier thread the agent starts when `[copy]` is configured.
Level-triggered: every TICK it compares the source catalog's backups with
what the target listed at its last pass; when one is missing (and, with
`[copy] interval`, that many seconds have passed since the last pass) it
opens the target and copies every source backup the target lacks
(`agent.copy`). An event lost, a pass killed or a target unreachable for a
day does no harm: the next pass finds the difference again. A failing pass
backs off (`[agent] retry_base`, doubled per failure, at most
`max_backoff`) and is recorded in the catalog under `copy.BACKOFF_KEY`, so
`oneback status` shows it beside the lag. Must not: print (one log line per
pass), or hold up backups (it runs beside them, on its own thread).
"""

from __future__ import annotations

import logging
import threading
import time

from agent import copy
from agent.catalog import Catalog
from agent.config import Config
from agent.errors import Interrupted, OnebackError
from agent.store import Repository

log = logging.getLogger("oneback.agent")
TICK = 1.0
"""Seconds between two looks at the source catalog (two cheap queries)."""


def _event(name: str, /, **fields: object) -> None:
    log.info(name, extra={"fields": fields})


def start_copier(cfg: Config, store: Repository, catalog: Catalog,
                 stop: threading.Event) -> threading.Thread | None:
    """The copier on its own thread until `stop` (None without `[copy]`)."""
    if cfg.copy is None:
        return None
    t = threading.Thread(target=run_copier, name="oneback-copy", daemon=True,
                         args=(cfg, store, catalog, stop))
    t.start()
    return t


def run_copier(cfg: Config, store: Repository, catalog: Catalog,
               stop: threading.Event) -> None:
    assert cfg.copy is not None
    interval = cfg.copy.interval
    copied: set[str] = set()      # manifests the target listed at the last pass
    next_try = 0.0                # wall clock: not before (a pass failed)
    next_pass = 0.0               # monotonic: with an interval, not before
    while not stop.wait(TICK):
        try:
            behind = set(catalog.manifest_names()) - copied
        except Exception as e:   # the catalog is busy: next tick
            _event("copy.failed", error=_error(e))
            continue
        if not behind or time.time() < next_try:
            continue
        if interval is not None:
            if time.monotonic() < next_pass:
                continue
            next_pass = time.monotonic() + interval
        try:
            copied = _pass(cfg, store, catalog, stop)
        except Interrupted:
            return
        except Exception as e:   # the target is unreachable, a chunk damaged...: back off
            error = _error(e)
            try:
                b = catalog.backoff_fail(copy.BACKOFF_KEY, f"copy to {cfg.copy.to}", error,
                                         vm_id=None, base=cfg.agent.retry_base,
                                         cap=cfg.agent.max_backoff)
                next_try = b.next_try
                _event("copy.failed", error=error, failures=b.failures, retry_at=b.next_try)
            except Exception as e2:
                next_try = time.time() + cfg.agent.retry_base
                _event("copy.failed", error=error, backoff_error=_error(e2))
            continue
        next_try = 0.0
        try:
            catalog.backoff_clear(copy.BACKOFF_KEY)
        except Exception as e:
            _event("backoff.clear_failed", key=copy.BACKOFF_KEY, error=_error(e))


def _pass(cfg: Config, store: Repository, catalog: Catalog,
          stop: threading.Event) -> set[str]:
    """Copy every backup the target lacks; the manifests it lists after."""
    assert cfg.copy is not None
    with copy.open_target(cfg.copy.to, source_id=getattr(store, "id", None),
                          lock_days=cfg.copy.lock_days) as target:
        missing = {n for _, n in copy.pending(catalog, target.catalog)}
        wanted = [w for w in copy.select(catalog) if w.manifest in missing]
        if wanted:
            report = copy.copy_backups(store, wanted, target, workers=cfg.storage.workers,
                                       cancel=stop)
            _event("copy.done", target=str(cfg.copy.to),
                   copied=[c.backup_id for c in report.backups
                           if c.outcome in ("copied", "registered")],
                   chunks_sent=report.sent, bytes_sent=report.bytes_sent,
                   failed=[c.backup_id for c in report.failed],
                   seconds=round(report.seconds, 3))
            error = copy.failure(report)
            if error is not None:
                raise error
        return set(target.catalog.manifest_names())


def _error(e: BaseException) -> str:
    if isinstance(e, OnebackError):
        return e.message
    return f"internal error: {type(e).__name__}: {e}"
