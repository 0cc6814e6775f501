"""`oneback doctor` against onesim: all green on a good setup, then each
broken thing in turn named with its fix, and a non-zero exit."""

from __future__ import annotations

import shutil
import socket
from typing import Any

from tests.agentkit import REPO, Cloud, Result, write_config
from tests.agentproc import AgentProcess
from tests.onesim.testing import wait_vm

CHECKS = ["config", "credentials", "hook secret", "oned", "oned version", "proxy VM",
          "proxy disks", "devices", "lvm filter", "event bus", "control endpoint", "hooks",
          "repository"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def good_setup(c: Cloud) -> int:
    """The LVM filter installed, a hook secret, the agent on a fixed port."""
    lvm = c.tmp / "lvm" / "lvmlocal.conf"
    lvm.parent.mkdir()
    shutil.copy(REPO / "install" / "lvmlocal.conf", lvm)
    secret = c.tmp / "hook_secret"
    secret.write_text("s3cret-s3cret-s3cret-s3cret\n")
    secret.chmod(0o600)
    port = free_port()
    text = c.config.read_text().replace("device_timeout = 5",
                                        f'device_timeout = 5\nlvm_config = "{lvm}"')
    c.config.write_text(text + f"""
[agent]
listen = "127.0.0.1:{port}"
secret_file = "{secret}"
reconcile_interval = 60
""")
    return port


def doctor(c: Cloud) -> tuple[Result, dict[str, dict[str, str]]]:
    r = c.call("doctor", "--json", timeout=60)
    doc = r.json()
    assert set(doc) == {"ok", "checks"} and doc["ok"] == (r.code == 0), doc
    for check in doc["checks"]:
        assert set(check) == {"name", "status", "message"}, check
        assert check["status"] in ("ok", "warn", "fail") and "\n" not in check["message"]
    return r, {x["name"]: x for x in doc["checks"]}


def fails(c: Cloud, name: str, *fix: str) -> dict[str, dict[str, str]]:
    r, checks = doctor(c)
    assert r.code == 20, (r.code, r.err)
    assert checks[name]["status"] == "fail", checks
    for words in fix:
        assert words in checks[name]["message"], checks[name]
    assert f"({name}" in r.err or f", {name}" in r.err, r.err
    return checks


def test_doctor_is_green_on_a_good_setup_and_names_each_broken_thing(cloud: Cloud) -> None:
    port = good_setup(cloud)
    # Before the hooks are registered and the agent runs.
    checks = fails(cloud, "hooks", "oneback hooks install", "oneback-vm-running")
    assert checks["control endpoint"]["status"] == "warn"
    assert "nothing listens" in checks["control endpoint"]["message"]
    assert cloud.call("hooks", "install").code == 0
    a = AgentProcess(cloud)
    try:
        a.wait_event("agent.started")
        r, checks = doctor(cloud)
        assert r.code == 0, [c for c in checks.values() if c["status"] != "ok"]
        assert list(checks) == CHECKS
        assert {k: v["status"] for k, v in checks.items()} == dict.fromkeys(CHECKS, "ok")
        assert "7.4.0" in checks["oned version"]["message"]
        assert "powers the VM off hard" in checks["oned version"]["message"]
        assert "cluster 0 (default)" in checks["proxy VM"]["message"]
        assert f"127.0.0.1:{port}" in checks["control endpoint"]["message"]

        # The same as lines for people: one per check, exit 0.
        text = cloud.call("doctor")
        assert text.code == 0 and len(text.out.splitlines()) == len(CHECKS), text.out
        assert text.out.splitlines()[0].startswith("ok    config: ")

        auth = cloud.tmp / "one_auth"
        auth.chmod(0o644)
        checks = fails(cloud, "credentials", "mode 0644", f"chmod 600 {auth}")
        assert "oned" not in checks   # no session to try: fix the file first
        text = cloud.call("doctor")
        assert text.code == 20
        assert f"FAIL  credentials: credentials file {auth} has mode 0644" in text.out
        assert text.err.count("\n") == 1 and "credentials" in text.err
        auth.chmod(0o600)

        good = auth.read_text()
        auth.write_text(good.split(":")[0] + ":wrong-password\n")
        checks = fails(cloud, "oned", "Check the user:password in the credentials file")
        assert "hooks" not in checks and "proxy VM" not in checks
        auth.write_text(good)

        original = cloud.config.read_text()
        cloud.config.write_text(original.replace(f"vm_id = {cloud.proxy_id}", "vm_id = 4242"))
        fails(cloud, "proxy VM", "proxy VM 4242 does not exist", "set proxy.vm_id")
        cloud.config.write_text(original.replace(f'events = "{cloud.sim.events}"',
                                                 'events = "tcp://127.0.0.1:9"'))
        fails(cloud, "event bus", "tcp://127.0.0.1:9", "opennebula.events")
        cloud.config.write_text(original)

        repo = cloud.tmp / "repo"
        repo.rename(cloud.tmp / "repo.away")
        repo.mkdir()                                   # the filesystem is not mounted
        fails(cloud, "repository", str(repo), "mount it at")
        repo.rmdir()
        (cloud.tmp / "repo.away").rename(repo)

        other = cloud.tmp / "other"
        other.mkdir()
        write_config(other, cloud.sim, cloud.proxy_id)   # `oneback init`: another repository
        cloud.config.write_text(original.replace(f'repository = "{repo}"',
                                                 f'repository = "{other / "repo"}"'))
        fails(cloud, "repository", "is not the one catalog", "storage.repository")
        cloud.config.write_text(original)

        hook_id = cloud.one.hookpool.info(-2, -1, -1).HOOK[0].ID
        cloud.one.hook.delete(hook_id)
        fails(cloud, "hooks", "1 of oneback's 6 hooks", "oneback hooks install")
        assert cloud.call("hooks", "install").code == 0

        lvm = cloud.tmp / "lvm" / "lvmlocal.conf"
        lvm.write_text("devices {\n  # global_filter = [ \"r|.*|\" ]\n}\n")
        fails(cloud, "lvm filter", "install/lvmlocal.conf")
        lvm.unlink()
        fails(cloud, "lvm filter", f"no LVM filter at {lvm}")
        shutil.copy(REPO / "install" / "lvmlocal.conf", lvm)

        cloud.one.vm.action("poweroff", cloud.proxy_id)
        wait_vm(cloud.one, cloud.proxy_id, "POWEROFF")
        fails(cloud, "proxy VM", "is POWEROFF", f"onevm resume {cloud.proxy_id}")
    finally:
        a.stop()
    r, checks = doctor(cloud)   # the agent is gone: a warning, not a failure
    assert checks["control endpoint"]["status"] == "warn", checks
    assert "systemctl start oneback" in checks["control endpoint"]["message"]


def test_doctor_with_a_broken_config_says_only_that(cloud: Cloud) -> None:
    cloud.config.write_text(cloud.config.read_text() + "\n[nonsense]\n")
    r = cloud.call("doctor", "--json")
    assert r.code == 20, r.err
    doc: dict[str, Any] = r.json()
    assert doc["ok"] is False
    assert [(c["name"], c["status"]) for c in doc["checks"]] == [("config", "fail")]
    assert "unknown section [nonsense]" in doc["checks"][0]["message"]
