"""`python -m tests.bench_support.scan CATALOG VM DISK PATH BLOCK [DEPTH [buffered]]`:
oneback's read-and-scan phase alone, as an incremental runs it (the disk's
last backup as the previous map), on a disk file with a cold cache, with no
OpenNebula in the way, DEPTH reads in flight, O_DIRECT unless `buffered`.
Prints {"seconds": s, "bytes_read": n, "bytes_changed": n, "direct": b}.
Changed blocks go to an in-memory store so the repository is untouched."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from agent import devices, reader
from agent.catalog import Catalog
from agent.store.memory import MemoryStore


def main(argv: list[str]) -> None:
    catalog, vm_id, disk_id, path, block = argv[:5]
    depth = int(argv[5]) if len(argv) > 5 else reader.DEFAULT_READ_DEPTH
    with Catalog.open(Path(catalog)) as cat:
        previous = cat.previous_map(int(vm_id), int(disk_id))
    size = devices.device_size(Path(path))
    start = time.perf_counter()
    result = reader.scan(Path(path), size, int(block), previous, MemoryStore(),
                         read_depth=depth, direct=argv[6:7] != ["buffered"])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "bytes_read": result.bytes_read,
                      "bytes_changed": result.bytes_changed, "direct": result.direct}))


if __name__ == "__main__":
    main(sys.argv[1:])
