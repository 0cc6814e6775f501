"""The `snapshot` commands: create, list, revert, delete and expire disk
snapshots in OpenNebula."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import click

from agent.errors import (
    CloudError,
)
from agent.render import (
    delete_json,
    emit_json,
    set_json,
)

if TYPE_CHECKING:
    from agent.snapshots import DeleteResult
from agent.commands import (
    ONE_ID,
    cli,
    config_option,
    interruptible,
    json_option,
    runtime,
)


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
