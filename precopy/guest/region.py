"""Memory region files: sizes, content generation, digests and mapping.

:func:`parse_size`, :func:`create_region` and :func:`region_digest` are the
public helpers used by tests and benchmarks; :class:`MappedRegion` maps a
region ``MAP_SHARED`` for the ``dirty`` and ``det`` guests, and
:func:`run_create` implements the ``create`` subcommand.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import xxhash

from .common import CHUNK_BYTES, PAGE_SIZE, GuestError, seeded_rng

__all__ = [
    "CREATE_CONTENTS",
    "MappedRegion",
    "buffer_digest",
    "create_region",
    "parse_size",
    "region_digest",
    "run_create",
    "text_pool",
]

CREATE_CONTENTS = ("random", "half-text", "zero")
"""Content kinds accepted by :func:`create_region` and ``create --content``."""

_TEXT_POOL_BYTES = 256 * 1024
_TEXT_VARIATION = 0.1
"""Fraction of words replaced in the text pool; 0.1 gives lz4 ratio ~0.7."""

_PARAGRAPH = (
    "Live migration moves a running workload from one machine to another while "
    "it keeps serving requests. The source copies memory pages in rounds, and "
    "pages that the guest writes again are sent once more, until the remaining "
    "set is small enough to stop the guest briefly, send the last pages "
    "together with the device state, and resume it on the destination "
    "machine. Good engineering keeps the pause short and the network busy, so "
    "the people who use the service never notice that their program changed "
    "its home."
)
_EXTRA_WORDS = (
    "time page data memory network system process value number state copy "
    "round rate fast slow small large first last next other every many most "
    "some only never always"
)


# ---------------------------------------------------------------------------
# Sizes, content generation and digests
# ---------------------------------------------------------------------------


_SIZE_RE = re.compile(r"\s*(\d+)\s*(?:([KMGT])(?:I?B)?|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a byte count such as ``4096``, ``64K``, ``256M``, ``1G`` or ``2GiB``.

    Suffixes K/M/G/T are binary (KiB/MiB/GiB/TiB); a trailing ``B`` or
    ``iB`` is accepted.  Alignment is not checked here.

    Raises:
        ValueError: if ``text`` is not a non-negative size.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use a non-negative integer with an optional "
            "K/M/G/T suffix (binary units), e.g. 4096, 64K, 256M or 1G"
        )
    unit = (match.group(2) or "").upper()
    return int(match.group(1)) * _SIZE_UNITS[unit]


def _check_region_size(size: int) -> None:
    """Raise ``ValueError`` unless ``size`` is a positive multiple of the page size."""
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(
            f"region size {size} is not a positive multiple of {PAGE_SIZE} bytes; "
            f"pick a size such as {max(1, -(-size // PAGE_SIZE)) * PAGE_SIZE}"
        )


def text_pool(seed: int, nbytes: int = _TEXT_POOL_BYTES) -> np.ndarray:
    """Return ``nbytes`` of English-like text as a uint8 array.

    The text repeats a fixed paragraph, replacing about 10 % of the words
    (and capitalising a few) using ``seed``, so it compresses well but not
    trivially.
    """
    words = _PARAGRAPH.split()
    vocabulary = words + _EXTRA_WORDS.split()
    rng = seeded_rng(seed, 0x7E47)
    count = nbytes // 4 + 1  # average word + space is well above 4 bytes
    base = np.arange(count) % len(words)
    replaced = rng.random(count) < _TEXT_VARIATION
    choice = np.where(replaced, rng.integers(0, len(vocabulary), count), base)
    capitalised = rng.random(count) < _TEXT_VARIATION / 4
    text = " ".join(
        vocabulary[index].capitalize() if cap else vocabulary[index]
        for index, cap in zip(choice.tolist(), capitalised.tolist())
    )
    data = text.encode("ascii")[:nbytes]
    return np.frombuffer(data, dtype=np.uint8)


def _random_chunks(size: int, seed: int) -> Iterator[bytes]:
    """Yield ``size`` bytes of incompressible data in chunks of at most 64 MiB."""
    rng = seeded_rng(seed)
    remaining = size
    while remaining:
        length = min(remaining, CHUNK_BYTES)
        yield rng.bytes(length)
        remaining -= length


def _half_text_chunks(size: int, seed: int) -> Iterator[np.ndarray]:
    """Yield pages whose first half is text and second half random bytes."""
    rng = seeded_rng(seed)
    half = PAGE_SIZE // 2
    pool = text_pool(seed)
    windows = np.lib.stride_tricks.sliding_window_view(pool, half)
    pages_per_chunk = CHUNK_BYTES // PAGE_SIZE
    remaining = size // PAGE_SIZE
    while remaining:
        count = min(remaining, pages_per_chunk)
        chunk = np.empty((count, PAGE_SIZE), dtype=np.uint8)
        chunk[:, :half] = windows[rng.integers(0, len(windows), count)]
        chunk[:, half:] = np.frombuffer(rng.bytes(count * half), dtype=np.uint8).reshape(
            count, half
        )
        yield chunk
        remaining -= count


def create_region(
    path: str | os.PathLike[str], size: int, content: str = "random", seed: int = 0
) -> None:
    """Create (or truncate) a region file of ``size`` bytes and fill it.

    Args:
        path: file to create, e.g. ``/dev/shm/guest.mem``.
        size: positive multiple of 4096.
        content: ``random`` (incompressible), ``half-text`` (each page half
            English-like text, half random; lz4 ratio about 0.7) or ``zero``.
        seed: seed for the content; the same seed gives the same bytes.

    Raises:
        ValueError: for a bad size or content kind.
        OSError: if the file cannot be written.
    """
    _check_region_size(size)
    if content not in CREATE_CONTENTS:
        raise ValueError(
            f"unknown content {content!r}; choose one of {', '.join(CREATE_CONTENTS)}"
        )
    with open(path, "wb") as handle:
        if content == "zero":
            handle.truncate(size)
            return
        if content == "random":
            for chunk in _random_chunks(size, seed):
                handle.write(chunk)
        else:
            for text in _half_text_chunks(size, seed):
                handle.write(text.data)


def _digest_chunks(chunks: Iterator[Any]) -> str:
    """Return the xxh3_128 hex digest of the concatenation of ``chunks``."""
    hasher = xxhash.xxh3_128()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _file_chunks(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """Yield the contents of ``path`` in chunks of at most 64 MiB."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = memoryview(bytearray(max(PAGE_SIZE, min(size, CHUNK_BYTES))))
        while count := handle.readinto(buffer):
            yield buffer[:count]


