"""A chunk store in a local directory (or a mounted filesystem).

Owns: the on-disk layout of a repository and crash-safe writes into it::

    REPO/config          JSON: {"format": 1, "id": "<hex>", "compression": "zstd"}
                         (an encrypted repository: format 2, "encryption": "aes-256-gcm")
    REPO/keys/NAME       key blobs: the master key wrapped under a passphrase (agent.keys)
    REPO/chunks/ab/abcd...   one zstd-compressed chunk per file, named by its SHA-256
    REPO/manifests/VM/NAME   one immutable manifest per backup (agent.manifest)
    REPO/tmp/            chunks being written; leftovers of a crash are ignored
    REPO/quarantine/     damaged chunks moved aside by a verify (kept, never read)
    REPO/running/NAME    one marker per backup (or prune) running now: its start and
                         heartbeat, so a prune keeps what it may still reference
    REPO/trash/          chunks a prune is about to delete (see `retire`)
    REPO/synced          the time before which every chunk file is durable

A chunk is written to a temp file and linked into place, so its name appears
only complete; files are read-only. `put` does not fsync: `flush` makes every
chunk written so far durable with one `syncfs` of the repository's filesystem
(as Proxmox Backup Server does before it finishes a backup) and records the
time it started in `synced`, instead of two fsyncs per chunk. A power loss
before a flush can leave a named chunk file whose data never reached the
disk; such a file is older than this boot and newer than `synced`, and `put`
checks (and rewrites) a chunk in that window instead of trusting its name.
Without syncfs (not Linux), or when opened with `sync_each_put`, every put is
durable on return as restic's `local.Save` does: fsync the file, link, fsync
the directory. Manifests are always written durably (temp file, fsync, link,
fsync the directory), and never over an existing name. A repository is
created only by `init` (`oneback init`); `open` refuses a missing or empty
directory (an unmounted filesystem) instead of silently starting a new
repository there. Must not: know about backups or the catalog.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from agent.errors import IntegrityError, NotFound, RepositoryError
from agent.store import (
    DEFAULT_LEVEL,
    Codec,
    Data,
    LockedCodec,
    Retired,
    check_chunk_id,
    check_key_name,
    check_manifest_name,
    is_key_name,
    is_manifest_name,
)
from agent.store.leases import LocalLeases

FORMAT = 2
"""The newest format this oneback reads: 1 plain, 2 encrypted (an older
oneback refuses an encrypted repository instead of misreading it)."""
CONFIG = "config"
PLAIN = "none"
TEMP_GRACE = 3600.0
"""Temp files older than this (seconds) are crash leftovers and removed on open;
younger ones may belong to another process still writing."""

_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
SYNCED = "synced"
QUARANTINE = "quarantine"
KEY_MAX = 64 << 10   # a key blob is a few hundred bytes
SYNC_MARGIN = 2.0
"""Seconds `synced` is set back from the start of the syncfs that proves it:
file times come from a coarse clock, and a file written just after the start
must not count as covered."""


HAVE_SYNCFS = sys.platform.startswith("linux")  # syncfs(2): Linux 2.6.39, glibc 2.14


def syncfs(fd: int) -> None:
    """Write back every dirty page and inode of the filesystem holding `fd`
    (libc's syncfs, through ctypes: loaded only by a flush, not by every
    command that opens a repository). Where libc lacks it: os.sync()."""
    import ctypes

    try:
        func = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    if func(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def boot_time() -> float:
    """When this machine booted, on the wall clock: files written since are
    whole in the page cache whatever a flush did (a power loss reboots)."""
    try:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return float("inf")  # unknown: every unflushed-looking chunk is checked


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes, tmp_dir: Path, mode: int = 0o444) -> None:
    """Temp file in `tmp_dir` (same filesystem), fsync, rename over `path`,
    fsync `path`'s directory. Readers see the old file or the new one."""
    tmp = tmp_dir / f"{path.name}-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _link_into_place(tmp: Path, path: Path) -> bool:
    """Give the complete file `tmp` the name `path` unless that name exists
    (a link, not a rename: a file that won a race stays whole). False if the
    name was taken. Where links are not supported, a rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _LINK_UNSUPPORTED:
            raise
        os.replace(tmp, path)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class LocalStore(LocalLeases):
    """A repository directory. Thread-safe; several processes may share it
    (names appear atomically, temp files are unique)."""

    def __init__(self, path: Path, repo_id: str, level: int,
                 sync_each_put: bool = False, codec: Codec | None = None,
                 encryption: str = PLAIN) -> None:
        self.path = path
        self.id = repo_id
        self.encryption = encryption   # what the config says: "none" or the cipher
        self._chunks = path / "chunks"
        self._manifests = path / "manifests"
        self._tmp = path / "tmp"
        self._codec = codec if codec is not None else (
            Codec(level) if encryption == PLAIN else LockedCodec(encryption))
        self.sync_each_put = sync_each_put or not HAVE_SYNCFS
        self._synced = 0.0     # chunk files older than this are durable
        self._boot = boot_time()
        # Per-id serialisation inside this process: a put that races another
        # put (or a has) of the same id waits until that one is complete.
        self._locks = [threading.Lock() for _ in range(256)]

    # -- opening -------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], level: int = DEFAULT_LEVEL,
             encryption: str = PLAIN) -> LocalStore:
        """Create a new repository at `path` (a missing or empty directory),
        whose config records `encryption` (its keys are `agent.keys`' to
        write). Raises RepositoryError if one is there already, or the
        directory holds anything else."""
        root = Path(path)
        try:
            if (root / CONFIG).exists():
                raise RepositoryError(
                    f"{root} is already a oneback repository; use it as it is (run "
                    "`oneback init` with a new catalog to join it), or choose another path"
                )
            cls._create(root, encryption)
        except OSError as e:
            raise RepositoryError(
                f"cannot create repository {root}: {e.strerror or e}; check that the "
                "path is writable by oneback"
            ) from e
        return cls.open(root, level=level)

    @classmethod
    def open(cls, path: str | os.PathLike[str], level: int = DEFAULT_LEVEL, *,
             sync_each_put: bool = False) -> LocalStore:
        """Open the existing repository at `path`. Removes temp files left by a
        crash more than TEMP_GRACE seconds ago. Raises RepositoryError when
        the path is missing, empty (a filesystem not mounted?), not a
        repository, or one of a newer format. Never creates anything but the
        repository's own missing subdirectories. `sync_each_put`: every put
        durable on return (two fsyncs per new chunk, the way before `flush`;
        the bench compares the two)."""
        root = Path(path)
        try:
            if not (root / CONFIG).exists():
                if not root.is_dir():
                    why = "the directory does not exist"
                elif not any(root.iterdir()):
                    why = "the directory is empty"
                else:
                    raise RepositoryError(
                        f"{root} is not a oneback repository (it has no config file); "
                        "fix storage.repository, or run `oneback init` on an empty directory"
                    )
                raise RepositoryError(
                    f"no oneback repository at {root} ({why}; is its filesystem mounted?); "
                    "run `oneback init` to create one"
                )
            repo_id, encryption = cls._read_config(root)
            store = cls(root, repo_id, level, sync_each_put, encryption=encryption)
            store._prepare()
        except OSError as e:
            raise RepositoryError(
                f"cannot use repository {root}: {e.strerror or e}; check that the "
                "path exists and is writable by oneback"
            ) from e
        return store

    @staticmethod
    def _create(root: Path, encryption: str = PLAIN) -> str:
        if root.exists() and any(root.iterdir()):
            raise RepositoryError(
                f"{root} is not empty and not a oneback repository; choose another "
                "storage.repository or empty that directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        (root / "manifests").mkdir(exist_ok=True)
        chunks = root / "chunks"
        chunks.mkdir(exist_ok=True)
        for i in range(256):
            (chunks / f"{i:02x}").mkdir(exist_ok=True)
        fsync_dir(chunks)
        repo_id = uuid.uuid4().hex
        config: dict[str, object] = {"format": 1, "id": repo_id, "compression": "zstd",
                                     "hash": "sha256"}
        if encryption != PLAIN:
            (root / "keys").mkdir(exist_ok=True)
            config.update(format=2, hash="hmac-sha256", encryption=encryption)
        write_file_durably(
            root / CONFIG, json.dumps(config, indent=2).encode() + b"\n", root / "tmp"
        )
        fsync_dir(root)
        if root.parent != root:
            fsync_dir(root.parent)
        return repo_id

    @staticmethod
    def _read_config(root: Path) -> tuple[str, str]:
        """The repository's id and encryption ("none": plain)."""
        raw = (root / CONFIG).read_bytes()
        try:
            config = json.loads(raw)
            fmt, repo_id = config["format"], config["id"]
            encryption = str(config.get("encryption") or PLAIN)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RepositoryError(
                f"repository config {root / CONFIG} is unreadable ({e}); restore it "
                "from a copy, or point storage.repository elsewhere"
            ) from e
        if not isinstance(fmt, int) or fmt > FORMAT:
            raise RepositoryError(
                f"repository {root} has format {fmt}, newer than this oneback "
                f"understands ({FORMAT}); upgrade oneback"
            )
        if encryption == PLAIN and (config.get("hash") == "hmac-sha256"
                                    or (root / "keys").exists()):
            # The config is not authenticated: an encrypted repository's, made to
            # look plain, would take plaintext backups (and a passphrase_file
            # would be refused as "not encrypted, remove it").
            raise RepositoryError(
                f"repository config {root / CONFIG} says the repository is not encrypted,"
                " but it has the keys (keys/) or chunk ids (hmac-sha256) of an encrypted"
                " one: its config was changed; restore it from a copy (or `oneback init"
                " --encryption` a new repository), and find out who changed it")
        return str(repo_id), encryption

    def use_codec(self, codec: Codec) -> None:
        """Read and write through `codec` from now on (an encrypted
        repository's, once `agent.keys` has unlocked it). Call right after
        `open`, before any chunk or manifest is read or written."""
        self._codec = codec

    def _prepare(self) -> None:
        self._tmp.mkdir(exist_ok=True)
        self._chunks.mkdir(exist_ok=True)
        self._manifests.mkdir(exist_ok=True)
        self.clean_temp(TEMP_GRACE)
        self._synced = self._read_synced()

    def _read_synced(self) -> float:
        try:
            return float((self.path / SYNCED).read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0.0  # never flushed (or a repository from before flush)

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove temp files (unfinished writes) older than `older_than`
        seconds; returns how many. Only call with 0 when no other process
        writes to this repository."""
        removed = 0
        limit = time.time() - older_than
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime <= limit:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # -- the ChunkStore Protocol ----------------------------------------------

    def _path(self, chunk_id: bytes) -> Path:
        check_chunk_id(chunk_id)
        name = chunk_id.hex()
        return self._chunks / name[:2] / name

    def _lock(self, chunk_id: bytes) -> threading.Lock:
        return self._locks[chunk_id[0]]

    def chunk_id(self, data: Data) -> bytes:
        return self._codec.chunk_id(data)

    def has(self, chunk_id: bytes) -> bool:
        path = self._path(chunk_id)
        with self._lock(chunk_id):
            return path.exists()

    def put(self, chunk_id: bytes, data: Data) -> int:
        """See ChunkStore.put: complete and readable on return, durable after
        the next `flush` (on return with `sync_each_put`)."""
        path = self._path(chunk_id)
        with self._lock(chunk_id):
            replace = False
            try:
                present = path.stat().st_mtime
            except FileNotFoundError:
                present = None
            if present is not None:
                if not self._maybe_lost(present) or self._whole(chunk_id, path):
                    if self._touch(path):   # fresh again: a prune running now keeps it
                        return 0
                    # a prune took it just now, or another account's file: write it
                    # (again), a new file with a fresh mtime
                    replace = True
                else:
                    replace = True  # debris of a power loss before a flush: write it again
            return self._write_chunk(chunk_id, path, data, replace)

    def _write_chunk(self, chunk_id: bytes, path: Path, data: Data, replace: bool) -> int:
        """Encode and save one chunk (the caller holds its lock)."""
        encoded = self._codec.encode(data, chunk_id)
        try:
            return self._save(path, encoded, replace)
        except OSError as e:
            raise RepositoryError(
                f"cannot write chunk {chunk_id.hex()} to {self.path}: "
                f"{e.strerror or e}; check free space and permissions"
            ) from e

    def _maybe_lost(self, mtime: float) -> bool:
        """A chunk file written before this boot and after the last flush
        started: a power loss may have kept its name but not its data."""
        return self._synced <= mtime < self._boot

    def _whole(self, chunk_id: bytes, path: Path) -> bool:
        try:
            self._codec.decode(chunk_id, path.read_bytes(), str(path))
        except (IntegrityError, OSError):
            return False
        return True

    def _save(self, path: Path, encoded: bytes, replace: bool = False) -> int:
        tmp = self._tmp / f"{path.name}-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            try:
                _write_all(fd, encoded)
                if self.sync_each_put:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not path.parent.is_dir():
                path.parent.mkdir(exist_ok=True)
                if self.sync_each_put:
                    fsync_dir(path.parent.parent)
            written = len(encoded)
            if replace:
                os.replace(tmp, path)
            elif not _link_into_place(tmp, path):
                # another process won the race: its complete file stays
                written = 0
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if self.sync_each_put:
            fsync_dir(path.parent)  # also when another process won: durable on return
        return written

    def flush(self) -> None:
        """Make every chunk put so far (by any process, on this filesystem)
        durable: one syncfs of the repository's filesystem, then `synced`
        records when it started. Raises RepositoryError when the filesystem
        reports a write error (the chunks may not be on disk)."""
        if self.sync_each_put:
            return
        started = time.time()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                syncfs(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise RepositoryError(
                f"cannot make the chunks in {self.path} durable (syncfs:"
                f" {e.strerror or e}); check the disk and free space, then back up again"
            ) from e
        mark = max(self._synced, started - SYNC_MARGIN)
        try:
            write_file_durably(self.path / SYNCED, f"{mark:.6f}\n".encode(), self._tmp)
        except OSError as e:
            raise RepositoryError(
                f"cannot write {self.path / SYNCED}: {e.strerror or e}; check free space"
                " and permissions") from e
        self._synced = mark

    def get(self, chunk_id: bytes) -> bytes:
        path = self._path(chunk_id)
        stored = self._read(path, f"chunk {chunk_id.hex()}")
        return self._codec.decode(chunk_id, stored, str(path))

    def _read(self, path: Path, what: str) -> bytes:
        """A repository file's bytes: NotFound if it is missing, else
        RepositoryError for any other failure, naming `what`."""
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise NotFound(f"{what} is not in repository {self.path}") from e
        except OSError as e:
            raise RepositoryError(
                f"cannot read {what} from {self.path}: {e.strerror or e}") from e

    def delete(self, chunk_id: bytes) -> None:
        path = self._path(chunk_id)
        with self._lock(chunk_id):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            except OSError as e:
                raise RepositoryError(
                    f"cannot delete chunk {chunk_id.hex()} from {self.path}: "
                    f"{e.strerror or e}"
                ) from e
            fsync_dir(path.parent)

    def quarantine(self, chunk_id: bytes) -> bool:
        """See ChunkStore.quarantine: re-read under the chunk's lock (a heal
        may have replaced it), then moved to `quarantine/HEX.TIME-RANDOM`."""
        path = self._path(chunk_id)
        with self._lock(chunk_id):
            if not path.exists() or self._whole(chunk_id, path):
                return False
            moved = self._move_aside(chunk_id, path)
            if moved is not None and self._whole(chunk_id, moved):
                # another process (its own locks) healed it between the read
                # and the move: the whole chunk goes back into place
                try:
                    os.link(moved, path)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise RepositoryError(
                        f"cannot move chunk {chunk_id.hex()} back from {moved}: "
                        f"{e.strerror or e}; move it back to {path} by hand") from e
                os.unlink(moved)
                fsync_dir(path.parent)
                return False
        return True

    def heal(self, chunk_id: bytes, data: Data) -> int:
        """See ChunkStore.heal."""
        path = self._path(chunk_id)
        with self._lock(chunk_id):
            replace = False
            if path.exists():
                if not self._whole(chunk_id, path):
                    self._move_aside(chunk_id, path)
                elif self._touch(path):
                    return 0   # fresh again, as a put's dedup hit: a prune keeps it
                else:
                    replace = True   # a prune took it just now, or another account's file
            return self._write_chunk(chunk_id, path, data, replace)

    def _move_aside(self, chunk_id: bytes, path: Path) -> Path | None:
        """Rename a damaged chunk file into quarantine/ (durably); its new
        path, None if it was gone. Call with the chunk's lock held."""
        target = self.path / QUARANTINE
        name = f"{chunk_id.hex()}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-" \
               f"{uuid.uuid4().hex[:8]}"
        try:
            target.mkdir(exist_ok=True)
            os.rename(path, target / name)
            fsync_dir(target)
            fsync_dir(path.parent)
        except FileNotFoundError:
            return None   # another process moved or deleted it meanwhile
        except OSError as e:
            raise RepositoryError(
                f"cannot move damaged chunk {chunk_id.hex()} to {target}: "
                f"{e.strerror or e}; check permissions and free space"
            ) from e
        return target / name

    # -- what a prune needs (not in the Protocol: a local repository's own) ---

    def _touch(self, path: Path) -> bool:
        """Set the file's mtime to now (the filesystem's clock); False if it
        is gone."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except PermissionError:
            # not the owner (another account wrote it): rewrite it instead
            return False
        except OSError as e:
            raise RepositoryError(
                f"cannot update {path}: {e.strerror or e}; check the repository's disk"
            ) from e
        return True

    def touch(self, chunk_id: bytes) -> bool:
        """Mark the chunk as used now (its mtime); False if it is missing. A
        backup touches every chunk it references without writing it, so a
        prune running beside it keeps them (see `retire`)."""
        return self._touch(self._path(chunk_id))

    def chunk_files(self) -> Iterator[tuple[bytes, float, int]]:
        """(id, mtime, stored bytes) of every chunk file, in no order."""
        for fan in sorted(os.listdir(self._chunks)):
            if len(fan) != 2:
                continue
            try:
                with os.scandir(self._chunks / fan) as entries:
                    found = [(e.name, e.stat(follow_symlinks=False)) for e in entries
                             if len(e.name) == 64 and e.name.startswith(fan)]
            except FileNotFoundError:
                continue
            for name, st in found:
                try:
                    yield bytes.fromhex(name), st.st_mtime, st.st_size
                except ValueError:
                    continue

    def retire(self, chunk_id: bytes, cutoff: float) -> int | None:
        """Delete the chunk unless it was used (written or touched) at or
        after `cutoff`. The file is first renamed into trash/, so no later
        touch or dedup can reach it (a touch then fails, and `put` writes the
        chunk again); then its mtime is read once more, and a chunk touched
        before the rename goes back into place. Returns the bytes freed, or
        None if the chunk was kept (or already gone)."""
        path = self._path(chunk_id)
        trash = self.path / "trash"
        held = trash / f"{chunk_id.hex()}-{uuid.uuid4().hex}"
        try:
            trash.mkdir(exist_ok=True)
            with self._lock(chunk_id):
                try:
                    os.rename(path, held)
                except FileNotFoundError:
                    return None
            st = os.stat(held)
            if st.st_mtime >= cutoff:
                try:
                    os.link(held, path)   # back; a chunk written meanwhile wins
                except FileExistsError:
                    pass
                os.unlink(held)
                return None
            os.unlink(held)
        except OSError as e:
            raise RepositoryError(
                f"cannot delete chunk {chunk_id.hex()} from {self.path}: {e.strerror or e}"
            ) from e
        return int(st.st_size)

    def retire_all(self, chunk_ids: list[bytes], cutoff: float) -> list[Retired]:
        """`retire` each chunk (see `Maintainable.retire_all`)."""
        return [Retired(c, self.retire(c, cutoff)) for c in chunk_ids]

    def now(self) -> float:
        """The repository filesystem's clock now (the mtime a new file gets):
        the clock chunk mtimes are compared against."""
        probe = self._tmp / f"clock-{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            raise RepositoryError(
                f"cannot write to {self._tmp}: {e.strerror or e}; check free space and "
                "permissions") from e

    def running_start(self, what: str) -> RunningMarker:
        """Write REPO/running/<what>-<random>: this process runs something
        that writes or may reference chunks (a backup). Its start time is
        the marker's mtime at creation (the filesystem's clock), recorded in
        it; `RunningMarker.beat` refreshes the mtime."""
        directory = self.path / "running"
        name = f"{what}-{uuid.uuid4().hex[:12]}"
        path = directory / name
        try:
            directory.mkdir(exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                started = os.fstat(fd).st_mtime
                _write_all(fd, json.dumps({"started": started, "pid": os.getpid(),
                                           "what": what}).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(directory)
        except OSError as e:
            raise RepositoryError(
                f"cannot write {path}: {e.strerror or e}; check free space and permissions"
            ) from e
        return RunningMarker(path, started)

    def running(self) -> list[tuple[str, float, float]]:
        """(name, started, heartbeat) of every marker in REPO/running/."""
        found: list[tuple[str, float, float]] = []
        directory = self.path / "running"
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return found
        for name in names:
            path = directory / name
            try:
                beat = os.stat(path).st_mtime
            except OSError:
                continue   # ended meanwhile
            try:
                started = float(json.loads(path.read_bytes())["started"])
            except (OSError, ValueError, KeyError, TypeError):
                started = beat   # being written: it was created just now
            found.append((name, started, beat))
        return found

    def end_running(self, name: str) -> None:
        """Remove the marker REPO/running/<name> (a crashed process's). Idempotent."""
        if "/" in name or name.startswith("."):
            return
        try:
            os.unlink(self.path / "running" / name)
        except OSError:
            pass

    def ids(self) -> Iterator[bytes]:
        with os.scandir(self._chunks) as fans:
            dirs = sorted(e.name for e in fans if len(e.name) == 2 and e.is_dir())
        for fan in dirs:
            with os.scandir(self._chunks / fan) as entries:
                names = [e.name for e in entries]
            for name in names:
                if len(name) == 64 and name.startswith(fan):
                    try:
                        yield bytes.fromhex(name)
                    except ValueError:
                        continue

    # -- the ManifestStore Protocol --------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        check_manifest_name(name)
        return self._manifests / name

    def put_manifest(self, name: str, data: bytes) -> int:
        self._write_once(self._manifest_path(name), self._codec.seal(data, name),
                         f"manifest {name}")
        return len(data)

    def _write_once(self, path: Path, data: bytes, what: str) -> None:
        """Write an immutable file durably (temp file, fsync, link, fsync the
        directory), never over an existing name: RepositoryError if it exists."""
        try:
            if path.exists():
                raise RepositoryError(
                    f"{what} already exists in {self.path}; it is written once (this is "
                    "a bug in the writer)"
                )
            self._make_dirs(path.parent)
            tmp = self._tmp / f"{path.parent.name}-{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if not _link_into_place(tmp, path):   # never over an existing name
                    raise RepositoryError(
                        f"{what} already exists in {self.path}; it is written once (this "
                        "is a bug in the writer)"
                    )
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            fsync_dir(path.parent)
        except OSError as e:
            raise RepositoryError(
                f"cannot write {what} to {self.path}: {e.strerror or e}; "
                "check free space and permissions"
            ) from e

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` (under manifests/) and make its name durable."""
        if directory.is_dir():
            return
        self._make_dirs(directory.parent)
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)

    def get_manifest(self, name: str) -> bytes:
        what = f"manifest {name}"
        return self._codec.unseal(self._read(self._manifest_path(name), what), what, name)

    def delete_manifest(self, name: str) -> None:
        self._unlink_durably(self._manifest_path(name), f"manifest {name}")

    def _unlink_durably(self, path: Path, what: str) -> None:
        """Remove `path` and make that durable; a missing file is no error."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise RepositoryError(
                f"cannot delete {what} from {self.path}: {e.strerror or e}") from e
        fsync_dir(path.parent)

    def manifests(self) -> Iterator[str]:
        names: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(self._manifests):
            rel = Path(dirpath).relative_to(self._manifests)
            for f in filenames:
                name = (rel / f).as_posix()
                if is_manifest_name(name):
                    names.append(name)
        return iter(sorted(names))

    # -- key blobs (an encrypted repository's; agent.keys writes and reads them) --

    def _key_path(self, name: str) -> Path:
        check_key_name(name)
        return self.path / "keys" / name

    def put_key(self, name: str, data: bytes) -> int:
        """Store key blob `name` (stored as given: it is already encrypted),
        durable on return, never over an existing name (RepositoryError)."""
        self._write_once(self._key_path(name), data, f"key {name}")
        return len(data)

    def get_key(self, name: str) -> bytes:
        """The key blob `name`; NotFound if there is none. RepositoryError if
        it is not a regular file of at most KEY_MAX bytes (a FIFO or a
        symlink to a device planted in keys/ would hang or exhaust the
        process that opens the repository)."""
        path = self._key_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFound(f"key {name} is not in repository {self.path}") from e
        except OSError as e:
            raise RepositoryError(
                f"cannot read key {name} from {self.path}: {e.strerror or e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > KEY_MAX:
                raise RepositoryError(f"key {name} in {self.path} is not a key file (not a "
                                      f"regular file of at most {KEY_MAX} bytes); remove it")
            return os.read(fd, KEY_MAX)
        except OSError as e:
            raise RepositoryError(
                f"cannot read key {name} from {self.path}: {e.strerror or e}") from e
        finally:
            os.close(fd)

    def delete_key(self, name: str) -> None:
        """Remove key blob `name`, durably. Idempotent."""
        self._unlink_durably(self._key_path(name), f"key {name}")

    def key_names(self) -> list[str]:
        """Every key blob's name, sorted."""
        try:
            names = os.listdir(self.path / "keys")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise RepositoryError(
                f"cannot list {self.path / 'keys'}: {e.strerror or e}") from e
        return sorted(n for n in names if is_key_name(n))

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"


class RunningMarker:
    """A running backup's marker in REPO/running/ (see `LocalStore.running_start`)."""

    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.started = started

    @property
    def name(self) -> str:
        return self.path.name

    def beat(self) -> None:
        """Refresh the heartbeat (the marker's mtime). Best effort. A marker
        that is gone was taken for a crash leftover by a prune (this process
        stalled longer than `agent.prune.STALE`): it is written again, with
        its start, so later prunes keep what this backup wrote and touched."""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self._restore()
        except OSError:
            pass

    def _restore(self) -> None:
        tmp = self.path.parent.parent / "tmp" / f"{self.path.name}-{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, json.dumps({"started": self.started, "pid": os.getpid(),
                                           "restored": True}).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)   # whole, never over a name (ended meanwhile?)
            finally:
                os.unlink(tmp)
            fsync_dir(self.path.parent)
        except OSError:
            pass

    def end(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
