"""Verifying the repository: is every backup still there, whole?

Owns: `verify` (the chosen backups' manifests read, and every chunk they
reference present, or with `read_data` read back and checked against its
SHA-256 and the xxh3-128 the manifest records, by parallel readers), the
quarantine of a damaged chunk (through the store: moved aside, kept), the
naming of every damaged backup, disk and block, and `background_slice`, one
step of the agent's continuous verify: a share of the chunk-id space, in id
order, from where the last step stopped (chunk ids are SHA-256, so a share
of the id space is that share of the chunks). The repository is the source
of truth: damage is reported only where a manifest still references it.
Must not: write SQL (the catalog keeps the progress), print, or read
configuration.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import xxhash

from agent import manifest as mf
from agent.errors import IntegrityError, Interrupted, NotFound, OnebackError
from agent.model import CHECKSUM_SIZE, CHUNK_ID_SIZE, Damage, VerifyProgress
from agent.store import Repository

SPACE = 1 << (8 * CHUNK_ID_SIZE)   # the chunk-id space, as integers
BACKGROUND = "background"
COMMAND = "command"
DAY = 86400.0
_HOLE = bytes(CHUNK_ID_SIZE)
# Chunk bytes a verify --read-data holds at once: each read holds the stored
# chunk and the decoded block, so at 4 MiB blocks 8 reads in flight, whatever
# `workers` asks (16 of them held 128 MiB).
READ_MEMORY = 64 * 1024 * 1024
# What a verify keeps per distinct chunk it checks (the id and the xxh3-128
# the manifests record, in a dict, and its place in the sorted list), and
# how much of that it holds at once: more chunks than fit are checked in
# slices of the chunk-id space, the manifests read once per slice.
PER_CHUNK = 240
CHUNK_MEMORY = 32 * 1024 * 1024
MAX_SLICES = 64   # each reads every manifest again


class VerifyCatalog(Protocol):
    """What a verify needs of the catalog."""

    def manifest_of(self, backup_id: int) -> str | None: ...

    def manifest_names(self) -> dict[str, int]: ...

    def referenced_chunk_count(self) -> int: ...


class ProgressCatalog(VerifyCatalog, Protocol):
    """What the continuous verify needs of the catalog besides."""

    def verify_progress(self, key: str) -> VerifyProgress | None: ...

    def verify_record(self, p: VerifyProgress) -> None: ...

    def referenced_chunks(self, low: bytes, high: bytes | None) -> list[bytes]: ...


@dataclass
class VerifyReport:
    read_data: bool
    sample: float | None           # percent of the chunks checked, None: all
    manifests: int = 0             # manifests read
    chunks: int = 0                # distinct chunks they reference
    checked: int = 0               # chunks checked
    bytes_read: int = 0            # raw bytes read back (with read_data)
    seconds: float = 0.0
    damage: list[Damage] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)   # hex ids moved aside
    slices: int = 1                # slices of the chunk-id space checked one after another

    @property
    def damaged_backups(self) -> list[str]:
        """One label per damaged backup: its id, or its manifest's name."""
        seen: dict[str, None] = {}
        for d in self.damage:
            seen[str(d.backup_id) if d.backup_id is not None else d.manifest] = None
        return list(seen)


def damage_error(report: VerifyReport) -> IntegrityError | None:
    """The error a verify that found damage ends with (exit 9)."""
    if not report.damage:
        return None
    labels = report.damaged_backups
    return IntegrityError(
        f"the repository is damaged: {len(report.damage)} problem(s) in backup(s) "
        f"{', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''}; damaged chunks were "
        "quarantined; the next backup of each VM that still holds those blocks stores them "
        "anew (`oneback backup VM_ID`)")


# -- one check ------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    problem: str | None            # None: whole
    detail: str = ""
    bytes_read: int = 0
    quarantined: bool = False
    xxh3: bytes | None = None      # the chunk's actual xxh3-128, when read


