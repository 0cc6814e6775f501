"""install/install.sh into a temporary root (`--root`), then the INSTALLED
oneback (the root's, not this checkout's) runs against onesim: `--version`,
`init`, a backup, `list`; the install is re-runnable (a second run changes
nothing and says so), never overwrites a configuration, writes the systemd
drop-in for a repository elsewhere, uninstalls (keeping configuration and
state) and purges; the hardened unit passes `systemd-analyze verify`.

How the program is installed here: the root gets its own virtualenv with
oneback built and installed (not editable) from a copy of this tree; its
dependencies come from the virtualenv running the tests (`--deps-from`,
a .pth file), so the test needs no package index and takes seconds. Set
ONEBACK_TEST_FULL_INSTALL=1 to install the dependencies from the package
index instead, as an operator's `install.sh` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agentkit import REPO, make_cloud, pattern

INSTALL = REPO / "install" / "install.sh"
EXAMPLE = REPO / "install" / "oneback.toml.example"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root: its mode and (for files) a hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = (0, os.readlink(p))
        elif p.is_file():
            out[rel] = (mode(p), hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = (mode(p), "")
    return out


def run_install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    program: list[str] = []
    if "--no-python" not in args and "--uninstall" not in args:
        program = ["--python", sys.executable]
        if os.environ.get("ONEBACK_TEST_FULL_INSTALL") != "1":
            if sys.prefix == sys.base_prefix:
                pytest.skip("the tests do not run in a virtualenv whose packages --deps-from"
                            " could reuse; set ONEBACK_TEST_FULL_INSTALL=1 to install from"
                            " the package index")
            program += ["--deps-from", sys.prefix]
    p = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-systemd",
                        *program, *args], capture_output=True, text=True, timeout=600,
                       cwd=root)
    assert p.returncode == 0, p.stderr + p.stdout
    return p


@dataclass
class Installed:
    root: Path
    first: str            # the first run's report
    again: str            # the second run's report
    tree_first: dict[str, tuple[int, str]]
    tree_again: dict[str, tuple[int, str]]

    @property
    def oneback(self) -> Path:
        return self.root / "usr" / "local" / "bin" / "oneback"

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ONEBACK", "PYTHON", "VIRTUAL_ENV"))}
        return subprocess.run([str(self.oneback), *args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("root")
    context = root / "run" / "one-context"
    context.mkdir(parents=True)
    (context / "one_env").write_text('export VMID="17"\nexport ETH0_IP="10.0.0.17"\n')
    first = run_install(root)
    tree_first = tree(root)
    again = run_install(root)
    yield Installed(root, first.stdout, again.stdout, tree_first, tree(root))


def test_install_lays_out_the_program_config_state_unit_and_filter(installed: Installed) -> None:
    r = installed.root
    etc, state = r / "etc" / "oneback", r / "var" / "lib" / "oneback"
    assert mode(etc) == 0o700 and mode(state) == 0o700
    for name in ("oneback.toml", "one_auth", "hook_secret"):
        assert mode(etc / name) == 0o600, name
    # the configuration is the example, with this VM's id read from its context once
    toml = (etc / "oneback.toml").read_text()
    assert re.search(r"^vm_id = 17 ", toml, re.M), toml
    assert toml.replace(re.search(r"^vm_id = .*$", toml, re.M).group(0), "") == (  # type: ignore
        EXAMPLE.read_text().replace(re.search(r"^vm_id = .*$", EXAMPLE.read_text(),
                                              re.M).group(0), ""))  # type: ignore
    assert len((etc / "hook_secret").read_text().strip()) >= 32
    unit = r / "etc" / "systemd" / "system" / "oneback.service"
    assert unit.read_text() == (REPO / "install" / "oneback.service").read_text()
    assert mode(unit) == 0o644
    assert (r / "etc" / "lvm" / "lvmlocal.conf").read_text() == (
        REPO / "install" / "lvmlocal.conf").read_text()
    assert mode(installed.oneback) == 0o755
    venv = r / "opt" / "oneback" / "venv"
    assert os.access(venv / "bin" / "oneback", os.X_OK)
    # the unit's ExecStart is what was installed (at its place under the root)
    exec_start = re.search(r"^ExecStart=(\S+)", unit.read_text(), re.M).group(1)  # type: ignore
    assert (r / exec_start.lstrip("/")) == venv / "bin" / "oneback"
    share = r / "opt" / "oneback" / "share"
    assert os.access(share / "hooks" / "oneback-hook", os.X_OK)
    assert os.access(share / "install" / "register-hooks.sh", os.X_OK)
    assert {p.name for p in (share / "hooks").iterdir()} == {
        p.name for p in (REPO / "hooks").iterdir()}
    # the checkout is not the installed copy, and stays clean
    assert not (REPO / "build").exists()
    assert "installed " in installed.first and "install.sh:" in installed.first


def test_a_second_run_changes_nothing_and_says_so(installed: Installed) -> None:
    assert installed.tree_again == installed.tree_first
    lines = installed.again.strip().splitlines()
    assert lines[-1] == "install.sh: nothing changed", installed.again
    verbs = {line.split()[0] for line in lines[:-1]}
    assert verbs <= {"unchanged", "kept", "skipped"}, installed.again
    assert "kept " + str(installed.root / "etc" / "oneback" / "oneback.toml") in lines


def test_the_installed_oneback_is_the_roots_and_backs_up_a_vm(
        installed: Installed, tmp_path: Path) -> None:
    venv = installed.root / "opt" / "oneback" / "venv"
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    version = installed.run("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("oneback, version")

    with make_cloud(tmp_path / "cloud") as cloud:
        # a configuration of its own for the installed copy: its repository
        # and catalog do not exist yet, so the installed `init` makes them
        text = cloud.config.read_text()
        work = tmp_path / "installed"
        work.mkdir()
        cfg = work / "oneback.toml"
        cfg.write_text(text.replace(str(cloud.tmp / "repo"), str(work / "repo")).replace(
            str(cloud.tmp / "catalog.sqlite"), str(work / "catalog.sqlite")))
        init = installed.run("--config", str(cfg), "init", "--json", cwd=tmp_path)
        assert init.returncode == 0, init.stderr
        assert (work / "repo").is_dir() and (work / "catalog.sqlite").exists()

        # The installed copy's doctor, against this cloud: what an operator
        # runs right after installing.
        doctor = installed.run("--config", str(cfg), "doctor", "--json", cwd=tmp_path)
        assert "Traceback" not in doctor.stderr, doctor.stderr
        checks = {c["name"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
        for name in ("config", "credentials", "oned", "oned version", "proxy VM"):
            assert checks.get(name) == "ok", (name, doctor.stdout)

        vm = cloud.vm("inst", [cloud.image("inst0", pattern(1024 * 1024, 5))])
        backup = installed.run("--config", str(cfg), "backup", str(vm), "--json", cwd=tmp_path)
        assert backup.returncode == 0, backup.stderr
        record = json.loads(backup.stdout)
        assert record["vm_id"] == vm and record["disks"][0]["bytes_read"] == 1024 * 1024
        listed = installed.run("--json", "--config", str(cfg), "list", cwd=tmp_path)
        assert [b["backup_id"] for b in json.loads(listed.stdout)] == [record["backup_id"]]
        assert cloud.leftovers() == []


def test_an_edited_configuration_is_kept_and_a_repository_elsewhere_gets_write_access(
        installed: Installed) -> None:
    r = installed.root
    cfg = r / "etc" / "oneback" / "oneback.toml"
    original = cfg.read_text()
    edited = original.replace('repository = "/var/lib/oneback/repo"',
                              'repository = "/srv/backup/oneback"')
    assert edited != original
    cfg.write_text(edited)
    dropin = r / "etc" / "systemd" / "system" / "oneback.service.d" / "paths.conf"
    try:
        out = run_install(r).stdout
        assert cfg.read_text() == edited                      # never overwritten
        assert f"created {dropin}" in out and out.strip().endswith("install.sh: 1 change(s)")
        assert "ReadWritePaths=/srv/backup/oneback\n" in dropin.read_text()
        assert "RequiresMountsFor=/srv/backup/oneback\n" in dropin.read_text()
        assert run_install(r).stdout.strip().endswith("nothing changed")
    finally:
        cfg.write_text(original)
    out = run_install(r).stdout
    assert not dropin.parent.exists() and f"removed {dropin.parent}" in out
    assert tree(r) == installed.tree_first


def test_the_unit_is_hardened_and_systemd_accepts_it(installed: Installed,
                                                     tmp_path: Path) -> None:
    unit = installed.root / "etc" / "systemd" / "system" / "oneback.service"
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    one = {k: v[-1] for k, v in settings.items()}
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict" and one["ReadWritePaths"] == "/var/lib/oneback"
    assert one["PrivateTmp"] == "yes" and one["ProtectHome"] == "yes"
    assert one["User"] == "oneback" and one["SupplementaryGroups"] == "disk"
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert settings["SystemCallFilter"][0] == "@system-service"
    assert one["DevicePolicy"] == "closed"
    assert all(d.endswith(" r") for d in settings["DeviceAllow"])   # read, never write
    assert "PrivateDevices" not in one     # it would hide the attached disks

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the unit's syntax is not verified")
    # verify checks that ExecStart exists: point it at the installed copy
    copy = tmp_path / "oneback.service"
    copy.write_text(unit.read_text().replace(
        "ExecStart=/opt/oneback/", f"ExecStart={installed.root}/opt/oneback/"))
    verify = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and str(copy) not in verify.stderr + verify.stdout, (
        verify.stderr)
    security = subprocess.run([analyze, "security", "--offline=true", str(copy)],
                              capture_output=True, text=True, timeout=60)
    if security.returncode == 0 or "exposure level" in security.stdout:
        level = re.search(r"exposure level for \S+: ([0-9.]+)", security.stdout)
        assert level and float(level.group(1)) <= 2.0, security.stdout[-400:]


def test_uninstall_keeps_config_and_state_and_purge_removes_them(installed: Installed) -> None:
    r = installed.root
    (r / "var" / "lib" / "oneback" / "catalog.sqlite").write_bytes(b"state")
    out = run_install(r, "--uninstall").stdout
    for gone in ("opt/oneback", "usr/local/bin/oneback", "etc/systemd/system/oneback.service"):
        assert not (r / gone).exists() and f"removed {r / gone}" in out, gone
    for kept in ("etc/oneback/oneback.toml", "etc/oneback/hook_secret",
                 "var/lib/oneback/catalog.sqlite", "etc/lvm/lvmlocal.conf"):
        assert (r / kept).exists(), kept
    again = run_install(r, "--uninstall").stdout
    assert again.strip().endswith("uninstalled, 0 change(s)") and "absent" in again

    purged = run_install(r, "--uninstall", "--purge").stdout
    for gone in ("etc/oneback", "var/lib/oneback", "etc/lvm/lvmlocal.conf"):
        assert not (r / gone).exists() and f"removed {r / gone}" in purged, gone


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    for args in (["--bogus"], ["--purge"], ["--root", str(tmp_path / "nope")]):
        p = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)


DEBIAN_LVMLOCAL = """\
# This is a local configuration file template.
#
# Refer to 'man lvm.conf' for information about the file layout.

