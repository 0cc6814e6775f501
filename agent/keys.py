"""An encrypted repository's keys.

Owns: the master key (32 random bytes that encrypt, 32 that key the chunk
ids), the key blobs in the repository that wrap it under a passphrase
(`REPO/keys/<random name>`, JSON: the KDF, its parameters and salt, and the
wrapped key; never the passphrase), unlocking a store with a passphrase or
an exported key (`unlock`), changing the passphrase (`passwd`), and the
exported key document (`export_document`, `import_key`).

A key blob, as restic's key files, records its own KDF parameters::

    {"version": 1, "kdf": "scrypt", "n": 65536, "r": 8, "p": 1,
     "salt": "<base64>", "cipher": "aes-256-gcm", "data": "<base64 frame>",
     "created": "2026-12-02T00:00:00Z"}

`data` is an `agent.store.encryption` frame (AES-256-GCM under the key
scrypt derives from the passphrase and salt) holding the master key as
JSON with the repository's id. A passphrase change writes a new blob
wrapping the same master key, then deletes the old one: nothing else in
the repository changes. Must not: read configuration or files (the caller
passes a `Secrets`, which reads them), print.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.errors import ConfigError, IntegrityError, NotFound, RepositoryError
from agent.store import Codec

KDF = "scrypt"
KDF_R, KDF_P = 8, 1
KDF_MIN_N, KDF_MAX_N = 2**10, 2**20
KDF_MAX_MEMORY = 2**28   # 128*n*r: a key blob asking for more is refused (256 MiB, 4x ours)
KDF_MAX_WORK = 2**30     # 128*n*r*p: so is one asking for more work (16x ours, a few s)
SALT_SIZE = 32
MAX_KEYS = 20   # key blobs tried with a passphrase, as restic (more: refused, no scrypt)
EXPORT_FORMAT = "oneback-key"
_WRAP = b"oneback key\x00"


class Secrets(Protocol):
    """What the configuration offers to open an encrypted repository
    (`agent.config.StorageConfig`)."""

    @property
    def passphrase_file(self) -> Path | None: ...

    @property
    def key_file(self) -> Path | None: ...

    @property
    def kdf_n(self) -> int: ...

    def read_passphrase(self) -> bytes: ...

    def read_key_file(self) -> bytes: ...


class KeyStore(Protocol):
    """The part of a store this module uses: its identity, what its config
    says about encryption, its key blobs, and its codec."""

    @property
    def id(self) -> str: ...

    @property
    def encryption(self) -> str: ...

    def put_key(self, name: str, data: bytes) -> object: ...

    def get_key(self, name: str) -> bytes: ...

    def delete_key(self, name: str) -> None: ...

    def key_names(self) -> list[str]: ...

    def use_codec(self, codec: Codec) -> None: ...


@dataclass(frozen=True)
class MasterKey:
    repository: str     # the id of the repository it encrypts
    encrypt: bytes = field(repr=False)   # AES-256-GCM key of chunks and manifests
    mac: bytes = field(repr=False)       # HMAC-SHA256 key of chunk ids (never in a repr)

    @classmethod
    def new(cls, repository: str) -> MasterKey:
        from agent.store.encryption import random_key
        return cls(repository, random_key(), random_key())

    def codec(self) -> Codec:
        from agent.store.encryption import EncryptingCodec
        return EncryptingCodec(self.encrypt, self.mac)

    def to_json(self) -> dict[str, str]:
        return {"repository": self.repository, "encrypt": _b64(self.encrypt),
                "mac": _b64(self.mac)}

    @classmethod
    def from_json(cls, doc: object) -> MasterKey:
        """ValueError if `doc` is not a master key."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        key = cls(str(doc["repository"]), _unb64(doc["encrypt"]), _unb64(doc["mac"]))
        if len(key.encrypt) != 32 or len(key.mac) != 32:
            raise ValueError("a key is 32 bytes")
        return key


@dataclass(frozen=True)
class Unlocked:
    master: MasterKey
    key_name: str | None   # the key blob the passphrase opened; None: an exported key


# -- key blobs -------------------------------------------------------------------