def _check(store: Repository, chunk: bytes, xxh3: set[bytes] | None,
           read_data: bool) -> _Found:
    if not read_data:
        return _Found(None if store.has(chunk) else "missing")
    try:
        data = store.get(chunk)
    except NotFound:
        return _Found("missing")
    except IntegrityError as e:
        return _Found("corrupt", e.message, 0, store.quarantine(chunk))
    except OnebackError as e:
        return _Found("unreadable", e.message)
    actual = bytes(xxhash.xxh3_128_digest(data))
    if xxh3 is not None and xxh3 != {actual}:
        return _Found("checksum", "the chunk is whole but its xxh3-128 is not the one the "
                      "manifest records", len(data), xxh3=actual)
    return _Found(None, "", len(data))


T = TypeVar("T")
R = TypeVar("R")


def _parallel(fn: Callable[[T], R], items: Iterable[T], workers: int,
              cancel: threading.Event | None) -> Iterator[tuple[T, R]]:
    """fn over items on `workers` threads, at most 2 x workers in flight."""
    window: list[tuple[T, Future[R]]] = []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="oneback-verify") as pool:
        for item in items:
            if cancel is not None and cancel.is_set():
                raise Interrupted("the verify was stopped")
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 2 * max(1, workers):
                done, fut = window.pop(0)
                yield done, fut.result()
        for done, fut in window:
            yield done, fut.result()


# -- manifests --------------------------------------------------------------------


def _chosen(store: Repository, catalog: VerifyCatalog, backup_ids: Sequence[int],
            report: VerifyReport) -> list[tuple[str, int | None, bool]]:
    """(manifest, catalog backup id, whether the catalog names it) to read."""
    names = catalog.manifest_names()
    if backup_ids:
        out: list[tuple[str, int | None, bool]] = []
        for b in dict.fromkeys(backup_ids):
            name = catalog.manifest_of(b)     # NotFound: no such backup (exit 6)
            if name is None:
                report.damage.append(Damage("", b, None, None, None, None, "manifest",
                                            "the backup has no manifest; run `oneback init`"))
                continue
            out.append((name, b, True))
        return out
    listed = list(store.manifests())
    present = set(listed)
    out = [(n, names.get(n), n in names) for n in listed]
    out += [(n, b, True) for n, b in sorted(names.items(), key=lambda kv: kv[1])
            if n not in present]
    return out


def _read(store: Repository, name: str, backup_id: int | None, named: bool,
          report: VerifyReport | None) -> mf.Manifest | None:
    """The manifest; None when it is gone or damaged (recorded in `report`,
    unless it went away since it was listed: forgotten meanwhile)."""
    try:
        return mf.decode(store.get_manifest(name), name)
    except NotFound:
        if named and report is not None:
            report.damage.append(Damage(name, backup_id, None, None, None, None, "manifest",
                                        "the manifest is missing from the repository"))
    except OnebackError as e:
        if report is not None:
            report.damage.append(Damage(name, backup_id, None, None, None, None, "manifest",
                                        e.message))
    return None


def _blocks_of(m: mf.Manifest, chunk: bytes) -> Iterator[tuple[int, int]]:
    """(disk id, block index) of every block of `m` stored as `chunk`."""
    for disk_id, dmap in sorted(m.maps.items()):
        buf = bytes(dmap.chunks)
        at = buf.find(chunk)
        while at >= 0:
            if at % CHUNK_ID_SIZE == 0:
                yield disk_id, at // CHUNK_ID_SIZE
            at = buf.find(chunk, at + 1)


def _locate(store: Repository, catalog: VerifyCatalog,
            manifests: Iterable[tuple[str, int | None, bool]],
            bad: dict[bytes, _Found]) -> list[Damage]:
    """Every block of the given manifests stored in a bad chunk."""
    out: list[Damage] = []
    for name, backup_id, named in manifests:
        m = _read(store, name, backup_id, named, None)
        if m is None:
            continue
        for chunk, found in bad.items():
            for disk_id, block in _blocks_of(m, chunk):
                if found.xxh3 is not None and m.maps[disk_id].record(block).checksum == \
                        found.xxh3:
                    continue   # a checksum problem: this block records the right one
                out.append(Damage(name, backup_id, m.vm_id, disk_id, block, chunk.hex(),
                                  found.problem or "", found.detail, found.quarantined))
    return out


