"""Frames: the 12-byte prefix, the msgpack header and the payload, and the checks of a received payload.

Frame layout (little endian)::

    magic "PC" | kind u8 | flags u8 | meta_len u32 | payload_len u32 | meta | payload

``meta`` is a msgpack map (at most :data:`~precopy.protocol.limits.MAX_META`
bytes); ``payload`` is raw bytes (at most
:data:`~precopy.protocol.limits.MAX_PAYLOAD`).  Both lengths are checked
from the prefix, before a byte of the body is buffered.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack
import numpy as np
import xxhash

from precopy.errors import AbortCode, RemoteProtocolError
from precopy.protocol.limits import MAGIC, MAX_META, MAX_PAYLOAD, PAGE_SIZE, PREFIX
from precopy.protocol.messages import Kind, Pages

__all__ = ["PAYLOAD_KINDS", "encode_frame", "payload_nbytes", "read_prefix", "decode_meta", "page_payload"]

#: A header's first buffer: a batch of MAX_BATCH_PAGES page numbers fits (larger grows).
_META_BUF: Final = 8 * 1024

#: The only kinds whose frames carry a payload.
PAYLOAD_KINDS: Final = frozenset({Kind.PAGES, Kind.DIGEST_TABLE, Kind.DEVICE_STATE, Kind.MISSING})


def encode_frame(kind: int, meta: dict[str, Any] | None = None, payload: Any = b"") -> list[Any]:
    """Frame ``meta`` and ``payload``; returns buffers to write in order.

    No length is checked here: :meth:`~precopy.protocol.connection.Connection.send`
    checks events, and tests use this directly to build invalid frames.
    """
    # Not msgpack.packb: its Packer mallocs a 256 KiB buffer per call, an
    # mmap and munmap each time (over glibc's threshold) that also waits
    # for the mmap lock while a thread maps the region in (MADV_POPULATE_*):
    # ~4 % of the source's samples.  The bytes are the same.
    meta_bytes = msgpack.Packer(use_bin_type=True, buf_size=_META_BUF).pack(meta or {})
    views = [_byte_view(p) for p in payload] if isinstance(payload, (list, tuple)) else [_byte_view(payload)]
    nbytes = sum(v.nbytes for v in views)
    head = PREFIX.pack(MAGIC, int(kind), 0, len(meta_bytes), nbytes)
    return [head + meta_bytes, *(v for v in views if v.nbytes)]


def _byte_view(buf: Any) -> memoryview:
    view = memoryview(buf if buf is not None else b"")
    if not view.nbytes:
        # An empty payload of any shape: ``cast`` refuses one with a zero in its shape (e.g. the
        # (0, 4096) array of a post-copy batch of nothing but zero pages).
        return memoryview(b"")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # socket code counts len() in bytes, not items
    return view


def payload_nbytes(payload: Any) -> int:
    """Bytes in a payload: one buffer, or a list of buffers sent as one."""
    if isinstance(payload, (list, tuple)):
        return sum(memoryview(p).nbytes for p in payload)
    return memoryview(payload).nbytes


def read_prefix(buf: Any, start: int) -> tuple[Kind, int, int]:
    """``(kind, meta_len, payload_len)`` of the frame whose prefix is at ``buf[start:]``, checked.

    Raises :class:`RemoteProtocolError` for a peer that is not precopy
    (or speaks TLS to a plain listener), an unknown kind or flag, or a
    length over its limit: nothing of such a frame's body is buffered.
    """
    magic, kind_no, flags, meta_len, payload_len = PREFIX.unpack_from(buf, start)
    if magic != MAGIC:
        if magic[0] in (0x15, 0x16) and magic[1] == 3:  # a TLS record (alert, handshake)
            raise RemoteProtocolError(
                f"bad frame magic {magic!r}: the peer speaks TLS; give both sides the TLS "
                "options (--tls-cert/--tls-key on precopy-dest, --tls-ca on precopy-source)"
            )
        raise RemoteProtocolError(f"bad frame magic {magic!r}: not a precopy peer")
    try:
        kind = Kind(kind_no)
    except ValueError:
        raise RemoteProtocolError(f"unknown message kind {kind_no}") from None
    if flags:
        raise RemoteProtocolError(f"{kind.name} frame has unknown flags {flags:#x}")
    if meta_len > MAX_META:
        raise RemoteProtocolError(f"{kind.name} header of {meta_len} bytes exceeds {MAX_META}")
    if payload_len > MAX_PAYLOAD:
        raise RemoteProtocolError(
            f"{kind.name} payload of {payload_len} bytes exceeds {MAX_PAYLOAD}"
        )
    return kind, int(meta_len), int(payload_len)


def decode_meta(kind: Kind, data: memoryview) -> dict[Any, Any]:
    """A frame's msgpack header, as a map (bounded: no field longer than a header)."""
    try:
        meta = msgpack.unpackb(
            data, raw=False, strict_map_key=True,
            max_bin_len=MAX_META, max_str_len=MAX_META, max_array_len=64, max_map_len=64,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise RemoteProtocolError(f"{kind.name} header is not valid msgpack: {exc}") from exc
    if not isinstance(meta, dict):
        raise RemoteProtocolError(f"{kind.name} header is not a map")
    return meta


def page_payload(ev: Pages, decompress: Any = None, *, chunk_pages: int = 0) -> memoryview:
    """Return the raw page bytes of a received batch, checked.

    Decompresses when needed (``decompress(data, raw_len)`` may be passed in
    to pick the codec; default lz4 block) into exactly ``len(indices)`` pages
    and verifies the batch checksum, or its chunk digests (``chunk_pages``,
    the migration's, is then needed).  Raises :class:`RemoteProtocolError`
    on a corrupt, truncated or oversized batch: never returns more bytes than
    the batch declares.
    """
    raw_len = len(ev.indices) * PAGE_SIZE
    data: Any = ev.payload
    if ev.compressed:
        import lz4.block

        try:
            if decompress is None:
                data = lz4.block.decompress(ev.payload, uncompressed_size=raw_len)
            else:
                data = decompress(ev.payload, raw_len)
        except Exception as exc:  # lz4 raises LZ4BlockError / ValueError
            raise RemoteProtocolError(f"compressed PAGES batch does not inflate: {exc}") from exc
        if memoryview(data).nbytes != raw_len:
            raise RemoteProtocolError(
                f"compressed PAGES batch inflates to {memoryview(data).nbytes} bytes, expected {raw_len}"
            )
    view = memoryview(data)
    if ev.chunk_digests is not None:
        if chunk_pages <= 0:
            raise ValueError("page_payload: a batch with chunk digests needs the migration's chunk_pages")
        step = chunk_pages * PAGE_SIZE
        h = xxhash.xxh3_64_intdigest
        got = [h(view[o:o + step]) for o in range(0, view.nbytes, step)]
        if len(got) != len(ev.chunk_digests) or not bool((np.array(got, dtype=np.uint64) == ev.chunk_digests).all()):
            raise RemoteProtocolError(
                "PAGES batch checksum mismatch (chunk digests): the data was corrupted in transit",
                AbortCode.PROTOCOL,
            )
    elif ev.checksum is not None and xxhash.xxh3_64_intdigest(data) != ev.checksum:
        raise RemoteProtocolError(
            "PAGES batch checksum mismatch: the data was corrupted in transit",
            AbortCode.PROTOCOL,
        )
    return view
