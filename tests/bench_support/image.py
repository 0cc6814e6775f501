"""A deterministic disk image with realistic content, and the guest's 1% change.

The image is laid out in extents of whole 4 MiB blocks, like a used filesystem:
all-zero regions (written out, not sparse, as a thick block device reads),
incompressible random data (media, encrypted or already-compressed files),
repeated blocks (the same few blocks appearing at several places: copies of
the same files) and compressible text (logs, configuration, source). Some
extents end in a half-filled block (a file's tail followed by free space).
Everything comes from one seed, so two runs build byte-identical images.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

BLOCK = 4 * 1024 * 1024
KINDS = ("zero", "random", "repeated", "text")
WEIGHTS = (0.25, 0.30, 0.15, 0.30)
_WORDS = ("backup snapshot disk image kernel systemd nginx request user session error"
          " warning info debug connection timeout started stopped volume block device"
          " network interface address route service cron job database query commit"
          " rollback index table checksum replica primary").split()


@dataclass
class ImageStats:
    blocks: int
    kinds: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        parts = [f"{self.kinds[k] * 100 / max(self.blocks, 1):.0f}% {k}" for k in KINDS]
        return f"{self.blocks} blocks of 4 MiB: " + ", ".join(parts)


def _text_lines(rng: random.Random, n: int) -> list[bytes]:
    lines = []
    for i in range(n):
        words = " ".join(rng.choices(_WORDS, k=rng.randint(4, 14)))
        lines.append(f"2024-05-{i % 28 + 1:02d}T{rng.randint(0, 86399):05d}"
                     f" host{rng.randint(1, 40)} svc[{rng.randint(100, 99999)}]: {words}"
                     f" id={rng.getrandbits(32):08x}\n".encode())
    return lines


class _Maker:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.lines = _text_lines(self.rng, 20000)
        self.repeats = [self.rng.randbytes(BLOCK) for _ in range(6)]

    def block(self, kind: str) -> bytes:
        if kind == "zero":
            return bytes(BLOCK)
        if kind == "random":
            return self.rng.randbytes(BLOCK)
        if kind == "repeated":
            return self.rng.choice(self.repeats)
        text = b"".join(self.rng.choices(self.lines, k=BLOCK // 60))
        return text[:BLOCK].ljust(BLOCK, b"\n")

    def tail(self, data: bytes) -> bytes:
        keep = self.rng.randrange(4096, BLOCK, 4096)
        return data[:keep] + bytes(BLOCK - keep)


def make_image(path: str, size: int, seed: int = 20240501) -> ImageStats:
    """Write `size` bytes (a multiple of 4 MiB) of mixed content to `path`."""
    maker = _Maker(seed)
    stats = ImageStats(blocks=size // BLOCK)
    with open(path, "wb") as f:
        done = 0
        while done < stats.blocks:
            kind = maker.rng.choices(KINDS, WEIGHTS)[0]
            run = min(maker.rng.randint(1, 24), stats.blocks - done)
            for i in range(run):
                data = maker.block(kind)
                if kind != "zero" and i == run - 1 and maker.rng.random() < 0.5:
                    data = maker.tail(data)
                f.write(data)
            stats.kinds[kind] += run
            done += run
    return stats


def changed_blocks(size: int, fraction: float = 0.01, seed: int = 7) -> list[int]:
    """Which blocks the guest changes: `fraction` of them, at seeded random positions."""
    blocks = size // BLOCK
    count = max(1, round(blocks * fraction))
    return sorted(random.Random(seed).sample(range(blocks), count))


def change_blocks(path: str, blocks: list[int], seed: int = 7) -> int:
    """Write as a guest would: 64 KiB of new data inside each listed block.

    Deterministic, so applying it to two copies of the image yields the same bytes.
    Returns the number of bytes written.
    """
    rng = random.Random(seed * 1000003)
    written = 0
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK + rng.randrange(0, BLOCK - 65536, 4096))
            f.write(rng.randbytes(65536))
            written += 65536
        f.flush()
    return written
