"""Message codecs: each event to its frame fields and back, with every field of a received frame checked.

Decoding is strict and bounded: a field of the wrong type, out of its
range, or naming a page or chunk outside the region is a
:class:`RemoteProtocolError` that says which field of which message.  Page
numbers travel as one binary field of uint32, never as per-page msgpack
objects.  The decoders here are pure: what they need of the conversation
(its BEGIN, the size of the digest table asked for, the device-state bytes
already in) is passed in by the :class:`~precopy.protocol.connection.Connection`.
"""

from __future__ import annotations

from typing import Any, Callable, Final

import numpy as np

from precopy.errors import RemoteProtocolError
from precopy.protocol.limits import (
    MAC_SIZE,
    MAX_BATCH_PAGES,
    MAX_CAPS,
    MAX_DEVICE_STATE,
    MAX_META,
    MAX_NAME,
    MAX_PAGE_DIGEST_CHUNKS,
    MAX_PAYLOAD,
    MAX_QUEUE,
    MAX_REGION,
    MAX_REQUIREMENTS,
    MAX_SOFTWARE,
    MAX_STREAMS,
    MAX_TIMINGS,
    NONCE_SIZE,
    PAGE_SIZE,
)
from precopy.protocol.messages import (
    KIND_OF,
    Abort,
    Auth,
    AuthOk,
    Begin,
    Commit,
    Committed,
    Complete,
    DeviceState,
    DigestRequest,
    DigestTable,
    Event,
    Hello,
    HelloAck,
    Join,
    Joined,
    Kind,
    Missing,
    Outcome,
    Pages,
    Query,
    Queued,
    Ready,
    Request,
    Resume,
    Switchover,
    Sync,
)

__all__ = [
    "encode_event", "decode_event", "decode_pages", "decode_digest_request", "decode_digest_table",
    "decode_device_state", "requires_field", "chunk_list", "table_size", "whole_chunks",
    "page_digest_limit", "valid_name", "u32", 
]


# --------------------------------------------------------------------------
# Encoding


def u32(a: np.ndarray) -> bytes:
    """Page or chunk numbers as one binary field: uint32 little endian."""
    return np.ascontiguousarray(a, dtype="<u4").tobytes()


def encode_event(ev: Event) -> tuple[Kind, dict[str, Any], Any]:
    """Return (kind, meta, payload) for an event."""
    if isinstance(ev, Pages):
        meta: dict[str, Any] = {
            "i": u32(ev.indices),
            "z": u32(ev.zeros),
            "c": int(ev.compressed),
        }
        if ev.checksum is not None:
            meta["h"] = int(ev.checksum)
        if ev.chunk_digests is not None:
            meta["cd"] = np.ascontiguousarray(ev.chunk_digests, dtype="<u8").tobytes()
        return Kind.PAGES, meta, ev.payload
    if isinstance(ev, DigestTable):
        table: dict[str, Any] = {"s": ev.seq}
        if ev.others is not None:
            table["o"] = ev.others
        return Kind.DIGEST_TABLE, table, np.ascontiguousarray(ev.digests, dtype="<u8").data
    if isinstance(ev, DigestRequest):
        req: dict[str, Any] = {"seq": ev.seq, "final": ev.final}
        if ev.pages_of is not None:
            req["p"] = u32(ev.pages_of)
        if ev.by_page:
            req["bp"] = True
        return Kind.DIGEST_REQUEST, req, b""
    if isinstance(ev, DeviceState):
        return Kind.DEVICE_STATE, {"o": ev.offset, "t": ev.total}, ev.data
    if isinstance(ev, Sync):
        return Kind.SYNC, {"n": [int(c) for c in ev.counts]}, b""
    if isinstance(ev, Missing):
        return Kind.MISSING, {"o": ev.offset, "t": ev.total}, ev.data
    if isinstance(ev, Request):
        return Kind.REQUEST, {"i": u32(ev.indices)}, b""
    if isinstance(ev, Resume):
        b = ev.begin
        fields = {"migration_id": b.migration_id, "name": b.name, "size": b.size, "page_size": b.page_size,
                  "chunk_pages": b.chunk_pages, **({"streams": b.streams} if b.streams != 1 else {})}
        return Kind.RESUME, fields, b""
    kind = KIND_OF[type(ev)]
    meta = {name: getattr(ev, name) for name in ev.__dataclass_fields__}
    if isinstance(ev, Begin):
        meta["requires"] = {k: list(v) for k, v in ev.requires.items()}
        if not ev.wait:
            del meta["wait"]  # as a source before queues: nothing new on the wire
        if ev.streams == 1:
            del meta["streams"]  # as a source before streams
    elif isinstance(ev, Ready) and ev.streams == 1:
        del meta["streams"]  # as a destination before streams
    elif isinstance(ev, Join):
        if not ev.lane:
            del meta["lane"]  # as a source before fault lanes
        if not ev.fast:
            del meta["fast"]  # as a source before the lane's lean frames
    elif isinstance(ev, Joined) and not ev.fast:
        del meta["fast"]  # as a destination before the lane's lean frames
    elif isinstance(ev, Complete) and not ev.stats:
        del meta["stats"]
    elif isinstance(ev, (Hello, HelloAck)):
        if ev.software is None:
            del meta["software"]  # as a peer before versions were announced
        if ev.caps is None:
            del meta["caps"]  # as a peer before capabilities: nothing new on the wire
        else:
            meta["caps"] = list(ev.caps)
    return kind, meta, b""


