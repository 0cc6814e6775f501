"""Prune: delete the chunks no manifest references, beside running backups.

Owns: the mark-and-sweep over a repository, through the `Maintainable`
Protocol both backends implement (a directory: mtimes and renames; S3:
LastModified, conditional writes and announcements, see `agent.store.s3`
and README "Prune on S3"). Its source of truth is the
repository's manifests (every catalog's backups, whichever agent wrote
them), never one catalog's reference counts. It takes no lock a backup
waits for. Safety, in short (README, "Prune"):

- A backup writes a marker in REPO/running/ before its first chunk and
  removes it after its manifest; the marker records its start and its mtime
  is a heartbeat (`agent.backup.running`). Every chunk a backup references
  was written, or touched (`put` of an existing chunk, and a touch of every
  chunk just before the manifest), after that start.
- Prune writes its own marker (its start, `p0`, on the repository's clock),
  reads the live markers, takes `cutoff = min(p0, their starts) - MARGIN`,
  then marks every chunk of every manifest, then sweeps: an unmarked chunk
  whose mtime is before `cutoff` is retired (`Maintainable.retire_all`):
  locally renamed into trash/ and, unless its mtime moved to `cutoff` or
  later meanwhile (touched just before the rename), deleted. A touch
  after the rename fails, and the backup writes the chunk again (`put`)
  or fails its commit (the touch before the manifest): it never commits
  a reference to a deleted chunk.
- A manifest committed after the mark belongs to a backup that was running
  when prune read the markers (its chunks are newer than `cutoff`) or
  started after (newer than `p0`). With no backup running, everything
  unreferenced and older than `p0 - MARGIN` goes at once.

Must not: print, read the catalog or the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent import manifest as mf
from agent.errors import IntegrityError, NotFound
from agent.model import CHUNK_ID_SIZE
from agent.store import Backend

MARGIN = 2.0
"""Seconds before the cut-off a chunk must be to go: file times are coarse."""
BATCH = 1000
"""Chunks retired at once (an S3 prune announces, checks and deletes a batch
in parallel, then holds the announcements a few seconds)."""
STALE = 600.0
"""A running marker whose heartbeat is older than this (seconds) is a crash
leftover: ignored, and removed by a prune that is not a dry run."""


@dataclass
class PruneReport:
    manifests: int = 0
    chunks: int = 0                # chunk files seen
    referenced: int = 0            # distinct chunks the manifests reference
    deleted: int = 0               # chunks deleted (dry run: would be)
    freed: int = 0                 # their stored bytes
    kept_recent: int = 0           # unreferenced, but newer than the cut-off
    locked: int = 0                # unreferenced, but under Object Lock: not deletable yet
    locked_until: float = 0.0      # the latest retention date among them
    running: list[str] = field(default_factory=list)   # live markers seen
    stale: list[str] = field(default_factory=list)     # stale markers (removed)
    cutoff: float = 0.0
    dry_run: bool = False


def prune(store: Backend, *, dry_run: bool = False, margin: float = MARGIN,
          stale: float = STALE) -> PruneReport:
    """Delete every chunk no manifest references that no running backup may
    still reference. IntegrityError, with nothing deleted, when a manifest
    cannot be read (its chunks could be in use)."""
    report = PruneReport(dry_run=dry_run)
    marker = store.running_start("prune")
    try:
        p0 = marker.started
        starts = [p0]
        for name, started, beat in store.running():
            if name == marker.name or name.startswith("prune-"):
                continue
            if beat < p0 - stale:
                report.stale.append(name)
                continue
            report.running.append(name)
            starts.append(started)
        cutoff = min(starts) - margin
        report.cutoff = cutoff

        referenced: set[bytes] = set()
        hole = bytes(CHUNK_ID_SIZE)
        damaged: list[str] = []
        for name in store.manifests():
            try:
                m = mf.decode(store.get_manifest(name), name)
            except NotFound:
                continue   # forgotten since the listing
            except IntegrityError as e:
                damaged.append(f"{name} ({e.message})")
                continue
            report.manifests += 1
            for disk_map in m.maps.values():
                chunks = memoryview(disk_map.chunks)
                for i in range(0, len(chunks), CHUNK_ID_SIZE):
                    chunk = bytes(chunks[i:i + CHUNK_ID_SIZE])
                    if chunk != hole:
                        referenced.add(chunk)
        if damaged:
            raise IntegrityError(
                f"prune deleted nothing: {len(damaged)} manifest(s) cannot be read, so the "
                f"chunks they reference are unknown: {'; '.join(damaged)[:500]}; restore "
                "them from a copy or remove their backups, then prune again")
        report.referenced = len(referenced)

        candidates: list[bytes] = []
        for chunk, mtime, size in store.chunk_files():
            report.chunks += 1
            if chunk in referenced:
                continue
            if mtime >= cutoff:
                report.kept_recent += 1
                continue
            if dry_run:
                report.deleted += 1
                report.freed += size
                continue
            candidates.append(chunk)
        for batch in range(0, len(candidates), BATCH):
            for done in store.retire_all(candidates[batch:batch + BATCH], cutoff):
                if done.locked_until is not None:
                    report.locked += 1
                    report.locked_until = max(report.locked_until, done.locked_until)
                elif done.freed is None:
                    report.kept_recent += 1
                else:
                    report.deleted += 1
                    report.freed += done.freed
        if not dry_run:
            for name in report.stale:
                store.end_running(name)
    finally:
        marker.end()
    return report
