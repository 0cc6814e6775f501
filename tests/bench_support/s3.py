"""The bench's S3 server and restic on it: one bucket on the tests' moto server.

`Bucket.start` starts moto's standalone server as the tests do
(`tests.s3server.server()`: `python -m moto.server` as its own process on
127.0.0.1 and a free port), with every object body spooled to a temporary
file under the bench's work directory (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=1)
rather than kept in the server's memory, as a real object store writes to
disk: a 2 GiB run stores several GiB. It creates one bucket; oneback's
repositories and restic's each take a prefix of it. `ResticS3` is restic
with its s3 backend on the same server and the same keys (restic reads them
from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). Raises S3Unavailable with
a reason when any of that is not possible, so the bench skips the S3 rows.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.bench_support.tools import Measured, run

BUCKET = "oneback-bench"
KEY, SECRET = "testing", "testing"   # moto accepts any keys


class S3Unavailable(Exception):
    """The bench's S3 server cannot run or be used here; the message says why."""


class Bucket:
    """The bench's bucket on the tests' moto server."""

    def __init__(self, endpoint: str, client: Any, proc: Any) -> None:
        self.endpoint, self.client, self._proc = endpoint, client, proc
        self.name = BUCKET

    @classmethod
    def start(cls, work: Path) -> Bucket:
        spool = work / "moto"
        spool.mkdir()
        saved = {k: os.environ.get(k) for k in ("TMPDIR", "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE")}
        os.environ.update(TMPDIR=str(spool), MOTO_S3_DEFAULT_KEY_BUFFER_SIZE="1")
        try:
            from tests import s3server
            srv = s3server.server()
            client = srv.client()
            client.create_bucket(Bucket=BUCKET)
        except Exception as e:
            raise S3Unavailable(f"moto's S3 server did not start: {e!r}") from e
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return cls(srv.endpoint, client, srv._server)

    def stored(self, prefix: str) -> int:
        """Bytes of the objects under `prefix/` (what a provider bills: S3 has
        no allocated size)."""
        total = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=f"{prefix}/")
            for page in pages:
                total += sum(int(o["Size"]) for o in page.get("Contents", []))
        except Exception as e:   # the server died: the step's own row says what failed
            print(f"bench: cannot list s3://{self.name}/{prefix}/: {e!r}")
        return total

    def delete(self, prefix: str) -> None:
        """Delete every object under `prefix/` (a finished scratch repository)."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=f"{prefix}/")
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.name, Delete={"Objects": keys})
        except Exception as e:
            print(f"bench: cannot empty s3://{self.name}/{prefix}/: {e!r}")

    def credentials_file(self, work: Path) -> Path:
        """The keys in the AWS shared-credentials format, mode 0600, for oneback."""
        path = work / "s3_credentials"
        path.write_text(f"[default]\naws_access_key_id = {KEY}\n"
                        f"aws_secret_access_key = {SECRET}\n")
        path.chmod(0o600)
        return path

    def storage_lines(self, work: Path, prefix: str) -> str:
        """oneback's `[storage]` repository line and `[storage.s3]` table for `prefix`."""
        return (f'repository = "s3://{self.name}/{prefix}"\n'
                "[storage.s3]\n"
                f'endpoint_url = "{self.endpoint}"\n'
                f'credentials_file = "{self.credentials_file(work)}"\n'
                'addressing_style = "path"\n')

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class ResticS3:
    """restic, repository format 2 (compressed, `auto`), always encrypted, in
    `s3:ENDPOINT/BUCKET/restic` (its s3 backend, path-style requests)."""

    name = "restic"
    key, label = "restic.s3", ", S3"
    note = "always encrypted (AES-256-CTR, Poly1305-AES), zstd auto; s3 backend, 5 connections"
    prefix = "restic"

    def __init__(self, work: Path, bucket: Bucket) -> None:
        self.bucket = bucket
        self.repo = f"s3:{bucket.endpoint}/{bucket.name}/{self.prefix}"
        self.env = {"RESTIC_PASSWORD": "bench",
                    "RESTIC_CACHE_DIR": str(work / "restic-s3-cache"),
                    "RESTIC_REPOSITORY": self.repo,
                    "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1"}
        init = subprocess.run(["restic", "init", "--repository-version", "2", "-q"],
                              env={**os.environ, **self.env}, capture_output=True, text=True)
        if init.returncode != 0:
            lines = (init.stderr.strip() or init.stdout.strip()).splitlines()
            raise S3Unavailable(f"`restic -r {self.repo} init` failed (exit"
                                f" {init.returncode}): {lines[-1] if lines else 'no output'}")

    def stored(self) -> int:
        return self.bucket.stored(self.prefix)

    def backup(self, image: Path, label: str) -> Measured:
        return run(["restic", "backup", "-q", "--stdin", "--stdin-filename", "disk.img",
                    "--host", "bench", "--tag", label], env=self.env, stdin=image)

    def restore(self, target: Path) -> tuple[Measured, Path]:
        m = run(["restic", "restore", "-q", "latest", "--target", str(target)],
                env=self.env, sync_after=True)
        return m, target / "disk.img"
