"""Configuration: one TOML file (+ the environment) into frozen dataclasses.

Owns: finding the file (`--config`, else `$ONEBACK_CONFIG`, else
/etc/oneback/oneback.toml), validating every key with a one-line error that
names the key and the file, reading the credentials file (which must be mode
0600) and resolving `proxy.vm_id = "auto"` from the proxy VM's OpenNebula
contextualization. Must not: be read anywhere else — no other module reads
`os.environ` or configuration files.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.model import ONE_ID_MAX, S3Location
from agent.retention import RULES, KeepPolicy

DEFAULT_PATH = Path("/etc/oneback/oneback.toml")
DEFAULT_CONTEXT_FILE = Path("/run/one-context/one_env")
ENV_VAR = "ONEBACK_CONFIG"
MiB = 1024 * 1024
# storage.block_size: per block a backup holds a packed record (reader.py),
# so 1 MiB blocks keep a 10 TiB disk's maps within the README's bound.
MIN_BLOCK, MAX_BLOCK = 1 * MiB, 64 * MiB


@dataclass(frozen=True)
class OpenNebulaConfig:
    endpoint: str
    credentials_file: Path
    events: str
    timeout: float            # seconds for one XML-RPC call
    operation_timeout: float  # seconds for an asynchronous operation to settle
    poll_interval: float      # seconds between two looks at an object that is settling

    def read_credentials(self) -> str:
        """The `user:password` session string. Refuses a file that others can read."""
        path = self.credentials_file
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(
                f"credentials file {path} does not exist: create it with one line"
                f" 'user:password' and mode 0600"
            ) from None
        except OSError as e:
            raise ConfigError(f"credentials file {path}: {e.strerror}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(
                f"credentials file {path} has mode {stat.S_IMODE(st.st_mode):04o}:"
                f" run 'chmod 600 {path}'"
            )
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"credentials file {path}: {e.strerror}") from None
        if ":" not in text or text.startswith(":") or "\n" in text:
            raise ConfigError(
                f"credentials file {path} must hold exactly one line 'user:password'"
            )
        return text


@dataclass(frozen=True)
class ProxyConfig:
    vm_id: int
    dev_root: Path
    device_timeout: float  # seconds to wait for an attached disk to appear
    sys_root: Path         # where the kernel shows block devices and their serials
    lvm_config: Path = Path("/etc/lvm/lvmlocal.conf")  # the LVM filter `oneback doctor` checks


MAX_READ_DEPTH = 256
KDF_N = 2**16
"""scrypt's cost (N, with r=8, p=1: 64 MiB and ~0.15 s) for a new key blob."""
TEST_KDF_N: int | None = None
"""For tests only, set in the test's own process (never from the
environment, a file or an option: nothing a production process inherits can
weaken a new key): a smaller scrypt N for the key blobs `load`'s
configurations write, so that an encrypted repository's tests run fast."""


@dataclass(frozen=True)
class S3Config:
    """`[storage.s3]`: how to reach the bucket of an `s3://` repository."""

    credentials_file: Path
    endpoint_url: str | None = None   # None: AWS S3 itself
    region: str = "us-east-1"
    addressing_style: str = "auto"    # path | virtual | auto
    lock_days: int = 0                # Object Lock retention of every chunk and manifest
    lock_mode: str = "COMPLIANCE"     # or GOVERNANCE
    prune_hold: float = 30.0          # seconds a prune keeps its trash/ announcements

    def read_credentials(self) -> tuple[str, str]:
        """(access key id, secret access key) from the `[default]` section of
        the AWS shared-credentials file. Refuses a file others can read. The
        keys are never logged or shown."""
        import configparser

        path = self.credentials_file
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(
                f"S3 credentials file {path} does not exist: create it with a [default]"
                " section holding aws_access_key_id and aws_secret_access_key, mode 0600"
            ) from None
        except OSError as e:
            raise ConfigError(f"S3 credentials file {path}: {e.strerror}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(
                f"S3 credentials file {path} has mode {stat.S_IMODE(st.st_mode):04o}:"
                f" run 'chmod 600 {path}'")
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(path.read_text(encoding="utf-8"), str(path))
        except OSError as e:
            raise ConfigError(f"S3 credentials file {path}: {e.strerror}") from None
        except configparser.Error as e:
            raise ConfigError(f"S3 credentials file {path} is not in the AWS credentials"
                              f" format ({type(e).__name__}); see the README, \"S3\"") from None
        keys = []
        for name in ("aws_access_key_id", "aws_secret_access_key"):
            value = parser.get("default", name, fallback="").strip()
            if not value:
                raise ConfigError(f"S3 credentials file {path} has no {name} in its"
                                  " [default] section")
            keys.append(value)
        return keys[0], keys[1]


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def parse_s3_location(text: str) -> S3Location | None:
    """`s3://BUCKET[/PREFIX]` as a location; None if it is not one."""
    if not text.startswith("s3://"):
        return None
    bucket, _, prefix = text[5:].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.match(bucket) or (prefix and (not _PREFIX.match(prefix) or any(
            part in (".", "..") for part in prefix.split("/")))):
        return None
    return S3Location(bucket, prefix)