def wrap(master: MasterKey, passphrase: bytes, n: int) -> bytes:
    """A key blob: `master` wrapped under the key scrypt derives from `passphrase`."""
    from agent.store.encryption import ALGORITHM, Sealer, scrypt
    salt = os.urandom(SALT_SIZE)
    kek = scrypt(passphrase, salt, n, KDF_R, KDF_P)
    frame = Sealer(kek).seal(json.dumps(master.to_json()).encode(), _WRAP)
    doc = {"version": 1, "kdf": KDF, "n": n, "r": KDF_R, "p": KDF_P, "salt": _b64(salt),
           "cipher": ALGORITHM, "data": _b64(frame),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return json.dumps(doc, indent=2).encode() + b"\n"


def unwrap(blob: bytes, passphrase: bytes, name: str) -> MasterKey | None:
    """The master key in key blob `name`, None if `passphrase` does not open
    it. RepositoryError if the blob is damaged or asks for an unknown KDF."""
    from agent.store.encryption import ALGORITHM, Sealer, scrypt
    try:
        doc = json.loads(blob)
        version, cipher = doc.get("version"), doc.get("cipher")
    except (ValueError, AttributeError) as e:
        raise RepositoryError(f"key {name} is damaged ({e}); open the repository with an "
                              "exported key (storage.key_file) and `oneback key import`") from e
    if type(version) is not int or version != 1 or cipher != ALGORITHM:
        raise RepositoryError(f"key {name} is of version {version!r:.20}, cipher {cipher!r:.40},"
                              " which this oneback does not know; upgrade oneback")
    try:
        n, r, p = _int(doc["n"]), _int(doc["r"]), _int(doc["p"])
        salt, frame = _unb64(doc["salt"]), _unb64(doc["data"])
        kdf = doc["kdf"]
    except (ValueError, KeyError, TypeError) as e:
        raise RepositoryError(f"key {name} is damaged ({e}); open the repository with an "
                              "exported key (storage.key_file) and `oneback key import`") from e
    if kdf != KDF or not KDF_MIN_N <= n <= KDF_MAX_N or n & (n - 1) or not (
            1 <= r <= 32 and 1 <= p <= 16 and 128 * r * n <= KDF_MAX_MEMORY
            and 128 * r * n * p <= KDF_MAX_WORK):
        raise RepositoryError(f"key {name} asks for a KDF this oneback does not use ({kdf},"
                              f" n={n}, r={r}, p={p}); upgrade oneback")
    plain = Sealer(scrypt(passphrase, salt, n, r, p)).open(frame, _WRAP)
    if plain is None:
        return None
    try:
        return MasterKey.from_json(json.loads(plain))
    except (ValueError, KeyError, TypeError) as e:
        raise RepositoryError(f"key {name} holds no valid master key ({e})") from e


def new_key_name() -> str:
    return os.urandom(16).hex()


def add_key(store: KeyStore, master: MasterKey, passphrase: bytes, n: int,
            name: str | None = None) -> str:
    """Write a new key blob wrapping `master` (named `name`, else a random
    name; RepositoryError if that name exists); its name."""
    name = name or new_key_name()
    store.put_key(name, wrap(master, passphrase, n))
    return name


# -- opening ---------------------------------------------------------------------


FIRST_KEY = "initial"
"""The name of the key blob that finishes an interrupted init: written once,
so of two processes finishing it concurrently exactly one succeeds."""


def create(store: KeyStore, secrets: Secrets, name: str | None = None) -> Unlocked:
    """A new master key for a newly created encrypted `store`, wrapped under
    the passphrase of `secrets` (its first key blob, named `name`), and the
    store unlocked with it."""
    passphrase = secrets.read_passphrase()
    master = MasterKey.new(store.id)
    name = add_key(store, master, passphrase, secrets.kdf_n, name)
    store.use_codec(master.codec())
    return Unlocked(master, name)


def unlock(store: KeyStore, secrets: Secrets | None) -> Unlocked | None:
    """Open `store` for reading and writing: an encrypted one through its
    master key, from the passphrase (tried on each key blob) or from the
    exported key the configuration names; a plain one as it is (None).
    ConfigError, one line, when the configuration does not fit the
    repository: a wrong passphrase or key, none for an encrypted
    repository, or one for a plain repository (never silently ignored)."""
    where = _where(store)
    passphrase_file = secrets.passphrase_file if secrets is not None else None
    key_file = secrets.key_file if secrets is not None else None
    if store.encryption == "none":
        if passphrase_file is not None or key_file is not None:
            setting = "passphrase_file" if passphrase_file is not None else "key_file"
            raise ConfigError(
                f"repository {where} is not encrypted, but storage.{setting} is set: if it"
                " is meant to be plain, remove the setting (or back up into a new repository"
                " made by `oneback init --encryption`); if it was made encrypted, its config"
                " was changed: keep the setting and restore the repository")
        return None
    from agent.store.encryption import ALGORITHM
    if store.encryption != ALGORITHM:
        raise RepositoryError(f"repository {where} is encrypted with {store.encryption},"
                              " which this oneback does not know; upgrade oneback")
    if secrets is None or (passphrase_file is None and key_file is None):
        raise ConfigError(
            f"repository {where} is encrypted: set storage.passphrase_file (a file holding "
            "its passphrase, mode 0600) or storage.key_file (its exported key)")
    if key_file is not None:
        master = parse_export(secrets.read_key_file(), f"storage.key_file {key_file}")
        if master.repository != store.id:
            raise ConfigError(
                f"storage.key_file {key_file} is the key of repository {master.repository},"
                f" not of {where} (id {store.id}); give that repository's exported key")
        store.use_codec(master.codec())
        return Unlocked(master, None)
    opened = open_with(store, secrets.read_passphrase(), store.key_names())
    if opened is None:
        raise ConfigError(
            f"the passphrase in storage.passphrase_file {passphrase_file} does not open "
            f"repository {where}: check the file (or open it with its exported key, "
            "storage.key_file)")
    store.use_codec(opened.master.codec())
    return opened


def open_with(store: KeyStore, passphrase: bytes, names: Iterable[str]) -> Unlocked | None:
    """The master key the first of the key blobs `names` that `passphrase`
    opens holds; None if none does. ConfigError if the repository has no key."""
    names = list(names)
    where = _where(store)
    if not names:
        raise ConfigError(
            f"repository {where} is encrypted but holds no key (keys/ is empty): open it "
            "with its exported key (storage.key_file), then `oneback key import` it")
    if len(names) > MAX_KEYS:
        raise RepositoryError(
            f"repository {where} holds {len(names)} key files, more than the {MAX_KEYS}"
            " oneback tries (each costs a scrypt): remove from keys/ the ones you did not"
            " make (`key passwd` and `key import` print the name of the key they write), or"
            " open it with its exported key (storage.key_file)")
    damaged: RepositoryError | None = None
    refused = 0   # whole key blobs the passphrase did not open
    for name in names:
        try:
            master = unwrap(store.get_key(name), passphrase, name)
        except NotFound:
            continue   # deleted meanwhile (a passwd elsewhere)
        except RepositoryError as e:
            damaged = e
            continue
        if master is not None:
            if master.repository != store.id:
                raise IntegrityError(f"key {name} of repository {where} holds the key of "
                                     f"repository {master.repository}; remove it")
            return Unlocked(master, name)
        refused += 1
    if damaged is not None and not refused:
        raise damaged
    if damaged is not None:   # most likely a wrong passphrase: say so (exit 3), and the damage
        raise ConfigError(
            f"the passphrase opens none of the {refused} whole key file(s) of repository"
            f" {where} (check storage.passphrase_file), and {damaged.message.split(';')[0]}")
    return None


def passwd(store: KeyStore, secrets: Secrets, new_passphrase: bytes
           ) -> tuple[str, list[str]]:
    """Change the passphrase: a new key blob wraps the same master key under
    `new_passphrase`, then every blob the old passphrase opens is deleted
    (so the old passphrase no longer opens the repository, also when `key
    import` wrapped it twice; a crash between the two leaves both working).
    Returns (new key name, the old key names, the one it opened first)."""
    if secrets.passphrase_file is None:
        raise ConfigError(
            "`oneback key passwd` changes the passphrase in storage.passphrase_file; set it"
            " (to set a passphrase from an exported key, use `oneback key import`)")
    opened = unlock(store, secrets)
    if opened is None or opened.key_name is None:
        raise ConfigError(f"repository {_where(store)} is not encrypted;"
                          " it has no passphrase to change")
    name = add_key(store, opened.master, new_passphrase, secrets.kdf_n)
    store.delete_key(opened.key_name)
    removed = [opened.key_name]
    old_passphrase = secrets.read_passphrase()
    for other in store.key_names():
        if other in (name, opened.key_name):
            continue
        try:
            if unwrap(store.get_key(other), old_passphrase, other) is None:
                continue
        except (NotFound, RepositoryError):
            continue   # deleted meanwhile, or not a key this passphrase opens
        store.delete_key(other)
        removed.append(other)
    return name, removed


def import_key(store: KeyStore, document: bytes, source: str, secrets: Secrets) -> str:
    """Wrap the exported master key `document` (read from `source`) under the
    passphrase of `secrets` as a new key blob of `store`: the repository
    opens with that passphrase again (a forgotten passphrase, lost key
    blobs). Returns the new key's name."""
    if store.encryption == "none":
        raise ConfigError(f"repository {_where(store)} is not encrypted;"
                          " it has no keys")
    master = parse_export(document, source)
    if master.repository != store.id:
        raise ConfigError(f"{source} is the key of repository {master.repository}, not of "
                          f"{_where(store)} (id {store.id})")
    if secrets.passphrase_file is None:
        raise ConfigError("`oneback key import` wraps the key under the passphrase in "
                          "storage.passphrase_file: set it (and remove storage.key_file)")
    present = len(store.key_names())
    if present >= MAX_KEYS:
        raise RepositoryError(
            f"repository {_where(store)} holds {present} key files, the most a passphrase is"
            f" tried on ({MAX_KEYS}): remove from keys/ the ones no passphrase you use opens"
            " (`key passwd` removes its old key), then import again")
    return add_key(store, master, secrets.read_passphrase(), secrets.kdf_n)


# -- the exported key ------------------------------------------------------------


def export_document(master: MasterKey) -> bytes:
    """The master key as a JSON document to keep somewhere safe: it opens the
    repository without any passphrase."""
    from agent.store.encryption import ALGORITHM
    doc = {"format": EXPORT_FORMAT, "version": 1, "encryption": ALGORITHM,
           **master.to_json(), "check": _check(master),
           "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "note": "this key opens the repository without its passphrase: keep it safe"}
    return json.dumps(doc, indent=2).encode() + b"\n"


def parse_export(data: bytes, source: str) -> MasterKey:
    """The master key in an exported key document; ConfigError naming
    `source`, also when its check does not match (a damaged copy: with a
    wrong key every chunk would read as damaged)."""
    try:
        doc = json.loads(data)
        if doc.get("format") != EXPORT_FORMAT:
            raise ValueError("it is not a oneback key")
        from agent.store.encryption import ALGORITHM
        version, cipher = doc.get("version"), doc.get("encryption")
        if type(version) is not int or version != 1 or cipher != ALGORITHM:
            raise ValueError(f"it is of version {version!r:.20}, encryption {cipher!r:.40},"
                             " which this oneback does not know: upgrade oneback")
        master = MasterKey.from_json(doc)
        if doc.get("check") != _check(master):
            raise ValueError("its check does not match: the copy is damaged")
        return master
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{source} is not a key exported by `oneback key export` ({e})"
                          ) from None


def _check(master: MasterKey) -> str:
    """A checksum of an exported key (not a secret: a hash of the key's text)."""
    text = json.dumps(master.to_json(), sort_keys=True).encode()
    return hashlib.sha256(b"oneback key check\x00" + text).hexdigest()[:16]


def _where(store: KeyStore) -> str:
    """How messages name a repository: its path (or URL), else its id."""
    return str(getattr(store, "path", None) or store.id)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _int(value: object) -> int:
    """A JSON integer (not a float: json reads Infinity and NaN, not a bool)."""
    if type(value) is not int:
        raise ValueError(f"expected an integer, not {type(value).__name__}")
    return value


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"bad base64: {e}") from e
