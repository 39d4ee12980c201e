"""Constants and small helpers shared by every part of the demo guest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "CHUNK_BYTES",
    "PAGE_SIZE",
    "POLL_S",
    "U64_MASK",
    "GuestError",
    "seeded_rng",
    "write_file_atomic",
]

PAGE_SIZE = 4096
"""Granularity of the memory region (bytes)."""

CHUNK_BYTES = 64 * 1024 * 1024
"""Chunk size used when filling or hashing a region."""

U64_MASK = (1 << 64) - 1
"""Mask reducing an int to an unsigned 64-bit value."""

POLL_S = 0.05
"""Upper bound on how long blocking waits go without re-checking stop flags."""


class GuestError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


def seeded_rng(*seeds: int) -> np.random.Generator:
    """Return a numpy generator seeded from one or more (possibly negative) ints."""
    return np.random.default_rng([seed & U64_MASK for seed in seeds])


def write_file_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)