@dataclass(frozen=True)
class StorageConfig:
    repository: Path | S3Location
    catalog: Path
    block_size: int
    workers: int
    read_depth: int = 16   # reads of the device in flight (independent of workers)
    direct_io: bool = True  # read devices with O_DIRECT (else buffered, dropped behind)
    passphrase_file: Path | None = None  # an encrypted repository's passphrase (mode 0600)
    key_file: Path | None = None   # or its exported key (`oneback key export`, mode 0600)
    kdf_n: int = KDF_N             # scrypt N of the key blobs this process writes
    s3: S3Config | None = None  # [storage.s3], for an s3:// repository

    def read_passphrase(self) -> bytes:
        """The passphrase in storage.passphrase_file (ConfigError if unset)."""
        if self.passphrase_file is None:
            raise ConfigError("storage.passphrase_file is not set")
        return read_passphrase_file(self.passphrase_file, "storage.passphrase_file")

    def read_key_file(self) -> bytes:
        """The exported key document in storage.key_file (ConfigError if unset)."""
        if self.key_file is None:
            raise ConfigError("storage.key_file is not set")
        return read_private_file(self.key_file, "storage.key_file")


SECRET_FILE_MAX = 1 << 20
"""A secret file (passphrase, exported key) larger than this is refused."""


def read_private_file(path: Path, what: str) -> bytes:
    """The bytes of a secret file (`what` names it: a config key or an
    option). Refuses a missing file, one that is not a regular file (a FIFO
    would hang the read, a device never end), one owned by another user
    than this process's or root (who can read or replace it), one others
    can read, and an empty or oversized one. The checks are made on the
    opened file (fstat), not on the name (which may change between)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist: create it (mode 0600), or fix"
                          f" the path") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file: put the secret in a"
                              " file (mode 0600)")
        if st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, who can read or"
                              f" change it: run 'chown {os.geteuid()} {path}'")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: run"
                              f" 'chmod 600 {path}'")
        if st.st_size > SECRET_FILE_MAX:
            raise ConfigError(f"{what} {path} is {st.st_size} bytes, too large for a"
                              " passphrase or a key: check the path")
        data = b""
        while len(data) <= SECRET_FILE_MAX and (piece := os.read(fd, SECRET_FILE_MAX + 1)):
            data += piece
        if len(data) > SECRET_FILE_MAX:
            raise ConfigError(f"{what} {path} is too large for a passphrase or a key:"
                              " check the path")
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if not data.strip():
        raise ConfigError(f"{what} {path} is empty")
    return data


def read_passphrase_file(path: Path, what: str) -> bytes:
    """A passphrase: the file's bytes without one trailing newline."""
    data = read_private_file(path, what)
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


@dataclass(frozen=True)
class AgentConfig:
    listen_host: str
    listen_port: int
    secret_file: Path
    reconcile_interval: float  # seconds between two looks at every VM
    max_jobs: int              # jobs running at once
    max_attached: int          # disks attached to the proxy VM at once
    retry_base: float          # seconds before the first retry, doubled each time
    max_attempts: int
    shutdown_grace: float      # seconds a running job may take to finish on SIGTERM
    min_interval: int = 3600   # floor on a VM owner's ONEBACK_INTERVAL
    max_snapshot_sets: int = 10  # snapshot sets per VM the agent takes on request
    failure_cooldown: float = 300.0  # after a failed job, doubled per failure in a row
    max_backoff: float = 21600.0     # cap on every backoff (failed jobs, reconcile, expiry)
    max_connections: int = 16  # control endpoint: connections (threads) at once
    connection_timeout: float = 5.0  # control endpoint: seconds a connection may take
    metrics_listen: tuple[str, int] | None = None  # Prometheus metrics (host, port); None: off
    clusters: tuple[int, ...] | None = None  # clusters this proxy serves (None: its host's)
    lease_time: float = 300.0  # seconds a VM's lease in the repository lasts unrenewed
    sync_interval: float = 60.0  # seconds between imports of other agents' manifests

    def read_secret(self) -> bytes:
        """The secret shared with the hook scripts. Refuses one others can read."""
        path = self.secret_file
        try:
            st = path.stat()
            secret = path.read_bytes().strip()
        except OSError as e:
            raise ConfigError(
                f"hook secret file {path}: {e.strerror}; create it with"
                f" 'head -c 32 /dev/urandom | base64 > {path}; chmod 600 {path}'") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"hook secret file {path} has mode"
                              f" {stat.S_IMODE(st.st_mode):04o}: run 'chmod 600 {path}'")
        if len(secret) < 16:
            raise ConfigError(f"hook secret file {path} is too short: use at least 16"
                              f" characters")
        return secret


