"""Lease objects in a local repository directory: the storage side of
`agent.vmlease` for `LocalStore`.

Owns: REPO/leases/<name>/, one file per generation of a lease (`000000000007`),
written once each with an exclusive create (a temp file, fsync, `link`,
which fails if the name exists), so of two writers replacing generation N
exactly one creates N+1: a compare-and-swap without a lock and without a
moment where the lease looks absent. The highest generation is the lease;
older ones are removed by the writer that superseded them. The time of a
write is the file's mtime, set by the filesystem (the repository's clock,
as prune's markers). Must not: interpret the bytes (vmlease does).

Works on any filesystem with atomic `link` (local, NFSv3+).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from agent.errors import InternalError, RepositoryError
from agent.model import StoredLease

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_GEN = re.compile(r"[0-9]{12,20}")   # zero-padded to 12; more digits past 10**12 - 1


class LocalLeases:
    """Mixed into LocalStore (its `path` is the repository directory)."""

    path: Path

    def _lease_dir(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise InternalError(f"{name!r:.80} is not a valid lease name")
        return self.path / "leases" / name

    def lease_now(self) -> float:
        """The repository's clock: the mtime the filesystem gives a new file."""
        directory = self.path / "leases"
        probe = directory / f".now-{uuid.uuid4().hex}"
        try:
            directory.mkdir(exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as e:
            raise RepositoryError(f"cannot write in {directory}: {e.strerror or e}; check "
                                  "that the repository is mounted read-write") from e

    def _generations(self, directory: Path) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(directory) if _GEN.fullmatch(n))
        except FileNotFoundError:
            return []

    def lease_names(self) -> list[str]:
        """Every lease ever written, sorted."""
        try:
            return sorted(n for n in os.listdir(self.path / "leases") if _NAME.fullmatch(n))
        except FileNotFoundError:
            return []

    def lease_get(self, name: str) -> StoredLease | None:
        """The lease's current generation, or None if it was never written."""
        directory = self._lease_dir(name)
        for _ in range(10):   # a generation removed between the listing and the read
            gens = self._generations(directory)
            if not gens:
                return None
            path = directory / f"{gens[-1]:012d}"
            try:
                with open(path, "rb") as fh:
                    written = os.fstat(fh.fileno()).st_mtime
                    data = fh.read(65536)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise RepositoryError(f"cannot read {path}: {e.strerror or e}") from e
            return StoredLease(str(gens[-1]), data, written)
        raise RepositoryError(f"lease {directory} keeps changing under the reader; try again")

    def lease_put(self, name: str, data: bytes, replaces: str | None) -> StoredLease | None:
        """Write `data` as the lease's next generation if its current one is
        still `replaces` (None: if the lease was never written). Returns what
        was written, or None when another writer got there first."""
        directory = self._lease_dir(name)
        gen = 1 if replaces is None else int(replaces) + 1
        if replaces is None and self._generations(directory):
            return None
        target = directory / f"{gen:012d}"
        tmp = directory.parent / f".tmp-{name}-{uuid.uuid4().hex}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return None
            written = os.stat(target).st_mtime
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise RepositoryError(f"cannot write lease {target}: {e.strerror or e}; check "
                                  "free space and permissions in the repository") from e
        finally:
            tmp.unlink(missing_ok=True)
        # A writer that read an old generation may have re-created one the
        # winner had already removed: only the highest generation counts.
        gens = self._generations(directory)
        if gens and gens[-1] != gen:
            target.unlink(missing_ok=True)
            return None
        for old in gens[:-1]:
            (directory / f"{old:012d}").unlink(missing_ok=True)
        return StoredLease(str(gen), bytes(data), written)
