"""A restore touches only what it created: every cloud object is made under a
unique temporary name and renamed last, so a refusal, a kill or a cleanup
never removes a VM or image a user named; leftovers are reported; `export`
replaces a file only once the new one is complete; odd VM names and values
survive; restored objects go back to their owners."""

from __future__ import annotations

from typing import Any

import pytest

from agent.vmtemplate import quote
from tests.agentkit import BLOCK, Cloud, MiB, pattern
from tests.onesim.templates import parse
from tests.onesim.testing import client, wait_until, wait_vm

DISK = 1 * MiB
RUNNING = (3, 3)


def tmp_objects(c: Cloud) -> list[str]:
    """Every VM (not DONE), template and image named oneback-tmp, and all of
    agentkit's leftovers (snapshots, proxy disks)."""
    found = list(c.leftovers())
    for vm in c.one.vmpool.info(-2, -1, -1, -1).VM:
        if vm.NAME.startswith("oneback-tmp"):
            found.append(f"vm {vm.ID} {vm.NAME}")
    for t in c.one.templatepool.info(-2, -1, -1).VMTEMPLATE:
        if t.NAME.startswith("oneback-tmp"):
            found.append(f"template {t.ID} {t.NAME}")
    return found


def state(c: Cloud, vm_id: int) -> tuple[int, int]:
    info = c.one.vm.info(vm_id)
    return int(info.STATE), int(info.LCM_STATE)


def vm_ids(c: Cloud) -> set[int]:
    return {int(v.ID) for v in c.one.vmpool.info(-2, -1, -1, -1).VM}


def image_ids(c: Cloud) -> set[int]:
    return {int(i.ID) for i in c.one.imagepool.info(-2, -1, -1).IMAGE}


