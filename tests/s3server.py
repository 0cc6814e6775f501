"""A real S3 server for the tests, and one view of a repository on either backend.

Owns: `s3server` (moto's standalone server, `python -m moto.server`, on
127.0.0.1 and a free port, started once per test process: real HTTP, real
signatures, nothing reaches the network), `S3Server.bucket()` (a fresh
bucket per test), `s3_credentials` (dummy keys in a 0600 AWS credentials
file), and `RepoView`: what the repository tests look at or damage in a
repository (its chunks, manifests, quarantine), the same way for a
directory and for a bucket, so one test body runs on both backends.
Must not: reach into oneback's modules beyond the store a test opens.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BACKENDS = ["local", "s3"]
"""The repository backends every repository test runs on."""

_buckets = itertools.count()


@dataclass
class S3Server:
    endpoint: str
    _server: Any = field(repr=False, default=None)
    _client: Any = field(repr=False, default=None)

    def client(self) -> Any:
        """A boto3 client of this server that reads no ~/.aws and no AWS_* variables."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> Any:
        import boto3
        import botocore.session
        session = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
        session.set_config_variable("config_file", "/dev/null")
        session.set_config_variable("credentials_file", "/dev/null")
        return boto3.Session(botocore_session=session).client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, lock: bool = False) -> str:
        """A new empty bucket (with Object Lock if `lock`)."""
        name = f"oneback-test-{os.getpid()}-{next(_buckets)}"
        kw = {"ObjectLockEnabledForBucket": True} if lock else {}
        self.client().create_bucket(Bucket=name, **kw)
        return name


_server: S3Server | None = None


def server() -> S3Server:
    """The test process's S3 server, started on first use and stopped at
    exit: moto's standalone server in a process of its own (in this process
    it would share the GIL with the oneback commands the tests run here),
    on 127.0.0.1 and a port that was free."""
    global _server
    if _server is None:
        import atexit
        import socket
        import subprocess
        import sys

        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            if proc.poll() is None and time.monotonic() < deadline:
                break
            proc.kill()   # the port was taken meanwhile: another one
            proc.wait()
        else:  # pragma: no cover
            raise RuntimeError("cannot start moto's S3 server")
        _server = S3Server(f"http://127.0.0.1:{port}", proc)
        atexit.register(lambda: (proc.terminate(), proc.wait(10)))
    return _server


@pytest.fixture
def s3server() -> S3Server:
    return server()


def credentials_file(directory: Path, key: str = "testing", secret: str = "testing") -> Path:
    """Dummy keys in the AWS shared-credentials format, mode 0600."""
    path = directory / "s3_credentials"
    path.write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    path.chmod(0o600)
    return path


def s3_section(tmp: Path, bucket: str, prefix: str = "repo", extra: str = "") -> tuple[str, str]:
    """(the storage.repository value, the [storage.s3] table) for `bucket`."""
    creds = credentials_file(tmp)
    return (f"s3://{bucket}/{prefix}",
            f"[storage.s3]\nendpoint_url = \"{server().endpoint}\"\n"
            f"credentials_file = \"{creds}\"\naddressing_style = \"path\"\n"
            f"prune_hold = 1\n{extra}")


class RepoView:
    """A repository as the tests see it. `kind` is "local" or "s3"."""

    kind = "local"

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location})"

    @property
    def location(self) -> str:
        return str(self.path)

    # chunks: {hex id: stored bytes}
    def chunks(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in (self.path / "chunks").rglob("*")
                if p.is_file()}

    def _chunk(self, hex_id: str) -> Path:
        return self.path / "chunks" / hex_id[:2] / hex_id

    def has_chunk(self, hex_id: str) -> bool:
        return self._chunk(hex_id).exists()

    def read_chunk(self, hex_id: str) -> bytes:
        return self._chunk(hex_id).read_bytes()

    def write_chunk(self, hex_id: str, data: bytes) -> None:
        """Replace a chunk's stored bytes (damage it)."""
        path = self._chunk(hex_id)
        path.chmod(0o644)
        path.write_bytes(data)
        path.chmod(0o444)

    def delete_chunk(self, hex_id: str) -> None:
        self._chunk(hex_id).unlink()

    def age_chunks(self, seconds: float) -> None:
        """Make every chunk look last used `seconds` ago (at least older than
        a prune's cut-off)."""
        then = time.time() - seconds
        for p in (self.path / "chunks").rglob("*"):
            if p.is_file():
                os.utime(p, (then, then))

    # manifests: {name: stored bytes}
    def manifests(self) -> dict[str, bytes]:
        root = self.path / "manifests"
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file()}

    def manifest_names(self) -> set[str]:
        root = self.path / "manifests"
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def write_manifest(self, name: str, data: bytes) -> None:
        path = self.path / "manifests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.chmod(0o644)
        path.write_bytes(data)

    def delete_manifest(self, name: str) -> None:
        (self.path / "manifests" / name).unlink()

    def quarantined(self) -> list[str]:
        """The chunk ids (hex) moved aside into quarantine/."""
        q = self.path / "quarantine"
        return sorted(p.name.split(".")[0] for p in q.iterdir()) if q.exists() else []

    def exists(self) -> bool:
        return (self.path / "config").exists()

    def config(self) -> bytes:
        return (self.path / "config").read_bytes()

    def open(self) -> Any:
        from agent.store.local import LocalStore
        return LocalStore.open(self.path)