# --------------------------------------------------------------------------
# Fields


def _field(meta: dict[Any, Any], key: str, typ: type | tuple[type, ...], kind: Kind) -> Any:
    try:
        value = meta[key]
    except KeyError:
        raise RemoteProtocolError(f"{kind.name} frame lacks field {key!r}") from None
    if isinstance(value, bool) and typ is int:
        raise RemoteProtocolError(f"{kind.name} field {key!r} must be an integer")
    if not isinstance(value, typ):
        raise RemoteProtocolError(
            f"{kind.name} field {key!r} has type {type(value).__name__}"
        )
    return value


def _timings(value: Any, what: str = "COMMITTED field 'timings'", hi: float = 1e9) -> dict[str, float]:
    """COMMITTED's optional ``timings`` (COMPLETE's ``stats``): at most 16 names (<= 32 chars) ->
    finite numbers in [0, ``hi``)."""
    if not isinstance(value, dict) or len(value) > MAX_TIMINGS:
        raise RemoteProtocolError(f"{what} must be a map of at most {MAX_TIMINGS} entries")
    out = {}
    for k, v in value.items():
        if (not isinstance(k, str) or not 0 < len(k) <= 32 or isinstance(v, bool)
                or not isinstance(v, (int, float)) or not 0 <= v < hi):
            raise RemoteProtocolError(f"{what}: {str(k)[:40]!r}: {str(v)[:40]} is not a number >= 0")
        out[k] = float(v)
    return out


def _bytes_field(meta: dict[Any, Any], key: str, kind: Kind, *, exact: int | None = None,
                 limit: int = MAX_META) -> bytes:
    value: bytes = _field(meta, key, bytes, kind)
    if exact is not None and len(value) != exact:
        raise RemoteProtocolError(f"{kind.name} field {key!r} must be {exact} bytes, got {len(value)}")
    if len(value) > limit:
        raise RemoteProtocolError(f"{kind.name} field {key!r} too long ({len(value)} bytes)")
    return value


def _str_field(meta: dict[Any, Any], key: str, kind: Kind, limit: int = 256) -> str:
    value: str = _field(meta, key, str, kind)
    if len(value) > limit:
        raise RemoteProtocolError(f"{kind.name} field {key!r} longer than {limit} characters")
    return value


def _id_field(meta: dict[Any, Any], kind: Kind) -> str:
    """A migration id: a plain token (it names journal files on the destination)."""
    value = _str_field(meta, "migration_id", kind, 64)
    if not valid_name(value):
        raise RemoteProtocolError(f"{kind.name} migration_id {value!r} is not a plain token ([A-Za-z0-9._-])")
    return value


def _int_field(meta: dict[Any, Any], key: str, kind: Kind, lo: int, hi: int) -> int:
    value: int = _field(meta, key, int, kind)
    if not lo <= value <= hi:
        raise RemoteProtocolError(f"{kind.name} field {key!r}={value} outside [{lo}, {hi}]")
    return value


def requires_field(value: Any) -> dict[str, tuple[str, ...]]:
    """BEGIN ``requires``: a map of at most 16 names to lists of at most 256 short strings."""
    if not isinstance(value, dict) or len(value) > MAX_REQUIREMENTS:
        raise RemoteProtocolError(f"BEGIN field 'requires' must be a map of at most {MAX_REQUIREMENTS} entries")
    out: dict[str, tuple[str, ...]] = {}
    for key, items in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise RemoteProtocolError("BEGIN 'requires' keys must be strings of 1-64 characters")
        if not isinstance(items, (list, tuple)) or len(items) > 256 or not all(
                isinstance(i, str) and 0 < len(i) <= 128 for i in items):
            raise RemoteProtocolError(
                f"BEGIN requirement {key!r} must be a list of at most 256 strings of 1-128 characters")
        out[key] = tuple(items)
    return out