def region_digest(path: str | os.PathLike[str]) -> str:
    """Return the xxh3_128 hex digest of the whole file at ``path`` (chunked)."""
    return _digest_chunks(_file_chunks(path))


def buffer_digest(buffer: mmap.mmap) -> str:
    """Return the xxh3_128 hex digest of a mapped region (chunked)."""
    with memoryview(buffer) as view:
        return _digest_chunks(
            view[start : start + CHUNK_BYTES] for start in range(0, len(view), CHUNK_BYTES)
        )


# ---------------------------------------------------------------------------
# Memory mapping
# ---------------------------------------------------------------------------


class MappedRegion:
    """A region file mapped ``MAP_SHARED`` read/write, with a numpy view."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Map ``path``; raise :class:`GuestError` if it is missing or misaligned."""
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            raise GuestError(
                f"memory region file {self.path} does not exist; create it first, e.g. "
                f"`precopy-guest create --memory {self.path} --size 64M`"
            ) from None
        except OSError as exc:
            raise GuestError(f"cannot open memory region file {self.path}: {exc}") from exc
        try:
            self.size = os.fstat(fd).st_size
            if self.size <= 0 or self.size % PAGE_SIZE:
                raise GuestError(
                    f"memory region file {self.path} has size {self.size}, which is not a "
                    f"positive multiple of {PAGE_SIZE}; recreate it with `precopy-guest create`"
                )
            self.mm = mmap.mmap(
                fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        self.pages = self.size // PAGE_SIZE
        self.array: np.ndarray | None = np.frombuffer(self.mm, dtype=np.uint8)

    def bytes_array(self) -> np.ndarray:
        """Return the writable uint8 numpy view of the whole region."""
        if self.array is None:
            raise GuestError(f"memory region {self.path} is already closed")
        return self.array

    def close(self) -> None:
        """Drop the numpy view and unmap the region."""
        self.array = None
        try:
            self.mm.close()
        except BufferError:
            # A numpy view is still alive somewhere; the OS unmaps at exit.
            pass

    def __enter__(self) -> MappedRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------


def run_create(args: argparse.Namespace) -> int:
    """Run the ``create`` subcommand; return the exit status."""
    try:
        create_region(args.memory, args.size, args.content, args.seed)
    except ValueError as exc:
        raise GuestError(str(exc)) from exc
    except OSError as exc:
        raise GuestError(
            f"cannot create memory region file {args.memory}: {exc}; check the "
            "directory exists and has enough free space"
        ) from exc
    return 0
