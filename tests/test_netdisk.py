"""The bench's network disk (tests/bench_support/netdisk.py) serves the image's bytes,
read-only, through a real FUSE mount. Skipped where FUSE or fusepy is unavailable;
its speed is measured only by `make bench`."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from tests.bench_support import netdisk

pytestmark = pytest.mark.skipif(netdisk.available() is not None,
                                reason=f"no FUSE here: {netdisk.available()}")


def test_serves_the_image_bytes_read_only(tmp_path: Path) -> None:
    image = tmp_path / "image"
    data = os.urandom(3 * 1024 * 1024 + 12345)  # not a multiple of any page or request
    image.write_bytes(data)
    with netdisk.Mounted(image, tmp_path / "mnt", latency=0.001, in_flight=2,
                         log=tmp_path / "log") as m:
        assert os.listdir(m.mountpoint) == [netdisk.NAME]
        assert m.path.stat().st_size == len(data)
        assert m.path.read_bytes() == data
        # Concurrent reads at odd offsets, more threads than requests in flight.
        fd = os.open(m.path, os.O_RDONLY)
        got: dict[int, bytes] = {}
        offsets = [0, 1, 4095, 1_000_003, len(data) - 7, len(data)]

        def read(off: int) -> None:
            got[off] = os.pread(fd, 70_000, off)

        threads = [threading.Thread(target=read, args=(o,)) for o in offsets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.close(fd)
        assert got == {o: data[o:o + 70_000] for o in offsets}
        with pytest.raises(OSError) as e:
            os.open(m.path, os.O_WRONLY)
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        assert not (m.mountpoint / "other").exists()
    assert not os.path.ismount(tmp_path / "mnt")
