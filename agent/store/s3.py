"""A repository in an S3 bucket (AWS, Ceph RGW, MinIO, Wasabi...).

Owns: the only use of boto3, the object layout of a repository under
`s3://BUCKET/PREFIX/` and the translation of every S3 failure into our
errors (one line naming the bucket and the fix)::

    PREFIX/config              the same JSON document as a local repository's
    PREFIX/chunks/ab/abcd...   one encoded chunk per object, named by its id
    PREFIX/manifests/VM/NAME   one immutable manifest per backup
    PREFIX/keys/NAME           immutable named blobs (encryption keys)
    PREFIX/running/NAME        markers of running backups and prunes
    PREFIX/trash/HEX           a prune is deleting this chunk (see `retire_all`)
    PREFIX/quarantine/...      damaged chunks moved aside by a verify
    PREFIX/tmp/clock-...       probes of the server's clock

An S3 PUT is atomic: an object is visible whole or not at all, and botocore
sends a checksum the server verifies, so no partial chunk or manifest is
ever visible. New chunks, manifests and keys are written with
`If-None-Match: *`: a name is written once, and of two racing writers one
wins whole. A successful PUT is durable, so `flush` has nothing to do.

S3 has no rename and no atime: what a prune needs (touch, retire, the
server's clock, running markers) is `agent.store.s3prune`, which calls S3
only through this module. With Object Lock (`lock_days`), every chunk and
manifest is written with a retention date and a delete of a locked object
fails: S3 itself refuses to delete what a backup still needs. Must not:
know about backups or the catalog.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig

from agent.errors import InternalError, NotFound, RepositoryError
from agent.model import S3Location, StoredLease
from agent.store import (
    DEFAULT_LEVEL,
    Codec,
    Data,
    LockedCodec,
    Retired,
    check_chunk_id,
    check_manifest_name,
    is_manifest_name,
)
from agent.store.s3prune import HOLD, S3Marker, S3Upkeep

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

_LEASE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
FORMAT = 2
"""The newest repository format this oneback reads (2: encrypted)."""
DAY = 86400.0
LOCK_MODES = ("COMPLIANCE", "GOVERNANCE")

T = TypeVar("T")

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
           "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}


@dataclass(frozen=True)
class S3Settings:
    """How to reach the bucket: what `[storage.s3]` says, keys already read."""

    endpoint_url: str | None
    region: str
    access_key: str
    secret_key: str
    addressing_style: str = "auto"
    lock_days: int = 0
    lock_mode: str = "COMPLIANCE"
    connections: int = 16
    hold: float = HOLD

    def __repr__(self) -> str:   # never show the keys
        return (f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r},"
                f" lock_days={self.lock_days})")


_session: boto3.Session | None = None
_session_lock = threading.Lock()


def _boto_session() -> boto3.Session:
    """One session per process (it caches the S3 service model: a client is
    made in milliseconds, not the ~0.2 s of loading it) that reads no
    ~/.aws files and no AWS_* environment: its config files point at
    /dev/null, no profile, every setting we use is given explicitly."""
    global _session
    with _session_lock:
        if _session is None:
            import botocore.session

            # no AWS_PROFILE: (config name, env var, default, conversion)
            core = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
            core.set_config_variable("config_file", "/dev/null")
            core.set_config_variable("credentials_file", "/dev/null")
            core.set_config_variable("ignore_configured_endpoint_urls", True)
            _session = boto3.Session(botocore_session=core)
        return _session


def _client(settings: S3Settings) -> S3Client:
    """A client that uses exactly these settings and keys."""
    config = BotoConfig(
        region_name=settings.region,
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=max(4, settings.connections),
        connect_timeout=10, read_timeout=60,
        s3={"addressing_style": settings.addressing_style},  # type: ignore[arg-type]
    )
    client: S3Client = _boto_session().client(
        "s3", endpoint_url=settings.endpoint_url, aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key, config=config)
    return client


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _ts(value: datetime) -> float:
    return value.timestamp()


class S3Store:
    """A repository under `s3://BUCKET/PREFIX`. Thread-safe (one boto3 client,
    a connection pool of `settings.connections`); several processes and
    hosts may share it."""

    def __init__(self, location: S3Location, settings: S3Settings, repo_id: str,
                 level: int = DEFAULT_LEVEL, codec: Codec | None = None,
                 client: S3Client | None = None, versioned: bool = False,
                 encryption: str = "none") -> None:
        self.location = location
        self.encryption = encryption   # what the config says: "none" or the cipher
        self.settings = settings
        self.id = repo_id
        self.lock_days = settings.lock_days
        self.hold = settings.hold
        self._codec = codec if codec is not None else Codec(level)
        self._s3 = client if client is not None else _client(settings)
        self._bucket = location.bucket
        self._versioned = versioned or self.lock_days > 0
        self._pool_size = max(4, settings.connections)
        self._upkeep = S3Upkeep(self)

    def __repr__(self) -> str:
        return f"S3Store({str(self.location)!r})"

    # -- errors ----------------------------------------------------------------

    def _fail(self, what: str, e: Exception) -> RepositoryError:
        """One line for any failure of S3 doing `what`."""
        where = str(self.location)
        endpoint = self.settings.endpoint_url or "AWS S3"
        if isinstance(e, botocore.exceptions.ClientError):
            code = _code(e)
            if code == "NoSuchBucket":
                return RepositoryError(
                    f"bucket {self._bucket} does not exist at {endpoint}; create it, or fix "
                    "storage.repository")
            if code in _DENIED:
                return RepositoryError(
                    f"access to {where} denied ({code}) while trying to {what}; check the keys"
                    " in storage.s3.credentials_file and the bucket's policy")
            message = e.response.get("Error", {}).get("Message", "") or str(e)
            return RepositoryError(f"cannot {what} in {where}: {code} {message}".rstrip()
                                   + "; check the bucket and try again")
        if isinstance(e, botocore.exceptions.EndpointConnectionError | botocore.exceptions.
                      ConnectTimeoutError | botocore.exceptions.ConnectionClosedError):
            return RepositoryError(
                f"cannot reach the S3 endpoint {endpoint} for {where} ({e}); check "
                "storage.s3.endpoint_url and the network")
        return RepositoryError(f"cannot {what} in {where}: {e}; check storage.s3 and the"
                               " network")

    def _call(self, what: str, fn: Callable[..., T], **kw: Any) -> T:
        try:
            return fn(Bucket=self._bucket, **kw)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail(what, e) from e

    def _key(self, name: str) -> str:
        return self.location.key(name)

    # -- opening -----------------------------------------------------------------

    @classmethod
    def init(cls, location: S3Location, settings: S3Settings, level: int = DEFAULT_LEVEL,
             codec: Codec | None = None, client: S3Client | None = None,
             encryption: str = "none") -> S3Store:
        """Create a repository under `location`, which must hold no object.
        With `settings.lock_days`, the bucket must have Object Lock enabled."""
        store = cls(location, settings, "", level, client=client)
        store._check_bucket()
        if settings.lock_days and not store._lock_enabled():
            raise RepositoryError(
                f"bucket {location.bucket} has no Object Lock, so storage.s3.lock_days cannot"
                " be kept; use a bucket created with Object Lock enabled, or remove lock_days")
        listed = store._call("list objects", store._s3.list_objects_v2,
                             Prefix=store._key(""), MaxKeys=2)
        keys = [o["Key"] for o in listed.get("Contents", [])]
        if store._key("config") in keys:
            raise RepositoryError(
                f"{location} is already a oneback repository; use it as it is (run "
                "`oneback init` with a new catalog to join it), or choose another prefix")
        if keys:
            raise RepositoryError(
                f"{location} is not empty and not a oneback repository; choose another "
                "storage.repository prefix or empty it")
        repo_id = uuid.uuid4().hex
        config: dict[str, object] = {"format": 1, "id": repo_id, "compression": "zstd",
                                     "hash": "sha256"}
        if encryption != "none":   # as a local repository's (agent.store.local._create)
            config.update(format=2, hash="hmac-sha256", encryption=encryption)
        if not store._put_new(store._key("config"),
                              json.dumps(config, indent=2).encode() + b"\n", "write config"):
            raise RepositoryError(f"{location} was initialised by another process just now;"
                                  " run `oneback init` again to join it")
        return cls.open(location, settings, level, codec=codec, client=store._s3)

    @classmethod
    def open(cls, location: S3Location, settings: S3Settings, level: int = DEFAULT_LEVEL,
             codec: Codec | None = None, client: S3Client | None = None) -> S3Store:
        """Open the repository under `location`: RepositoryError (one line) when
        the bucket is missing, access is denied, the endpoint is unreachable, or
        there is no repository there (never creates one)."""
        store = cls(location, settings, "", level, codec=codec, client=client)
        try:
            raw = store._s3.get_object(Bucket=location.bucket,
                                       Key=store._key("config"))["Body"].read()
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                raise RepositoryError(
                    f"no oneback repository at {location} (it has no config object); run "
                    "`oneback init` to create one, or fix storage.repository") from e
            raise store._fail("read the repository config", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise store._fail("read the repository config", e) from e
        try:
            config = json.loads(raw)
            fmt, repo_id = config["format"], config["id"]
            store.encryption = str(config.get("encryption") or "none")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RepositoryError(
                f"repository config in {location} is unreadable ({e}); restore it from a "
                "copy, or point storage.repository elsewhere") from e
        if not isinstance(fmt, int) or fmt > FORMAT:
            raise RepositoryError(
                f"repository {location} has format {fmt}, newer than this oneback "
                f"understands ({FORMAT}); upgrade oneback")
        store.id = str(repo_id)
        if store.encryption == "none" and (config.get("hash") == "hmac-sha256"
                                           or store.key_names()):
            # As agent.store.local._read_config: the config is not authenticated.
            raise RepositoryError(
                f"repository config in {location} says the repository is not encrypted, but"
                " it has the keys (keys/) or chunk ids (hmac-sha256) of an encrypted one: its"
                " config was changed; restore it from a copy (or `oneback init --encryption`"
                " a new repository), and find out who changed it")
        if codec is None and store.encryption != "none":
            store._codec = LockedCodec(store.encryption)   # until agent.keys unlocks it
        if settings.lock_days and not store._lock_enabled():
            raise RepositoryError(
                f"bucket {location.bucket} has no Object Lock, so storage.s3.lock_days cannot"
                " be kept; use a bucket with Object Lock enabled, or remove lock_days")
        if not store._versioned:
            status = store._call("read the bucket's versioning",
                                 store._s3.get_bucket_versioning).get("Status")
            store._versioned = status in ("Enabled", "Suspended")
        return store

    def _check_bucket(self) -> None:
        self._call("find the bucket", self._s3.head_bucket)

    def _lock_enabled(self) -> bool:
        try:
            got = self._s3.get_object_lock_configuration(Bucket=self._bucket)
        except botocore.exceptions.ClientError as e:
            if _code(e) == "ObjectLockConfigurationNotFoundError":
                return False
            raise self._fail("read the bucket's Object Lock", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail("read the bucket's Object Lock", e) from e
        return got.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    # -- objects -------------------------------------------------------------------

    def _lock_args(self) -> dict[str, Any]:
        if not self.lock_days:
            return {}
        until = datetime.now(UTC) + timedelta(days=self.lock_days)
        return {"ObjectLockMode": self.settings.lock_mode, "ObjectLockRetainUntilDate": until}

    def _put_new(self, key: str, body: bytes, what: str, lock: bool = False) -> bool:
        """PUT `body` as `key` unless the name exists (If-None-Match). False
        if it existed. A retry of a PUT that had succeeded (its answer lost)
        finds the name taken: the caller decides whether that was its own."""
        extra = self._lock_args() if lock else {}
        try:
            self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, IfNoneMatch="*",
                                **extra)
        except botocore.exceptions.ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._fail(what, e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(what, e) from e
        return True

    def _head(self, key: str, what: str) -> dict[str, Any] | None:
        try:
            return dict(self._s3.head_object(Bucket=self._bucket, Key=key))
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise self._fail(what, e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(what, e) from e

    def _get_object(self, key: str, what: str, **kw: Any) -> dict[str, Any] | None:
        """GetObject's answer (its Body still to read), or None if `key` is
        missing; RepositoryError, one line naming `what`, on any failure."""
        try:
            return dict(self._s3.get_object(Bucket=self._bucket, Key=key, **kw))
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise self._fail(f"read {what}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(f"read {what}", e) from e

    def _get(self, key: str, what: str, limit: int | None = None) -> bytes:
        """The object's bytes: NotFound if it is missing; RepositoryError if
        it holds more than `limit` bytes (not read: a planted object)."""
        answer = self._get_object(key, what)
        if answer is None:
            raise NotFound(f"{what} is not in repository {self.location}")
        body = answer["Body"]
        try:
            if limit is not None and int(answer.get("ContentLength", 0)) > limit:
                raise RepositoryError(f"{what} in {self.location} is larger than {limit}"
                                      " bytes; remove it")
            data: bytes = body.read() if limit is None else body.read(limit + 1)
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            raise RepositoryError(f"cannot read {what} from {self.location}: {e}") from e
        finally:
            body.close()
        if limit is not None and len(data) > limit:
            raise RepositoryError(f"{what} in {self.location} is larger than {limit} bytes;"
                                  " remove it")
        return data

    def _delete(self, key: str, what: str) -> float | None:
        """Delete `key` (every version, where the bucket keeps versions: a
        delete marker would hide the object but keep its bytes). Idempotent.
        Returns the retention date of a version S3 refused to delete
        (Object Lock), else None."""
        if not self._versioned:
            self._call(f"delete {what}", self._s3.delete_object, Key=key)
            return None
        locked: float | None = None
        listed = self._call(f"list the versions of {what}", self._s3.list_object_versions,
                            Prefix=key)
        versions = [v for v in listed.get("Versions", []) + listed.get("DeleteMarkers", [])
                    if v["Key"] == key]
        for v in versions:
            try:
                self._s3.delete_object(Bucket=self._bucket, Key=key, VersionId=v["VersionId"])
            except botocore.exceptions.ClientError as e:
                if _code(e) in _MISSING:
                    continue
                if _code(e) == "AccessDenied":
                    until = self._retention(key, v["VersionId"])
                    if until is not None:
                        locked = max(locked or 0.0, until)
                        continue
                raise self._fail(f"delete {what}", e) from e
            except botocore.exceptions.BotoCoreError as e:
                raise self._fail(f"delete {what}", e) from e
        return locked

    def _retention(self, key: str, version: str | None = None) -> float | None:
        """The object's retention date if it is still in force (read with
        HeadObject, which every S3 answers; moto's GetObjectRetention fails)."""
        kw: dict[str, Any] = {"VersionId": version} if version else {}
        try:
            head = self._s3.head_object(Bucket=self._bucket, Key=key, **kw)
        except botocore.exceptions.ClientError:
            return None
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail("read a retention date", e) from e
        until = head.get("ObjectLockRetainUntilDate")
        if until is None or _ts(until) <= time.time():
            return None
        return _ts(until)

    def _list(self, prefix: str, what: str) -> Iterator[dict[str, Any]]:
        """Every object under PREFIX/`prefix` (paginated)."""
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._key(prefix)):
                for o in page.get("Contents", []):
                    yield dict(o)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail(f"list {what}", e) from e

    def _strip(self, key: str, prefix: str) -> str:
        return key[len(self._key(prefix)):]

    # -- the ChunkStore Protocol -------------------------------------------------------

    def _chunk_key(self, chunk_id: bytes) -> str:
        check_chunk_id(chunk_id)
        name = chunk_id.hex()
        return self._key(f"chunks/{name[:2]}/{name}")

    def chunk_id(self, data: Data) -> bytes:
        return self._codec.chunk_id(data)

    def has(self, chunk_id: bytes) -> bool:
        return self._head(self._chunk_key(chunk_id), f"chunk {chunk_id.hex()}") is not None

    def put(self, chunk_id: bytes, data: Data) -> int:
        """See ChunkStore.put: complete, readable and durable on return. A
        chunk already stored is touched (a prune running now keeps it)."""
        key = self._chunk_key(chunk_id)
        if self.touch(chunk_id):
            return 0
        return self._write_chunk(chunk_id, key, data)

    def _write_chunk(self, chunk_id: bytes, key: str, data: Data) -> int:
        encoded = self._codec.encode(data, chunk_id)
        if self._put_new(key, encoded, f"write chunk {chunk_id.hex()}", lock=True):
            return len(encoded)
        # another writer won the race (or our own retried PUT): it is whole
        # and fresh; with Object Lock, make sure its retention is long enough
        self.touch(chunk_id)
        return 0

    def flush(self) -> None:
        """Nothing to do: S3 acknowledges a PUT only once it is durable."""

    def get(self, chunk_id: bytes) -> bytes:
        key = self._chunk_key(chunk_id)
        stored = self._get(key, f"chunk {chunk_id.hex()}")
        return self._codec.decode(chunk_id, stored, f"{self.location}/{self._strip(key, '')}")

    def delete(self, chunk_id: bytes) -> None:
        until = self._delete(self._chunk_key(chunk_id), f"chunk {chunk_id.hex()}")
        if until is not None:
            raise RepositoryError(
                f"chunk {chunk_id.hex()} in {self.location} is locked until {_date(until)}"
                " (Object Lock); it can be deleted after that date")

    def ids(self) -> Iterator[bytes]:
        for chunk, _, _ in self.chunk_files():
            yield chunk

    def _whole(self, chunk_id: bytes, stored: bytes) -> bool:
        try:
            self._codec.decode(chunk_id, stored, str(self.location))
        except Exception:   # IntegrityError, or a codec's own failure
            return False
        return True

    def quarantine(self, chunk_id: bytes) -> bool:
        """See ChunkStore.quarantine: the damaged object is copied (only if it
        is still the one read: If-Match its ETag) to quarantine/ and deleted."""
        key = self._chunk_key(chunk_id)
        try:
            got = self._s3.get_object(Bucket=self._bucket, Key=key)
            stored, etag = got["Body"].read(), got["ETag"]
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return False
            raise self._fail(f"read chunk {chunk_id.hex()}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(f"read chunk {chunk_id.hex()}", e) from e
        if self._whole(chunk_id, stored):
            return False
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self._key(f"quarantine/{chunk_id.hex()}.{stamp}-{uuid.uuid4().hex[:8]}")
        try:
            self._s3.copy_object(Bucket=self._bucket, Key=target, CopySourceIfMatch=etag,
                                 CopySource={"Bucket": self._bucket, "Key": key})
        except botocore.exceptions.ClientError as e:
            if _code(e) in ("PreconditionFailed", "412") or _code(e) in _MISSING:
                return False   # replaced (healed) or removed since the read
            raise self._fail(f"quarantine chunk {chunk_id.hex()}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(f"quarantine chunk {chunk_id.hex()}", e) from e
        self.delete(chunk_id)
        return True

    def heal(self, chunk_id: bytes, data: Data) -> int:
        """See ChunkStore.heal."""
        key = self._chunk_key(chunk_id)
        try:
            stored = self._get(key, f"chunk {chunk_id.hex()}")
        except NotFound:
            return self._write_chunk(chunk_id, key, data)
        if not self._whole(chunk_id, stored):
            self.quarantine(chunk_id)
            return self._write_chunk(chunk_id, key, data)
        if self.touch(chunk_id):
            return 0
        return self._write_chunk(chunk_id, key, data)

    # -- the ManifestStore Protocol and keys ----------------------------------------------

    def _manifest_key(self, name: str) -> str:
        check_manifest_name(name)
        return self._key(f"manifests/{name}")

    def _put_once(self, key: str, sealed: bytes, what: str) -> None:
        """Write an immutable object; RepositoryError if the name exists
        (unless it holds exactly these bytes: our own PUT, retried)."""
        if self._put_new(key, sealed, f"write {what}", lock=True):
            return
        try:
            if self._get(key, what) == sealed:
                return
        except NotFound:
            pass
        raise RepositoryError(
            f"{what} already exists in {self.location}; it is written once (this is a bug"
            " in the writer)")

    def put_manifest(self, name: str, data: bytes) -> int:
        self._put_once(self._manifest_key(name), self._codec.seal(data, name), f"manifest {name}")
        return len(data)

    def get_manifest(self, name: str) -> bytes:
        what = f"manifest {name}"
        return self._codec.unseal(self._get(self._manifest_key(name), what), what, name)

    def delete_manifest(self, name: str) -> None:
        until = self._delete(self._manifest_key(name), f"manifest {name}")
        if until is not None:
            raise RepositoryError(
                f"manifest {name} in {self.location} is locked until {_date(until)} (Object"
                " Lock); forget its backup after that date")

    def manifest_locked_until(self, name: str) -> float | None:
        """See `agent.store.Locking`."""
        if not self._versioned:
            return None
        return self._retention(self._manifest_key(name))

    def manifests(self) -> Iterator[str]:
        names = [self._strip(o["Key"], "manifests/") for o in self._list("manifests/",
                                                                           "manifests")]
        return iter(sorted(n for n in names if is_manifest_name(n)))

    def _key_key(self, name: str) -> str:
        import re
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ValueError(f"{name!r:.80} is not a valid key name")
        return self._key(f"keys/{name}")

    def use_codec(self, codec: Codec) -> None:
        """Read and write through `codec` from now on (an encrypted
        repository's, once `agent.keys` has unlocked it). Call right after
        `open`, before any chunk or manifest is read or written."""
        self._codec = codec

    def put_key(self, name: str, data: bytes) -> None:
        """Store an immutable named blob (a wrapped key); RepositoryError if
        the name exists with other bytes."""
        self._put_once(self._key_key(name), bytes(data), f"key {name}")

    def get_key(self, name: str) -> bytes:
        """The key blob `name`: NotFound if there is none; RepositoryError if it
        is larger than local.KEY_MAX (a planted object must not exhaust memory)."""
        from agent.store.local import KEY_MAX
        return self._get(self._key_key(name), f"key {name}", limit=KEY_MAX)

    def delete_key(self, name: str) -> None:
        self._delete(self._key_key(name), f"key {name}")

    def key_names(self) -> list[str]:
        return sorted(self._strip(o["Key"], "keys/") for o in self._list("keys/", "keys"))

    def _copy_onto_itself(self, key: str, what: str) -> float | None:
        """Copy an object onto itself (metadata replaced): a new LastModified,
        returned; None if the object is missing."""
        try:
            copied = self._s3.copy_object(
                Bucket=self._bucket, Key=key, CopySource={"Bucket": self._bucket, "Key": key},
                MetadataDirective="REPLACE", Metadata={"touched": f"{time.time():.3f}"})
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise self._fail(f"touch {what}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(f"touch {what}", e) from e
        touched = copied.get("CopyObjectResult", {}).get("LastModified")
        return _ts(touched) if touched is not None else time.time()

    def _set_retention(self, key: str, version: str | None, governance: bool,
                       until: datetime, what: str) -> bool:
        """Set an object version's retention date; False if it is missing."""
        kw: dict[str, Any] = {"VersionId": version} if version else {}
        retention: Any = {"Mode": "GOVERNANCE" if governance else "COMPLIANCE",
                          "RetainUntilDate": until}
        try:
            self._s3.put_object_retention(Bucket=self._bucket, Key=key, Retention=retention,
                                          **kw)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return False
            raise self._fail(f"extend the retention of {what}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(f"extend the retention of {what}", e) from e
        return True

    # -- what a prune needs (agent.store.Maintainable): agent.store.s3prune -----------

    def touch(self, chunk_id: bytes) -> bool:
        """See `S3Upkeep.touch`."""
        return self._upkeep.touch(chunk_id)

    def chunk_files(self) -> Iterator[tuple[bytes, float, int]]:
        return self._upkeep.chunk_files()

    def retire_all(self, chunk_ids: list[bytes], cutoff: float) -> list[Retired]:
        """See `S3Upkeep.retire_all`."""
        return self._upkeep.retire_all(chunk_ids, cutoff)

    def now(self) -> float:
        return self._upkeep.now()

    # -- leases (agent.vmlease's LeaseStore): one object per lease ---------------
    # `leases/<name>`, replaced by conditional PUTs: If-None-Match "*" creates
    # it, If-Match on the ETag read replaces exactly that version, so of two
    # writers replacing the same version one wins (S3 answers 412 to the
    # other): the compare-and-swap a local repository makes with `link`. The
    # version is the ETag; the time of a write is the object's LastModified
    # (the server's clock, as prune's). Leases are never Object-Locked.

    def lease_now(self) -> float:
        return self._upkeep.now()

    def _lease_key(self, name: str) -> str:
        if not _LEASE_NAME.fullmatch(name):
            raise InternalError(f"{name!r:.80} is not a valid lease name")
        return self._key(f"leases/{name}")

    def lease_names(self) -> list[str]:
        names = []
        for obj in self._list("leases/", "list the leases"):
            name = str(obj["Key"]).rsplit("/", 1)[-1]
            if _LEASE_NAME.fullmatch(name):
                names.append(name)
        return sorted(names)

    def lease_get(self, name: str) -> StoredLease | None:
        got = self._get_object(self._lease_key(name), f"lease {name}", Range="bytes=0-65535")
        if got is None:
            return None
        data = got["Body"].read()
        return StoredLease(str(got["ETag"]), data, got["LastModified"].timestamp())

    def lease_put(self, name: str, data: bytes, replaces: str | None) -> StoredLease | None:
        key = self._lease_key(name)
        condition = {"IfNoneMatch": "*"} if replaces is None else {"IfMatch": replaces}
        try:
            put = self._s3.put_object(Bucket=self._bucket, Key=key, Body=bytes(data),
                                      **condition)   # type: ignore[arg-type]
        except botocore.exceptions.ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict") or (
                    replaces is not None and _code(e) in _MISSING):
                return None
            raise self._fail(f"write lease {name}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._fail(f"write lease {name}", e) from e
        head = self._head(key, f"lease {name}")
        if head is None or head.get("ETag") != put.get("ETag"):
            return None   # replaced by another writer right after ours
        return StoredLease(str(put["ETag"]), bytes(data), head["LastModified"].timestamp())

    def running_start(self, what: str) -> S3Marker:
        return self._upkeep.running_start(what)

    def running(self) -> list[tuple[str, float, float]]:
        return self._upkeep.running()

    def end_running(self, name: str) -> None:
        self._upkeep.end_running(name)

    def clean_temp(self, older_than: float = 0.0) -> int:
        return self._upkeep.clean_temp(older_than)


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
