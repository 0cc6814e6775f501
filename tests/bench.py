"""`make bench`: oneback against restic, borg and the disk itself, on one image, in one run.

Builds a deterministic disk image with realistic content, then measures the
plain sequential read and write of the disk (`dd bs=4M`, the physical limits),
a full backup, an incremental after 1% of the 4 MiB blocks changed, and a
restore of the latest backup, for restic (`backup --stdin`), borg (fixed 4 MiB
chunker, zstd) and oneback (through its real path: onesim, snapshot, saveas,
attach to the proxy VM, read the device); then oneback again into an
encrypted repository, into an S3 repository and an encrypted one on moto's
S3 server (started here as the tests start it), and restic with its s3
backend on the same server (tests/bench_support/s3.py; borg has no S3
backend). Each tool runs as a child process
with a cold page cache; its wall time, peak RSS and repository size (allocated
bytes) are recorded. Prints a table of results and of the issue's targets,
PASS or FAIL, and writes the same as Markdown to `--output`.

Run: `make bench`, or `.venv/bin/python -m tests.bench --size 256M` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench_support import mountread, netdisk
from tests.bench_support.image import BLOCK, change_blocks, changed_blocks, make_image
from tests.bench_support.oneback import Oneback, OnebackUnavailable
from tests.bench_support.s3 import Bucket, ResticS3, S3Unavailable
from tests.bench_support.tools import (
    Borg,
    Measured,
    Restic,
    drop_caches,
    du,
    ensure_tools,
    run,
    sha256,
)

MiB = 1024 * 1024
OPS_NOTE = "snapshot, saveas, attach, detach, delete"


@dataclass
class Row:
    tool: str
    phase: str
    wall: float | None = None
    nbytes: int = 0           # bytes the step handled, for MiB/s
    repo: int | None = None   # repository size after the step
    added: int | None = None  # what the step added to it
    rss_kib: int | None = None
    note: str = ""
    key: str = ""             # what targets() looks rows up by
    value: float | None = None  # a measured quantity that is not a time, for targets()


@dataclass
class Bench:
    work: Path
    image: Path
    size: int
    rows: list[Row] = field(default_factory=list)
    tools: list[Restic | Borg] = field(default_factory=list)
    ob: Oneback | None = None
    enc: Oneback | None = None   # the same VM into an encrypted repository
    bucket: Bucket | None = None  # the S3 server (moto) and its bucket
    s3_tools: list[ResticS3] = field(default_factory=list)  # restic's s3 backend there
    s3: list[Oneback] = field(default_factory=list)  # the same VM into s3://, plain, encrypted

    def run_all(self) -> None:
        """Every measurement, in order: reads, fulls, the guest's change, incrementals,
        writes, restores of the latest backup."""
        self.plain_reads()
        if self.ob:
            self.oneback_startup(self.ob)
        for phase in ("full", "incremental"):
            if phase == "incremental":
                self.change()
            for tool in self.tools:
                self.backup(tool, phase)
            if self.ob:
                self.oneback_backup(self.ob, phase)
            if self.enc:
                self.oneback_backup(self.enc, phase)
            for s3tool in self.s3_tools:
                self.backup(s3tool, phase)
            for ob in self.s3:
                self.oneback_backup(ob, phase)
        if self.ob:
            self.oneback_scan(self.ob)
            self.oneback_syncs(self.ob)
            self.oneback_s3_store(self.ob)
        self.plain_write()
        for tool in self.tools:
            self.restore(tool)
        if self.ob:
            self.oneback_restore(self.ob)
            self.oneback_export(self.ob)
            self.oneback_mount(self.ob)
        if self.enc:
            self.oneback_export(self.enc)
        for s3tool in self.s3_tools:
            self.restore(s3tool)
        for ob in self.s3:
            self.oneback_export(ob)
        if self.ob:
            self.oneback_verify(self.ob)
            self.oneback_manifests(self.ob)
            self.oneback_prune(self.ob)
        self.network_disk()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        took = f"{row.wall:.2f} s" if row.wall is not None else ""
        print(f"bench: {row.tool} {row.phase}: {took} {row.note}".rstrip(), flush=True)

    def measured(self, tool: str, phase: str, m: Measured, key: str, *, note: str = "",
                 repo: Path | None = None, before: int = 0,
                 stored: Callable[[], int] | None = None) -> None:
        """A row for `m`; the repository's size after it from `stored` or the
        allocated bytes under `repo`."""
        if m.rc != 0:
            self.add(Row(tool, phase, note=m.last_error(), key=key))
            return
        after = stored() if stored else du(repo) if repo else None
        self.add(Row(tool, phase, m.wall, self.size, after,
                     after - before if after is not None else None, m.rss_kib, note, key))

    def change(self) -> None:
        blocks = changed_blocks(self.size)
        for path in [self.image, *([self.ob.guest_disk] if self.ob else [])]:
            change_blocks(str(path), blocks)
        print(f"bench: the guest changed {len(blocks)} of {self.size // BLOCK} blocks")

    def plain_reads(self) -> None:
        def dd(path: Path, cold: bool = True) -> Measured:
            return run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"], cold=cold)

        self.measured("dd", "read image", dd(self.image), "dd.read",
                      note="what restic and borg read")
        if self.ob:
            disk = self.ob.guest_disk
            self.measured("dd", "read VM disk", dd(disk), "dd.read.vm",
                          note="the VM's disk in onesim (zero blocks are holes there)")
            self.measured("dd", "read VM disk, warm", dd(disk, cold=False), "dd.read.warm",
                          note="the same from the page cache, where onesim's copy leaves it")

    def plain_write(self) -> None:
        target = self.work / "write-test"
        m = run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={self.size // BLOCK}",
                 "conv=fsync", "status=none"])
        target.unlink(missing_ok=True)
        self.measured("dd", "write (fsync)", m, "dd.write", note="the restore target's limit")

    def backup(self, tool: Restic | Borg | ResticS3, phase: str) -> None:
        before = tool.stored()
        m = tool.backup(self.image, phase)
        self.measured(tool.name, f"backup {phase}{tool.label}", m, f"{tool.key}.{phase}",
                      stored=tool.stored, before=before, note=tool.note)

    def restore(self, tool: Restic | Borg | ResticS3) -> None:
        target = self.work / f"{tool.key}-restore"
        m, path = tool.restore(target)
        same = m.rc == 0 and path.exists() and sha256(path) == sha256(self.image)
        self.measured(tool.name, f"restore{tool.label}", m, f"{tool.key}.restore",
                      note=tool.note + ("" if same else "; restored data DIFFERS from the image"))
        shutil.rmtree(target, ignore_errors=True)

    def oneback_backup(self, ob: Oneback, phase: str) -> None:
        """A backup through the whole path; into the encrypted or S3 repository when
        `ob` is such a variant (rows `..., S3 encrypted`, keys `oneback.s3.encrypted.*`)."""
        label, key = ob.label, ob.key
        before = ob.stored()
        m = run(ob.backup_cmd())
        doc = ob.parse(m)
        if doc is None:
            self.add(Row("oneback", f"backup {phase}{label}", note=m.last_error()))
            return
        after = ob.stored()
        changed = sum(int(d.get("bytes_changed", 0)) for d in doc.get("disks", []))
        self.add(Row("oneback", f"backup {phase}{label}", m.wall, self.size, after,
                     after - before, m.rss_kib,
                     f"{doc.get('kind')}, changed {changed / MiB:.0f} MiB", f"{key}.{phase}"))
        scan, ops = float(doc.get("scan_seconds", 0.0)), float(doc.get("cloud_seconds", 0.0))
        self.add(Row("oneback", "(read+scan)", scan, self.size,
                     note="reading, hashing, storing"
                     + (", encrypting" if ob.passphrase else "")
                     + (" into S3" if ob.bucket else ""),
                     key=f"{key}.scan.{phase}"))
        self.add(Row("oneback", "(OpenNebula ops)", ops, note=OPS_NOTE,
                     key=f"{key}.ops.{phase}"))
        self.add(Row("oneback", "(the rest)", max(m.wall - scan - ops, 0.0),
                     note="start-up, sweep, catalog, commit"))
        if "cloud_bytes_copied" in doc:
            copied = int(doc["cloud_bytes_copied"])
            self.add(Row("oneback", "(OpenNebula copied)", note=f"{copied / MiB:.0f} MiB"
                         f" copied by the datastore drivers: {copied / self.size:.2f}x the disk",
                         key=f"{key}.copied.{phase}", value=copied / self.size))

    def oneback_startup(self, ob: Oneback, runs: int = 7) -> None:
        """Start-up of commands that do not talk to the cloud, on the still empty
        catalog: the median of `runs` warm runs (a command's modules are cached
        after its first run, as on a proxy where oneback runs all day)."""
        for phase, args, key in (("start-up: --version", ["--version"], "oneback.startup"),
                                 ("start-up: list, empty catalog", ob.list_args(),
                                  "oneback.startup.list")):
            walls, last = [], None
            for _ in range(runs):
                last = run([ob.exe, *args], cold=False)
                if last.rc != 0:
                    self.add(Row("oneback", phase, note=last.last_error(), key=key))
                    break
                walls.append(last.wall)
            else:
                walls.sort()
                self.add(Row("oneback", phase, walls[len(walls) // 2], 0, None, None,
                             last.rss_kib if last else None, f"median of {runs}, warm",
                             key))

    def oneback_scan(self, ob: Oneback) -> None:
        """The read-and-scan phase alone, on the VM's disk, cold, right after a
        cold plain read of the same file: like against like, no OpenNebula."""
        dd = run(["dd", f"if={ob.guest_disk}", "of=/dev/null", "bs=4M", "status=none"])
        self.measured("dd", "read VM disk, again", dd, "dd.read.vm.again",
                      note="just before the isolated scan")
        dd = run(["dd", f"if={ob.guest_disk}", "of=/dev/null", "bs=4M", "iflag=direct",
                  "status=none"])
        self.measured("dd", "read VM disk, O_DIRECT", dd, "dd.read.vm.direct",
                      note="the same with iflag=direct: the O_DIRECT read's limit")
        m = run(ob.scan_cmd())
        try:
            doc = json.loads(m.out)
        except ValueError:
            self.add(Row("oneback", "scan alone", note=m.last_error()))
            return
        how = "O_DIRECT" if doc.get("direct") else "buffered, pages dropped behind"
        self.add(Row("oneback", "scan alone", float(doc["seconds"]), self.size, None, None,
                     m.rss_kib, "the incremental's read+scan on the VM disk, no OpenNebula,"
                     f" read_depth 16, {how}", "oneback.scan.isolated"))
        for phase, cmd, note, key in (
                ("scan alone, buffered", ob.scan_cmd(direct=False),
                 "the same, direct_io = false: readahead, pages dropped behind",
                 "oneback.scan.buffered"),
                ("scan alone, read_depth 1", ob.scan_cmd(read_depth=1),
                 "the same as `scan alone`, one read in flight", "oneback.scan.depth1")):
            other = run(cmd)
            try:
                seconds = float(json.loads(other.out)["seconds"])
            except (ValueError, KeyError):
                self.add(Row("oneback", phase, note=other.last_error()))
                continue
            self.add(Row("oneback", phase, seconds, self.size, None, None, other.rss_kib,
                         note, key))

    def oneback_syncs(self, ob: Oneback) -> None:
        """A full backup's read-and-store phase alone, into a fresh repository,
        with one syncfs before the commit and, side by side, with two fsyncs
        per new chunk (how it was before): the cost of durability."""
        for mode, phase, note in (
                ("each", "full store, fsync per chunk", "file + directory fsync per new chunk"),
                ("batch", "full store, one syncfs", "no fsync per chunk; one syncfs at the end"),
                ("encrypted", "full store, encrypted", "the same into an encrypted repository"
                 " (AES-256-GCM, HMAC-SHA256 ids)")):
            repo = self.work / f"syncs-{mode}"
            m = run(ob.fullstore_cmd(repo, mode))
            try:
                doc = json.loads(m.out)
            except ValueError:
                self.add(Row("oneback", phase, note=m.last_error()))
                continue
            shutil.rmtree(repo, ignore_errors=True)
            self.add(Row("oneback", phase, float(doc["seconds"]), self.size, None, None,
                         m.rss_kib, f"{note}: {doc['chunks']} chunks, flush"
                         f" {float(doc['flush_seconds']):.2f} s", f"oneback.syncs.{mode}"))

    def oneback_s3_store(self, ob: Oneback) -> None:
        """The same full read-and-store, alone, into a fresh S3 repository on the
        bench's server, plain and encrypted: encryption's cost on S3 without
        OpenNebula, start-up or the passphrase's key derivation in the way."""
        if not self.bucket:
            return
        for mode, phase, note in (
                ("s3", "full store, S3", "the same into an S3 repository"),
                ("s3-encrypted", "full store, S3 encrypted",
                 "the same into an encrypted S3 repository (AES-256-GCM, HMAC-SHA256 ids)")):
            prefix = f"fullstore-{mode}"
            m = run(ob.fullstore_cmd(f"s3://{self.bucket.name}/{prefix}", mode),
                    env={"BENCH_S3_ENDPOINT": self.bucket.endpoint})
            self.bucket.delete(prefix)
            try:
                doc = json.loads(m.out)
            except ValueError:
                self.add(Row("oneback", phase, note=m.last_error()))
                continue
            self.add(Row("oneback", phase, float(doc["seconds"]), self.size, None, None,
                         m.rss_kib, f"{note}: {doc['chunks']} chunks",
                         f"oneback.syncs.{mode}"))

    def oneback_restore(self, ob: Oneback) -> None:
        cmd = ob.restore_cmd()
        if cmd is None:
            self.add(Row("oneback", "restore VM", note="skipped: no `oneback restore` yet"))
            return
        m = run(cmd, sync_after=True)
        doc = ob.parse(m)
        disk = ob.restored_disk(doc) if doc else None
        same = disk is not None and sha256(disk) == sha256(self.image)
        note = "new RUNNING VM, through OpenNebula" + ("" if same else "; NOT verified equal")
        self.measured("oneback", "restore VM", m, "oneback.restore", note=note)

    def oneback_export(self, ob: Oneback) -> None:
        label, key = ob.label, ob.key
        target = self.work / "oneback-export.img"
        cmd = ob.export_cmd(target)
        if cmd is None:
            self.add(Row("oneback", f"export{label}", note="skipped: no `oneback export` yet"))
            return
        m = run(cmd, sync_after=True)
        same = m.rc == 0 and target.exists() and sha256(target) == sha256(self.image)
        self.measured("oneback", f"export{label}", m, f"{key}.export",
                      note="the restore's data path alone, to a sparse file"
                      + (f", from the {label[2:]} repository" if label else "")
                      + ("" if same else "; DIFFERS from the image"))
        target.unlink(missing_ok=True)

    def oneback_mount(self, ob: Oneback) -> None:
        """Single-file restore: `oneback mount` of the latest backup's disk, cold each
        time: the time to its first byte, then random 4 KiB and 1 MiB reads through
        the FUSE file, one reader (tests/bench_support/mountread.py)."""
        why = mountread.unavailable() or (None if ob.last_backup else "no backup to mount")
        if why:
            self.add(Row("oneback", "mount", note=f"skipped: {why}", key="oneback.mount"))
            return
        assert ob.last_backup is not None
        for unit, reads, key in ((4096, 2000, "rand4k"), (MiB, 200, "rand1m")):
            try:
                m = mountread.measure(ob.exe, ob.config, ob.last_backup, self.work / "mnt",
                                      self.size, unit=unit, reads=reads)
            except OSError as e:
                self.add(Row("oneback", "mount", note=f"failed: {e}", key="oneback.mount"))
                return
            if unit == 4096:
                self.add(Row("oneback", "mount: time to first byte", m.first_byte,
                             rss_kib=m.rss_kib, key="oneback.mount.ttfb",
                             note=f"start to the first 4 KiB of disk.raw, cold (mounted after"
                             f" {m.mounted:.2f} s: the block map read)"))
            size = "4 KiB" if unit == 4096 else "1 MiB"
            self.add(Row("oneback", f"mount: random {size} reads", m.seconds, m.nbytes,
                         rss_kib=m.rss_kib, key=f"oneback.mount.{key}",
                         note=f"{m.count / m.seconds:.0f} reads/s, {m.count} reads over the"
                         " whole disk, one reader, cold"))

    def oneback_verify(self, ob: Oneback) -> None:
        """`oneback verify --read-data` against a plain read of the same chunk files."""
        chunks = ob.repository / "chunks"
        m = run(["sh", "-c", f"find '{chunks}' -type f -exec cat {{}} + > /dev/null"])
        self.measured("cat", "read repository chunks", m, "cat.read.repo",
                      note="every chunk file, one reader: the repository's plain read")
        m = run([ob.exe, "verify", "--read-data", "--json", "--config", str(ob.config)])
        doc = ob.parse(m)
        note = (f"{doc['checked']} chunks of {doc['manifests']} backups, parallel; "
                + ("clean" if doc["clean"] else "DAMAGE FOUND")) if doc else ""
        self.measured("oneback", "verify --read-data", m, "oneback.verify", note=note)


    def oneback_manifests(self, ob: Oneback) -> None:
        """What a backup's manifest costs in the repository, per backup and per
        block of the disk (the issue's bound: about 50 bytes per block)."""
        files = [p for p in (ob.repository / "manifests").rglob("*") if p.is_file()]
        if not files:
            self.add(Row("oneback", "manifests", note="no manifest found", key="oneback.manifest"))
            return
        per_backup = sum(p.stat().st_size for p in files) / len(files)
        blocks = max(1, -(-self.size // (4 * MiB)))
        self.add(Row("oneback", "manifests", note=f"{per_backup:.0f} bytes per backup over"
                     f" {len(files)} backups: {per_backup / blocks:.1f} bytes per 4 MiB block",
                     key="oneback.manifest"))

    def oneback_prune(self, ob: Oneback) -> None:
        """Forget all but the newest backup, then time `oneback prune` (its
        wall time and peak memory) over what that left unreferenced."""
        cfg = ["--config", str(ob.config)]
        forgot = ob.parse(run([ob.exe, "forget", "--keep-last", "1", "--json", *cfg]))
        before = du(ob.repository)
        m = run([ob.exe, "prune", "--json", *cfg])
        doc = ob.parse(m)
        note = (f"{doc['deleted']} of {doc['chunks']} chunks freed"
                f" ({doc['freed'] / MiB:.1f} MiB), {doc['manifests']} backups kept"
                f" after forgetting {len((forgot or {}).get('forgotten', []))}") if doc else ""
        self.measured("oneback", "prune", m, "oneback.prune", note=note, repo=ob.repository,
                      before=before)

    def network_disk(self) -> None:
        """The same disk served through FUSE with a per-request latency and a bounded
        number of requests in flight (tests/bench_support/netdisk.py: an RBD or iSCSI
        volume), read by dd, oneback's scan at several read depths, restic and borg."""
        lat, flight = netdisk.DEFAULT_LATENCY, netdisk.DEFAULT_IN_FLIGHT
        shape = f"{lat * 1000:.0f} ms a request, {flight} in flight"
        netdisk.ensure_fusepy()
        why = netdisk.available()
        if why:
            self.add(Row("netdisk", "all", note=f"skipped: {why}", key="netdisk"))
            return
        source = self.ob.guest_disk if self.ob else self.image
        try:
            mounted = netdisk.Mounted(source, self.work / "netdisk", latency=lat,
                                      in_flight=flight, log=self.work / "netdisk.log")
        except OSError as e:
            self.add(Row("netdisk", "all", note=f"skipped: {e}", key="netdisk"))
            return
        with mounted:
            path = mounted.path
            m = run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"])
            self.measured("dd", "read network disk", m, "netdisk.dd",
                          note=f"FUSE, {shape}: the plain read, kernel readahead")
            if self.ob:
                for depth in (1, 4, 16, 32):
                    self.netdisk_scan(self.ob, path, depth)
            for tool in self.tools:
                m = tool.backup(path, "netdisk")
                self.measured(tool.name, "backup from network disk", m,
                              f"netdisk.{tool.name}",
                              note="the same disk's bytes again (an incremental), from FUSE")

    def netdisk_scan(self, ob: Oneback, path: Path, depth: int) -> None:
        m = run(ob.scan_cmd(read_depth=depth, path=path))
        try:
            doc = json.loads(m.out)
            seconds = float(doc["seconds"])
        except (ValueError, KeyError):
            self.add(Row("oneback", f"scan network disk, read_depth {depth}",
                         note=m.last_error(), key=f"netdisk.scan.{depth}"))
            return
        how = "O_DIRECT" if doc.get("direct") else "buffered"
        self.add(Row("oneback", f"scan network disk, read_depth {depth}", seconds, self.size,
                     None, None, m.rss_kib, f"the scan alone from FUSE, {how}",
                     f"netdisk.scan.{depth}"))


# -- the tables ------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def results_table(rows: list[Row]) -> list[str]:
    out = ["| tool | step | wall s | MiB/s | repo MiB | +MiB | peak RSS MiB | note |",
           "|---|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        rate = r.nbytes / MiB / r.wall if r.wall and r.nbytes else None
        repo = r.repo / MiB if r.repo is not None else None
        added = r.added / MiB if r.added is not None else None
        rss = r.rss_kib / 1024 if r.rss_kib is not None else None
        out.append(f"| {r.tool} | {r.phase} | {fmt(r.wall, '.2f')} | {fmt(rate, '.0f')}"
                   f" | {fmt(repo)} | {fmt(added)} | {fmt(rss, '.0f')} | {r.note} |")
    return out


Target = tuple[str, float | None, str, Callable[[float], bool] | None]


def targets(rows: list[Row]) -> list[Target]:
    """(what, value, goal, test) for issue 13's goals and the informative ratios;
    value None when not measured, test None when only informative."""
    by_key = {r.key: r for r in rows if r.key}

    def wall(key: str) -> float | None:
        r = by_key.get(key)
        return r.wall if r and r.wall else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def at_least(goal: float) -> Callable[[float], bool]:
        return lambda v: v >= goal

    scan, ob_incr = wall("oneback.scan.incremental"), wall("oneback.incremental")
    ops_incr = wall("oneback.ops.incremental")
    ob_work = ob_incr - (ops_incr or 0.0) if ob_incr else None
    repo = {k: by_key[k].repo for k in ("oneback.incremental", "restic.incremental")
            if k in by_key}
    export = wall("oneback.export")
    copied = by_key.get("oneback.copied.incremental")
    rss = [r for r in rows if r.rss_kib is not None and r.tool == "oneback"]

    def without_ops(key: str) -> float | None:
        """A oneback backup's wall time less its OpenNebula operations
        (`oneback.s3.full`: less `oneback.s3.ops.full`)."""
        variant, phase = key.rsplit(".", 1)
        total = wall(key)
        return total - (wall(f"{variant}.ops.{phase}") or 0.0) if total else None

    top = max(rss, key=lambda r: r.rss_kib or 0) if rss else None
    return [
        # -- issue 13's goals
        ("restic incremental / oneback incremental without OpenNebula ops",
         ratio(wall("restic.incremental"), ob_work), ">= 4x", at_least(4.0)),
        ("borg incremental / oneback incremental without OpenNebula ops",
         ratio(wall("borg.incremental"), ob_work), ">= 2x", at_least(2.0)),
        ("incremental: bytes OpenNebula copied / disk size (copies of each disk)",
         copied.value if copied else None, "= 1",
         lambda v: 0.99 <= v <= 1.01),
        ("incremental: share of the wall time spent in OpenNebula operations",
         ratio(ops_incr, ob_incr), "report", None),
        ("oneback read+scan rate / plain read rate of the same disk, both cold",
         ratio(wall("dd.read.vm.again"), wall("oneback.scan.isolated")), ">= 0.95",
         at_least(0.95)),
        ("network disk: oneback scan rate (read_depth 16) / borg's read of the same path",
         ratio(wall("netdisk.borg"), wall("netdisk.scan.16")), ">= 3x", at_least(3.0)),
        ("restic restore / oneback restore VM (with OpenNebula ops)",
         ratio(wall("restic.restore"), wall("oneback.restore")), "> 1", lambda v: v > 1.0),
        ("oneback export rate / plain write rate", ratio(wall("dd.write"), export), ">= 0.9",
         at_least(0.9)),
        (f"oneback's largest peak RSS of any row, MiB ({top.phase})" if top
         else "oneback's largest peak RSS of any row, MiB",
         top.rss_kib / 1024 if top and top.rss_kib else None, "< 150", lambda v: v < 150),
        ("oneback list start-up on an empty catalog, seconds", wall("oneback.startup.list"),
         "< 0.15", lambda v: v < 0.15),
        # -- informative: why, and like against like
        ("read+scan, O_DIRECT / dd iflag=direct of the same disk (like against like)",
         ratio(wall("dd.read.vm.direct"), wall("oneback.scan.isolated")), "info", None),
        ("read+scan, buffered (direct_io = false) / plain read",
         ratio(wall("dd.read.vm.again"), wall("oneback.scan.buffered")), "info", None),
        ("dd iflag=direct rate / plain read rate (what O_DIRECT costs on this disk)",
         ratio(wall("dd.read.vm.again"), wall("dd.read.vm.direct")), "info", None),
        ("read+scan inside the incremental / plain read (device just written by onesim)",
         ratio(wall("dd.read.vm") or wall("dd.read"), scan), "info", None),
        ("oneback repository / restic repository, after the incremental",
         ratio(repo.get("oneback.incremental"), repo.get("restic.incremental")), "info", None),
        ("restic incremental / whole oneback incremental command",
         ratio(wall("restic.incremental"), ob_incr), "info", None),
        ("full store with two fsyncs per chunk / with one syncfs (time)",
         ratio(wall("oneback.syncs.each"), wall("oneback.syncs.batch")), "info", None),
        ("restic restore / oneback export", ratio(wall("restic.restore"), export), "info", None),
        ("borg restore / oneback export", ratio(wall("borg.restore"), export), "info", None),
        ("encrypted / plain full store rate (encryption's cost on backup throughput)",
         ratio(wall("oneback.syncs.batch"), wall("oneback.syncs.encrypted")), ">= 0.90",
         at_least(0.90)),
        ("encrypted / plain read+scan rate inside the full backup",
         ratio(wall("oneback.scan.full"), wall("oneback.encrypted.scan.full")), "info", None),
        ("encrypted / plain full backup rate (whole command)",
         ratio(wall("oneback.full"), wall("oneback.encrypted.full")), "info", None),
        ("encrypted / plain incremental backup rate (whole command)",
         ratio(wall("oneback.incremental"), wall("oneback.encrypted.incremental")), "info",
         None),
        ("encrypted / plain export rate (restore's data path)",
         ratio(export, wall("oneback.encrypted.export")), "info", None),
        ("restic restore / oneback encrypted export (both encrypted)",
         ratio(wall("restic.restore"), wall("oneback.encrypted.export")), "info", None),
        ("restic incremental / oneback encrypted incremental without OpenNebula ops"
         " (both encrypted)",
         ratio(wall("restic.incremental"), without_ops("oneback.encrypted.incremental")),
         "info", None),
        # -- an S3 repository on the local moto server (issue 12)
        ("S3: encrypted / plain full store rate (encryption's cost on backup throughput)",
         ratio(wall("oneback.syncs.s3"), wall("oneback.syncs.s3-encrypted")), ">= 0.90",
         at_least(0.90)),
        ("S3: encrypted / plain read+scan rate inside the full backup",
         ratio(wall("oneback.s3.scan.full"), wall("oneback.s3.encrypted.scan.full")), "info",
         None),
        ("S3: encrypted / plain full backup rate (whole command)",
         ratio(wall("oneback.s3.full"), wall("oneback.s3.encrypted.full")), "info", None),
        ("S3: encrypted / plain export rate",
         ratio(wall("oneback.s3.export"), wall("oneback.s3.encrypted.export")), "info", None),
        ("restic S3 full backup / oneback S3 full backup (whole command)",
         ratio(wall("restic.s3.full"), wall("oneback.s3.full")), "info", None),
        ("restic S3 full backup / oneback S3 encrypted full backup without OpenNebula ops"
         " (both encrypted)",
         ratio(wall("restic.s3.full"), without_ops("oneback.s3.encrypted.full")), "info",
         None),
        ("restic S3 incremental / oneback S3 incremental without OpenNebula ops",
         ratio(wall("restic.s3.incremental"), without_ops("oneback.s3.incremental")), "info",
         None),
        ("restic S3 restore / oneback S3 export",
         ratio(wall("restic.s3.restore"), wall("oneback.s3.export")), "info", None),
        ("restic S3 restore / oneback S3 encrypted export (both encrypted)",
         ratio(wall("restic.s3.restore"), wall("oneback.s3.encrypted.export")), "info", None),
        ("oneback mount: time to first byte, seconds", wall("oneback.mount.ttfb"), "info",
         None),
        ("network disk: oneback scan rate (read_depth 16) / dd's read of the same path",
         ratio(wall("netdisk.dd"), wall("netdisk.scan.16")), "info", None),
        ("network disk: oneback scan rate, read_depth 32 / read_depth 1",
         ratio(wall("netdisk.scan.1"), wall("netdisk.scan.32")), "info", None),
    ]


def targets_table(rows: list[Row]) -> list[str]:
    out = ["| ratio | measured | goal | result |", "|---|--:|---|---|"]
    for what, value, goal, test in targets(rows):
        if value is None:
            out.append(f"| {what} |  | {goal} | not measured |")
        else:
            result = "" if test is None else "met" if test(value) else "NOT MET"
            out.append(f"| {what} | {value:.2f} | {goal} | {result} |")
    return out


# -- main ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    n = int(float(t[:-1]) * units[t[-1]]) if t[-1:] in units else int(t)
    if n < BLOCK:
        raise argparse.ArgumentTypeError("size must be at least 4M")
    return n - n % BLOCK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench",
                                 description="Benchmark oneback against restic, borg and dd.")
    ap.add_argument("--size", type=parse_size, default=2 << 30,
                    help="image size, e.g. 256M or 2G (default 2G)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                    help="where the temporary directory goes (default /var/tmp)")
    ap.add_argument("--output", type=Path, default=Path("bench-results.md"),
                    help="the Markdown report (default bench-results.md)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return ap.parse_args(argv)


def prepare(bench: Bench, skipped: dict[str, str]) -> None:
    t = time.perf_counter()
    stats = make_image(str(bench.image), bench.size)
    print(f"bench: image of {bench.size / MiB:.0f} MiB in {bench.work}: {stats.describe()};"
          f" made in {time.perf_counter() - t:.1f}s")
    try:
        bench.ob = Oneback.start(bench.work, bench.image)
    except OnebackUnavailable as e:
        bench.add(Row("oneback", "all", note=f"skipped: {e}"))
    if bench.ob:
        try:
            bench.enc = bench.ob.encrypted()
        except OnebackUnavailable as e:
            bench.add(Row("oneback", "encrypted", note=f"skipped: {e}"))
    for cls in (Restic, Borg):
        if cls.name in skipped:
            bench.add(Row(cls.name, "all", note=f"skipped: {skipped[cls.name]}"))
        else:
            bench.tools.append(cls(bench.work))
    prepare_s3(bench, skipped)


def prepare_s3(bench: Bench, skipped: dict[str, str]) -> None:
    """The S3 rows' server, bucket and repositories: oneback plain and encrypted,
    restic's s3 backend; each that cannot be had is a skipped row with the reason."""
    bench.add(Row("borg", "S3", note="skipped: borg has no S3 backend (local and ssh://"
                  " repositories only)"))
    if not bench.ob and "restic" in skipped:
        return
    try:
        bench.bucket = Bucket.start(bench.work)
    except S3Unavailable as e:
        bench.add(Row("S3", "all", note=f"skipped: {e}"))
        return
    print(f"bench: S3 server (moto) at {bench.bucket.endpoint}, bucket {bench.bucket.name}")
    if "restic" in skipped:
        bench.add(Row("restic", "S3", note=f"skipped: {skipped['restic']}"))
    else:
        try:
            bench.s3_tools.append(ResticS3(bench.work, bench.bucket))
        except S3Unavailable as e:
            bench.add(Row("restic", "S3", note=f"skipped: {e}"))
    if bench.ob:
        for encrypted in (False, True):
            try:
                bench.s3.append(bench.ob.variant(encrypted=encrypted, bucket=bench.bucket))
            except OnebackUnavailable as e:
                bench.add(Row("oneback", "S3" + (" encrypted" if encrypted else ""),
                              note=f"skipped: {e}"))


def report(rows: list[Row], args: argparse.Namespace, cold: bool) -> None:
    cache = "cold page cache" if cold else "WARM page cache (could not drop it: not root?)"
    head = [f"## oneback bench: {args.size / MiB:.0f} MiB image, {os.cpu_count()} cores,"
            f" {cache}", ""]
    text = "\n".join([*head, *results_table(rows), "", *targets_table(rows), ""])
    print("\n" + text)
    args.output.write_text(text)
    print(f"bench: written to {args.output}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    skipped = ensure_tools()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="oneback-bench-", dir=args.workdir))
    bench = Bench(work, work / "disk.img", args.size)
    cold = drop_caches()
    if not cold:
        print("bench: cannot drop the page cache (not root?): every read is WARM")
    try:
        prepare(bench, skipped)
        bench.run_all()
    finally:
        if bench.ob:
            bench.ob.stop()
        if bench.bucket:
            bench.bucket.stop()
        if args.keep:
            print(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(bench.rows, args, cold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
