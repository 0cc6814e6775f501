"""Users other than oneadmin: ownership, permission bits, default ACLs and
oned's AUTHORIZATION messages."""

from __future__ import annotations

from typing import Any

import pyone
import pytest

from tests.onesim import Simulator
from tests.onesim.testing import client, create_datablock, create_vm, wait_vm


@pytest.fixture
def bob(one: Any, onesim: Simulator) -> Any:
    uid = one.user.allocate("bob", "secret", "core", [])
    assert uid == 2  # 0 oneadmin, 1 serveradmin
    return client(onesim, "bob", "secret")


def test_new_user_joins_the_users_group(one: Any, bob: Any) -> None:
    me = bob.user.info(-1)
    assert (me.ID, me.NAME, me.GID, me.GNAME, me.GROUPS.ID) == (2, "bob", 1, "users", [1])
    assert "TOKEN_PASSWORD" in me.TEMPLATE
    with pytest.raises(pyone.OneException, match="NAME is already taken by USER 2"):
        one.user.allocate("bob", "x", "core", [])
    with pytest.raises(pyone.OneAuthorizationException,
                       match=r"\[one.user.info\] User \[2\] : Not authorized to perform USE "
                             r"USER \[0\]."):
        bob.user.info(0)


def test_users_cannot_touch_each_others_vms(one: Any, onesim: Simulator, bob: Any) -> None:
    vid = create_vm(one, onesim, "admins", [{"TYPE": "fs", "SIZE": 1}])
    with pytest.raises(pyone.OneAuthorizationException,
                       match=r"^\[one.vm.info\] User \[2\] : Not authorized to perform USE VM "
                             rf"\[{vid}\].$"):
        bob.vm.info(vid)
    with pytest.raises(pyone.OneAuthorizationException,
                       match=rf"Not authorized to perform MANAGE VM \[{vid}\]"):
        bob.vm.action("poweroff", vid)
    with pytest.raises(pyone.OneAuthorizationException):
        bob.vm.detach(vid, 0)  # detach authorizes before it looks at the disk
    assert bob.vmpool.info(-2, -1, -1, -1).VM == []
    one.vm.chmod(vid, -1, -1, -1, -1, -1, -1, 1, 0, 0)  # OTHER_U
    assert bob.vm.info(vid).ID == vid
    assert [v.ID for v in bob.vmpool.info(-2, -1, -1, -1).VM] == [vid]
    assert bob.vmpool.info(-3, -1, -1, -1).VM == []  # not his
    with pytest.raises(pyone.OneAuthorizationException, match="MANAGE VM"):
        bob.vm.action("poweroff", vid)


def test_a_user_manages_his_own_images_and_vms(one: Any, onesim: Simulator, bob: Any) -> None:
    iid = create_datablock(bob, "mine", 1)
    img = bob.image.info(iid)
    assert (img.UID, img.GID, img.UNAME) == (2, 1, "bob")
    assert (img.PERMISSIONS.OWNER_U, img.PERMISSIONS.OWNER_M, img.PERMISSIONS.GROUP_U) == (1, 1, 0)
    vid = create_vm(bob, onesim, "his", [iid])
    bob.vm.action("poweroff", vid)
    wait_vm(bob, vid, "POWEROFF")
    assert [v.ID for v in bob.vmpool.info(-3, -1, -1, -1).VM] == [vid]
    assert [v.ID for v in one.vmpool.info(2, -1, -1, -1).VM] == [vid]
    with pytest.raises(pyone.OneAuthorizationException,
                       match=rf"Not authorized to perform ADMIN VM \[{vid}\]"):
        bob.vm.action("resched", vid)
    with pytest.raises(pyone.OneAuthorizationException):
        bob.vm.deploy(vid, 0, False, -1)


def test_images_of_others_cannot_be_attached(one: Any, onesim: Simulator, bob: Any) -> None:
    theirs = create_datablock(one, "admins", 1)
    vid = create_vm(bob, onesim, "his", [{"TYPE": "fs", "SIZE": 1}])
    with pytest.raises(pyone.OneAuthorizationException,
                       match=rf"Not authorized to perform USE IMAGE \[{theirs}\]"):
        bob.vm.attach(vid, f'DISK=[IMAGE_ID="{theirs}"]')
    with pytest.raises(pyone.OneAuthorizationException, match="Not authorized to perform "
                                                              "ADMIN HOOK"):
        bob.hookpool.info(-2, -1, -1)


def test_bad_password_is_refused(onesim: Simulator, bob: Any) -> None:
    with pytest.raises(pyone.OneAuthenticationException,
                       match=r"\[one.vm.info\] User couldn't be authenticated, aborting call."):
        client(onesim, "bob", "wrong").vm.info(0)
