"""What a prune needs of an S3 repository (`agent.store.Maintainable`).

Owns: the S3 form of a prune's safety argument (README, "Prune on S3"): the
server's clock, running markers, `touch` (a copy onto itself, then a check
for a prune's announcement; with Object Lock, a retention extended) and
`retire_all` (announce, re-read LastModified, delete, hold the
announcements). S3 has no rename and no atime, so these stand in for a
directory's mtimes and its rename into trash/. Must not: import boto3 (the
S3 calls are `S3Store`'s), know about backups or the catalog.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from agent.errors import NotFound, RepositoryError
from agent.store import Retired

if TYPE_CHECKING:
    from agent.store.s3 import S3Store

HOLD = 30.0
"""Seconds a prune keeps a chunk's trash/ marker after deleting it: a touch
that copied the chunk just before the delete sees the marker (it checks it
within HOLD/2 of starting) and fails instead of trusting a deleted chunk."""
TRASH_STALE = 600.0
"""Seconds after which a trash/ announcement is a crashed prune's leftover
(a prune announces a batch and decides it within seconds): ignored by a
touch, removed by the next prune."""
RELOCK_SLACK = 1.0
"""Days a re-lock adds past what a backup needs, so the next backups of the
day find the retention long enough and do not re-lock again."""


def _ts(value: datetime) -> float:
    return value.timestamp()


class S3Upkeep:
    """The `Maintainable` side of one `S3Store` (it delegates here)."""

    def __init__(self, store: S3Store) -> None:
        self.store = store

    def _trash_key(self, chunk_id: bytes) -> str:
        return self.store._key(f"trash/{chunk_id.hex()}")

    def touch(self, chunk_id: bytes) -> bool:
        """Mark the chunk as used now; False if it is missing or a prune is
        deleting it. Without Object Lock: copy it onto itself (a new
        LastModified), then check, within hold/2 of starting, that no prune
        announced its deletion (`trash/HEX`); while one is announced, wait
        until the prune kept it (the announcement goes) or deleted it
        (False). With Object Lock: extend its retention if it ends sooner
        than a backup made now needs (a locked chunk cannot be deleted)."""
        key = self.store._chunk_key(chunk_id)
        if self.store.lock_days:
            return self._relock(chunk_id, key)
        while True:
            started = time.monotonic()
            touched = self.store._copy_onto_itself(key, f"chunk {chunk_id.hex()}")
            if touched is None:
                return False
            marker = self.store._head(self._trash_key(chunk_id), "a trash marker")
            if marker is not None and touched - _ts(marker["LastModified"]) > TRASH_STALE:
                marker = None   # a crashed prune's: no prune deletes it any more
            if marker is None and time.monotonic() - started < self.store.hold / 2:
                return True
            # A prune may be deleting it (or this took too long to tell):
            # wait for the prune to decide, then touch again.
            time.sleep(min(1.0, self.store.hold / 10))
            if not self.store.has(chunk_id):
                return False

    def _relock(self, chunk_id: bytes, key: str) -> bool:
        head = self.store._head(key, f"chunk {chunk_id.hex()}")
        if head is None:
            return False
        needed = datetime.now(UTC) + timedelta(days=self.store.lock_days)
        until = head.get("ObjectLockRetainUntilDate")
        if until is not None and until >= needed:
            return True
        mode = head.get("ObjectLockMode") or self.store.settings.lock_mode
        # deleted by a prune meanwhile (False): the caller writes it again
        return self.store._set_retention(key, head.get("VersionId"), mode == "GOVERNANCE",
                                         needed + timedelta(days=RELOCK_SLACK),
                                         f"chunk {chunk_id.hex()}")

    def chunk_files(self) -> Iterator[tuple[bytes, float, int]]:
        for o in self.store._list("chunks/", "chunks"):
            name = o["Key"].rsplit("/", 1)[-1]
            if len(name) != 64 or not o["Key"].endswith(f"{name[:2]}/{name}"):
                continue
            try:
                chunk = bytes.fromhex(name)
            except ValueError:
                continue
            yield chunk, _ts(o["LastModified"]), int(o["Size"])

    def retire_all(self, chunk_ids: list[bytes], cutoff: float) -> list[Retired]:
        """Delete each chunk unless it was used at or after `cutoff`
        (see `touch` for the other side): announce (`trash/HEX`), read
        LastModified again, delete, and remove the announcements `hold`
        seconds after the last delete. With Object Lock, S3 refuses to delete
        a chunk whose retention is in force: it is reported `locked_until`."""
        if not chunk_ids:
            return []
        with ThreadPoolExecutor(self.store._pool_size, thread_name_prefix="oneback-prune") as pool:
            if self.store.lock_days:
                return list(pool.map(lambda c: self._retire_locked(c, cutoff), chunk_ids))
            stale = time.time() - TRASH_STALE
            for o in self.store._list("trash/", "trash markers"):
                if _ts(o["LastModified"]) < stale:
                    self.store._delete(o["Key"], "a stale trash marker")
            try:
                list(pool.map(lambda c: self.store._call(
                    "announce a chunk's deletion", self.store._s3.put_object,
                    Key=self._trash_key(c), Body=b""), chunk_ids))
                results = list(pool.map(lambda c: self._retire_one(c, cutoff), chunk_ids))
            finally:
                # a touch that copied a chunk just before its delete checks
                # the announcement within hold/2: keep it that long and more
                time.sleep(self.store.hold)
                list(pool.map(lambda c: self.store._delete(self._trash_key(c), "a trash marker"),
                              chunk_ids))
        return results

    def _retire_one(self, chunk_id: bytes, cutoff: float) -> Retired:
        key = self.store._chunk_key(chunk_id)
        head = self.store._head(key, f"chunk {chunk_id.hex()}")
        if head is None or _ts(head["LastModified"]) >= cutoff:
            return Retired(chunk_id)
        until = self.store._delete(key, f"chunk {chunk_id.hex()}")
        if until is not None:
            return Retired(chunk_id, locked_until=until)
        return Retired(chunk_id, freed=int(head.get("ContentLength", 0)))

    def _retire_locked(self, chunk_id: bytes, cutoff: float) -> Retired:
        key = self.store._chunk_key(chunk_id)
        head = self.store._head(key, f"chunk {chunk_id.hex()}")
        if head is None or _ts(head["LastModified"]) >= cutoff:
            return Retired(chunk_id)
        until = head.get("ObjectLockRetainUntilDate")
        if until is not None and _ts(until) > time.time():
            return Retired(chunk_id, locked_until=_ts(until))
        locked = self.store._delete(key, f"chunk {chunk_id.hex()}")
        if locked is not None:
            return Retired(chunk_id, locked_until=locked)
        return Retired(chunk_id, freed=int(head.get("ContentLength", 0)))

    def now(self) -> float:
        """The server's clock (a probe object's LastModified, whole seconds
        like every LastModified)."""
        key = self.store._key(f"tmp/clock-{uuid.uuid4().hex}")
        self.store._call("write a clock probe", self.store._s3.put_object, Key=key, Body=b"")
        try:
            head = self.store._head(key, "a clock probe")
        finally:
            self.store._delete(key, "a clock probe")
        if head is None:
            raise RepositoryError(f"a probe written to {self.store.location} vanished at once;"
                                  " check the bucket")
        return _ts(head["LastModified"])

    def running_start(self, what: str) -> S3Marker:
        """Write running/<what>-<random>; its start is the object's first
        LastModified (the server's clock), each beat re-writes it."""
        name = f"{what}-{uuid.uuid4().hex[:12]}"
        marker = S3Marker(self.store, name, 0.0)
        key = self.store._key(f"running/{name}")
        self.store._call(f"write running/{name}", self.store._s3.put_object, Key=key,
                   Body=json.dumps({"what": what}).encode())
        head = self.store._head(key, f"running/{name}")
        marker.started = _ts(head["LastModified"]) if head is not None else self.now()
        return marker

    def running(self) -> list[tuple[str, float, float]]:
        found: list[tuple[str, float, float]] = []
        for o in self.store._list("running/", "running markers"):
            name = self.store._strip(o["Key"], "running/")
            beat = _ts(o["LastModified"])
            try:
                doc = json.loads(self.store._get(o["Key"], f"running/{name}"))
                started = float(doc["started"]) if "started" in doc else beat
            except NotFound:
                continue   # ended meanwhile
            except (ValueError, KeyError, TypeError):
                started = beat
            found.append((name, started, beat))
        return sorted(found)

    def end_running(self, name: str) -> None:
        if "/" in name or name.startswith("."):
            return
        try:
            self.store._delete(self.store._key(f"running/{name}"), f"running/{name}")
        except RepositoryError:
            pass

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove clock probes left by a crash (S3 has no other unfinished writes)."""
        limit = time.time() - older_than
        removed = 0
        for o in self.store._list("tmp/", "temporary objects"):
            if _ts(o["LastModified"]) <= limit:
                self.store._delete(o["Key"], "a temporary object")
                removed += 1
        return removed


class S3Marker:
    """A running backup's marker in PREFIX/running/ (see `S3Store.running_start`)."""

    def __init__(self, store: S3Store, name: str, started: float) -> None:
        self._store = store
        self.name = name
        self.started = started

    def beat(self) -> None:
        """Re-write the marker (a new LastModified), with its start: also
        writes it again if a prune took it for a crash leftover. Best effort."""
        try:
            self._store._call(
                f"refresh running/{self.name}", self._store._s3.put_object,
                Key=self._store._key(f"running/{self.name}"),
                Body=json.dumps({"started": self.started}).encode())
        except RepositoryError:
            pass

    def end(self) -> None:
        self._store.end_running(self.name)


