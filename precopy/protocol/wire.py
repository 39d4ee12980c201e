"""The precopy wire protocol: framing, messages and phases, with no I/O.

A :class:`Connection` turns bytes into events and events into bytes, the way
h11 does for HTTP.  It never touches a socket: the agents feed it what they
read (``get_buffer``/``buffer_updated`` for zero-copy receive, or
``receive_data``), pull events with :meth:`Connection.next_event`, and write
what :meth:`Connection.send` returns.

Frame layout (little endian)::

    magic "PC" | kind u8 | flags u8 | meta_len u32 | payload_len u32 | meta | payload

``meta`` is a msgpack map (at most :data:`MAX_META` bytes); ``payload`` is raw
bytes (at most :data:`MAX_PAYLOAD`).  Both lengths are checked before a byte
of the body is buffered.  Page numbers travel as one binary field of uint32,
never as per-page msgpack objects.

Every phase transition lives in :data:`TRANSITIONS`.  A frame that is not
allowed in the current phase raises :class:`RemoteProtocolError` naming the
message, the sender and the phase.
"""

from __future__ import annotations

import struct
from collections import deque
import dataclasses
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Callable, Final, Union

import msgpack
import numpy as np
import xxhash

from precopy.errors import AbortCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "PAGE_SIZE",
    "MAX_META",
    "MAX_PAYLOAD",
    "MAX_BATCH_PAGES",
    "MAX_DEVICE_STATE",
    "MAX_REQUIREMENTS",
    "Kind",
    "Role",
    "Phase",
    "NEED_DATA",
    "Connection",
    "Hello",
    "HelloAck",
    "Auth",
    "AuthOk",
    "Begin",
    "Ready",
    "Pages",
    "DigestRequest",
    "DigestTable",
    "Switchover",
    "DeviceState",
    "Commit",
    "Committed",
    "Query",
    "Outcome",
    "Abort",
    "Queued",
    "Event",
    "encode_frame",
    "page_payload",
    "payload_nbytes",
    "whole_chunks",
    "page_digest_limit",
    "MAX_PAGE_DIGEST_CHUNKS",
]

PROTOCOL_VERSION: Final = 3
PAGE_SIZE: Final = 4096
MAGIC: Final = b"PC"
PREFIX = struct.Struct("<2sBBII")
PREFIX_SIZE: Final = PREFIX.size  # 12

#: Largest msgpack header a peer may declare.  Batches carry their page
#: numbers here (4 bytes a page), digest tables travel in the payload.
MAX_META: Final = 64 * 1024
#: Largest payload of one frame: a batch of MAX_BATCH_PAGES raw pages.
MAX_BATCH_PAGES: Final = 1024
MAX_PAYLOAD: Final = MAX_BATCH_PAGES * PAGE_SIZE
#: Largest region a migration may declare (1 TiB) and smallest chunk.
MAX_REGION: Final = 1 << 40
#: Largest device-state blob carried to the destination (256 MiB).
MAX_DEVICE_STATE: Final = 256 * 1024 * 1024
#: At most this many guest requirements in one BEGIN.
MAX_REQUIREMENTS: Final = 16
MAX_NAME: Final = 128
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32


class Kind(IntEnum):
    """Message kinds, the third byte of every frame."""

    HELLO = 1
    HELLO_ACK = 2
    AUTH = 3
    AUTH_OK = 4
    BEGIN = 5
    READY = 6
    PAGES = 7
    DIGEST_REQUEST = 8
    DIGEST_TABLE = 9
    SWITCHOVER = 10
    DEVICE_STATE = 11
    COMMIT = 12
    COMMITTED = 13
    QUERY = 14
    OUTCOME = 15
    ABORT = 16
    QUEUED = 17


class Role(Enum):
    SOURCE = "source"
    DEST = "dest"

    @property
    def peer(self) -> Role:
        return Role.DEST if self is Role.SOURCE else Role.SOURCE


class Phase(Enum):
    HELLO = "hello"
    HELLO_ACK = "awaiting hello-ack"
    AUTH = "awaiting auth"
    AUTH_OK = "awaiting auth-ok"
    AUTHENTICATED = "authenticated"
    BEGIN_SENT = "awaiting ready"
    COPYING = "copying"
    PAUSED = "paused"
    COMMIT_SENT = "awaiting committed"
    QUERY_SENT = "awaiting outcome"
    DONE = "done"
    ABORTED = "aborted"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

S, D = Role.SOURCE, Role.DEST

