"""One contract suite over every chunk store, then what only a directory can show."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from agent.errors import IntegrityError, InternalError, NotFound, RepositoryError
from agent.store import ChunkStore, Repository, chunk_id_of
from agent.store.local import TEMP_GRACE, LocalStore
from agent.store.memory import MemoryStore
from tests.agentkit import Cloud, offline_config, pattern
from tests.s3server import BACKENDS, S3RepoView

ROOT = Path(__file__).resolve().parents[1]


def chunk_file(store: LocalStore, chunk_id: bytes) -> Path:
    name = chunk_id.hex()
    return store.path / "chunks" / name[:2] / name


def damage_local(store: ChunkStore, chunk_id: bytes, how: str) -> None:
    assert isinstance(store, LocalStore)
    path = chunk_file(store, chunk_id)
    os.chmod(path, 0o644)
    _write_damaged(path.read_bytes(), how, path.write_bytes)


def damage_memory(store: ChunkStore, chunk_id: bytes, how: str) -> None:
    assert isinstance(store, MemoryStore)
    _write_damaged(store.blobs[chunk_id], how, lambda b: store.blobs.__setitem__(chunk_id, b))


def _write_damaged(stored: bytes, how: str, write: Callable[[bytes], object]) -> None:
    if how == "flip":
        middle = len(stored) // 2
        write(stored[:middle] + bytes([stored[middle] ^ 0xFF]) + stored[middle + 1:])
    elif how == "truncate":
        write(stored[: len(stored) // 2])
    else:  # a well-formed frame holding other data
        write(zstandard.ZstdCompressor().compress(b"not the chunk you are looking for"))


def damage_s3(store: ChunkStore, chunk_id: bytes, how: str) -> None:
    from agent.store.s3 import S3Store
    assert isinstance(store, S3Store)
    view = S3RepoView(store.location.bucket, store.location.prefix)
    _write_damaged(view.read_chunk(chunk_id.hex()), how,
                   lambda b: view.write_chunk(chunk_id.hex(), b))


@pytest.fixture(params=[*BACKENDS, "memory"])
def backend(request: pytest.FixtureRequest,
            tmp_path: Path) -> Iterator[tuple[ChunkStore, Callable[..., None]]]:
    """Every backend: a directory, an S3 bucket (the tests' own server), memory."""
    if request.param == "local":
        yield LocalStore.init(tmp_path / "repo"), damage_local
    elif request.param == "s3":
        from agent import config, repository
        cfg = offline_config(tmp_path, backend="s3")
        yield repository.init_store(config.load(cfg).storage), damage_s3
    else:
        yield MemoryStore(), damage_memory


@pytest.fixture
def store(backend: tuple[ChunkStore, Callable[..., None]]) -> ChunkStore:
    return backend[0]


def block(seed: int, size: int = 64 * 1024) -> bytes:
    """Deterministic, half-compressible data."""
    head = hashlib.sha256(seed.to_bytes(8, "big")).digest() * (size // 64)
    return head + bytes(size - len(head))


# -- the contract ---------------------------------------------------------------


def test_is_a_chunk_store(store: ChunkStore) -> None:
    assert isinstance(store, ChunkStore)


def test_put_then_get_returns_the_bytes(store: ChunkStore) -> None:
    data = block(1)
    cid = chunk_id_of(data)
    assert not store.has(cid)
    written = store.put(cid, data)
    assert 0 < written < len(data)  # compressed
    assert store.has(cid)
    assert store.get(cid) == data


def test_put_is_idempotent_and_reports_nothing_written(store: ChunkStore) -> None:
    data = block(2)
    cid = chunk_id_of(data)
    assert store.put(cid, data) > 0
    assert store.put(cid, data) == 0
    assert list(store.ids()) == [cid]


def test_put_accepts_views_of_a_larger_buffer(store: ChunkStore) -> None:
    buf = bytearray(block(3) + block(4))
    view = memoryview(buf)[: 64 * 1024]
    cid = chunk_id_of(view)
    store.put(cid, view)
    buf[:] = bytes(len(buf))  # the store must not keep a reference
    assert store.get(cid) == block(3)


def test_empty_and_incompressible_chunks_round_trip(store: ChunkStore) -> None:
    for data in (b"", os.urandom(100_000)):
        cid = chunk_id_of(data)
        store.put(cid, data)
        assert store.get(cid) == data


def test_ids_lists_every_chunk(store: ChunkStore) -> None:
    ids = set()
    for i in range(20):
        data = block(100 + i, 4096)
        ids.add(chunk_id_of(data))
        store.put(chunk_id_of(data), data)
    assert set(store.ids()) == ids


def test_delete_removes_and_is_idempotent(store: ChunkStore) -> None:
    data = block(5)
    cid = chunk_id_of(data)
    store.put(cid, data)
    store.delete(cid)
    store.delete(cid)
    assert not store.has(cid)
    assert list(store.ids()) == []
    with pytest.raises(NotFound):
        store.get(cid)


def test_get_of_an_absent_chunk_is_not_found(store: ChunkStore) -> None:
    with pytest.raises(NotFound, match=chunk_id_of(b"x").hex()):
        store.get(chunk_id_of(b"x"))


def test_ids_must_be_sha256_sized(store: ChunkStore) -> None:
    with pytest.raises(TypeError):
        store.put(b"short", b"data")
    with pytest.raises(TypeError):
        store.has(chunk_id_of(b"x").hex().encode())


@pytest.mark.parametrize("how", ["flip", "truncate", "other-data"])
def test_get_raises_integrity_error_on_damaged_chunk(
    backend: tuple[ChunkStore, Callable[..., None]], how: str
) -> None:
    store, damage = backend
    data = block(6)
    cid = chunk_id_of(data)
    store.put(cid, data)
    damage(store, cid, how)
    with pytest.raises(IntegrityError, match=cid.hex()):
        store.get(cid)


def test_concurrent_puts_of_one_id_write_it_once(store: ChunkStore) -> None:
    data = block(7, 1024 * 1024)
    cid = chunk_id_of(data)
    start = threading.Barrier(8)
    results: list[int] = []

    def put() -> None:
        start.wait()
        results.append(store.put(cid, data))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[:-1] == [0] * 7 and results.count(0) == 7
    assert store.get(cid) == data
    assert list(store.ids()) == [cid]


def test_concurrent_puts_of_many_ids(store: ChunkStore) -> None:
    datas = [block(1000 + i, 16 * 1024) for i in range(64)]

    def put_all(offset: int) -> None:
        for i in range(64):
            d = datas[(i + offset) % 64]
            store.put(chunk_id_of(d), d)

    threads = [threading.Thread(target=put_all, args=(k * 8,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(store.ids()) == {chunk_id_of(d) for d in datas}
    assert all(store.get(chunk_id_of(d)) == d for d in datas)


# -- the local directory -----------------------------------------------------------


def test_local_layout_config_and_read_only_files(tmp_path: Path) -> None:
    store = LocalStore.init(tmp_path / "repo")
    data = block(8)
    cid = chunk_id_of(data)
    store.put(cid, data)
    path = chunk_file(store, cid)
    assert path.parent.name == cid.hex()[:2]
    assert path.stat().st_mode & 0o777 == 0o444
    config = json.loads((tmp_path / "repo" / "config").read_text())
    assert config["format"] == 1 and config["id"] == store.id
    assert zstandard.ZstdDecompressor().decompress(path.read_bytes()) == data


def test_local_reopen_keeps_id_and_chunks(tmp_path: Path) -> None:
    first = LocalStore.init(tmp_path / "repo")
    data = block(9)
    first.put(chunk_id_of(data), data)
    again = LocalStore.open(tmp_path / "repo")
    assert again.id == first.id
    assert again.get(chunk_id_of(data)) == data


def test_local_two_instances_racing_like_two_processes(tmp_path: Path) -> None:
    a = LocalStore.init(tmp_path / "repo")
    b = LocalStore.open(tmp_path / "repo")
    data = block(10, 1024 * 1024)
    cid = chunk_id_of(data)
    start = threading.Barrier(2)
    results: list[int] = []

    def put(store: LocalStore) -> None:
        start.wait()
        results.append(store.put(cid, data))

    threads = [threading.Thread(target=put, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(0) == 3
    assert b.get(cid) == data
    assert os.listdir(tmp_path / "repo" / "tmp") == []


def test_local_open_never_creates_a_repository(tmp_path: Path) -> None:
    """A missing or empty directory (an unmounted filesystem) is refused, with
    the fix, and left as it was: only `init` creates a repository."""
    with pytest.raises(RepositoryError, match=r"no oneback repository .*does not exist.*"
                       "oneback init"):
        LocalStore.open(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "mnt").mkdir()
    with pytest.raises(RepositoryError, match=r"no oneback repository .*is empty.*mounted"):
        LocalStore.open(tmp_path / "mnt")
    assert os.listdir(tmp_path / "mnt") == []
    LocalStore.init(tmp_path / "mnt")
    with pytest.raises(RepositoryError, match="already a oneback repository"):
        LocalStore.init(tmp_path / "mnt")


def test_local_refuses_a_directory_that_is_not_a_repository(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "precious.txt").write_text("keep me")
    with pytest.raises(RepositoryError, match="not empty"):
        LocalStore.init(tmp_path / "repo")
    with pytest.raises(RepositoryError, match="not a oneback repository"):
        LocalStore.open(tmp_path / "repo")
    assert (tmp_path / "repo" / "precious.txt").read_text() == "keep me"


def test_local_refuses_a_newer_format_and_a_broken_config(tmp_path: Path) -> None:
    LocalStore.init(tmp_path / "repo")
    config = tmp_path / "repo" / "config"
    os.chmod(config, 0o644)
    config.write_text(json.dumps({"format": 99, "id": "x"}))
    with pytest.raises(RepositoryError, match="upgrade oneback"):
        LocalStore.open(tmp_path / "repo")
    config.write_text("{not json")
    with pytest.raises(RepositoryError, match="unreadable"):
        LocalStore.open(tmp_path / "repo")


def test_local_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(RepositoryError, match="cannot create repository"):
        LocalStore.init(tmp_path / "file" / "repo")


def test_local_leftover_temp_files_are_ignored_then_cleaned(tmp_path: Path) -> None:
    store = LocalStore.init(tmp_path / "repo")
    data = block(11)
    cid = chunk_id_of(data)
    tmp = tmp_path / "repo" / "tmp"
    old = tmp / f"{cid.hex()}-crashed"
    old.write_bytes(b"partial")
    long_ago = time.time() - TEMP_GRACE - 60
    os.utime(old, (long_ago, long_ago))
    young = tmp / f"{cid.hex()}-still-writing"
    young.write_bytes(b"partial")
    assert not store.has(cid) and list(store.ids()) == []

    LocalStore.open(tmp_path / "repo")
    assert not old.exists()
    assert young.exists()  # may belong to another process still writing
    assert store.clean_temp(0) == 1
    assert os.listdir(tmp) == []


def test_local_stray_files_in_chunk_dirs_are_not_chunks(tmp_path: Path) -> None:
    store = LocalStore.init(tmp_path / "repo")
    (tmp_path / "repo" / "chunks" / "ab" / "README").write_text("hi")
    (tmp_path / "repo" / "chunks" / "ab" / ("zz" * 32)).write_text("hi")
    assert list(store.ids()) == []


CRASHER = """
import hashlib, os, sys
sys.path.insert(0, sys.argv[2])
from agent.store.local import LocalStore
store = LocalStore.open(sys.argv[1])
i = 0
while True:
    data = hashlib.sha256(str(i).encode()).digest() * 16384 + os.urandom(512 * 1024)
    store.put(hashlib.sha256(data).digest(), data)
    i += 1
    print(i, flush=True)
"""


def test_local_killed_writer_leaves_no_partial_chunk(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    LocalStore.init(repo)
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(repo), str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(5):  # it is writing steadily now
        assert proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    store = LocalStore.open(repo)
    ids = list(store.ids())
    assert len(ids) >= 5
    for cid in ids:  # every visible chunk is whole and verifies
        assert hashlib.sha256(store.get(cid)).digest() == cid
    store.clean_temp(0)
    assert os.listdir(repo / "tmp") == []


# -- manifests (the ManifestStore contract, over every backend) ------------------------


def test_is_a_repository(store: ChunkStore) -> None:
    assert isinstance(store, Repository)


def test_manifest_put_get_list_delete(store: ChunkStore) -> None:
    assert isinstance(store, Repository)
    assert list(store.manifests()) == []
    store.put_manifest("7/20261201T221530Z-b", b"second")
    assert store.put_manifest("7/20261201T221530Z-a", b"first") == 5
    store.put_manifest("12/x", b"")
    assert list(store.manifests()) == ["12/x", "7/20261201T221530Z-a", "7/20261201T221530Z-b"]
    assert store.get_manifest("7/20261201T221530Z-a") == b"first"
    assert store.get_manifest("12/x") == b""
    store.delete_manifest("12/x")
    store.delete_manifest("12/x")
    with pytest.raises(NotFound, match="manifest 12/x"):
        store.get_manifest("12/x")
    assert list(store.manifests()) == ["7/20261201T221530Z-a", "7/20261201T221530Z-b"]


def test_manifest_is_written_once(store: ChunkStore) -> None:
    assert isinstance(store, Repository)
    store.put_manifest("1/a", b"original")
    with pytest.raises(RepositoryError, match="already exists"):
        store.put_manifest("1/a", b"other")
    assert store.get_manifest("1/a") == b"original"


@pytest.mark.parametrize("name", ["", "../escape", "/abs", "a//b", "a/b/c/d", ".hidden",
                                  "a/../b", "sp ace", "x" * 101])
def test_manifest_names_outside_the_alphabet_are_refused(store: ChunkStore, name: str) -> None:
    assert isinstance(store, Repository)
    with pytest.raises(InternalError, match="not a valid manifest name"):
        store.put_manifest(name, b"x")
    with pytest.raises(InternalError):
        store.get_manifest(name)
    assert list(store.manifests()) == []


def test_local_manifest_files_are_read_only_and_leave_no_temp(tmp_path: Path) -> None:
    store = LocalStore.init(tmp_path / "repo")
    store.put_manifest("3/m", b"data")
    path = tmp_path / "repo" / "manifests" / "3" / "m"
    assert path.read_bytes() == b"data" and path.stat().st_mode & 0o777 == 0o444
    assert os.listdir(tmp_path / "repo" / "tmp") == []
    (tmp_path / "repo" / "manifests" / "3" / "not a name").write_text("stray")
    assert list(LocalStore.open(tmp_path / "repo").manifests()) == ["3/m"]


MANIFEST_CRASHER = """
import hashlib, sys
sys.path.insert(0, sys.argv[2])
from agent.store.local import LocalStore
store = LocalStore.open(sys.argv[1])
i = 0
while True:
    store.put_manifest(f"1/m{i}", hashlib.sha256(str(i).encode()).digest() * 32768)
    i += 1
    print(i, flush=True)
"""


def test_local_killed_manifest_writer_leaves_no_partial_manifest(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    LocalStore.init(repo)
    proc = subprocess.Popen([sys.executable, "-c", MANIFEST_CRASHER, str(repo), str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(5):
        assert proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = LocalStore.open(repo)
    names = list(store.manifests())
    assert len(names) >= 5
    for name in names:   # every visible manifest is whole
        i = int(name.split("/m")[1])
        assert store.get_manifest(name) == hashlib.sha256(str(i).encode()).digest() * 32768


# -- fewer syncs: put writes, flush makes durable -----------------------------------


def test_flush_keeps_every_chunk_readable(store: ChunkStore) -> None:
    chunks = [block(40 + i) for i in range(5)]
    for data in chunks:
        store.put(chunk_id_of(data), data)
    store.flush()
    store.flush()  # nothing new: still fine
    assert [store.get(chunk_id_of(d)) for d in chunks] == chunks


SYNC_COUNTER = """
import hashlib, sys
sys.path.insert(0, sys.argv[2])
from agent.store.local import LocalStore
store = LocalStore.open(sys.argv[1], sync_each_put=sys.argv[3] == "each")
for i in range(40):
    data = hashlib.sha256(str(i).encode()).digest() * 2048
    store.put(hashlib.sha256(data).digest(), data)
print("puts done", flush=True)
open("/dev/null", "w").write("FLUSH")  # a marker in the trace
store.flush()
"""


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace to count sync calls")
@pytest.mark.parametrize("mode", ["batch", "each"])
def test_forty_new_chunks_cost_one_syncfs_not_eighty_fsyncs(tmp_path: Path, mode: str) -> None:
    repo = tmp_path / "repo"
    LocalStore.init(repo)
    trace = tmp_path / "trace"
    p = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e",
                        "trace=fsync,fdatasync,syncfs,sync,write",
                        sys.executable, "-c", SYNC_COUNTER, str(repo), str(ROOT), mode],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0 and "ptrace" in p.stderr:
        pytest.skip(f"strace cannot trace here: {p.stderr.strip()[:100]}")
    assert p.returncode == 0, p.stderr
    # "PID name(args) = result", one line per call (the -f PID column varies in width)
    calls = [(m.group(1), line) for line in trace.read_text().splitlines()
             if (m := re.match(r"\s*\d+\s+(fsync|fdatasync|syncfs|sync|write)\(", line))]
    marker = next(i for i, (_, line) in enumerate(calls) if '"FLUSH"' in line)
    before = [name for name, _ in calls[:marker] if name != "write"]
    after = [name for name, _ in calls[marker:] if name != "write"]
    if mode == "each":   # the way before flush: file and directory, per chunk
        assert len(before) == 80 and after == []
    else:                # one syncfs, then the `synced` mark (its file and directory)
        assert before == [], before[:3]
        assert after == ["syncfs", "fsync", "fsync"]
    assert sorted(LocalStore.open(repo).ids()) and len(list(LocalStore.open(repo).ids())) == 40


def lost_window(store: LocalStore, cid: bytes, *, synced: float, mtime: float) -> None:
    """Leave the repository as a power loss would: `synced` records the last
    flush, the chunk file carries `mtime`."""
    (store.path / "synced").write_text(f"{synced}\n")
    os.utime(chunk_file(store, cid), (mtime, mtime))


def test_a_chunk_a_power_loss_emptied_is_written_again(tmp_path: Path) -> None:
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    first = LocalStore.init(tmp_path / "repo")
    whole, lost, old = block(50), block(51), block(52)
    for data in (whole, lost, old):
        first.put(chunk_id_of(data), data)
    first.flush()
    # written after the last flush and before this boot: names that may have
    # outlived their data; a chunk older than the last flush is trusted
    lost_window(first, chunk_id_of(whole), synced=boot - 3600, mtime=boot - 60)
    lost_window(first, chunk_id_of(lost), synced=boot - 3600, mtime=boot - 60)
    lost_window(first, chunk_id_of(old), synced=boot - 3600, mtime=boot - 7200)
    os.chmod(chunk_file(first, chunk_id_of(lost)), 0o644)
    chunk_file(first, chunk_id_of(lost)).write_bytes(b"")  # what ext4 leaves after a crash
    os.utime(chunk_file(first, chunk_id_of(lost)), (boot - 60, boot - 60))
    again = LocalStore.open(tmp_path / "repo")
    assert again.put(chunk_id_of(whole), whole) == 0      # checked, whole: kept
    assert again.put(chunk_id_of(lost), lost) > 0         # checked, empty: written again
    assert again.get(chunk_id_of(lost)) == lost
    assert again.put(chunk_id_of(old), old) == 0          # before the last flush: durable
    again.flush()
    assert float((tmp_path / "repo" / "synced").read_text()) > boot


# A backup whose store stalls in flush (after every put): killed there, nothing
# may be committed. Builds the objects as `oneback backup` does.
STALLED_BACKUP = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from agent.backup import BackupOptions, backup_vm
from agent.cli import runtime

config, vm_id, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

class StallingFlush:
    def __init__(self, store):
        self.store = store
    def __getattr__(self, name):
        return getattr(self.store, name)
    def flush(self):
        marker.write_text(str(len(list(self.store.ids()))))
        time.sleep(600)

with runtime(config) as rt:
    backup_vm(vm_id, BackupOptions(), cloud=rt.cloud, catalog=rt.catalog,
              store=StallingFlush(rt.store), workspace=rt.workspace(), settings=rt.settings())
print("committed", flush=True)
"""


def test_a_backup_killed_after_its_puts_and_before_flush_commits_nothing(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    disk = pattern(4 * 1024 * 1024, 7)
    vm = cloud.vm("db", [cloud.image("db-os", disk)])
    marker = cloud.tmp / "flushing"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_BACKUP, str(cloud.config), str(vm),
                             str(marker), str(ROOT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the backup ended without flushing its store: {out} {err}")
            assert time.monotonic() < deadline, "the backup never reached flush"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert int(marker.read_text()) >= 4  # its chunks were written ...
    listed = cloud.run("list", "--json", capsys=capsys)
    assert listed.code == 0 and listed.json() == []  # ... and nothing refers to them
    done = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert done.code == 0, done.err
    assert done.json()["kind"] == "full"
    out = cloud.tmp / "db.raw"
    exported = cloud.run("export", str(done.json()["backup_id"]), "0", "-o", str(out),
                         capsys=capsys)
    assert exported.code == 0, exported.err
    assert out.read_bytes() == disk