# -- verify -------------------------------------------------------------------------


def verify(store: Repository, catalog: VerifyCatalog, backup_ids: Sequence[int] = (), *,
           read_data: bool = False, sample: float | None = None, workers: int = 8,
           rng: random.Random | None = None, cancel: threading.Event | None = None,
           memory: int = READ_MEMORY, chunk_memory: int = CHUNK_MEMORY) -> VerifyReport:
    """Check the chosen backups (all the repository holds when none are
    named): every manifest reads and every chunk it references is there,
    or with `read_data` reads back whole (SHA-256) with the xxh3-128 the
    manifest records; `sample` (percent) checks that share of the chunks,
    drawn at random (in each slice). A damaged chunk is quarantined.
    NotFound if a named backup does not exist. At most `workers` checks run
    at once, and with `read_data` no more than fit twice their backups'
    largest block in `memory`. The chunks are checked in id order, in as
    many slices of the id space as keep PER_CHUNK bytes per chunk within
    `chunk_memory`, reckoned from the chunks the catalog references (at
    most the blocks the manifests hold), at most MAX_SLICES."""
    t0 = time.monotonic()
    report = VerifyReport(read_data, sample)
    chosen = _chosen(store, catalog, backup_ids, report)
    readable: list[tuple[str, int | None, bool]] = []
    block_size = blocks = 0
    for name, backup_id, named in chosen:
        m = _read(store, name, backup_id, named, report)
        if m is None:
            continue
        report.manifests += 1
        readable.append((name, backup_id, named))
        block_size = max([block_size, *(d.block_size for d in m.disks)])
        blocks += sum(dmap.count for dmap in m.maps.values())
    if read_data:
        workers = max(1, min(workers, memory // (2 * max(1, block_size))))
    known = catalog.referenced_chunk_count()
    chunks = min(blocks, known) if known else blocks
    report.slices = max(1, min(MAX_SLICES, -(-chunks * PER_CHUNK // max(1, chunk_memory))))
    bad: dict[bytes, _Found] = {}
    for k in range(report.slices):
        low, high = SPACE * k // report.slices, SPACE * (k + 1) // report.slices
        _verify_slice(store, readable, low.to_bytes(CHUNK_ID_SIZE, "big"),
                      None if high >= SPACE else high.to_bytes(CHUNK_ID_SIZE, "big"),
                      report, bad, workers, rng, cancel)
    report.damage += _locate(store, catalog, readable, bad)
    report.seconds = time.monotonic() - t0
    return report


def _verify_slice(store: Repository, readable: Sequence[tuple[str, int | None, bool]],
                  low: bytes, high: bytes | None, report: VerifyReport,
                  bad: dict[bytes, _Found], workers: int, rng: random.Random | None,
                  cancel: threading.Event | None) -> None:
    """Check the chunks with ids from `low` (inclusive) to `high` (exclusive;
    None: to the end) that the `readable` manifests reference; a manifest
    gone since it was first read was forgotten meanwhile and is skipped."""
    xxh3: dict[bytes, bytes] = {}
    conflicts: dict[bytes, set[bytes]] = {}   # chunks recorded with several xxh3s
    for name, backup_id, named in readable:
        m = _read(store, name, backup_id, named, None)
        if m is None:
            continue
        for dmap in m.maps.values():
            chunks, sums = bytes(dmap.chunks), bytes(dmap.checksums)
            for i in range(dmap.count):
                chunk = chunks[i * CHUNK_ID_SIZE:(i + 1) * CHUNK_ID_SIZE]
                if chunk == _HOLE or chunk < low or (high is not None and chunk >= high):
                    continue
                digest = sums[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE]
                first = xxh3.setdefault(chunk, digest)
                if first != digest:
                    conflicts.setdefault(chunk, {first}).add(digest)
    report.chunks += len(xxh3)
    ids = sorted(xxh3)
    if report.sample is not None:
        k = min(len(ids), max(1 if ids else 0, round(len(ids) * report.sample / 100)))
        ids = sorted((rng or random.Random()).sample(ids, k))
    for chunk, found in _parallel(
            lambda c: _check(store, c, conflicts.get(c) or {xxh3[c]}, report.read_data),
            ids, workers, cancel):
        report.checked += 1
        report.bytes_read += found.bytes_read
        if found.problem is not None:
            bad[chunk] = found
            if found.quarantined:
                report.quarantined.append(chunk.hex())


def as_progress(report: VerifyReport, now: float | None = None) -> VerifyProgress:
    """A command run's result, as the catalog keeps it for `oneback status`."""
    return VerifyProgress(COMMAND, time.time() if now is None else now, report.checked,
                          report.bytes_read, tuple(report.damage[:100]),
                          read_data=report.read_data)


# -- the agent's continuous verify --------------------------------------------------


@dataclass(frozen=True)
class Slice:
    checked: int
    bytes_read: int
    damage: tuple[Damage, ...]
    pass_done: bool
    progress: VerifyProgress


def background_slice(store: Repository, catalog: ProgressCatalog, share: float, *,
                     workers: int = 2, now: float | None = None,
                     cancel: threading.Event | None = None) -> Slice:
    """Read back and check the next `share` (0 < share <= 1) of the
    chunk-id space that the catalog's backups reference, from where the
    last slice stopped (kept in the catalog: a restart goes on there);
    quarantine what is damaged, name the backups it hurts, and record the
    result. A pass ends at the top of the id space and starts again at 0."""
    now = time.time() if now is None else now
    last = catalog.verify_progress(BACKGROUND)
    cursor = int.from_bytes(last.cursor, "big") if last is not None and last.cursor else 0
    finished = last.last_pass_finished if last is not None else None
    if last is None or cursor == 0:
        # A new pass: what the last one found stays listed until it is healed.
        pass_started, pass_checked = now, 0
        pass_damage = tuple(d for d in (last.damage if last is not None else ())
                            if d.chunk is not None and not store.has(bytes.fromhex(d.chunk)))
    else:
        pass_started, pass_checked, pass_damage = (last.pass_started, last.pass_checked,
                                                   last.damage)
    top = cursor + max(1, int(min(1.0, max(0.0, share)) * SPACE))
    done = top >= SPACE
    low = cursor.to_bytes(CHUNK_ID_SIZE, "big")
    high = None if done else top.to_bytes(CHUNK_ID_SIZE, "big")
    chunks = catalog.referenced_chunks(low, high)
    bad: dict[bytes, _Found] = {}
    checked = read = 0
    for chunk, found in _parallel(lambda c: _check(store, c, None, True), chunks, workers,
                                  cancel):
        checked += 1
        read += found.bytes_read
        if found.problem is not None:
            bad[chunk] = found
    damage: tuple[Damage, ...] = ()
    if bad:
        names = catalog.manifest_names()
        everything = [(n, names.get(n), n in names) for n in store.manifests()]
        damage = tuple(_locate(store, catalog, everything, bad))
    # Once per block, as first found (a chunk quarantined as corrupt is
    # missing to the next pass until a backup heals it).
    first: dict[tuple[str, int | None, int | None, str | None], Damage] = {}
    for d in pass_damage + damage:
        first.setdefault((d.manifest, d.disk_id, d.block, d.chunk), d)
    listed = tuple(first.values())
    progress = VerifyProgress(
        BACKGROUND, now, checked, read, listed[:100],
        cursor=b"" if done else top.to_bytes(CHUNK_ID_SIZE, "big"),
        pass_started=pass_started, pass_checked=pass_checked + checked,
        last_pass_finished=now if done else finished)
    catalog.verify_record(progress)
    return Slice(checked, read, damage, done, progress)


def share_due(rate: float, elapsed: float) -> float:
    """The share of the repository to check after `elapsed` seconds at
    `rate` (a share per day); at most one whole pass."""
    return min(1.0, max(0.0, rate * elapsed / DAY))