#: Everything that affects the state machine lives here:
#: (phase, sender, kind) -> next phase.  ABORT is allowed from any live phase.
TRANSITIONS: Final[dict[tuple[Phase, Role, Kind], Phase]] = {
    (Phase.HELLO, S, Kind.HELLO): Phase.HELLO_ACK,
    (Phase.HELLO_ACK, D, Kind.HELLO_ACK): Phase.AUTH,
    (Phase.AUTH, S, Kind.AUTH): Phase.AUTH_OK,
    (Phase.AUTH_OK, D, Kind.AUTH_OK): Phase.AUTHENTICATED,
    (Phase.AUTHENTICATED, S, Kind.BEGIN): Phase.BEGIN_SENT,
    (Phase.AUTHENTICATED, S, Kind.QUERY): Phase.QUERY_SENT,
    (Phase.QUERY_SENT, D, Kind.OUTCOME): Phase.DONE,
    (Phase.BEGIN_SENT, D, Kind.READY): Phase.COPYING,
    (Phase.BEGIN_SENT, D, Kind.QUEUED): Phase.BEGIN_SENT,
    (Phase.COPYING, S, Kind.PAGES): Phase.COPYING,
    (Phase.COPYING, S, Kind.DIGEST_REQUEST): Phase.COPYING,
    (Phase.COPYING, D, Kind.DIGEST_TABLE): Phase.COPYING,
    (Phase.COPYING, S, Kind.SWITCHOVER): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.PAGES): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.DIGEST_REQUEST): Phase.PAUSED,
    (Phase.PAUSED, D, Kind.DIGEST_TABLE): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.DEVICE_STATE): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.COMMIT): Phase.COMMIT_SENT,
    (Phase.COMMIT_SENT, D, Kind.COMMITTED): Phase.DONE,
}
_TERMINAL: Final = frozenset({Phase.DONE, Phase.ABORTED})
#: Phases before both sides are authenticated: the receive buffer stays small.
_HANDSHAKE: Final = frozenset({Phase.HELLO, Phase.HELLO_ACK, Phase.AUTH, Phase.AUTH_OK})
#: The only kinds whose frames carry a payload.
_PAYLOAD_KINDS: Final = frozenset({"PAGES", "DIGEST_TABLE", "DEVICE_STATE"})
#: Receive buffer of a connection still in the handshake: room for two of
#: the largest headers, not the ~8 MiB a copying connection uses, so idle
#: or hostile unauthenticated peers cost little memory.
HANDSHAKE_BUFFER: Final = 2 * (PREFIX_SIZE + MAX_META)


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class HelloAck:
    version: int
    nonce: bytes
    mac: bytes  # proves the destination holds the key (empty without a key)


@dataclass(frozen=True, slots=True)
class Auth:
    mac: bytes


@dataclass(frozen=True, slots=True)
class AuthOk:
    pass


@dataclass(frozen=True, slots=True)
class Begin:
    migration_id: str
    name: str
    size: int
    page_size: int = PAGE_SIZE
    chunk_pages: int = 32
    #: Preflight only: the destination runs its checks, answers READY (all
    #: fit) or ABORT (what did not), and no page moves.
    dry_run: bool = False
    #: Guest requirements the source's workload adapter declares, checked by
    #: the destination before READY: ``{"cpu_flags": [...], "executables": [...]}``.
    requires: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: The source can wait in the destination's queue: QUEUED frames may
    #: come before READY (never to a BEGIN without it, nor to a dry run).
    wait: bool = False

    @property
    def npages(self) -> int:
        return self.size // self.page_size


@dataclass(frozen=True, slots=True)
class Ready:
    """The destination accepts the BEGIN.

    ``existing``: it receives into a region file it already held under the
    region's name (a repeat migration, a pre-provisioned host): its pages
    hold old contents, not zeros, and its first digest table says which.
    """

    existing: bool = False


#: Most migrations a QUEUED frame may count (positions, active, limit).
MAX_QUEUE: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class Queued:
    """The destination holds the BEGIN in its queue: ``position`` migrations
    wait ahead of and including this one (1: next); ``active`` move bytes
    there now, at most ``limit`` at once.  Sent when the migration enters
    the queue, when its position changes and every few seconds meanwhile
    (a keep-alive: the source's timeouts restart on each); READY follows
    once it may move bytes."""

    position: int
    active: int
    limit: int


@dataclass(frozen=True, slots=True, eq=False)
class Pages:
    """A batch of pages.

    ``indices`` are the pages whose bytes are in the payload (in order);
    ``zeros`` are pages that are all zero and carry no bytes.  ``payload`` is
    raw pages, or one lz4 block of them when ``compressed``; ``checksum`` is
    xxh3_64 of the raw page bytes.  A batch whose data pages are whole
    digest chunks (one run starting on a chunk boundary; see
    :func:`whole_chunks`) may carry ``chunk_digests`` instead: xxh3_64 of
    each chunk's raw bytes, which the receiver checks and keeps as its chunk
    table (one pass over the bytes for both); ``checksum`` is then 0.  A raw
    batch sent straight from the workload's memory carries neither
    (``checksum`` None): its sender never saw the bytes the kernel copied,
    and the destination's digests of what it received become the source's
    record of them (a DIGEST_REQUEST with ``pages_of``), checked like every
    page by the final verification.  On receive, ``payload`` is a view into
    the connection's buffer, valid until the next receive call -- or, with
    ``in_place``, the view a :attr:`Connection.payload_sink` gave, into
    which the payload was received directly (already where it belongs).
    """

    indices: np.ndarray
    zeros: np.ndarray
    payload: Any  # bytes-like
    compressed: bool = False
    checksum: int | None = 0
    chunk_digests: np.ndarray | None = None
    in_place: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class DigestRequest:
    """Ask the destination for the digests of every chunk it holds.

    With ``pages_of`` (uint32 chunk numbers, strictly increasing): for the
    digest of every page of those chunks instead, in order -- what the
    destination holds, as the source's record of pages it sent without
    hashing them.

    With ``by_page``: each chunk's digest is derived from its pages' digests
    (:func:`precopy.memory.digest.chunks_of_page_digests`), not from its bytes, so
    that a page rewritten costs a 4 KiB hash instead of its whole chunk's.
    Once a migration asks for that, it asks for it in every later chunk
    table (the destination keeps a page table from then on); never together
    with ``pages_of``.
    """

    seq: int
    final: bool = False
    pages_of: np.ndarray | None = None
    by_page: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class DigestTable:
    """xxh3_64 of every chunk of the destination region (or of the pages asked
    for with ``pages_of``), uint64 little endian."""

    seq: int
    digests: np.ndarray
    #: Optional: other migrations moving bytes into the destination now
    #: (contention the source's stop rule takes into account); None: not said.
    others: int | None = None


