"""`oneback hooks install` is re-runnable and says what it changed: missing
hooks are created (one.hook.allocate), hooks whose template in oned differs
are replaced (one.hook.update) and the others left alone ("unchanged"); the
hooks oned then runs are the new ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.hookdefs import HOOKS
from tests.agentkit import Cloud, pattern
from tests.onesim.testing import wait_until

NAMES = {h.name for h in HOOKS}


def registered(cloud: Cloud) -> dict[str, tuple[int, dict[str, Any]]]:
    """oned's hooks by name: (id, template as a dict)."""
    pool = cloud.one.hookpool.info(-2, -1, -1)
    out = {}
    for h in pool.HOOK:
        tmpl = {k: str(v) for k, v in dict(h.TEMPLATE).items()}
        out[h.NAME] = (int(h.ID), tmpl)
    return out


def install(cloud: Cloud, *args: str) -> Any:
    r = cloud.call("hooks", "install", *args, "--json")
    assert r.code == 0, r.err
    return r.json()


def test_a_second_run_changes_nothing_and_says_unchanged(cloud: Cloud) -> None:
    first = install(cloud, "--command", "/opt/hooks/oneback-hook")
    assert {h["name"] for h in first} == NAMES
    assert all(h["action"] == "created" and h["created"] for h in first)
    before = registered(cloud)

    again = install(cloud, "--command", "/opt/hooks/oneback-hook")
    assert [(h["name"], h["id"], h["action"]) for h in again] == [
        (h["name"], h["id"], "unchanged") for h in first]
    assert not any(h["created"] or h["changed"] for h in again)
    assert registered(cloud) == before

    text = cloud.call("hooks", "install", "--command", "/opt/hooks/oneback-hook")
    assert text.code == 0, text.err
    lines = text.out.strip().splitlines()
    for h in first:
        assert f"hook {h['id']} {h['name']}: unchanged" in lines
    assert lines[-1] == f"0 created, 0 updated, {len(HOOKS)} unchanged"
    assert registered(cloud) == before


def test_a_hook_that_differs_is_updated_and_reported(cloud: Cloud) -> None:
    first = {h["name"]: h["id"] for h in install(cloud, "--command", "/opt/hooks/oneback-hook")}
    want = registered(cloud)
    hook_id = first["oneback-vm-running"]
    # someone edits one hook in oned (onehook update): another LCM state, an extra attribute
    tmpl = dict(want["oneback-vm-running"][1], LCM_STATE="PROLOG", ARGUMENTS_STDIN="yes")
    cloud.one.hook.update(hook_id, "\n".join(f'{k}="{v}"' for k, v in tmpl.items()), 0)
    assert registered(cloud)["oneback-vm-running"][1]["LCM_STATE"] == "PROLOG"
    # and one is deleted
    cloud.one.hook.delete(first["oneback-vm-detach"])

    text = cloud.call("hooks", "install", "--command", "/opt/hooks/oneback-hook")
    assert text.code == 0, text.err
    assert (f"hook {hook_id} oneback-vm-running: updated (ARGUMENTS_STDIN, LCM_STATE)"
            in text.out.splitlines()), text.out
    assert "1 created, 1 updated, 4 unchanged" in text.out
    now = registered(cloud)
    assert now["oneback-vm-running"] == (hook_id, want["oneback-vm-running"][1])
    assert {k: v for k, v in now.items() if k != "oneback-vm-detach"} == {
        k: v for k, v in want.items() if k != "oneback-vm-detach"}
    assert now["oneback-vm-detach"][1] == want["oneback-vm-detach"][1]

    final = install(cloud, "--command", "/opt/hooks/oneback-hook")
    assert {h["action"] for h in final} == {"unchanged"}


def test_a_new_command_path_updates_every_hook_and_oned_runs_the_new_one(
        cloud: Cloud, tmp_path: Path) -> None:
    old = tmp_path / "old-hook"
    new = tmp_path / "new-hook"
    for script in (old, new):
        script.write_text(f"#!/bin/sh\necho \"$1 $2\" >> {script}.ran\n")
        script.chmod(0o755)
    first = install(cloud, "--command", str(old))
    moved = install(cloud, "--command", str(new))
    assert [(h["id"], h["action"]) for h in moved] == [(h["id"], "updated") for h in first]
    assert all(h["changed"] == ["COMMAND"] for h in moved)
    assert all(t["COMMAND"] == str(new) for _, t in registered(cloud).values())

    vm = cloud.vm("hk", [cloud.image("hk0", pattern(1024 * 1024, 3))])
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)     # oneback-vm-update fires
    ran = Path(f"{new}.ran")
    wait_until(lambda: ran.exists() and "api one.vm.update" in ran.read_text(), 30, 0.05)
    assert not Path(f"{old}.ran").exists()


def test_a_hook_of_the_other_type_under_our_name_is_refused_in_one_line(cloud: Cloud) -> None:
    squatter = cloud.one.hook.allocate(
        'NAME="oneback-vm-update"\nTYPE="state"\nRESOURCE="VM"\nON="RUNNING"\n'
        'COMMAND="/bin/true"')
    r = cloud.call("hooks", "install")
    assert r.code == 7, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and f"onehook delete {squatter}" in lines[0], r.err
    # refused before any change: nothing was created beside it
    assert list(registered(cloud)) == ["oneback-vm-update"]
