"""Client-side encryption of a repository: the encrypting codec.

Owns: the only use of `cryptography` in oneback: AES-256-GCM (authenticated
encryption, a random 96-bit nonce per object), keyed chunk ids
(HMAC-SHA256 of the plaintext under the repository's MAC key) and scrypt
(the memory-hard KDF `agent.keys` derives a passphrase's key with); and
`EncryptingCodec`, the `Codec` an encrypted repository's backends take.

Every object is stored as one frame::

    0x01 | nonce (12 bytes) | AES-256-GCM ciphertext + tag (16 bytes)

A chunk's frame holds its zstd frame and is bound to its id (associated
data), a manifest's is bound to its name, so neither can be swapped for
another without the swap being detected. Must not: know where keys are
kept (`agent.keys`), read files or configuration, print.
"""

from __future__ import annotations

import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.errors import IntegrityError, InternalError
from agent.store import DEFAULT_LEVEL, Codec, Data

ALGORITHM = "aes-256-gcm"
"""What an encrypted repository's config records under "encryption"."""
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
FRAME = b"\x01"
OVERHEAD = len(FRAME) + NONCE_SIZE + TAG_SIZE
_CHUNK = b"oneback chunk\x00"
_MANIFEST = b"oneback manifest\x00"


def random_key() -> bytes:
    """32 bytes from the operating system's CSPRNG."""
    return os.urandom(KEY_SIZE)


def scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The 32-byte key scrypt derives from `passphrase` (memory: 128*r*n bytes)."""
    return Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p).derive(passphrase)


class Sealer:
    """AES-256-GCM under one key: `seal` makes a frame, `open` checks and
    opens one (None if it does not authenticate: damaged, another key, or
    other associated data). Thread-safe."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise InternalError("an AES-256-GCM key is 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, data: Data, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return FRAME + nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, stored: bytes, aad: bytes) -> bytes | None:
        if len(stored) < OVERHEAD or stored[:1] != FRAME:
            return None
        view = memoryview(stored)
        try:
            return self._aead.decrypt(view[1:1 + NONCE_SIZE], view[1 + NONCE_SIZE:], aad)
        except InvalidTag:
            return None


class EncryptingCodec(Codec):
    """The codec of an encrypted repository. `chunk_id` is the HMAC-SHA256
    of the raw chunk under `mac_key` (identical blocks still deduplicate;
    the id reveals no content hash); `encode` is zstd then AES-256-GCM
    under `encrypt_key`, bound to the id; `decode` authenticates, then
    decompresses and checks the HMAC. Manifests are sealed whole, bound
    to their name."""

    def __init__(self, encrypt_key: bytes, mac_key: bytes, level: int = DEFAULT_LEVEL) -> None:
        super().__init__(level)
        if len(mac_key) != KEY_SIZE:
            raise InternalError("a chunk-id MAC key is 32 bytes")
        self._mac_key = bytes(mac_key)
        self._sealer = Sealer(encrypt_key)

    def chunk_id(self, data: Data) -> bytes:
        return hmac.digest(self._mac_key, data, "sha256")

    def encode(self, data: Data, chunk_id: bytes | None = None) -> bytes:
        if chunk_id is None:
            chunk_id = self.chunk_id(data)
        return self._sealer.seal(super().encode(data), _CHUNK + chunk_id)

    def decode(self, chunk_id: bytes, stored: bytes, where: str) -> bytes:
        plain = self._sealer.open(stored, _CHUNK + chunk_id)
        if plain is None:
            raise IntegrityError(
                f"chunk {chunk_id.hex()} in {where} is corrupt (it does not decrypt and "
                "authenticate); run a repository check and back the affected VMs up again"
            )
        return super().decode(chunk_id, plain, where)

    def seal(self, data: bytes, name: str | None = None) -> bytes:
        return self._sealer.seal(data, _MANIFEST + _name(name).encode())

    def unseal(self, stored: bytes, what: str, name: str | None = None) -> bytes:
        plain = self._sealer.open(stored, _MANIFEST + _name(name).encode())
        if plain is None:
            raise IntegrityError(
                f"{what} is damaged (it does not decrypt and authenticate under its name); "
                "restore it from a copy, or forget the backup and back the VM up again"
            )
        return plain


def _name(name: str | None) -> str:
    if name is None:
        raise InternalError("an encrypted repository binds each manifest to its name: "
                            "the store must pass name= to seal and unseal")
    return name