@pytest.fixture
def production(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    """A RUNNING VM `web` (a user's production VM), and a backup of another
    VM `app`, to be restored under the name `web`."""
    web = cloud.vm("web", [cloud.image("web0", pattern(DISK, 1))])
    app = cloud.vm("app", [cloud.image("app0", pattern(DISK, 2)),
                           cloud.image("app1", pattern(DISK, 3))])
    r = cloud.run("backup", str(app), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return {"web": web, "app": app, "backup": r.json()["backup_id"]}


# -- a failure touches only what oneback created -------------------------------


def test_restore_named_like_a_running_vm_refused_at_instantiate_leaves_it_running(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], production: dict[str, int]) -> None:
    web = production["web"]
    vms, images = vm_ids(cloud), image_ids(cloud)
    cloud.sim.faults.fail_call("one.template.instantiate", "injected refusal", code=0x800)
    r = cloud.run("restore", str(production["backup"]), "--name", "web", capsys=capsys)
    assert r.code == 4, r.err
    assert "instantiating the VM" in r.err and "injected refusal" in r.err
    assert "everything this restore created was removed" in r.err
    assert state(cloud, web) == RUNNING
    assert cloud.one.vm.info(web).NAME == "web"
    assert vm_ids(cloud) == vms and image_ids(cloud) == images
    assert cloud.run("cleanup", capsys=capsys).code == 0
    assert state(cloud, web) == RUNNING
    assert tmp_objects(cloud) == []


def test_restore_killed_during_instantiate_then_cleanup_leaves_the_namesake_running(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], production: dict[str, int]) -> None:
    web = production["web"]
    before = vm_ids(cloud)
    cloud.sim.faults.delay_call("one.template.instantiate", 2.0, count=1)
    cloud.kill_during("one.template.instantiate",
                      "restore", str(production["backup"]), "--name", "web")
    # oned goes on with the call the dead process made: a new VM appears
    new = wait_until(lambda: vm_ids(cloud) - before or None, timeout=20)
    for vm_id in new:
        wait_vm(cloud.one, vm_id, "ACTIVE", "RUNNING", timeout=20)
    r = cloud.run("cleanup", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert state(cloud, web) == RUNNING
    assert cloud.one.vm.info(web).NAME == "web"
    assert all(int(cloud.one.vm.info(v).STATE) == 6 for v in new)   # DONE
    assert tmp_objects(cloud) == []


def test_killed_after_the_commit_keeps_the_renamed_vm(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], production: dict[str, int]) -> None:
    """Renaming is the commit: once the VM has its final name no sweep removes it."""
    before = vm_ids(cloud)
    cloud.sim.faults.delay_call("one.vm.rename", 2.0, count=1)
    cloud.kill_during("one.vm.rename",
                      "restore", str(production["backup"]), "--name", "again")
    (vm_id,) = vm_ids(cloud) - before
    wait_until(lambda: cloud.one.vm.info(vm_id).NAME == "again", timeout=20)
    r = cloud.run("cleanup", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert any("vm oneback-tmp" in k for k in r.json()["kept"])
    assert state(cloud, vm_id) == RUNNING
    names = {cloud.one.image.info(int(d["IMAGE_ID"])).NAME for d in _disks(cloud, vm_id).values()}
    assert names == {"again-disk0", "again-disk1"}
    assert tmp_objects(cloud) == []


def _disks(c: Cloud, vm_id: int) -> dict[int, Any]:
    ds = c.one.vm.info(vm_id).TEMPLATE.get("DISK", [])
    ds = ds if isinstance(ds, list) else [ds]
    return {int(d["DISK_ID"]): d for d in ds}


def test_cleanup_spares_a_users_object_that_only_looks_like_a_leftover(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    uid = int(cloud.one.user.allocate("mallory", "pw", "core", []))
    img = cloud.image("oneback-tmp-0badc0de-1234abcd-x", b"\1" * BLOCK)
    cloud.one.image.chown(img, uid, -1)
    r = cloud.run("cleanup", capsys=capsys)
    assert r.code == 0, r.err
    assert cloud.one.image.info(img).NAME == "oneback-tmp-0badc0de-1234abcd-x"


@pytest.mark.parametrize("command", ["restore", "restore-disk"])
def test_a_failed_detach_fails_the_restore_and_cleanup_removes_it(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], production: dict[str, int],
        command: str) -> None:
    """The disk the proxy wrote is the restored image itself (a persistent
    image, linked, not saved as another): when its detach fails it is still
    the proxy's disk and no VM can use it, so the restore fails, names what
    it could not remove, and `oneback cleanup` removes it."""
    images_before = {i.ID for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE}
    vms_before = {v.ID for v in cloud.one.vmpool.info(-2, -1, -1, -1).VM}
    cloud.sim.faults.fail_driver("detach", count=1)
    args = [str(production["backup"])] + (["1"] if command == "restore-disk" else [])
    r = cloud.run(command, *args, "--json", capsys=capsys)
    assert r.code == 4, r.err
    assert "still attached to the proxy VM" in r.err
    assert "attachment" in r.err and "was not removed" in r.err
    assert "oneback cleanup" in r.err
    assert cloud.run("cleanup", capsys=capsys).code == 0
    assert tmp_objects(cloud) == []
    assert {i.ID for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE} == images_before
    assert {v.ID for v in cloud.one.vmpool.info(-2, -1, -1, -1).VM} == vms_before
    r = cloud.run(command, *args, "--name", "second", capsys=capsys)   # then it works
    assert r.code == 0, r.err
    assert tmp_objects(cloud) == []


# -- export replaces a file only when the new one is complete ----------------------


def test_export_keeps_a_good_file_when_a_chunk_is_damaged(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], production: dict[str, int]) -> None:
    out_dir = cloud.tmp / "exports"
    out_dir.mkdir()
    out = out_dir / "disk0.raw"
    out.write_bytes(b"old contents")
    r = cloud.run("export", str(production["backup"]), "0", "-o", str(out), capsys=capsys)
    assert r.code == 0, r.err
    good = pattern(DISK, 2)
    assert out.read_bytes() == good
    assert sorted(p.name for p in out_dir.iterdir()) == ["disk0.raw"]

    for p in sorted(q for q in (cloud.tmp / "repo" / "chunks").rglob("*") if q.is_file()):
        p.chmod(0o644)
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    r = cloud.run("export", str(production["backup"]), "0", "-o", str(out), capsys=capsys)
    assert r.code == 9, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert out.read_bytes() == good
    assert sorted(p.name for p in out_dir.iterdir()) == ["disk0.raw"]

    r = cloud.run("export", str(production["backup"]), "0", "-o",
                  str(cloud.tmp / "missing" / "x.raw"), capsys=capsys)
    assert r.code == 10 and "missing" in r.err and len(r.err.strip().splitlines()) == 1


# -- odd names and values ------------------------------------------------------------

ODD = 'web & "db" <ü>'
ODD_VALUES = {
    "NOTE": 'a "q" & <b> \\ ü \'s',
    "ENDS_IN_BACKSLASH": "c:\\temp\\",
    "HAS_CDATA_END": "x ]]> y",
    "QUOTED_BACKSLASH": 'say \\"hi\\"',
}


@pytest.mark.parametrize("value", [*ODD_VALUES.values(), "plain", "", "multi\nline ]]> z"])
def test_quote_reads_back_as_the_value_through_oneds_grammar(value: str) -> None:
    # vmtemplate writes each vector value on its own line, as here
    assert parse(f"K={quote(value)}\nL=[\n  A={quote(value)},\n  B=\"1\" ]\n").attrs == [
        ("K", value.strip()), ("L", {"A": value.strip(), "B": "1"})]