@dataclass(frozen=True, slots=True)
class Switchover:
    """The source has paused the workload; downtime has begun."""

    pass


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One piece of the device-state blob: bytes [offset, offset+len) of total."""

    offset: int
    total: int
    data: Any  # bytes-like


@dataclass(frozen=True, slots=True)
class Commit:
    migration_id: str
    checksum: int  # xxh3_64 of the device-state blob


@dataclass(frozen=True, slots=True)
class Committed:
    migration_id: str
    resumed: bool
    #: Optional: the destination's resume steps, name -> milliseconds.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Query:
    migration_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    migration_id: str
    committed: bool
    known: bool  # False: the destination has no record and no live migration


@dataclass(frozen=True, slots=True)
class Abort:
    code: int
    reason: str


Event = Union[
    Hello, HelloAck, Auth, AuthOk, Begin, Ready, Pages, DigestRequest,
    DigestTable, Switchover, DeviceState, Commit, Committed, Query, Outcome, Abort, Queued,
]

_KIND_OF: Final[dict[type, Kind]] = {
    Hello: Kind.HELLO,
    HelloAck: Kind.HELLO_ACK,
    Auth: Kind.AUTH,
    AuthOk: Kind.AUTH_OK,
    Begin: Kind.BEGIN,
    Ready: Kind.READY,
    Pages: Kind.PAGES,
    DigestRequest: Kind.DIGEST_REQUEST,
    DigestTable: Kind.DIGEST_TABLE,
    Switchover: Kind.SWITCHOVER,
    DeviceState: Kind.DEVICE_STATE,
    Commit: Kind.COMMIT,
    Committed: Kind.COMMITTED,
    Query: Kind.QUERY,
    Outcome: Kind.OUTCOME,
    Abort: Kind.ABORT,
    Queued: Kind.QUEUED,
}


# --------------------------------------------------------------------------
# Encoding


def encode_frame(kind: int, meta: dict[str, Any] | None = None, payload: Any = b"") -> list[Any]:
    """Frame ``meta`` and ``payload``; returns buffers to write in order.

    No length is checked here: :meth:`Connection.send` checks events, and
    tests use this directly to build invalid frames.
    """
    meta_bytes = msgpack.packb(meta or {}, use_bin_type=True)
    views = [_byte_view(p) for p in payload] if isinstance(payload, (list, tuple)) else [_byte_view(payload)]
    nbytes = sum(v.nbytes for v in views)
    head = PREFIX.pack(MAGIC, int(kind), 0, len(meta_bytes), nbytes)
    return [head + meta_bytes, *(v for v in views if v.nbytes)]


def _byte_view(buf: Any) -> memoryview:
    view = memoryview(buf if buf is not None else b"")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # socket code counts len() in bytes, not items
    return view


def payload_nbytes(payload: Any) -> int:
    """Bytes in a payload: one buffer, or a list of buffers sent as one."""
    if isinstance(payload, (list, tuple)):
        return sum(memoryview(p).nbytes for p in payload)
    return memoryview(payload).nbytes


def _u32(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<u4").tobytes()


def _encode_event(ev: Event) -> tuple[Kind, dict[str, Any], Any]:
    """Return (kind, meta, payload) for an event."""
    if isinstance(ev, Pages):
        meta: dict[str, Any] = {
            "i": _u32(ev.indices),
            "z": _u32(ev.zeros),
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
            req["p"] = _u32(ev.pages_of)
        if ev.by_page:
            req["bp"] = True
        return Kind.DIGEST_REQUEST, req, b""
    if isinstance(ev, DeviceState):
        return Kind.DEVICE_STATE, {"o": ev.offset, "t": ev.total}, ev.data
    kind = _KIND_OF[type(ev)]
    meta = {name: getattr(ev, name) for name in ev.__dataclass_fields__}
    if isinstance(ev, Begin):
        meta["requires"] = {k: list(v) for k, v in ev.requires.items()}
        if not ev.wait:
            del meta["wait"]  # as a source before queues: nothing new on the wire
    return kind, meta, b""


# --------------------------------------------------------------------------
# Decoding and validation


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


MAX_TIMINGS: Final = 16


def _timings(value: Any) -> dict[str, float]:
    """COMMITTED's optional ``timings``: at most 16 names (<= 32 chars) -> finite ms >= 0."""
    if not isinstance(value, dict) or len(value) > MAX_TIMINGS:
        raise RemoteProtocolError(f"COMMITTED field 'timings' must be a map of at most {MAX_TIMINGS} entries")
    out = {}
    for k, v in value.items():
        if (not isinstance(k, str) or not 0 < len(k) <= 32 or isinstance(v, bool)
                or not isinstance(v, (int, float)) or not 0 <= v < 1e9):
            raise RemoteProtocolError(f"COMMITTED timing {str(k)[:40]!r}: {str(v)[:40]} is not a duration in ms")
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