local {
\t# system_id = ""
}
"""


def test_a_shipped_lvmlocal_gets_the_filter_appended_and_an_operators_is_kept(
        tmp_path: Path) -> None:
    ours = (REPO / "install" / "lvmlocal.conf").read_text()
    root = tmp_path / "debian"
    lvm = root / "etc" / "lvm" / "lvmlocal.conf"
    lvm.parent.mkdir(parents=True)
    lvm.write_text(DEBIAN_LVMLOCAL)
    out = run_install(root, "--no-python").stdout
    assert f"updated {lvm}" in out
    assert lvm.read_text() == DEBIAN_LVMLOCAL + "\n" + ours
    assert (lvm.parent / "lvmlocal.conf.before-oneback").read_text() == DEBIAN_LVMLOCAL
    assert f"unchanged {lvm}" in run_install(root, "--no-python").stdout
    run_install(root, "--uninstall")
    assert lvm.read_text() == DEBIAN_LVMLOCAL + "\n" + ours     # uninstall keeps the filter
    run_install(root, "--uninstall", "--purge")
    assert lvm.read_text() == DEBIAN_LVMLOCAL                  # purge restores the original

    mine = tmp_path / "operator"
    lvm = mine / "etc" / "lvm" / "lvmlocal.conf"
    lvm.parent.mkdir(parents=True)
    text = 'devices {\n    global_filter = [ "a|^/dev/sda$|", "r|.*|" ]\n}\n'
    lvm.write_text(text)
    out = run_install(mine, "--no-python").stdout
    assert f"kept {lvm}" in out and lvm.read_text() == text


REAL_ROOT_SCRIPT = r"""
set -euo pipefail
# A private view of the system: what install.sh writes to /etc, /opt,
# /usr/local, /var, /run (and the user it adds) lands in overlays under $T.
for d in /etc /opt /usr/local /var /run /root; do
    mkdir -p "$T/ovl$d/u" "$T/ovl$d/w"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$T/ovl$d/u,workdir=$T/ovl$d/w" "$d"
