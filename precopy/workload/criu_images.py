"""CRIU's image files as one device-state blob, and back: a bounded, checked container (pure).

Layout::

    magic "PCCRIU1\\n" | header_len u32 LE | msgpack header | file bytes, in header order

The header is a map: ``v`` (1), ``region`` (the region's absolute path on
the source: the destination puts its copy there), ``size`` (its bytes),
``mode`` (its permission bits: CRIU checks them), ``pid`` (the dumped
process), ``criu`` (the version that dumped it) and
``files``, a list of ``[name, length]``.  Everything is checked before a
byte is written: names are plain file names, lengths add up to exactly
what follows, counts and sizes are bounded.  A blob that fails a check is
a :class:`~precopy.errors.GuestControlError` (the destination then refuses
the commit and the source resumes its process).
"""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from precopy.errors import GuestControlError
from precopy.protocol import MAX_DEVICE_STATE

__all__ = ["ImageSet", "pack_images", "prefaulted", "unpack_images", "MAGIC", "MAX_FILES"]

MAGIC = b"PCCRIU1\n"
_LEN = struct.Struct("<I")
MAX_HEADER = 64 * 1024
#: CRIU writes a few files per task and thread; a process with thousands is not one to move this way.
MAX_FILES = 4096
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
#: Files of the images directory that are ours or CRIU's logs, not images.
_SKIP = frozenset({"dump.log", "restore.log"})


@dataclass(frozen=True)
class ImageSet:
    """The header of a blob: where the region goes and what dumped it."""

    region: str
    size: int
    mode: int
    pid: int
    criu: str
    files: tuple[tuple[str, int], ...] = ()


def prefaulted(nbytes: int) -> bytearray:
    """A zeroed buffer of ``nbytes`` with every page already mapped in (for :func:`pack_images`'s ``into``).

    A fresh buffer takes a page fault per 4 KiB as it is first written:
    about half of packing 9 MiB of images.  Made while CRIU still dumps,
    the faults are out of the way when the images are read.
    """
    buf = bytearray(nbytes)
    step = 1 << 20
    for at in range(0, nbytes, step):  # a MiB at a time, letting other threads run in between
        buf[at:at + step:4096] = bytes(len(range(at, min(at + step, nbytes), 4096)))
        time.sleep(0)
    return buf


def pack_images(images_dir: Path, *, region: str, size: int, mode: int, pid: int, criu: str,
                limit: int = MAX_DEVICE_STATE, into: bytearray | None = None) -> bytearray:
    """Read every image file of ``images_dir`` into one blob (each file read once, straight into place).

    ``into``: a buffer to use (cut to size) when it is large enough
    (:func:`prefaulted`).  Raises :class:`GuestControlError` when the images
    would not fit ``limit`` (checked before a byte is read) or a file
    changes size while read.
    """
    names = sorted(n for n in os.listdir(images_dir) if n not in _SKIP)
    sizes = [os.stat(images_dir / n).st_size for n in names]
    header = msgpack.packb({"v": 1, "region": region, "size": size, "mode": mode, "pid": pid, "criu": criu,
                            "files": [[n, k] for n, k in zip(names, sizes)]})
    off = len(MAGIC) + _LEN.size + len(header)
    total = off + sum(sizes)
    if total > limit:
        raise GuestControlError(f"the CRIU images are {total >> 20} MiB, over the device-state limit of "
                                f"{limit >> 20} MiB: the process holds too much private memory to move this way")
    if into is not None and len(into) >= total:
        blob = into
        del blob[total:]
    else:
        blob = bytearray(total)
    blob[:off] = MAGIC + _LEN.pack(len(header)) + header
    view = memoryview(blob)
    for name, k in zip(names, sizes):
        with open(images_dir / name, "rb", buffering=0) as f:
            got = 0
            while got < k and (n := f.readinto(view[off + got:off + k])):
                got += n
            if got != k or f.read(1):
                raise GuestControlError(f"CRIU image {name} changed size while it was read")
        off += k
    return blob


def _header(blob: memoryview) -> tuple[ImageSet, int]:
    """The checked header, and where the file bytes start."""
    if blob[:len(MAGIC)] != MAGIC:
        raise GuestControlError("the device state is not a CRIU image set (bad magic)")
    start = len(MAGIC) + _LEN.size
    if len(blob) < start:
        raise GuestControlError("CRIU image set truncated")
    (hlen,) = _LEN.unpack(blob[len(MAGIC):start])
    if hlen > MAX_HEADER or start + hlen > len(blob):
        raise GuestControlError(f"CRIU image set header of {hlen} bytes is too long")
    try:
        h = msgpack.unpackb(blob[start:start + hlen], max_bin_len=0, max_str_len=MAX_HEADER,
                            max_array_len=MAX_FILES, max_map_len=16)
    except (ValueError, msgpack.UnpackException) as exc:
        raise GuestControlError(f"CRIU image set header unreadable: {exc}") from exc
    try:
        if h["v"] != 1:
            raise GuestControlError(f"CRIU image set version {h['v']!r} unknown here: upgrade precopy")
        region, size, mode, pid, criu, files = h["region"], h["size"], h["mode"], h["pid"], h["criu"], h["files"]
        ok = (isinstance(region, str) and region.startswith("/") and "\0" not in region
              and isinstance(size, int) and 0 < size and isinstance(pid, int) and pid > 0
              and isinstance(mode, int) and 0 <= mode <= 0o7777
              and isinstance(criu, str) and isinstance(files, list))
        if not ok:
            raise GuestControlError("CRIU image set header has a bad field")
        out: list[tuple[str, int]] = []
        for entry in files:
            name, length = entry
            if not (isinstance(name, str) and _NAME.match(name) and isinstance(length, int) and length >= 0):
                raise GuestControlError(f"CRIU image set names a bad file {name!r}")
            out.append((name, length))
    except (KeyError, TypeError, ValueError) as exc:
        raise GuestControlError(f"CRIU image set header malformed: {exc}") from exc
    if len({n for n, _ in out}) != len(out):
        raise GuestControlError("CRIU image set names a file twice")
    if start + hlen + sum(n for _, n in out) != len(blob):
        raise GuestControlError("CRIU image set: the file lengths do not add up to the blob")
    header = ImageSet(region=os.path.normpath(region), size=size, mode=mode, pid=pid, criu=criu, files=tuple(out))
    return header, start + hlen


def unpack_images(blob: bytes | bytearray | memoryview, images_dir: Path) -> ImageSet:
    """Check ``blob`` whole, then write its files into ``images_dir`` (created, must be empty).

    Returns the header.  Raises :class:`GuestControlError` for a bad blob
    (nothing written) or a directory that cannot take it.
    """
    view = memoryview(blob)
    header, off = _header(view)
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
        if any(images_dir.iterdir()):
            raise GuestControlError(f"{images_dir} is not empty")
        for name, length in header.files:
            with open(images_dir / name, "xb") as f:
                f.write(view[off:off + length])
            off += length
    except OSError as exc:
        raise GuestControlError(f"cannot write the CRIU images into {images_dir}: {exc}") from exc
    return header
