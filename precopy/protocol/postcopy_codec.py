"""Post-copy's frames (POSTCOPY, COMPLETE, RESUME; REQUEST, MISSING): their fields checked.

Pure, as :mod:`precopy.protocol.codec` (whose field checks these use): the
connection passes in what REQUEST and MISSING need of the conversation --
its BEGIN (or RESUME), and the MISSING bytes already in -- and decodes the
other three with :data:`DECODERS`.
"""

from __future__ import annotations

from typing import Any, Callable, Final

import numpy as np

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol.codec import _decode_begin, _id_field, _int_field, _timings
from precopy.protocol.limits import MAX_META, MAX_REGION, MAX_REQUEST_PAGES, PAGE_SIZE
from precopy.protocol.messages import Begin, Complete, Event, Kind, Missing, Postcopy, Request, Resume

__all__ = ["decode_request", "decode_missing", "missing_bytes", "bitmap_of", "bitmap_of_mask", "mask_of_bitmap", "pages_of_bitmap", "DECODERS",
           "decode_postcopy", "decode_complete", "decode_resume", "POSTCOPY_KINDS", "decode_postcopy_frame",
           "check_missing_send"]


def _int(meta: dict[Any, Any], key: str, kind: Kind, lo: int, hi: int) -> int:
    value = meta.get(key)
    if key not in meta:
        raise RemoteProtocolError(f"{kind.name} frame lacks field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RemoteProtocolError(f"{kind.name} field {key!r}={str(value)[:40]} is not an integer in [{lo}, {hi}]")
    return value


def decode_request(meta: dict[Any, Any], begin: Begin) -> Request:
    """A post-copy REQUEST: 1..1024 strictly increasing page numbers within the region."""
    raw = meta.get("i")
    if not isinstance(raw, bytes) or len(raw) > MAX_META:
        raise RemoteProtocolError("REQUEST field 'i' must be bytes (uint32 page numbers)")
    if len(raw) % 4:
        raise RemoteProtocolError("REQUEST field 'i' is not a whole number of uint32")
    arr = np.frombuffer(raw, dtype="<u4")
    if not 0 < arr.size <= MAX_REQUEST_PAGES:
        raise RemoteProtocolError(f"REQUEST names {arr.size} pages (1..{MAX_REQUEST_PAGES})")
    if arr.size > 1 and not bool(np.greater(arr[1:], arr[:-1]).all()):
        raise RemoteProtocolError("REQUEST field 'i' is not strictly increasing")
    if int(arr[-1]) >= begin.npages:
        raise RemoteProtocolError(f"REQUEST names page {int(arr[-1])} but the region has {begin.npages} pages")
    return Request(indices=arr)


def missing_bytes(begin: Begin) -> int:
    """Bytes in the bitmap of missing pages of the migration ``begin``."""
    return -(-begin.npages // 8)


def decode_missing(meta: dict[Any, Any], payload: memoryview, received: int, begin: Begin) -> Missing:
    """A MISSING piece: it starts where the ``received`` bytes before it end; the total is the
    region's bitmap size; no bit past the region's last page is set."""
    kind = Kind.MISSING
    want = missing_bytes(begin)
    offset = _int(meta, "o", kind, 0, want)
    total = _int(meta, "t", kind, 0, want)
    if total != want:
        raise RemoteProtocolError(f"MISSING bitmap of {total} bytes for a region of {begin.npages} pages "
                                  f"({want} bytes)")
    if offset != received:
        raise RemoteProtocolError(f"MISSING piece at offset {offset}, expected {received}")
    if not len(payload) or offset + len(payload) > total:
        raise RemoteProtocolError("MISSING piece is empty or runs past the bitmap")
    tail = begin.npages % 8
    if offset + len(payload) == total and tail and payload[-1] >> tail:
        raise RemoteProtocolError("MISSING names pages past the end of the region")
    return Missing(offset=offset, total=total, data=payload)




def bitmap_of(pages: np.ndarray, npages: int) -> bytes:
    """The MISSING bitmap of ``pages`` (bit ``p`` of byte ``p // 8``, least significant first)."""
    bits = np.zeros(npages, dtype=bool)
    bits[np.asarray(pages, dtype=np.int64)] = True
    return np.packbits(bits, bitorder="little").tobytes()


def bitmap_of_mask(mask: np.ndarray) -> bytes:
    """The MISSING bitmap of a per-page mask (True: missing)."""
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little").tobytes()


def mask_of_bitmap(bitmap: bytes | bytearray | memoryview, npages: int) -> np.ndarray:
    """The per-page mask (bool, True: missing) of a MISSING bitmap."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=npages, bitorder="little")
    return bits.view(bool)


def pages_of_bitmap(bitmap: bytes | bytearray | memoryview, npages: int) -> np.ndarray:
    """The pages (uint32, ascending) whose bits are set in a MISSING bitmap."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=npages, bitorder="little")
    return np.flatnonzero(bits).astype(np.uint32)


def decode_postcopy(meta: dict[Any, Any]) -> Event:
    return Postcopy(
        migration_id=_id_field(meta, Kind.POSTCOPY),
        checksum=_int_field(meta, "checksum", Kind.POSTCOPY, 0, (1 << 64) - 1),
    )


def decode_complete(meta: dict[Any, Any]) -> Event:  # (stats: as COMMITTED's timings, larger numbers)
    return Complete(migration_id=_id_field(meta, Kind.COMPLETE),
                    pages=_int_field(meta, "pages", Kind.COMPLETE, 0, MAX_REGION // PAGE_SIZE),
                    stats=_timings(meta.get("stats", {}), "COMPLETE field 'stats'", 1e12))


def decode_resume(meta: dict[Any, Any]) -> Event:
    """RESUME: the BEGIN fields that bound the page numbers (checked as BEGIN's)."""
    fields = {k: meta[k] for k in ("migration_id", "name", "size", "page_size", "chunk_pages", "streams")
              if k in meta}
    try:
        begin = _decode_begin(fields)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(str(exc).replace("BEGIN", "RESUME")) from None
    assert isinstance(begin, Begin)
    return Resume(begin=begin)


#: The post-copy kinds whose fields alone say whether they are valid (the connection's to call).
DECODERS: Final[dict[Kind, Callable[[dict[Any, Any]], Event]]] = {
    Kind.POSTCOPY: decode_postcopy,
    Kind.COMPLETE: decode_complete,
    Kind.RESUME: decode_resume,
}

#: Every post-copy kind: the connection decodes them with :func:`decode_postcopy_frame`.
POSTCOPY_KINDS: Final = frozenset({*DECODERS, Kind.MISSING, Kind.REQUEST})


def decode_postcopy_frame(kind: Kind, meta: dict[Any, Any], payload: memoryview, begin: Begin | None,
                          missing_in: int) -> tuple[Event, int]:
    """A post-copy frame's event, and the MISSING bitmap bytes received with it (``missing_in``
    before).  REQUEST and MISSING need the conversation's BEGIN (or RESUME): the phase table
    puts one first."""
    if kind in DECODERS:
        return DECODERS[kind](meta), missing_in
    assert begin is not None
    if kind is Kind.MISSING:
        return decode_missing(meta, payload, missing_in, begin), missing_in + len(payload)
    return decode_request(meta, begin), missing_in


def check_missing_send(meta: dict[str, Any], payload: Any, sent: int, begin: Begin | None) -> None:
    """Raise :class:`LocalProtocolError` unless this MISSING piece may go out after ``sent`` bytes."""
    if begin is None:
        return  # the phase table refuses it
    try:
        decode_missing(meta, memoryview(payload).cast("B"), sent, begin)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(str(exc)) from None