def _requires_field(value: Any) -> dict[str, tuple[str, ...]]:
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


#: Chunks one DIGEST_REQUEST may ask page digests of (their numbers fill at
#: most 32 KiB of the header; the answer is also bounded by MAX_PAYLOAD).
MAX_PAGE_DIGEST_CHUNKS: Final = 8192


def _chunk_list(raw: bytes, begin: Begin) -> np.ndarray:
    """A DIGEST_REQUEST's ``p``: strictly increasing chunk numbers within the region."""
    if len(raw) % 4:
        raise RemoteProtocolError("DIGEST_REQUEST field 'p' is not a whole number of uint32")
    arr = np.frombuffer(raw, dtype="<u4")
    nchunks = -(-begin.npages // begin.chunk_pages)
    limit = min(MAX_PAGE_DIGEST_CHUNKS, MAX_PAYLOAD // 8 // begin.chunk_pages)
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


@dataclass
class Connection:
    """One side of a precopy conversation, as a pure state machine.

    ``role`` is the side we play.  Bytes in: :meth:`get_buffer` and
    :meth:`buffer_updated` (zero copy) or :meth:`receive_data`; events out:
    :meth:`next_event`.  Events in: :meth:`send`, which returns the buffers
    to write.  Errors: :class:`RemoteProtocolError` for anything the peer
    sent that is malformed or out of place, :class:`LocalProtocolError` when
    the caller tries to send something not allowed now.
    """

    role: Role
    #: Receive buffer once authenticated; 0: by role.  A destination streams
    #: page batches: room for the largest frame plus 1 MiB, so that a batch
    #: (1 MiB by default) can arrive while one is parsed, and the partial
    #: frame moved to the front now and then is small; a source receives
    #: only short answers and digest tables, one at a time.
    buffer_size: int = 0
    #: Zero-copy receive of page batches: called with a batch's page
    #: numbers once its header is in (the batch checked, raw pages, its
    #: payload still to come), it returns a writable view of exactly the
    #: payload's size to receive the payload into, or None for the receive
    #: buffer.  The event then comes with ``in_place``.  With a sink,
    #: :meth:`get_buffer` hands out no more than the frame in progress
    #: needs, so that no payload is read into the buffer only to be copied
    #: out -- while the sink takes payloads.  Once it declines one
    #: (scattered pages), reads are as large as the buffer again until a
    #: payload it takes: frame-sized reads (a read for each frame's prefix,
    #: header and payload) cost a third of the receive rate of scattered
    #: rounds (1.1 against 1.45 GB/s at 200,000 pages/s).  A destination
    #: receiving into a region that has its pages sets it: the second copy
    #: (buffer to region) is gone.
    payload_sink: Callable[[np.ndarray], memoryview | None] | None = None
    phase: Phase = Phase.HELLO
    begin: Begin | None = None
    _buf: bytearray = field(init=False, repr=False)
    _start: int = field(default=0, init=False, repr=False)
    _end: int = field(default=0, init=False, repr=False)
    #: Digests in the answer to each DIGEST_REQUEST not yet answered, in order.
    _expected_tables: deque[int] = field(default_factory=deque, init=False, repr=False)
    #: A chunk table by page was asked for (DIGEST_REQUEST ``bp``): every later one is.
    _by_page: bool = field(default=False, init=False, repr=False)
    _device_received: int = field(default=0, init=False, repr=False)
    _device_sent: int = field(default=0, init=False, repr=False)
    _eof: bool = field(default=False, init=False, repr=False)
    #: The payload in progress into a sink's view: (view, bytes in, the batch).
    _direct: tuple[memoryview, int, Pages] | None = field(default=None, init=False, repr=False)
    #: Buffer offset of a frame whose payload the sink declined (not asked again).
    _declined: int = field(default=-1, init=False, repr=False)
    #: The sink declined the last payload offered: reads are not limited to the frame.
    _sink_declines: bool = field(default=False, init=False, repr=False)
    #: :meth:`release_sink` dropped a payload in progress: no more events.
    _abandoned: bool = field(default=False, init=False, repr=False)
    #: :meth:`close` dropped the receive buffer.
    _closed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.buffer_size <= 0:
            frame = PREFIX_SIZE + MAX_META + MAX_PAYLOAD
            self.buffer_size = frame + (1024 if self.role is Role.DEST else 256) * 1024
        # Full size once authenticated (or when a frame needs it): see _grow.
        self._buf = bytearray(min(self.buffer_size, HANDSHAKE_BUFFER))

    def _grow(self, need: int = 0) -> None:
        """Enlarge the receive buffer (keeps buffered bytes).

        A destination's goes to its full ``buffer_size`` at once (it streams
        page batches); a source's only as far as a frame needs (it receives
        short answers and digest tables: a 1 GiB region's chunk table is
        64 KiB, and 4 MiB of zero-filled buffer would be 6 % of the agent's
        memory).
        """
        if len(self._buf) >= self.buffer_size:
            return
        size = self.buffer_size
        if self.role is Role.SOURCE:
            size = min(size, max(need, 2 * len(self._buf)))
        new = bytearray(size)
        n = self._end - self._start
        new[:n] = self._buf[self._start:self._end]
        self._buf, self._start, self._end = new, 0, n

    # -- receiving ------------------------------------------------------

    def get_buffer(self, min_free: int = 256 * 1024) -> memoryview:
        """Return writable space for incoming bytes (invalidates old payload views).

        While a payload goes to a sink's view (see :attr:`payload_sink`),
        the rest of that view.
        """
        if self._closed:
            raise LocalProtocolError("the connection is closed: it receives nothing more")
        if self._direct is not None and self._direct[1] < self._direct[0].nbytes:
            view, done, _ = self._direct
            return view[done:]
        if len(self._buf) < self.buffer_size and self.phase not in _HANDSHAKE and self.role is Role.DEST:
            self._grow()
        need = self._wanted() if self.payload_sink is not None and not self._sink_declines else 0
        free = len(self._buf) - self._end
        if free < max(min_free, need) or self._start == self._end:
            n = self._end - self._start
            if self._start:
                self._buf[0:n] = self._buf[self._start:self._end]
                if self._declined >= 0:
                    self._declined -= self._start
            self._start, self._end = 0, n
        if need:
            if len(self._buf) - self._end < need:
                self._grow(self._end + need)
            return memoryview(self._buf)[self._end:self._end + need]
        return memoryview(self._buf)[self._end:]

    def _wanted(self) -> int:
        """Bytes that complete the header, or else the frame, in progress (with a sink)."""
        avail = self._end - self._start
        if avail < PREFIX_SIZE:
            return PREFIX_SIZE - avail
        _, _, _, meta_len, payload_len = PREFIX.unpack_from(self._buf, self._start)
        head = PREFIX_SIZE + min(int(meta_len), MAX_META)
        if avail < head:
            return head - avail
        return max(0, head + min(int(payload_len), MAX_PAYLOAD) - avail)

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None and self._direct[1] < self._direct[0].nbytes:
            view, done, ev = self._direct
            if nbytes < 0 or done + nbytes > view.nbytes:
                raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the payload")
            self._direct = (view, done + nbytes, ev)
            return
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the buffer")
        self._end += nbytes

    def receive_data(self, data: bytes) -> None:
        """Feed bytes (copying); ``b""`` means the peer closed the stream."""
        if self._closed:
            raise LocalProtocolError("the connection is closed: it receives nothing more")
        if not data:
            self._eof = True
            return
        view = memoryview(data)
        if len(view) > self.buffer_size - self.buffered:
            raise LocalProtocolError(
                f"receive_data() of {len(view)} bytes: only {self.buffer_size - self.buffered} "
                "bytes free in the receive buffer (call next_event() first)"
            )
        if len(view) > len(self._buf) - self.buffered:
            self._grow(self.buffered + len(view))
        while view:
            buf = self.get_buffer(min(len(view), len(self._buf) // 2))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def close(self) -> None:
        """Let go of the receive buffer (up to ~5 MiB on a destination): nothing more is received.

        A closed connection's object may outlive it for a while -- the
        frames of an exception that ended it, a future, and the cycles they
        form are freed only by a full garbage collection -- and must not
        hold its buffer meanwhile.  Receiving afterwards raises
        :class:`LocalProtocolError`; sending still works (an ABORT).
        """
        self.release_sink()
        self._buf = bytearray()
        self._start = self._end = 0
        self._closed = True

    def release_sink(self) -> None:
        """Stop offering payloads to :attr:`payload_sink` and drop any view it gave.

        For the end of a receive (the sink's memory is about to go away): a
        payload still arriving into a sink's view is abandoned, and from then
        on :meth:`next_event` raises :class:`LocalProtocolError` -- the rest of
        that frame would be read as the next one.  Without a payload in
        progress the connection goes on as without a sink.
        """
        self.payload_sink = None
        if self._direct is not None:
            self._direct = None
            self._abandoned = True

    def next_event(self) -> Event | _NeedData:
        """Parse one event from buffered bytes, or return :data:`NEED_DATA`."""
        if self._abandoned:
            raise LocalProtocolError("a payload was abandoned mid-frame (release_sink): the stream is out of step")
        if self._direct is not None:
            view, done, ev = self._direct
            if done < view.nbytes:
                if self._eof:
                    raise RemoteProtocolError(
                        f"peer closed the connection in the middle of a frame ({done} of {view.nbytes} "
                        "payload bytes in)")
                return NEED_DATA
            self._direct = None
            self._advance(self.role.peer, Kind.PAGES, local=False)
            return ev
        avail = self._end - self._start
        if avail < PREFIX_SIZE:
            return self._need_data()
        magic, kind_no, flags, meta_len, payload_len = PREFIX.unpack_from(self._buf, self._start)
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
        # Refuse from the prefix alone what no body could make acceptable,
        # so an unauthenticated peer never gets a large body buffered.
        self._check_allowed(self.role.peer, kind, local=False)
        if payload_len and kind.name not in _PAYLOAD_KINDS:
            raise RemoteProtocolError(f"{kind.name} frame must not carry a payload")
        total = PREFIX_SIZE + meta_len + payload_len
        mstart = self._start + PREFIX_SIZE
        pstart = mstart + meta_len
        if avail < total:
            if (self.payload_sink is not None and kind is Kind.PAGES and payload_len
                    and avail >= PREFIX_SIZE + meta_len and self._declined != self._start):
                return self._to_sink(kind, mstart, pstart, payload_len)
            if total > len(self._buf):
                self._grow(total)
            return self._need_data()
        meta = self._meta(kind, mstart, pstart)
        payload = memoryview(self._buf)[pstart:pstart + payload_len]
        self._start += total
        self._advance(self.role.peer, kind, local=False)
        return self._decode(kind, meta, payload)

    def _meta(self, kind: Kind, mstart: int, pstart: int) -> dict[Any, Any]:
        try:
            meta = msgpack.unpackb(
                memoryview(self._buf)[mstart:pstart], raw=False, strict_map_key=True,
                max_bin_len=MAX_META, max_str_len=MAX_META, max_array_len=64, max_map_len=64,
            )
        except Exception as exc:  # msgpack raises several unrelated types
            raise RemoteProtocolError(f"{kind.name} header is not valid msgpack: {exc}") from exc
        if not isinstance(meta, dict):
            raise RemoteProtocolError(f"{kind.name} header is not a map")
        return meta

    def _to_sink(self, kind: Kind, mstart: int, pstart: int, payload_len: int) -> _NeedData:
        """A PAGES header is in, its payload not: offer the payload to the sink.

        The batch is checked first (as when it is whole): a sink is only
        ever asked for pages of the region, for a payload of their size.
        """
        assert self.payload_sink is not None
        meta = self._meta(kind, mstart, pstart)
        ev = self._decode_pages(meta, None, payload_len)
        target = None if ev.compressed or not ev.indices.size else self.payload_sink(ev.indices)
        self._sink_declines = target is None
        if target is None:
            self._declined = self._start
            if PREFIX_SIZE + (pstart - mstart) + payload_len > len(self._buf):
                self._grow(PREFIX_SIZE + (pstart - mstart) + payload_len)
            return self._need_data()
        if target.nbytes != payload_len:
            raise LocalProtocolError(f"payload sink gave {target.nbytes} bytes for a {payload_len}-byte payload")
        have = self._end - pstart
        if have:
            target[:have] = memoryview(self._buf)[pstart:self._end]
        self._start = self._end
        self._direct = (target, have, dataclasses.replace(ev, payload=target, in_place=True))
        return NEED_DATA

    def _need_data(self) -> _NeedData:
        if self._eof and self._end > self._start:
            raise RemoteProtocolError(
                f"peer closed the connection in the middle of a frame ({self.buffered} bytes left)"
            )
        return NEED_DATA

    def _decode(self, kind: Kind, meta: dict[Any, Any], payload: memoryview) -> Event:
        if kind.name not in _PAYLOAD_KINDS:
            if len(payload):
                raise RemoteProtocolError(f"{kind.name} frame must not carry a payload")
        if kind is Kind.HELLO:
            return Hello(
                version=_int_field(meta, "version", kind, 0, 1 << 16),
                nonce=_bytes_field(meta, "nonce", kind, exact=NONCE_SIZE),
            )
        if kind is Kind.HELLO_ACK:
            return HelloAck(
                version=_int_field(meta, "version", kind, 0, 1 << 16),
                nonce=_bytes_field(meta, "nonce", kind, exact=NONCE_SIZE),
                mac=_bytes_field(meta, "mac", kind, limit=MAC_SIZE),
            )
        if kind is Kind.AUTH:
            return Auth(mac=_bytes_field(meta, "mac", kind, limit=MAC_SIZE))
        if kind is Kind.AUTH_OK:
            return AuthOk()
        if kind is Kind.BEGIN:
            page_size = _int_field(meta, "page_size", kind, PAGE_SIZE, PAGE_SIZE)
            size = _int_field(meta, "size", kind, page_size, MAX_REGION)
            if size % page_size:
                raise RemoteProtocolError(f"BEGIN size {size} is not a multiple of {page_size}")
            chunk = _int_field(meta, "chunk_pages", kind, 1, 4096)
            if chunk & (chunk - 1):
                raise RemoteProtocolError(f"BEGIN chunk_pages {chunk} is not a power of two")
            if -(-size // (page_size * chunk)) * 8 > MAX_PAYLOAD:
                raise RemoteProtocolError(
                    f"BEGIN chunk_pages {chunk} makes a digest table larger than one frame"
                )
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
            ev = Begin(
                migration_id=_str_field(meta, "migration_id", kind, 64),
                name=name, size=size, page_size=page_size, chunk_pages=chunk,
                dry_run=dry_run, requires=_requires_field(meta.get("requires", {})), wait=wait,
            )
            if not ev.migration_id or not valid_name(ev.migration_id):
                raise RemoteProtocolError("BEGIN migration_id must be a plain token")
            self.begin = ev
            return ev
        if kind is Kind.READY:
            return Ready(existing=bool(_field(meta, "existing", bool, kind)) if "existing" in meta else False)
        if kind is Kind.PAGES:
            return self._decode_pages(meta, payload)
        if kind is Kind.DIGEST_REQUEST:
            assert self.begin is not None
            seq = _int_field(meta, "seq", kind, 0, 1 << 62)
            final = bool(_field(meta, "final", bool, kind))
            pages_of = None
            if "p" in meta:
                pages_of = _chunk_list(_bytes_field(meta, "p", kind), self.begin)
            by_page = bool(_field(meta, "bp", bool, kind)) if "bp" in meta else False
            self._check_by_page(by_page, pages_of)
            self._by_page |= by_page
            self._expected_tables.append(self._table_size(pages_of))
            return DigestRequest(seq=seq, final=final, pages_of=pages_of, by_page=by_page)
        if kind is Kind.DIGEST_TABLE:
            return self._decode_table(meta, payload)
        if kind is Kind.SWITCHOVER:
            return Switchover()
        if kind is Kind.DEVICE_STATE:
            offset = _int_field(meta, "o", kind, 0, MAX_DEVICE_STATE)
            total = _int_field(meta, "t", kind, 0, MAX_DEVICE_STATE)
            if offset != self._device_received:
                raise RemoteProtocolError(
                    f"DEVICE_STATE piece at offset {offset}, expected {self._device_received}"
                )
            if offset + len(payload) > total:
                raise RemoteProtocolError("DEVICE_STATE piece runs past the declared total")
            self._device_received += len(payload)
            return DeviceState(offset=offset, total=total, data=payload)
        if kind is Kind.COMMIT:
            return Commit(
                migration_id=_id_field(meta, kind),
                checksum=_int_field(meta, "checksum", kind, 0, (1 << 64) - 1),
            )
        if kind is Kind.COMMITTED:
            return Committed(
                migration_id=_id_field(meta, kind),
                resumed=bool(_field(meta, "resumed", bool, kind)),
                timings=_timings(meta.get("timings", {})),
            )
        if kind is Kind.QUERY:
            return Query(migration_id=_id_field(meta, kind))
        if kind is Kind.OUTCOME:
            return Outcome(
                migration_id=_id_field(meta, kind),
                committed=bool(_field(meta, "committed", bool, kind)),
                known=bool(_field(meta, "known", bool, kind)),
            )
        if kind is Kind.ABORT:
            return Abort(
                code=_int_field(meta, "code", kind, 0, 255),
                reason=_str_field(meta, "reason", kind, 4096),
            )
        if kind is Kind.QUEUED:
            return Queued(
                position=_int_field(meta, "position", kind, 1, MAX_QUEUE),
                active=_int_field(meta, "active", kind, 0, MAX_QUEUE),
                limit=_int_field(meta, "limit", kind, 1, MAX_QUEUE),
            )
        raise RemoteProtocolError(f"no decoder for {kind.name}")  # pragma: no cover

    def _decode_pages(self, meta: dict[Any, Any], payload: memoryview | None,
                      payload_len: int | None = None) -> Pages:
        """Check a PAGES frame and return its event.

        ``payload`` None: only the header is in (see :meth:`_to_sink`);
        ``payload_len`` is then the payload's declared size.
        """
        kind = Kind.PAGES
        size = len(payload) if payload is not None else int(payload_len or 0)
        assert self.begin is not None  # guaranteed by the phase table
        npages = self.begin.npages
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
            chunks = whole_chunks(indices, self.begin.chunk_pages, npages)
            if chunks is None:
                raise RemoteProtocolError("PAGES chunk digests for pages that are not whole chunks")
            if len(raw_cd) != 8 * (chunks[1] - chunks[0]):
                raise RemoteProtocolError(
                    f"PAGES carries {len(raw_cd) // 8} chunk digests for {chunks[1] - chunks[0]} chunks"
                )
            chunk_digests = np.frombuffer(raw_cd, dtype="<u8")
        return Pages(indices=indices, zeros=zeros, payload=payload,
                     compressed=compressed, checksum=checksum, chunk_digests=chunk_digests)

    def _decode_table(self, meta: dict[Any, Any], payload: memoryview) -> DigestTable:
        kind = Kind.DIGEST_TABLE
        assert self.begin is not None
        seq = _int_field(meta, "s", kind, 0, 1 << 62)
        if not self._expected_tables:
            raise RemoteProtocolError("DIGEST_TABLE without a request")
        want = self._expected_tables[0]
        if len(payload) != want * 8:
            raise RemoteProtocolError(
                f"DIGEST_TABLE of {len(payload)} bytes, expected {want * 8} for the {want} digests asked for"
            )
        self._expected_tables.popleft()
        others = _int_field(meta, "o", kind, 0, MAX_QUEUE) if "o" in meta else None
        return DigestTable(seq=seq, digests=np.frombuffer(payload, dtype="<u8"), others=others)

    def _check_by_page(self, by_page: bool, pages_of: np.ndarray | None) -> None:
        """A chunk table by page excludes ``pages_of``, and once asked for, is asked for from then on."""
        if by_page and pages_of is not None:
            raise RemoteProtocolError("DIGEST_REQUEST asks for page digests ('p') and a chunk table by page "
                                      "('bp') at once")
        if pages_of is None:
            if self._by_page and not by_page:
                raise RemoteProtocolError("DIGEST_REQUEST for a chunk table of chunk bytes after one by page "
                                          "('bp'): a migration's chunk tables stay by page once they are")

    def _table_size(self, pages_of: np.ndarray | None) -> int:
        """Digests in the answer to a request for ``pages_of`` (None: the chunk table)."""
        assert self.begin is not None
        cp, npages = self.begin.chunk_pages, self.begin.npages
        nchunks = -(-npages // cp)
        if pages_of is None:
            return nchunks
        n = len(pages_of) * cp
        if len(pages_of) and int(pages_of[-1]) == nchunks - 1:
            n -= nchunks * cp - npages  # the last chunk may be short
        return n

    # -- sending --------------------------------------------------------

    def send(self, event: Event) -> list[Any]:
        """Check ``event`` against the phase and return the buffers to write."""
        kind, meta, payload = _encode_event(event)
        # Check everything first: a refused send must leave no trace.
        if kind is Kind.PAGES:
            n = len(event.indices) + len(event.zeros)  # type: ignore[union-attr]
            if not 0 < n <= MAX_BATCH_PAGES:
                raise LocalProtocolError(f"PAGES batch of {n} pages")
        if payload_nbytes(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"{kind.name} payload exceeds {MAX_PAYLOAD} bytes")
        if kind is Kind.DIGEST_TABLE:
            if not self._expected_tables:
                raise LocalProtocolError("DIGEST_TABLE without a request")
            if memoryview(payload).nbytes != 8 * self._expected_tables[0]:
                raise LocalProtocolError(
                    f"DIGEST_TABLE of {memoryview(payload).nbytes // 8} digests answers a request "
                    f"for {self._expected_tables[0]}"
                )
        if kind is Kind.PAGES:
            assert isinstance(event, Pages)
            if event.compressed and event.checksum is None and event.chunk_digests is None:
                raise LocalProtocolError("a compressed PAGES batch must carry a checksum")
        if kind is Kind.DIGEST_REQUEST:
            assert isinstance(event, DigestRequest)
            try:
                self._check_by_page(event.by_page, event.pages_of)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(str(exc)) from None
            if event.pages_of is not None:
                if self.begin is None:
                    raise LocalProtocolError("DIGEST_REQUEST before BEGIN")
                try:
                    _chunk_list(_u32(event.pages_of), self.begin)
                except RemoteProtocolError as exc:
                    raise LocalProtocolError(str(exc)) from None
        if kind is Kind.DEVICE_STATE:
            assert isinstance(event, DeviceState)
            if event.offset != self._device_sent or event.total > MAX_DEVICE_STATE:
                raise LocalProtocolError("DEVICE_STATE pieces must be sent in order, within the limit")
        if kind is Kind.BEGIN:
            try:
                _requires_field(meta["requires"])
            except RemoteProtocolError as exc:
                raise LocalProtocolError(str(exc)) from None
        self._advance(self.role, kind, local=True)  # raises before changing the phase
        if kind is Kind.BEGIN:
            assert isinstance(event, Begin)
            self.begin = event
        if kind is Kind.DIGEST_REQUEST:
            assert isinstance(event, DigestRequest)
            self._by_page |= event.by_page
            self._expected_tables.append(self._table_size(event.pages_of))
        if kind is Kind.DIGEST_TABLE:
            self._expected_tables.popleft()
        if kind is Kind.DEVICE_STATE:
            self._device_sent += memoryview(event.data).nbytes  # type: ignore[union-attr]
        return encode_frame(kind, meta, payload)

    def _check_allowed(self, sender: Role, kind: Kind, *, local: bool) -> Phase:
        """The phase after ``kind`` from ``sender``; raises if not allowed now."""
        if kind is Kind.ABORT and self.phase not in _TERMINAL:
            return Phase.ABORTED
        nxt = TRANSITIONS.get((self.phase, sender, kind))
        if kind is Kind.QUEUED and nxt is not None and (self.begin is None or not self.begin.wait
                                                        or self.begin.dry_run):
            err = LocalProtocolError if local else RemoteProtocolError
            raise err(f"QUEUED from the {sender.value} answers a BEGIN that did not offer to wait "
                      "(no 'wait', or a dry run)")
        if nxt is None:
            who = "we" if local else "the peer"
            err = LocalProtocolError if local else RemoteProtocolError
            raise err(
                f"{kind.name} from the {sender.value} ({who}) is not allowed in phase "
                f"'{self.phase.value}'"
            )
        return nxt

    def _advance(self, sender: Role, kind: Kind, *, local: bool) -> None:
        self.phase = self._check_allowed(sender, kind, local=local)


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