@dataclass(frozen=True)
class BackupConfig:
    qcow2_base: bool = False   # keep a permanent oneback-base snapshot where the first
                               # snapshot of a disk could never be deleted (README)


@dataclass(frozen=True)
class VerifyConfig:
    rate: float = 1 / 7       # share of the repository the agent reads back per day; 0: off
    interval: float = 300.0   # seconds between two steps of the continuous verify
    workers: int = 2          # chunks read back at once


@dataclass(frozen=True)
class CopyConfig:
    to: Path                       # the target's configuration file (its [storage])
    interval: float | None = None  # seconds between two copy passes; None: after every backup
    lock_days: int | None = None   # Object Lock retention of what is copied (S3 targets)


@dataclass(frozen=True)
class Config:
    source: Path
    opennebula: OpenNebulaConfig
    proxy: ProxyConfig
    storage: StorageConfig
    agent: AgentConfig
    backup: BackupConfig = BackupConfig()
    verify: VerifyConfig = VerifyConfig()
    retention: KeepPolicy = KeepPolicy()   # [retention]: the default of every VM
                                           # without ONEBACK_KEEP (empty: keep all)
    copy: CopyConfig | None = None         # [copy]: copy every new backup to another repository


def config_path(explicit: str | Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """Which file to read: the flag, then $ONEBACK_CONFIG, then the default."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    return DEFAULT_PATH


def load(explicit: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration. Raises ConfigError naming key and file."""
    path = config_path(explicit, environ)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} does not exist: pass --config FILE or set {ENV_VAR}"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"configuration file {path}: {e.strerror}") from None
    cfg = parse(data, path)
    if TEST_KDF_N is not None:
        cfg = replace(cfg, storage=replace(cfg.storage, kdf_n=TEST_KDF_N))
    return cfg


