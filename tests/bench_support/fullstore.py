"""`python -m tests.bench_support.fullstore PATH BLOCK REPO MODE`: a full
backup's read-and-store phase alone: every block of the disk file at PATH
scanned into a fresh local repository at REPO, then the store flushed, as a
backup does before its commit. MODE `batch` is oneback's way (no fsync per
chunk, one syncfs in the flush); `each` makes every new chunk durable on
its own (file and directory fsync, the way before flush); `encrypted` is
`batch` into an encrypted repository (AES-256-GCM, keyed chunk ids). MODE
`s3` and `s3-encrypted` store into a fresh repository at REPO =
`s3://BUCKET/PREFIX` instead, on the S3 server at $BENCH_S3_ENDPOINT (the
bench's moto server; keys "testing"), `s3-encrypted` encrypted as above.
Prints {"seconds": s, "scan_seconds": s, "flush_seconds": s, "chunks": n}."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent import devices, reader
from agent.store.local import LocalStore


def s3_store(repo: str, encrypted: bool) -> Any:
    """A fresh S3 repository at `repo` (s3://BUCKET/PREFIX), as `oneback init` makes it."""
    from agent.model import S3Location
    from agent.store.s3 import S3Settings, S3Store
    bucket, _, prefix = repo.removeprefix("s3://").partition("/")
    settings = S3Settings(endpoint_url=os.environ["BENCH_S3_ENDPOINT"], region="us-east-1",
                          access_key="testing", secret_key="testing", addressing_style="path",
                          connections=max(os.cpu_count() or 2, reader.DEFAULT_READ_DEPTH) + 4)
    if not encrypted:
        return S3Store.init(S3Location(bucket, prefix), settings)
    from agent.store.encryption import ALGORITHM, EncryptingCodec, random_key
    store = S3Store.init(S3Location(bucket, prefix), settings, encryption=ALGORITHM)
    store.use_codec(EncryptingCodec(random_key(), random_key()))
    return store


def main(argv: list[str]) -> None:
    path, block, repo, mode = argv
    store: Any
    if mode in ("s3", "s3-encrypted"):
        store = s3_store(repo, mode == "s3-encrypted")
    elif mode == "encrypted":
        from agent.store.encryption import ALGORITHM, EncryptingCodec, random_key
        LocalStore.init(repo, encryption=ALGORITHM)
        store = LocalStore.open(repo)
        store.use_codec(EncryptingCodec(random_key(), random_key()))
    else:
        LocalStore.init(repo)
        store = LocalStore.open(repo, sync_each_put=mode == "each")
    size = devices.device_size(Path(path))
    start = time.perf_counter()
    result = reader.scan(Path(path), size, int(block), None, store, full=True)
    scanned = time.perf_counter()
    store.flush()
    done = time.perf_counter()
    print(json.dumps({"seconds": done - start, "scan_seconds": scanned - start,
                      "flush_seconds": done - scanned,
                      "chunks": sum(1 for r in result.blocks if r.chunk is not None)}))


if __name__ == "__main__":
    main(sys.argv[1:])
