"""`oneback doctor`: is this proxy VM ready to back up, and if not, what to fix.

Owns: the list of checks and their order (configuration and file modes,
credentials against oned, oned's version and what depends on it, the proxy
VM, its devices and LVM filter, the event bus, the agent's control endpoint,
the hooks registered in oned, the repository and catalog), each ending as
one `Check`: ok, warn or fail, with one line naming what was found and the
fix. A check that cannot run because an earlier one failed (no oned
connection without credentials) is left out: fix the earlier one first.
Must not: print, change anything (every probe only reads, except the
repository's own write test), or raise for a broken system: that is what
it reports. Cloud calls go through `Cloud`, ZeroMQ through the subscriber,
devices through `devices`, the repository through `repository.open_checked`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent import config as config_mod
from agent import control, devices, subscriber
from agent.cloud import Cloud
from agent.config import Config
from agent.errors import ConfigError, NotFound, OnebackError
from agent.hookdefs import HOOKS
from agent.model import LCM_RUNNING, OBJECT_PREFIX, VM_ACTIVE
from agent.snapshots import REVERT_IN_POWEROFF_SINCE

OK, WARN, FAIL = "ok", "warn", "fail"
PROBE_TIMEOUT = 2.0           # seconds for the event bus and the control endpoint to answer
TESTED_SINCE = (6, 0, 0)      # older oned versions are not tested
LOW_SPACE = 1024 ** 3         # bytes free in the repository below which it warns
LOW_SHARE = 0.05              # ... or this share of its filesystem
VD_TARGETS = 26               # vda .. vdz: the targets oned gives DEV_PREFIX "vd" disks

T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    name: str
    status: str    # OK | WARN | FAIL
    message: str   # one line: what was found, and the fix


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == WARN]


class _Checks:
    """The checks run so far; `attempt` turns any error into a failed check."""

    def __init__(self) -> None:
        self.done: list[Check] = []

    def attempt(self, name: str, fn: Callable[[], tuple[Check, T]]) -> T | None:
        try:
            check, value = fn()
        except OnebackError as e:
            self.done.append(Check(name, FAIL, e.message))
            return None
        except Exception as e:   # a bug in a probe: reported, never raised
            self.done.append(Check(name, FAIL, f"internal error (please report):"
                                               f" {type(e).__name__}: {e}"))
            return None
        self.done.append(check)
        return value


def run(config_file: str | Path | None, *, probe_timeout: float = PROBE_TIMEOUT) -> Report:
    """Run every check that can run. Never raises for what it finds."""
    checks = _Checks()
    cfg = checks.attempt("config", lambda: _config(config_file))
    if cfg is None:
        return Report(tuple(checks.done))
    session = checks.attempt("credentials", lambda: _credentials(cfg))
    checks.attempt("hook secret", lambda: _secret(cfg))
    cloud = None
    if session is not None:
        cloud = checks.attempt("oned", lambda: _oned(cfg, session))
    if cloud is not None:
        checks.attempt("oned version", lambda: _version(cloud))
        vm = checks.attempt("proxy VM", lambda: _proxy(cfg, cloud))
        if vm is not None:
            checks.attempt("proxy disks", lambda: _proxy_disks(cfg, cloud))
    checks.attempt("devices", lambda: _devices(cfg))
    checks.attempt("lvm filter", lambda: _lvm(cfg.proxy.lvm_config))
    checks.attempt("event bus", lambda: _events(cfg, probe_timeout))
    checks.attempt("control endpoint", lambda: _control(cfg, probe_timeout))
    if cloud is not None:
        checks.attempt("hooks", lambda: _hooks(cloud))
    checks.attempt("repository", lambda: _repository(cfg))
    return Report(tuple(checks.done))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _config(config_file: str | Path | None) -> tuple[Check, Config]:
    cfg = config_mod.load(config_file)
    mode = _mode(cfg.source)
    if mode & 0o022:
        return Check("config", WARN, f"{cfg.source} is read, but others may write it (mode"
                     f" {mode:04o}): run 'chmod 600 {cfg.source}'"), cfg
    return Check("config", OK, f"{cfg.source} is read and valid (mode {mode:04o})"), cfg


def _credentials(cfg: Config) -> tuple[Check, str]:
    session = cfg.opennebula.read_credentials()   # ConfigError names mode and format
    path = cfg.opennebula.credentials_file
    return Check("credentials", OK, f"{path}: mode {_mode(path):04o}, one line for user"
                 f" {session.split(':', 1)[0]!r}"), session


def _secret(cfg: Config) -> tuple[Check, None]:
    cfg.agent.read_secret()
    path = cfg.agent.secret_file
    return Check("hook secret", OK, f"{path}: mode {_mode(path):04o}"), None


def _oned(cfg: Config, session: str) -> tuple[Check, Cloud]:
    one = cfg.opennebula
    cloud = Cloud(one.endpoint, session, timeout=one.timeout,
                  operation_timeout=one.operation_timeout, poll_interval=one.poll_interval)
    uid, name = cloud.whoami()
    return Check("oned", OK, f"{one.endpoint} accepts the credentials: user {name!r}"
                 f" (id {uid})"), cloud


def _version(cloud: Cloud) -> tuple[Check, None]:
    version = cloud.version()
    shown = ".".join(map(str, version))
    if version >= REVERT_IN_POWEROFF_SINCE:
        revert = (f"a snapshot-set revert powers the VM off hard (oned >="
                  f" {'.'.join(map(str, REVERT_IN_POWEROFF_SINCE))} refuses SUSPENDED)")
    else:
        revert = "a snapshot-set revert suspends the VM (oned < 6.6.3)"
    if version < TESTED_SINCE:
        return Check("oned version", WARN, f"OpenNebula {shown} is older than oneback is tested"
                     f" with ({'.'.join(map(str, TESTED_SINCE))}+): upgrade OpenNebula;"
                     f" {revert}"), None
    return Check("oned version", OK, f"OpenNebula {shown}: {revert}"), None


def _proxy(cfg: Config, cloud: Cloud) -> tuple[Check, int]:
    vm_id = cfg.proxy.vm_id
    try:
        vm = cloud.vm(vm_id)
    except NotFound:
        raise NotFound(f"proxy VM {vm_id} does not exist in OpenNebula: set proxy.vm_id to"
                       f" the id of the VM oneback runs in (or \"auto\")") from None
    if not (vm.state == VM_ACTIVE and vm.lcm_state == LCM_RUNNING):
        return Check("proxy VM", FAIL, f"proxy VM {vm_id} ({vm.name}) is {vm.state_name}; it"
                     f" must be RUNNING to take the disks it reads: 'onevm resume {vm_id}'"
                     f" (or deploy it), or set proxy.vm_id to the VM oneback runs in"), vm_id
    where = cloud.vm_cluster(vm_id)
    if where is None:
        place = "but has no placement record"
    else:
        cid, cname, _, host = where
        place = (f"on host {host or '?'} in cluster {cid} ({cname or '?'}): it attaches images"
                 f" from the datastores of that cluster")
        # oned checks an image's datastore against the proxy VM's own cluster
        # (VirtualMachineDisks::set_up_attach): any other listed one is wrong
        other = sorted(set(cfg.agent.clusters or ()) - {cid})
        if other:
            return Check("proxy VM", WARN, f"proxy VM {vm_id} ({vm.name}) runs in cluster {cid}"
                         f" but agent.clusters also lists {', '.join(map(str, other))}: oned"
                         f" attaches to it only images of datastores in cluster {cid}, so its"
                         f" backups of VMs there fail; set agent.clusters = [{cid}] or leave"
                         f" it out"), vm_id
    return Check("proxy VM", OK, f"proxy VM {vm_id} ({vm.name}) is RUNNING {place}"), vm_id


def _proxy_disks(cfg: Config, cloud: Cloud) -> tuple[Check, None]:
    vm = cloud.vm(cfg.proxy.vm_id)
    ours = [d for d in vm.disks if d.serial.startswith(OBJECT_PREFIX)]
    used = {d.target for d in vm.disks if d.target.startswith("vd")}
    free = VD_TARGETS - len(used)
    want = cfg.agent.max_attached
    if ours:
        return Check("proxy disks", WARN, f"{len(ours)} disk(s) oneback attached are on the"
                     f" proxy VM now (disk {', '.join(str(d.disk_id) for d in ours)}): a backup"
                     f" is running, or they are leftovers: 'oneback cleanup' removes those"), None
    if free < want:
        return Check("proxy disks", WARN, f"only {free} free vd targets on the proxy VM but"
                     f" agent.max_attached is {want}: detach disks the proxy does not need, or"
                     f" lower agent.max_attached"), None
    return Check("proxy disks", OK, f"{free} free vd targets, none of oneback's disks attached"
                 f" (agent.max_attached {want})"), None


def _devices(cfg: Config) -> tuple[Check, None]:
    names, by_id = devices.visible_disks(cfg.proxy.dev_root, cfg.proxy.sys_root)
    block = cfg.proxy.sys_root / "block"
    if not names:
        return Check("devices", FAIL, f"{block} shows no block device, not even the proxy's"
                     f" own disk: set proxy.sys_root to where the kernel shows them (/sys)"), None
    if not by_id:
        return Check("devices", WARN, f"{len(names)} block device(s) in {block}, but no"
                     f" {cfg.proxy.dev_root}/disk/by-id: is udev running in the proxy VM?"
                     f" (disks are then found by their serial in {block} alone)"), None
    return Check("devices", OK, f"{len(names)} block device(s) in {block};"
                 f" {cfg.proxy.dev_root}/disk/by-id exists"), None


_FILTER = re.compile(r'^\s*global_filter\s*=\s*\[(?P<rules>(?:\s*"[^"]*"\s*,?)*)\s*\]', re.M)
_REJECT_ALL = re.compile(r"^r(.)\.\*\1$")


def _lvm(path: Path) -> tuple[Check, None]:
    fix = (f"copy install/lvmlocal.conf to {path} (install/install.sh does), or LVM in the"
           f" proxy VM may activate and repair volume groups on the disks it reads")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return Check("lvm filter", FAIL, f"no LVM filter at {path}: {fix}"), None
    except OSError as e:
        return Check("lvm filter", FAIL, f"cannot read {path} ({e.strerror}): {fix}"), None
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    m = _FILTER.search(uncommented)
    rules = re.findall(r'"([^"]*)"', m.group("rules")) if m else []
    if not rules or not _REJECT_ALL.match(rules[-1]):
        return Check("lvm filter", FAIL, f"{path} has no global_filter that ends by rejecting"
                     f" every other device (\"r|.*|\"): {fix}"), None
    return Check("lvm filter", OK, f"{path}: global_filter accepts {len(rules) - 1} pattern(s)"
                 f" and rejects every other device"), None


def _events(cfg: Config, timeout: float) -> tuple[Check, None]:
    endpoint = cfg.opennebula.events
    if subscriber.probe(endpoint, timeout):
        return Check("event bus", OK, f"oned's event bus at {endpoint} answers"), None
    return Check("event bus", FAIL, f"no ZeroMQ publisher answers at {endpoint} within"
                 f" {timeout:g}s: check opennebula.events, and that oned's HM_MAD publishes"
                 f" there (its -b address in oned.conf; 127.0.0.1 by default)"), None


def _control(cfg: Config, timeout: float) -> tuple[Check, None]:
    host, port = cfg.agent.listen_host, cfg.agent.listen_port
    if port == 0:
        return Check("control endpoint", WARN, "agent.listen has port 0 (any free port): hook"
                     " scripts cannot know it; set a fixed port, e.g. 2640"), None
    why = control.probe(host, port, timeout)
    if why is None:
        return Check("control endpoint", OK, f"the agent answers at {host}:{port}"), None
    return Check("control endpoint", WARN, f"no oneback agent at {host}:{port} ({why}):"
                 f" start it ('systemctl start oneback'), or fix agent.listen"), None


def _hooks(cloud: Cloud) -> tuple[Check, None]:
    registered = cloud.hooks()
    missing = [h.name for h in HOOKS if h.name not in registered]
    if missing:
        return Check("hooks", FAIL, f"{len(missing)} of oneback's {len(HOOKS)} hooks are not"
                     f" registered in oned ({', '.join(missing)}): run 'oneback hooks install'"
                     f" (the agent then only learns of changes from the event bus and its"
                     f" reconcile timer)"), None
    return Check("hooks", OK, f"all {len(HOOKS)} of oneback's hooks are registered in oned"), None


def _repository(cfg: Config) -> tuple[Check, None]:
    from agent import repository
    repo, catalog_path = cfg.storage.repository, cfg.storage.catalog
    catalog, store = repository.open_checked(cfg.storage, catalog_path)
    try:
        backups = catalog.backup_count()
        store.now()   # writes and removes a file in the repository: RepositoryError if it cannot
        for path in (catalog_path, catalog_path.parent):
            if not os.access(path, os.W_OK):
                raise ConfigError(f"the catalog {path} is not writable by this user: fix its"
                                  f" owner or mode, or run oneback as its owner")
        if not isinstance(repo, Path):   # an S3 bucket: no free space to speak of
            return Check("repository", OK, f"{repo} (id {store.id}) is the catalog's"
                         f" repository, writable; catalog {catalog_path} holds {backups}"
                         f" backup(s)"), None
        fs = os.statvfs(repo)
        free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
        owner, me = os.stat(repo).st_uid, os.geteuid()
    finally:
        catalog.close()
    if owner != me:
        return Check("repository", WARN, f"{repo} is owned by uid {owner} but oneback runs"
                     f" here as uid {me}: what one writes (umask 077: chunks 0400) the other"
                     f" cannot read or touch; run oneback as the repository's owner, and give"
                     f" the oneback user the same uid on every proxy sharing the repository"
                     f" (useradd --uid)"), None
    gib = free / 1024 ** 3
    if free < LOW_SPACE or (total and free / total < LOW_SHARE):
        return Check("repository", WARN, f"{repo} (id {store.id}) has only {gib:.1f} GiB free"
                     f" ({100 * free / max(total, 1):.0f}%): add space, or forget and prune"
                     f" old backups ('oneback forget', 'oneback prune')"), None
    return Check("repository", OK, f"{repo} (id {store.id}) is the catalog's repository,"
                 f" writable, {gib:.1f} GiB free; catalog {catalog_path} holds {backups}"
                 f" backup(s)"), None