class _Section:
    """Typed access to one table of the file, with errors that name the key."""

    def __init__(self, data: Mapping[str, Any], name: str, path: Path) -> None:
        self.name, self.path = name, path
        raw = data.get(name)
        if raw is None:
            raise ConfigError(f"{path}: missing section [{name}]")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.data: dict[str, Any] = raw

    def _bad(self, key: str, want: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.name}.{key} must be {want}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self.path}: missing key {self.name}.{key}")
        return default

    def text(self, key: str, default: Any = None) -> str:
        v = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(v, str) or not v:
            raise self._bad(key, "a non-empty string")
        return v

    def path_(self, key: str, default: str | None = None) -> Path:
        return Path(self.text(key, default))

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        v = self._get(key, default)
        # TOML has nan and inf: NaN passes every range check (comparisons are false)
        if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                or v <= minimum):
            raise self._bad(key, f"a number greater than {minimum:g}")
        return float(v)

    def integer(self, key: str, default: int | None, minimum: int = 1) -> int:
        v = self._get(key, _REQUIRED if default is None else default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self._bad(key, f"an integer of at least {minimum}")
        return v

    def raw(self, key: str) -> Any:
        return self._get(key, _REQUIRED)

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def raw_default(self, key: str, default: Any) -> Any:
        return self._get(key, default)

    def check_known(self, known: set[str]) -> None:
        unknown = sorted(set(self.data) - known)
        if unknown:
            raise ConfigError(
                f"{self.path}: unknown key {self.name}.{unknown[0]}"
                f" (known: {', '.join(sorted(known))})"
            )


_REQUIRED = object()


def parse(data: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document (see `load`)."""
    unknown = sorted(set(data) - {"opennebula", "proxy", "storage", "agent", "backup",
                                  "verify", "retention", "copy"})
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}]")

    one = _Section(data, "opennebula", path)
    one.check_known(
        {"endpoint", "credentials_file", "events", "timeout", "operation_timeout",
         "poll_interval"}
    )
    endpoint = one.text("endpoint")
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", endpoint):
        raise ConfigError(
            f"{path}: opennebula.endpoint must be an http(s) URL such as"
            f" http://127.0.0.1:2633/RPC2"
        )
    events = one.text("events", "tcp://127.0.0.1:2101")
    if not re.match(r"^tcp://[^\s]+:\d+$", events):
        raise ConfigError(f"{path}: opennebula.events must look like tcp://HOST:PORT")
    opennebula = OpenNebulaConfig(
        endpoint=endpoint,
        credentials_file=one.path_("credentials_file", "/etc/oneback/one_auth"),
        events=events,
        timeout=one.number("timeout", 30.0),
        operation_timeout=one.number("operation_timeout", 900.0),
        poll_interval=one.number("poll_interval", 0.5),
    )

    px = _Section(data, "proxy", path)
    px.check_known({"vm_id", "dev_root", "sys_root", "context_file", "device_timeout",
                    "lvm_config"})
    raw_id = px.raw("vm_id")
    context_file = px.path_("context_file", str(DEFAULT_CONTEXT_FILE))
    if raw_id == "auto":
        vm_id = _vmid_from_context(context_file, path)
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= ONE_ID_MAX:
        vm_id = raw_id
    else:
        raise ConfigError(
            f"{path}: proxy.vm_id must be the proxy VM's id (an integer from 0 to"
            f" {ONE_ID_MAX}) or \"auto\""
        )
    proxy = ProxyConfig(
        vm_id=vm_id,
        dev_root=px.path_("dev_root", "/dev"),
        device_timeout=px.number("device_timeout", 30.0),
        sys_root=px.path_("sys_root", "/sys"),
        lvm_config=px.path_("lvm_config", "/etc/lvm/lvmlocal.conf"),
    )

    st = _Section(data, "storage", path)
    st.check_known({"repository", "catalog", "block_size", "workers", "read_depth",
                    "direct_io", "passphrase_file", "key_file", "s3"})
    secrets = {k: st.path_(k) if k in st.data else None for k in ("passphrase_file", "key_file")}
    if secrets["passphrase_file"] is not None and secrets["key_file"] is not None:
        raise ConfigError(f"{path}: set storage.passphrase_file or storage.key_file (an"
                          f" exported key), not both")
    repository, s3 = _repository(st, path)
    block_size = st.raw_default("block_size", 4 * MiB)
    if (isinstance(block_size, bool) or not isinstance(block_size, int)
            or not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1)):
        raise ConfigError(
            f"{path}: storage.block_size must be a power of two from {MIN_BLOCK} (1 MiB) to"
            f" {MAX_BLOCK} (64 MiB), e.g. {4 * MiB} (4 MiB); got {block_size!r}")
    read_depth = st.integer("read_depth", 16)
    if read_depth > MAX_READ_DEPTH:  # a thread per read in flight
        raise ConfigError(f"{path}: storage.read_depth must be from 1 to {MAX_READ_DEPTH},"
                          f" e.g. 16 (network storage) or 4 (a local disk); got {read_depth}")
    storage = StorageConfig(
        repository=repository,
        catalog=st.path_("catalog", "/var/lib/oneback/catalog.sqlite"),
        block_size=block_size,
        workers=st.integer("workers", os.cpu_count() or 2),
        read_depth=read_depth,
        direct_io=st.flag("direct_io", True),
        passphrase_file=secrets["passphrase_file"],
        key_file=secrets["key_file"],
        s3=s3,
    )
    ag = _Section({"agent": data.get("agent", {})}, "agent", path)
    ag.check_known({"listen", "secret_file", "reconcile_interval", "max_jobs", "max_attached",
                    "retry_base", "max_attempts", "shutdown_grace", "min_interval",
                    "max_snapshot_sets", "failure_cooldown", "max_backoff",
                    "max_connections", "connection_timeout", "metrics_listen",
                    "clusters", "lease_time", "sync_interval"})
    listen = ag.text("listen", "127.0.0.1:2640")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{path}: agent.listen must be HOST:PORT, e.g. 127.0.0.1:2640 or"
                          f" this VM's management address")
    agent = AgentConfig(
        listen_host=host, listen_port=int(port),
        secret_file=ag.path_("secret_file", "/etc/oneback/hook_secret"),
        reconcile_interval=ag.number("reconcile_interval", 300.0),
        max_jobs=ag.integer("max_jobs", 2),
        max_attached=ag.integer("max_attached", 4),
        retry_base=ag.number("retry_base", 30.0),
        max_attempts=ag.integer("max_attempts", 5),
        shutdown_grace=ag.number("shutdown_grace", 60.0),
        min_interval=ag.integer("min_interval", 3600),
        max_snapshot_sets=ag.integer("max_snapshot_sets", 10),
        failure_cooldown=ag.number("failure_cooldown", 300.0),
        max_backoff=ag.number("max_backoff", 21600.0),
        max_connections=ag.integer("max_connections", 16),
        connection_timeout=ag.number("connection_timeout", 5.0),
        metrics_listen=_metrics_listen(ag.raw_default("metrics_listen", None), path),
        clusters=_clusters(ag.raw_default("clusters", None), path),
        lease_time=ag.number("lease_time", 300.0),
        sync_interval=ag.number("sync_interval", 60.0),
    )
    if agent.lease_time < 1 or agent.lease_time > 3600:
        raise ConfigError(f"{path}: agent.lease_time must be from 1 to 3600 seconds, e.g. 300;"
                          f" got {agent.lease_time:g}")
    bk = _Section({"backup": data.get("backup", {})}, "backup", path)
    bk.check_known({"qcow2_base"})
    backup = BackupConfig(qcow2_base=bk.flag("qcow2_base", False))
    vf = _Section({"verify": data.get("verify", {})}, "verify", path)
    vf.check_known({"rate", "interval", "workers"})
    verify = VerifyConfig(rate=_rate(vf.raw_default("rate", "1/7"), path),
                          interval=vf.number("interval", 300.0),
                          workers=vf.integer("workers", 2))
    rt = _Section({"retention": data.get("retention", {})}, "retention", path)
    rt.check_known({f"keep_{r}" for r in RULES})
    retention = KeepPolicy(**{r: rt.integer(f"keep_{r}", 0, minimum=0) for r in RULES})
    return Config(source=path, opennebula=opennebula, proxy=proxy, storage=storage,
                  agent=agent, backup=backup, verify=verify, retention=retention,
                  copy=_copy(data, path))


def _copy(data: Mapping[str, Any], path: Path) -> CopyConfig | None:
    """[copy]: `to` (the target's configuration file), optional `interval`
    (seconds; absent: after every backup) and `lock_days` (S3 Object Lock)."""
    if "copy" not in data:
        return None
    cp = _Section(data, "copy", path)
    cp.check_known({"to", "interval", "lock_days"})
    to = cp.path_("to")
    if not to.is_absolute():
        to = path.parent / to
    if to.resolve() == path.resolve():
        raise ConfigError(f"{path}: copy.to names this configuration file itself; it must be"
                          " the configuration of another repository (its [storage])")
    interval = cp.number("interval", 0.0) if "interval" in cp.data else None
    lock_days = cp.integer("lock_days", 1) if "lock_days" in cp.data else None
    return CopyConfig(to=to, interval=interval, lock_days=lock_days)


def _metrics_listen(raw: Any, path: Path) -> tuple[str, int] | None:
    """agent.metrics_listen: "HOST:PORT" where the agent serves Prometheus
    metrics (absent: no metrics; port 0: any free port, logged)."""
    if raw is None:
        return None
    host, _, port = raw.rpartition(":") if isinstance(raw, str) else ("", "", "")
    if (not host or not port.isascii() or not port.isdigit() or int(port) > 65535
            or any(c.isspace() for c in host)):
        raise ConfigError(f"{path}: agent.metrics_listen must be HOST:PORT, e.g."
                          f" \"127.0.0.1:9464\" (leave it out for no metrics);"
                          f" got {str(raw)[:60]!r}")
    return host.strip("[]"), int(port)


def _clusters(raw: Any, path: Path) -> tuple[int, ...] | None:
    """agent.clusters: the OpenNebula cluster ids whose datastores this
    proxy can attach, e.g. [0, 100] (unset: the cluster its host is in)."""
    if raw is None:
        return None
    if (not isinstance(raw, list) or not raw
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= ONE_ID_MAX
                   for c in raw)):
        raise ConfigError(f"{path}: agent.clusters must be a list of cluster ids, e.g. [0, 100]"
                          f" (leave it out to serve the cluster of the proxy VM's host);"
                          f" got {raw!r}")
    return tuple(sorted(set(raw)))


def _repository(st: _Section, path: Path) -> tuple[Path | S3Location, S3Config | None]:
    """storage.repository (a directory, or s3://BUCKET/PREFIX) and [storage.s3]."""
    text = st.text("repository", "/var/lib/oneback/repo")
    raw = st.data.get("s3")
    if not text.startswith("s3://"):
        if raw is not None:
            raise ConfigError(f"{path}: [storage.s3] is set but storage.repository is not an"
                              " s3://BUCKET/PREFIX location; remove one of them")
        return Path(text), None
    location = parse_s3_location(text)
    if location is None:
        raise ConfigError(
            f"{path}: storage.repository must be s3://BUCKET/PREFIX with a valid bucket name"
            f" (3-63 lower-case letters, digits, '.', '-') and a prefix of letters, digits,"
            f" '.', '_', '-' and '/'; got {text!r}")
    s3 = _Section({"storage.s3": raw if raw is not None else {}}, "storage.s3", path)
    s3.check_known({"endpoint_url", "region", "credentials_file", "addressing_style",
                    "lock_days", "lock_mode", "prune_hold"})
    endpoint = s3.data.get("endpoint_url")
    if endpoint is not None and (not isinstance(endpoint, str) or not re.match(
            r"^https?://[^/\s]+/?$", endpoint)):
        raise ConfigError(f"{path}: storage.s3.endpoint_url must be an http(s) URL such as"
                          " https://s3.example.com or http://127.0.0.1:9000")
    style = s3.text("addressing_style", "auto")
    if style not in ("auto", "path", "virtual"):
        raise ConfigError(f"{path}: storage.s3.addressing_style must be path, virtual or"
                          f" auto; got {style!r}")
    mode = s3.text("lock_mode", "COMPLIANCE").upper()
    if mode not in ("COMPLIANCE", "GOVERNANCE"):
        raise ConfigError(f"{path}: storage.s3.lock_mode must be COMPLIANCE or GOVERNANCE;"
                          f" got {mode!r}")
    config = S3Config(
        credentials_file=s3.path_("credentials_file", "/etc/oneback/s3_credentials"),
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=s3.text("region", "us-east-1"),
        addressing_style=style,
        lock_days=s3.integer("lock_days", 0, minimum=0),
        lock_mode=mode,
        prune_hold=s3.number("prune_hold", 30.0),
    )
    return location, config


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?)\s*|(%)\s*)?$")


def _rate(raw: Any, path: Path) -> float:
    """verify.rate: a share of the repository per day, "1/7" (all of it every
    7 days), "15%", a number, or "off" (0)."""
    if raw == "off" or (not isinstance(raw, bool) and raw == 0):
        return 0.0
    m = _RATE.match(raw) if isinstance(raw, str) else None
    value = -1.0
    if m is not None:
        value = float(m.group(1))
        if m.group(2) is not None:
            value = value / float(m.group(2)) if float(m.group(2)) > 0 else -1.0
        elif m.group(3):
            value /= 100
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    if not value > 0:
        raise ConfigError(
            f"{path}: verify.rate must be the share of the repository to read back per day,"
            f" e.g. \"1/7\" (all of it every 7 days), \"15%\", or \"off\"; got {raw!r}")
    return value


_VMID = re.compile(r"""^\s*(?:export\s+)?VMID\s*=\s*["']?(\d+)["']?\s*$""", re.M)


def _vmid_from_context(context_file: Path, path: Path) -> int:
    """The VMID context variable that one-context writes into the proxy VM."""
    try:
        text = context_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        raise ConfigError(
            f"{path}: proxy.vm_id is \"auto\" but {context_file} cannot be read; set"
            f" proxy.context_file, or proxy.vm_id to the proxy VM's id"
        ) from None
    m = _VMID.search(text)
    if not m:
        raise ConfigError(
            f"{path}: proxy.vm_id is \"auto\" but {context_file} has no VMID;"
            f" set proxy.vm_id to the proxy VM's id"
        )
    if len(m.group(1)) > 10 or int(m.group(1)) > ONE_ID_MAX:
        raise ConfigError(f"{path}: the VMID in {context_file} is not an OpenNebula id;"
                          f" set proxy.vm_id to the proxy VM's id")
    return int(m.group(1))