def _page_list(raw: bytes, key: str, npages: int) -> np.ndarray:
    """A PAGES batch's ``i`` or ``z``: strictly increasing page numbers within the region."""
    if len(raw) % 4:
        raise RemoteProtocolError(f"PAGES field {key!r} is not a whole number of uint32")
    arr = np.frombuffer(raw, dtype="<u4")
    if arr.size > MAX_BATCH_PAGES:
        raise RemoteProtocolError(f"PAGES batch of {arr.size} pages exceeds {MAX_BATCH_PAGES}")
    # Strictly increasing first: then the last page is the largest (one
    # comparison of neighbours, no max, no widening copy).
    if arr.size > 1 and not bool(np.greater(arr[1:], arr[:-1]).all()):
        raise RemoteProtocolError(f"PAGES field {key!r} is not strictly increasing")
    if arr.size and int(arr[-1]) >= npages:
        raise RemoteProtocolError(
            f"PAGES names page {int(arr[-1])} but the region has {npages} pages"
        )
    return arr


def whole_chunks(indices: np.ndarray, chunk_pages: int, npages: int) -> tuple[int, int] | None:
    """``(first, end)`` chunk numbers if ``indices`` are exactly those whole chunks, else None.

    The pages must be one ascending run starting on a chunk boundary and
    ending on one (or at the region's last page: the last chunk may be short).
    """
    n = len(indices)
    if n == 0:
        return None
    first, last = int(indices[0]), int(indices[-1])
    if first % chunk_pages or last - first != n - 1:
        return None
    if (last + 1) % chunk_pages and last + 1 != npages:
        return None
    if n > 2 and not bool((np.diff(indices) == 1).all()):
        return None
    return first // chunk_pages, -(-(last + 1) // chunk_pages)