class S3RepoView(RepoView):
    kind = "s3"

    def __init__(self, bucket: str, prefix: str, config: Path | None = None) -> None:
        self.bucket, self.prefix, self.config_file = bucket, prefix, config
        self.s3 = server().client()

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _objects(self, under: str) -> Iterator[dict[str, Any]]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/{under}")
        for page in pages:
            yield from page.get("Contents", [])

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _get(self, name: str) -> bytes:
        data: bytes = self.s3.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        return data

    def _delete(self, name: str) -> None:
        key = self._key(name)
        listed = self.s3.list_object_versions(Bucket=self.bucket, Prefix=key)
        versions = [v for v in listed.get("Versions", []) if v["Key"] == key]
        if not versions:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        for v in versions:
            self.s3.delete_object(Bucket=self.bucket, Key=key, VersionId=v["VersionId"])

    def chunks(self) -> dict[str, int]:
        return {o["Key"].rsplit("/", 1)[1]: o["Size"] for o in self._objects("chunks/")}

    def has_chunk(self, hex_id: str) -> bool:
        return hex_id in self.chunks()

    def read_chunk(self, hex_id: str) -> bytes:
        return self._get(f"chunks/{hex_id[:2]}/{hex_id}")

    def write_chunk(self, hex_id: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key(f"chunks/{hex_id[:2]}/{hex_id}"),
                           Body=data)

    def delete_chunk(self, hex_id: str) -> None:
        self._delete(f"chunks/{hex_id[:2]}/{hex_id}")

    def age_chunks(self, seconds: float) -> None:
        """LastModified is the server's: wait until every chunk is older than
        a prune starting now would keep (its MARGIN, plus LastModified's whole
        seconds)."""
        from agent import prune
        newest = max((o["LastModified"].timestamp() for o in self._objects("chunks/")),
                     default=0.0)
        wait = newest + prune.MARGIN + 1.05 - time.time()
        if wait > 0:
            time.sleep(wait)

    def manifests(self) -> dict[str, bytes]:
        n = len(self._key("manifests/"))
        return {o["Key"][n:]: self._get(o["Key"][len(self.prefix) + 1:])
                for o in self._objects("manifests/")}

    def manifest_names(self) -> set[str]:
        n = len(self._key("manifests/"))
        return {o["Key"][n:] for o in self._objects("manifests/")}

    def write_manifest(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key(f"manifests/{name}"), Body=data)

    def delete_manifest(self, name: str) -> None:
        self._delete(f"manifests/{name}")

    def quarantined(self) -> list[str]:
        return sorted(o["Key"].rsplit("/", 1)[1].split(".")[0]
                      for o in self._objects("quarantine/"))

    def exists(self) -> bool:
        return any(o["Key"] == self._key("config") for o in self._objects("config"))

    def config(self) -> bytes:
        return self._get("config")

    def open(self) -> Any:
        from agent import config, repository
        assert self.config_file is not None
        return repository.open_store(config.load(self.config_file).storage)


def storage_lines(kind: str, tmp: Path, prefix: str = "repo", lock: bool = False,
                  extra_s3: str = "") -> tuple[str, str, RepoView]:
    """(the storage.repository value, a [storage.s3] table or "", a view)
    for a new repository of `kind` under `tmp`: local, s3, or s3-lock (a
    bucket with Object Lock)."""
    if kind == "local":
        return str(tmp / prefix), "", RepoView(tmp / prefix)
    bucket = server().bucket(lock=lock or kind == "s3-lock")
    repository, table = s3_section(tmp, bucket, prefix, extra_s3)
    return repository, table, S3RepoView(bucket, prefix)