def test_vm_with_an_odd_name_backs_up_and_restores_without_name(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    img = cloud.image("odd0", pattern(DISK, 7))
    template = int(cloud.one.template.allocate(
        f'NAME="odd-tpl"\nCPU="0.1"\nMEMORY="64"\nDISK=[IMAGE_ID="{img}"]\n'
        f'DESCRIPTION={quote(ODD)}\nCONTEXT=[NETWORK="YES", TOKEN="YES"]'))
    # oned refuses such a name today; a VM from before it did keeps it
    vm = int(cloud.one.template.instantiate(template, ODD, False, "", False))
    wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    cloud.one.vm.update(vm, "\n".join(f"{k}={quote(v)}" for k, v in ODD_VALUES.items()), 1)
    user_template = cloud.one.vm.info(vm).USER_TEMPLATE
    assert {k: user_template.get(k) for k in ODD_VALUES} == ODD_VALUES

    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    backup = r.json()["backup_id"]
    r = cloud.run("restore", str(backup), "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc = r.json()
    info = cloud.one.vm.info(doc["vm_id"])
    assert (int(info.STATE), int(info.LCM_STATE)) == RUNNING
    assert info.NAME == doc["name"] == f"web _ _db_ _ü_-restored-{backup}"
    assert {k: info.USER_TEMPLATE.get(k) for k in ODD_VALUES} == ODD_VALUES
    assert info.USER_TEMPLATE.get("DESCRIPTION") == ODD
    assert cloud.disk_path(doc["vm_id"], 0).read_bytes() == pattern(DISK, 7)
    image = cloud.one.image.info(doc["images"][0]["image_id"])
    assert image.NAME == f"web _ _db_ _ü_-restored-{backup}-disk0"

    r = cloud.run("restore", str(backup), "--name", "a&b", capsys=capsys)
    assert r.code == 2 and "'&'" in r.err and "--name" in r.err
    assert tmp_objects(cloud) == []


# -- owners ---------------------------------------------------------------------------


def test_restored_vm_and_images_go_back_to_their_owner(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    alice = int(cloud.one.user.allocate("alice", "pw", "core", []))
    bob = int(cloud.one.user.allocate("bob", "pw", "core", []))
    owned: dict[int, dict[str, int]] = {}
    for uid, seed in ((alice, 11), (bob, 12)):
        img = cloud.image(f"img-{uid}", pattern(DISK, seed))
        cloud.one.image.chown(img, uid, 1)
        vm = cloud.vm(f"vm-{uid}", [img])
        cloud.one.vm.chown(vm, uid, 1)
        r = cloud.run("backup", str(vm), "--json", capsys=capsys)
        assert r.code == 0, r.err
        owned[uid] = {"vm": vm, "backup": r.json()["backup_id"]}
    cloud.one.user.delete(bob)

    r = cloud.run("restore", str(owned[alice]["backup"]), "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["notes"] == []
    info = cloud.one.vm.info(doc["vm_id"])
    assert (int(info.UID), int(info.GID)) == (alice, 1)
    image = cloud.one.image.info(doc["images"][0]["image_id"])
    assert (int(image.UID), int(image.GID)) == (alice, 1)
    assert image.NAME == f"vm-{alice}-restored-{owned[alice]['backup']}-disk0"
    # alice can use what is hers
    as_alice = client(cloud.sim, "alice", "pw")
    assert int(as_alice.vm.info(doc["vm_id"]).ID) == doc["vm_id"]

    r = cloud.run("restore", str(owned[bob]["backup"]), capsys=capsys)
    assert r.code == 0, r.err
    assert "note: VM " in r.out and f"user {bob} no longer exists" in r.out
    new = int(r.out.split(" as VM ")[1].split()[0])
    info = cloud.one.vm.info(new)
    assert (int(info.UID), int(info.GID)) == (0, 1)   # oneback's user, bob's group

    r = cloud.run("restore-disk", str(owned[alice]["backup"]), "0", "--name", "alone", "--json",
                  capsys=capsys)
    assert r.code == 0, r.err
    image = cloud.one.image.info(r.json()["image_id"])
    assert (int(image.UID), int(image.GID)) == (alice, 1)
    assert tmp_objects(cloud) == []


def test_onesim_rename_and_chown_check_as_oned(cloud: Cloud) -> None:
    """one.image.rename / one.image.chown / one.vm.rename refuse as
    SharedAPI::rename and ::chown do."""
    a = cloud.image("ren-a", b"\1" * BLOCK)
    b = cloud.image("ren-b", b"\2" * BLOCK)
    with pytest.raises(Exception, match="collides with image"):
        cloud.one.image.rename(b, "ren-a")
    with pytest.raises(Exception, match="char '&' is not allowed"):
        cloud.one.image.rename(b, "x&y")
    with pytest.raises(Exception, match=r"Error getting user \[99\]"):
        cloud.one.image.chown(a, 99, -1)
    uid = int(cloud.one.user.allocate("carol", "pw", "core", []))
    cloud.one.image.chown(a, uid, -1)
    cloud.one.image.rename(b, "ren-a")          # names are unique per owner
    with pytest.raises(Exception, match=r"already owns image \[\d+\] with NAME ren-a"):
        cloud.one.image.chown(b, uid, -1)
    vm = cloud.vm("ren-vm", [])
    cloud.one.vm.rename(vm, "web")
    other = cloud.vm("ren-vm2", [])
    cloud.one.vm.rename(other, "web")          # VM names need not be unique
    with pytest.raises(Exception, match="char '<' is not allowed"):
        cloud.one.vm.rename(vm, "a<b")
    with pytest.raises(Exception, match="oneadmin cannot be deleted"):
        cloud.one.user.delete(0)