def chunk_list(raw: bytes, begin: Begin) -> np.ndarray:
    """A DIGEST_REQUEST's ``p``: strictly increasing chunk numbers within the region."""
    if len(raw) % 4:
        raise RemoteProtocolError("DIGEST_REQUEST field 'p' is not a whole number of uint32")
    arr = np.frombuffer(raw, dtype="<u4")
    nchunks = -(-begin.npages // begin.chunk_pages)
    limit = page_digest_limit(begin)
    if not 0 < arr.size <= limit:
        raise RemoteProtocolError(f"DIGEST_REQUEST asks for the pages of {arr.size} chunks (1..{limit})")
    if int(arr.max()) >= nchunks:
        raise RemoteProtocolError(f"DIGEST_REQUEST names chunk {int(arr.max())} of a region of {nchunks}")
    if arr.size > 1 and not (np.diff(arr.astype(np.int64)) > 0).all():
        raise RemoteProtocolError("DIGEST_REQUEST field 'p' is not strictly increasing")
    return arr


def page_digest_limit(begin: Begin) -> int:
    """Most chunks one DIGEST_REQUEST may ask the page digests of."""
    return min(MAX_PAGE_DIGEST_CHUNKS, MAX_PAYLOAD // 8 // begin.chunk_pages)


def valid_name(name: str) -> bool:
    """Region names are file names: [A-Za-z0-9._-], not starting with a dot."""
    return (
        0 < len(name) <= MAX_NAME
        and not name.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    )


def table_size(begin: Begin, pages_of: np.ndarray | None) -> int:
    """Digests in the answer to a DIGEST_REQUEST for ``pages_of`` (None: the chunk table)."""
    cp, npages = begin.chunk_pages, begin.npages
    nchunks = -(-npages // cp)
    if pages_of is None:
        return nchunks
    n = len(pages_of) * cp
    if len(pages_of) and int(pages_of[-1]) == nchunks - 1:
        n -= nchunks * cp - npages  # the last chunk may be short
    return n


# --------------------------------------------------------------------------
# Decoding: the kinds that need something of the conversation


def decode_pages(meta: dict[Any, Any], payload: memoryview | None, begin: Begin,
                 payload_len: int | None = None) -> Pages:
    """Check a PAGES frame of the migration ``begin`` and return its event.

    ``payload`` None: only the header is in (a payload to be received in
    place); ``payload_len`` is then the payload's declared size.
    """
    kind = Kind.PAGES
    size = len(payload) if payload is not None else int(payload_len or 0)
    npages = begin.npages
    indices = _page_list(_bytes_field(meta, "i", kind), "i", npages)
    zeros = _page_list(_bytes_field(meta, "z", kind), "z", npages)
    if indices.size + zeros.size == 0:
        raise RemoteProtocolError("PAGES batch names no page")
    if indices.size + zeros.size > MAX_BATCH_PAGES:
        raise RemoteProtocolError(f"PAGES batch exceeds {MAX_BATCH_PAGES} pages")
    if indices.size and zeros.size:
        both = np.intersect1d(indices, zeros, assume_unique=True)
        if both.size:
            raise RemoteProtocolError(f"PAGES batch names page {int(both[0])} both with data and as zero")
    compressed = _int_field(meta, "c", kind, 0, 1) == 1
    checksum = _int_field(meta, "h", kind, 0, (1 << 64) - 1) if "h" in meta else None
    if checksum is None and "cd" not in meta and compressed:
        # Only raw bytes may come unchecked (the destination's digests of
        # them become the source's record); an lz4 block must be checked.
        raise RemoteProtocolError("compressed PAGES batch without a checksum")
    raw_len = indices.size * PAGE_SIZE
    if compressed:
        if not indices.size or size == 0:
            raise RemoteProtocolError("compressed PAGES batch without data")
    elif size != raw_len:
        raise RemoteProtocolError(
            f"PAGES payload is {size} bytes for {indices.size} pages"
        )
    chunk_digests = None
    if "cd" in meta:
        raw_cd = _bytes_field(meta, "cd", kind)
        chunks = whole_chunks(indices, begin.chunk_pages, npages)
        if chunks is None:
            raise RemoteProtocolError("PAGES chunk digests for pages that are not whole chunks")
        if len(raw_cd) != 8 * (chunks[1] - chunks[0]):
            raise RemoteProtocolError(
                f"PAGES carries {len(raw_cd) // 8} chunk digests for {chunks[1] - chunks[0]} chunks"
            )
        chunk_digests = np.frombuffer(raw_cd, dtype="<u8")
    return Pages(indices=indices, zeros=zeros, payload=payload,
                 compressed=compressed, checksum=checksum, chunk_digests=chunk_digests)


def decode_digest_request(meta: dict[Any, Any], begin: Begin) -> DigestRequest:
    """A DIGEST_REQUEST's fields (whether ``bp`` fits the migration's earlier requests is
    :func:`~precopy.protocol.phases.check_by_page`'s to say)."""
    kind = Kind.DIGEST_REQUEST
    seq = _int_field(meta, "seq", kind, 0, 1 << 62)
    final = bool(_field(meta, "final", bool, kind))
    pages_of = None
    if "p" in meta:
        pages_of = chunk_list(_bytes_field(meta, "p", kind), begin)
    by_page = bool(_field(meta, "bp", bool, kind)) if "bp" in meta else False
    return DigestRequest(seq=seq, final=final, pages_of=pages_of, by_page=by_page)


def decode_digest_table(meta: dict[Any, Any], payload: memoryview, want: int | None) -> DigestTable:
    """A DIGEST_TABLE answering the oldest request not yet answered, which asked for
    ``want`` digests (None: there is none)."""
    kind = Kind.DIGEST_TABLE
    seq = _int_field(meta, "s", kind, 0, 1 << 62)
    if want is None:
        raise RemoteProtocolError("DIGEST_TABLE without a request")
    if len(payload) != want * 8:
        raise RemoteProtocolError(
            f"DIGEST_TABLE of {len(payload)} bytes, expected {want * 8} for the {want} digests asked for"
        )
    others = _int_field(meta, "o", kind, 0, MAX_QUEUE) if "o" in meta else None
    return DigestTable(seq=seq, digests=np.frombuffer(payload, dtype="<u8"), others=others)


def decode_device_state(meta: dict[Any, Any], payload: memoryview, received: int) -> DeviceState:
    """A DEVICE_STATE piece, which must start where the ``received`` bytes before it end."""
    kind = Kind.DEVICE_STATE
    offset = _int_field(meta, "o", kind, 0, MAX_DEVICE_STATE)
    total = _int_field(meta, "t", kind, 0, MAX_DEVICE_STATE)
    if offset != received:
        raise RemoteProtocolError(
            f"DEVICE_STATE piece at offset {offset}, expected {received}"
        )
    if offset + len(payload) > total:
        raise RemoteProtocolError("DEVICE_STATE piece runs past the declared total")
    return DeviceState(offset=offset, total=total, data=payload)


# --------------------------------------------------------------------------
# Decoding: the kinds whose fields alone say whether they are valid


def decode_event(kind: Kind, meta: dict[Any, Any]) -> Event:
    """The event of a frame without a payload, its fields checked.

    For every kind but PAGES, DIGEST_REQUEST, DIGEST_TABLE and DEVICE_STATE
    (their decoders above need the conversation's state).
    """
    try:
        decoder = _DECODERS[kind]
    except KeyError:  # pragma: no cover - the connection decodes those four itself
        raise RemoteProtocolError(f"no decoder for {kind.name}") from None
    return decoder(meta)


def _software(meta: dict[Any, Any], kind: Kind) -> str | None:
    """HELLO's and HELLO_ACK's optional ``software``: the sender's precopy version, printable."""
    if "software" not in meta:
        return None
    value = _str_field(meta, "software", kind, MAX_SOFTWARE)
    if not value or not value.isprintable():
        raise RemoteProtocolError(f"{kind.name} field 'software' must be 1-{MAX_SOFTWARE} printable characters")
    return value


def _caps(meta: dict[Any, Any], kind: Kind) -> tuple[str, ...] | None:
    """HELLO's and HELLO_ACK's optional ``caps``: <= 16 names of 1-32 printable characters (unknown ones too)."""
    if "caps" not in meta:
        return None
    value = meta["caps"]
    if (not isinstance(value, (list, tuple)) or len(value) > MAX_CAPS
            or not all(isinstance(c, str) and 0 < len(c) <= 32 and c.isprintable() for c in value)):
        raise RemoteProtocolError(f"{kind.name} field 'caps' must be a list of at most {MAX_CAPS} "
                                  "names of 1-32 printable characters")
    return tuple(value)


def _decode_hello(meta: dict[Any, Any]) -> Event:
    return Hello(
        version=_int_field(meta, "version", Kind.HELLO, 0, 1 << 16),
        nonce=_bytes_field(meta, "nonce", Kind.HELLO, exact=NONCE_SIZE),
        software=_software(meta, Kind.HELLO),
        caps=_caps(meta, Kind.HELLO),
    )


def _decode_hello_ack(meta: dict[Any, Any]) -> Event:
    kind = Kind.HELLO_ACK
    return HelloAck(
        version=_int_field(meta, "version", kind, 0, 1 << 16),
        nonce=_bytes_field(meta, "nonce", kind, exact=NONCE_SIZE),
        mac=_bytes_field(meta, "mac", kind, limit=MAC_SIZE),
        software=_software(meta, kind),
        caps=_caps(meta, kind),
    )


def _decode_begin(meta: dict[Any, Any]) -> Event:
    kind = Kind.BEGIN
    page_size = _int_field(meta, "page_size", kind, PAGE_SIZE, PAGE_SIZE)
    size, chunk = _geometry(meta, kind)
    name = _str_field(meta, "name", kind, MAX_NAME)
    if not valid_name(name):
        raise RemoteProtocolError(
            f"BEGIN region name {name!r} is not a plain file name ([A-Za-z0-9._-])"
        )
    dry_run = meta.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RemoteProtocolError("BEGIN field 'dry_run' must be a boolean")
    wait = meta.get("wait", False)
    if not isinstance(wait, bool):
        raise RemoteProtocolError("BEGIN field 'wait' must be a boolean")
    streams = _int_field(meta, "streams", kind, 1, MAX_STREAMS) if "streams" in meta else 1
    ev = Begin(
        migration_id=_str_field(meta, "migration_id", kind, 64),
        name=name, size=size, page_size=page_size, chunk_pages=chunk,
        dry_run=dry_run, requires=requires_field(meta.get("requires", {})), wait=wait, streams=streams,
    )
    if not ev.migration_id or not valid_name(ev.migration_id):
        raise RemoteProtocolError("BEGIN migration_id must be a plain token")
    return ev


def _geometry(meta: dict[Any, Any], kind: Kind) -> tuple[int, int]:
    """BEGIN's (and JOIN's) ``size`` and ``chunk_pages``, checked."""
    size = _int_field(meta, "size", kind, PAGE_SIZE, MAX_REGION)
    if size % PAGE_SIZE:
        raise RemoteProtocolError(f"{kind.name} size {size} is not a multiple of {PAGE_SIZE}")
    chunk = _int_field(meta, "chunk_pages", kind, 1, 4096)
    if chunk & (chunk - 1):
        raise RemoteProtocolError(f"{kind.name} chunk_pages {chunk} is not a power of two")
    if -(-size // (PAGE_SIZE * chunk)) * 8 > MAX_PAYLOAD:
        raise RemoteProtocolError(
            f"{kind.name} chunk_pages {chunk} makes a digest table larger than one frame"
        )
    return size, chunk


def _decode_ready(meta: dict[Any, Any]) -> Event:
    return Ready(existing=bool(_field(meta, "existing", bool, Kind.READY)) if "existing" in meta else False,
                 streams=_int_field(meta, "streams", Kind.READY, 1, MAX_STREAMS) if "streams" in meta else 1)


def _decode_join(meta: dict[Any, Any]) -> Event:
    size, chunk = _geometry(meta, Kind.JOIN)
    lane = bool(_field(meta, "lane", bool, Kind.JOIN)) if "lane" in meta else False
    fast = bool(_field(meta, "fast", bool, Kind.JOIN)) if "fast" in meta else False
    if fast and not lane:
        raise RemoteProtocolError("JOIN field 'fast' (the fault lane's lean frames) without 'lane'")
    return Join(migration_id=_id_field(meta, Kind.JOIN),
                stream=_int_field(meta, "stream", Kind.JOIN, 0 if lane else 1, 0 if lane else MAX_STREAMS - 1),
                size=size, chunk_pages=chunk, lane=lane, fast=fast)


def _decode_sync(meta: dict[Any, Any]) -> Event:
    counts = _field(meta, "n", list, Kind.SYNC)
    if not 0 < len(counts) < MAX_STREAMS or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 62 for c in counts):
        raise RemoteProtocolError(f"SYNC field 'n' must be a list of 1-{MAX_STREAMS - 1} counts")
    return Sync(counts=tuple(counts))


def _decode_commit(meta: dict[Any, Any]) -> Event:
    return Commit(
        migration_id=_id_field(meta, Kind.COMMIT),
        checksum=_int_field(meta, "checksum", Kind.COMMIT, 0, (1 << 64) - 1),
    )


def _decode_committed(meta: dict[Any, Any]) -> Event:
    return Committed(
        migration_id=_id_field(meta, Kind.COMMITTED),
        resumed=bool(_field(meta, "resumed", bool, Kind.COMMITTED)),
        timings=_timings(meta.get("timings", {})),
    )


def _decode_outcome(meta: dict[Any, Any]) -> Event:
    kind = Kind.OUTCOME
    return Outcome(
        migration_id=_id_field(meta, kind),
        committed=bool(_field(meta, "committed", bool, kind)),
        known=bool(_field(meta, "known", bool, kind)),
    )


def _decode_abort(meta: dict[Any, Any]) -> Event:
    return Abort(
        code=_int_field(meta, "code", Kind.ABORT, 0, 255),
        reason=_str_field(meta, "reason", Kind.ABORT, 4096),
    )


def _decode_queued(meta: dict[Any, Any]) -> Event:
    kind = Kind.QUEUED
    return Queued(
        position=_int_field(meta, "position", kind, 1, MAX_QUEUE),
        active=_int_field(meta, "active", kind, 0, MAX_QUEUE),
        limit=_int_field(meta, "limit", kind, 1, MAX_QUEUE),
    )


_DECODERS: Final[dict[Kind, Callable[[dict[Any, Any]], Event]]] = {
    Kind.HELLO: _decode_hello,
    Kind.HELLO_ACK: _decode_hello_ack,
    Kind.AUTH: lambda meta: Auth(mac=_bytes_field(meta, "mac", Kind.AUTH, limit=MAC_SIZE)),
    Kind.AUTH_OK: lambda meta: AuthOk(),
    Kind.BEGIN: _decode_begin,
    Kind.READY: _decode_ready,
    Kind.SWITCHOVER: lambda meta: Switchover(),
    Kind.COMMIT: _decode_commit,
    Kind.COMMITTED: _decode_committed,
    Kind.QUERY: lambda meta: Query(migration_id=_id_field(meta, Kind.QUERY)),
    Kind.OUTCOME: _decode_outcome,
    Kind.ABORT: _decode_abort,
    Kind.QUEUED: _decode_queued,
    Kind.JOIN: _decode_join,
    Kind.JOINED: lambda meta: Joined(fast=bool(_field(meta, "fast", bool, Kind.JOINED)) if "fast" in meta else False),
    Kind.SYNC: _decode_sync,
}
