"""Commands that run and watch the agent: `agent`, `status`, `hooks install`."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import click

from agent.commands import (
    cli,
    config_option,
    json_option,
    runtime,
)
from agent.errors import (
    UsageError,
)
from agent.hookdefs import DEFAULT_COMMAND, HOOKS
from agent.render import (
    JsonLogFormatter,
    backoff_json,
    emit_json,
    job_json,
    lag_json,
    lag_lines,
    verify_progress_json,
    verify_progress_lines,
)


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
        copy_lag, copy_error = None, None
        if rt.cfg.copy is not None:   # [copy]: how far the target is behind
            from agent import copy
            copy_lag = copy.lag(rt.catalog, rt.cfg.copy.to)
            copy_error = next((b.error for b in failing if b.key == copy.BACKOFF_KEY), None)
    now = time.time()
    if as_json:
        emit_json({"queued": [job_json(j) for j in queued],
                   "running": [job_json(j) for j in running],
                   "recent": [job_json(j) for j in recent],
                   "failing": [backoff_json(b) for b in failing],
                   "verify": {p.key: verify_progress_json(p) for p in checks},
                   "copy": None if copy_lag is None else lag_json(copy_lag, copy_error, now)})
        return
    for title, jobs in (("running", running), ("queued", queued), ("recent", recent)):
        click.echo(f"{title}: {len(jobs)}")
        for j in jobs:
            what = j.error or j.result or j.reason
            click.echo(f"  job {j.id}: VM {j.vm_id} {j.kind} {j.state}"
                       f" (attempt {j.attempts}) {what}")
    click.echo(f"failing (backing off): {len(failing)}")
    for b in failing:
        vm = f"VM {b.vm_id} " if b.vm_id is not None else ""
        wait = max(0, int(b.next_try - now))
        click.echo(f"  {vm}{b.what}: failed {b.failures} time(s) in a row, next try in"
                   f" {wait}s: {b.error}")
    for p in checks:
        for line in verify_progress_lines(p):
            click.echo(line)
    if copy_lag is not None:
        for line in lag_lines(copy_lag, copy_error, now):
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
