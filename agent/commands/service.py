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
from agent.hookdefs import DEFAULT_COMMAND, plan
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
        unserved = rt.catalog.not_served()
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
                   "not_served": [{"vm_id": n.vm_id, "status": f"not served here ({n.reason})",
                                   "reason": n.reason, "since": n.since} for n in unserved],
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
    click.echo(f"not served here (another agent's proxy can attach them): {len(unserved)}")
    for n in unserved:
        click.echo(f"  VM {n.vm_id}: not served here ({n.reason})")
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
    """Register oneback's hooks in oned: create the missing ones, update those
    whose template differs (one.hook.update), leave the rest. Re-runnable."""
    if not command.startswith("/") or any(c in command for c in "\"'\n $`;|&"):
        raise UsageError(f"--command {command!r} must be an absolute path without spaces"
                         f" or shell characters")
    with runtime(config_file) as rt:
        done = []
        for step in plan(rt.cloud.hook_list(), command):
            if step.action == "create":
                hook_id = rt.cloud.hook_allocate(step.hook.template(command))
                result = "created"
            else:
                hook_id = step.id if step.id is not None else -1
                if step.action == "update":
                    rt.cloud.hook_update(hook_id, step.hook.update_template(command))
                result = "updated" if step.action == "update" else "unchanged"
            done.append((step, hook_id, result))
    if as_json:
        emit_json([{"name": s.hook.name, "id": i, "action": r, "created": r == "created",
                    "changed": list(s.changed)} for s, i, r in done])
        return
    for step, hook_id, result in done:
        what = f" ({', '.join(step.changed)})" if step.changed else ""
        click.echo(f"hook {hook_id} {step.hook.name}: {result}{what}")
    counts = {a: sum(r == a for _, _, r in done) for a in ("created", "updated", "unchanged")}
    click.echo(", ".join(f"{n} {a}" for a, n in counts.items()))
