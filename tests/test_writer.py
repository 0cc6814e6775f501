"""Writing backed-up disks back out: scan a real file, commit it to a real
catalog, restore it to a file (or loop device) and compare bytes."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import reader, writer
from agent.catalog import Catalog
from agent.errors import DeviceError, IntegrityError, Interrupted
from agent.model import BlockRecord, DiskBackup
from agent.store.local import LocalStore

BS = 64 * 1024


def disk_bytes(seed: int, blocks: int = 24, tail: int = 1000) -> bytes:
    rng = random.Random(seed)
    parts = []
    for i in range(blocks):
        parts.append(bytes(BS) if i % 4 == 0 else rng.randbytes(BS))
    parts.append(rng.randbytes(tail))
    return b"".join(parts)


class Backed:
    """A disk backed up twice (full, then incremental) into a real repository."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = LocalStore.init(tmp_path / "repo")
        self.catalog = Catalog.open(tmp_path / "catalog.sqlite")
        self.versions: dict[int, bytes] = {}
        source = tmp_path / "source"
        data = disk_bytes(1)
        for _ in range(2):
            source.write_bytes(data)
            prev = self.catalog.previous_map(1, 0)
            scan = reader.scan(source, len(data), BS, prev, self.store)
            made = self.catalog.commit_backup(
                vm_id=1, vm_name="vm", kind="incremental" if prev else "full", started=0,
                finished=1, vm_document="<VM/>", image_documents={},
                disks=[DiskBackup(0, len(data), BS, 5, False, False)],
                blocks={0: scan.blocks}, chunk_sizes=scan.chunk_sizes)
            self.versions[made.id] = data
            changed = bytearray(data)
            changed[5 * BS:6 * BS] = os.urandom(BS)
            changed[8 * BS:9 * BS] = bytes(BS)  # data becomes a hole
            data = bytes(changed)

    def restore(self, backup_id: int, target: Path | int, **kw: object) -> int:
        size = len(self.versions[backup_id])
        return writer.write_disk(target, self.catalog.blocks(backup_id, 0), self.store,
                                 size=size, block_size=BS, where=f"backup {backup_id} disk 0",
                                 **kw)  # type: ignore[arg-type]


@pytest.fixture
def backed(tmp_path: Path) -> Iterator[Backed]:
    b = Backed(tmp_path)
    yield b
    b.catalog.close()


def test_restores_every_backup_byte_for_byte(backed: Backed, tmp_path: Path) -> None:
    for backup_id, data in backed.versions.items():
        target = tmp_path / f"restored-{backup_id}"
        done: list[int] = []
        written = backed.restore(backup_id, target, progress=done.append, workers=3)
        assert target.read_bytes() == data
        assert sum(done) == len(data)
        assert written < len(data)  # holes skipped


def test_export_file_is_sparse_where_the_disk_was_zero(backed: Backed, tmp_path: Path) -> None:
    target = tmp_path / "exported.raw"
    target.write_bytes(b"\xff" * 10)  # replaced
    data = backed.versions[1]
    written = writer.export_file(target, backed.catalog.blocks(1, 0), backed.store,
                                 size=len(data), block_size=BS, where="backup 1 disk 0")
    assert target.read_bytes() == data
    holes = sum(1 for i in range(0, len(data), BS) if not any(data[i:i + BS]))
    assert written == len(data) - holes * BS
    assert target.stat().st_blocks * 512 <= len(data) - holes * BS + BS


def test_holes_are_zeroed_on_an_existing_target(backed: Backed, tmp_path: Path) -> None:
    data = backed.versions[2]
    target = tmp_path / "dirty"
    target.write_bytes(b"\xff" * len(data))
    fd = os.open(target, os.O_WRONLY)
    try:
        written = backed.restore(2, fd)  # an fd: its old content is kept unless zeroed
    finally:
        os.close(fd)
    assert target.read_bytes() == data
    holes = sum(1 for i in range(0, len(data), BS) if not any(data[i:i + BS]))
    assert holes > 0
    assert written == len(data) - holes * BS  # holes were punched, not written
    assert target.stat().st_blocks * 512 <= len(data) - holes * BS + BS


def chunk_of(backed: Backed, backup_id: int, index: int) -> bytes:
    record = list(backed.catalog.blocks(backup_id, 0))[index]
    assert record.chunk is not None
    return record.chunk


def test_damaged_chunk_names_backup_disk_and_block(backed: Backed, tmp_path: Path) -> None:
    cid = chunk_of(backed, 2, 5)
    path = backed.store.path / "chunks" / cid.hex()[:2] / cid.hex()
    os.chmod(path, 0o644)
    stored = bytearray(path.read_bytes())
    stored[len(stored) // 2] ^= 0x55
    path.write_bytes(bytes(stored))
    with pytest.raises(IntegrityError, match="backup 2 disk 0 block 5"):
        backed.restore(2, tmp_path / "restored")


def test_missing_chunk_names_the_block(backed: Backed, tmp_path: Path) -> None:
    backed.store.delete(chunk_of(backed, 1, 1))
    with pytest.raises(IntegrityError, match="backup 1 disk 0 block 1 .*missing"):
        backed.restore(1, tmp_path / "restored")


def test_block_not_matching_its_checksum(backed: Backed, tmp_path: Path) -> None:
    blocks = list(backed.catalog.blocks(1, 0))
    other = blocks[2]
    blocks[1] = BlockRecord(1, blocks[1].checksum, other.chunk)  # valid chunk, wrong block
    with pytest.raises(IntegrityError, match="block 1 .*checksum recorded"):
        writer.write_disk(tmp_path / "restored", blocks, backed.store,
                          size=len(backed.versions[1]), block_size=BS, where="backup 1 disk 0")


def test_incomplete_block_map(backed: Backed, tmp_path: Path) -> None:
    blocks = list(backed.catalog.blocks(1, 0))
    with pytest.raises(IntegrityError, match="lacks block 3"):
        writer.write_disk(tmp_path / "r", blocks[:3] + blocks[4:], backed.store,
                          size=len(backed.versions[1]), block_size=BS, where="backup 1 disk 0")
    with pytest.raises(IntegrityError, match="ends at block 10"):
        writer.write_disk(tmp_path / "r", blocks[:10], backed.store,
                          size=len(backed.versions[1]), block_size=BS, where="backup 1 disk 0")


def test_unwritable_target_is_a_device_error(backed: Backed, tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(DeviceError, match="a-directory"):
        backed.restore(1, tmp_path / "a-directory")


def test_cancel_stops_the_restore(backed: Backed, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Interrupted):
        backed.restore(1, tmp_path / "restored", cancel=cancel)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "backing"
    backing.write_bytes(b"\xee" * (26 * BS))  # old content the restore must overwrite
    made = subprocess.run(["losetup", "--find", "--show", str(backing)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a loop device: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


@pytest.mark.loop
def test_restore_to_a_loop_device_zeroes_holes(backed: Backed, loop_device: Path) -> None:
    data = backed.versions[2]
    backed.restore(2, loop_device)
    with open(loop_device, "rb") as f:
        assert f.read(len(data)) == data