done
chmod 711 /root            # the tests' interpreter lives under /root (pyenv)
if getent passwd oneback >/dev/null; then echo "oneback exists before the install"; exit 3; fi
mkdir -p /run/one-context
printf 'export VMID="42"\n' >/run/one-context/one_env
echo "== first"; bash "$INSTALL" "$@"
echo "== second"; bash "$INSTALL" "$@"
echo "== state"
id oneback
stat -c '%U %a %n' /etc/oneback /etc/oneback/* /var/lib/oneback
grep '^vm_id' /etc/oneback/oneback.toml
sed -i 's/FRONTEND/127.0.0.1/' /etc/oneback/oneback.toml
echo "== init"
/usr/local/bin/oneback --config /etc/oneback/oneback.toml init --json >/dev/null
stat -c '%U %n' /var/lib/oneback/repo /var/lib/oneback/catalog.sqlite
echo "== purge"
bash "$INSTALL" --uninstall --purge
getent passwd oneback || echo "no user oneback"
"""


def test_on_the_real_root_it_adds_the_user_owns_the_state_and_root_runs_as_it(
        tmp_path: Path) -> None:
    """install.sh on / itself, in a private mount namespace whose /etc, /opt,
    /usr/local, /var and /run are overlays: the oneback user (group disk)
    is created once, owns the configuration and the state, and `oneback`
    run as root creates the repository as that user."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t",
                            "tmpfs", "probe", str(tmp_path)], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    if os.environ.get("ONEBACK_TEST_FULL_INSTALL") != "1" and sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtualenv --deps-from could reuse")
    args = ["--python", sys.executable]
    if os.environ.get("ONEBACK_TEST_FULL_INSTALL") != "1":
        # the installed copy runs as user oneback and imports its dependencies
        # from this virtualenv: every directory on the way must let others in
        for d in [Path(sys.prefix).resolve(), *Path(sys.prefix).resolve().parents]:
            if not d.stat().st_mode & 0o001:
                pytest.skip(f"{d} (mode {d.stat().st_mode & 0o777:o}) keeps other users out,"
                            f" so user oneback cannot import the dependencies --deps-from"
                            f" {sys.prefix} lends it; clone elsewhere, or set"
                            " ONEBACK_TEST_FULL_INSTALL=1 to install them from the index")
        args += ["--deps-from", sys.prefix]
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c",
                        REAL_ROOT_SCRIPT, "install-test", *args],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "T": str(tmp_path), "INSTALL": str(INSTALL)})
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    first = out.split("== first\n")[1].split("== second\n")[0]
    second = out.split("== second\n")[1].split("== state\n")[0]
    state = out.split("== state\n")[1].split("== init\n")[0]
    init = out.split("== init\n")[1].split("== purge\n")[0]
    purge = out.split("== purge\n")[1]
    assert "created user oneback (groups: oneback, disk)" in first
    assert "skipped systemctl (systemd is not running here)" in first
    assert "unchanged user oneback" in second
    assert "install.sh: nothing changed" in second.splitlines(), second
    assert re.search(r"groups=\d+\(oneback\),\d+\(disk\)", state), state
    for line in ("oneback 700 /etc/oneback", "oneback 600 /etc/oneback/one_auth",
                 "oneback 600 /etc/oneback/hook_secret", "oneback 600 /etc/oneback/oneback.toml",
                 "oneback 700 /var/lib/oneback"):
        assert line in state.splitlines(), state
    assert "vm_id = 42 " in state
    # root's `oneback` ran as the agent's user: what it made is the agent's
    assert init.split() == ["oneback", "/var/lib/oneback/repo",
                            "oneback", "/var/lib/oneback/catalog.sqlite"], init
    assert "removed user oneback" in purge and "no user oneback" in purge
    # and nothing of it reached the real system
    assert not Path("/opt/oneback").exists() and not Path("/etc/oneback").exists()
    assert subprocess.run(["getent", "passwd", "oneback"]).returncode != 0
