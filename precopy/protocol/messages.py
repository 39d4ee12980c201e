"""The protocol's vocabulary: message kinds, the two roles, and one event dataclass per kind.

Events are what a :class:`~precopy.protocol.connection.Connection` hands
out and takes in; :mod:`precopy.protocol.codec` turns them into frame
fields and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Final, Union

import numpy as np

from precopy.protocol.limits import PAGE_SIZE

__all__ = [
    "Kind", "Role", "Event", "KIND_OF",
    "Hello", "HelloAck", "Auth", "AuthOk", "Begin", "Ready", "Queued", "Pages", "DigestRequest",
    "DigestTable", "Switchover", "DeviceState", "Commit", "Committed", "Query", "Outcome", "Abort",
    "Join", "Joined", "Sync",
    "Missing", "Postcopy", "Request", "Complete", "Resume", "POSTCOPY_CAP",
    "POSTCOPY_IMMEDIATE_CAP", "POSTCOPY_LANE_CAP",
]

#: The capability a HELLO (and its HELLO_ACK) names to offer post-copy (docs/PROTOCOL.md).
POSTCOPY_CAP: Final = "postcopy"
#: Named beside it by a source that switches over to post-copy right after READY (``--postcopy
#: immediate``); a destination that names it back sends READY only once the guest it starts early
#: is ready to take the post-copy (docs/PROTOCOL.md "Post-copy").
POSTCOPY_IMMEDIATE_CAP: Final = "postcopy-immediate"
#: Named beside it by a source that asks for the post-copy's faults on a connection of their own
#: (a JOIN with ``lane``: REQUESTs and their answers, no pushes, so an answer never queues behind
#: them; docs/PROTOCOL.md "Post-copy"); a destination that names it back takes such a JOIN.
POSTCOPY_LANE_CAP: Final = "postcopy-lane"


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
    JOIN = 18
    JOINED = 19
    SYNC = 20
    # Post-copy (negotiated: HELLO and HELLO_ACK ``caps`` name "postcopy").
    MISSING = 21
    POSTCOPY = 22
    REQUEST = 23
    COMPLETE = 24
    RESUME = 25


class Role(Enum):
    """The side of a conversation: the source sends the region, the destination receives it."""

    SOURCE = "source"
    DEST = "dest"

    @property
    def peer(self) -> Role:
        return Role.DEST if self is Role.SOURCE else Role.SOURCE


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    nonce: bytes
    #: The source's precopy version ("0.1.0"), named when the protocol
    #: versions differ; None: not sent (a peer from before it was).
    software: str | None = None
    #: Optional capabilities offered (e.g. ``("postcopy",)``); None: not sent.
    caps: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class HelloAck:
    version: int
    nonce: bytes
    mac: bytes  # proves the destination holds the key (empty without a key)
    #: The destination's precopy version, as in :class:`Hello`.
    software: str | None = None
    #: The capabilities of the HELLO's it offers too; None: not sent (only
    #: answers a HELLO that named some).
    caps: tuple[str, ...] | None = None


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
    #: TCP connections the source would like to use for this migration's
    #: pages (1: this one alone); READY says how many the destination takes.
    streams: int = 1

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
    #: Connections the destination takes for this migration's pages, at
    #: most BEGIN's ``streams`` (1: this one alone); the others JOIN.
    streams: int = 1


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
    :func:`~precopy.protocol.codec.whole_chunks`) may carry ``chunk_digests`` instead: xxh3_64 of
    each chunk's raw bytes, which the receiver checks and keeps as its chunk
    table (one pass over the bytes for both); ``checksum`` is then 0.  A raw
    batch sent straight from the workload's memory carries neither
    (``checksum`` None): its sender never saw the bytes the kernel copied,
    and the destination's digests of what it received become the source's
    record of them (a DIGEST_REQUEST with ``pages_of``), checked like every
    page by the final verification.  On receive, ``payload`` is a view into
    the connection's buffer, valid until the next receive call -- or, with
    ``in_place``, the view a :attr:`~precopy.protocol.connection.Connection.payload_sink` gave, into
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


@dataclass(frozen=True, slots=True)
class Join:
    """An extra stream of a migration: sent on a new, authenticated connection
    instead of BEGIN.  ``stream`` is its index (1 .. READY's ``streams`` - 1);
    ``size`` and ``chunk_pages`` repeat the migration's BEGIN (the
    destination checks them), so that each end checks this stream's PAGES
    against the region without the other connection.

    ``lane`` (post-copy, negotiated with ``postcopy-lane``; ``stream`` 0): the
    connection carries the destination's REQUESTs and the source's answers
    to them (PAGES), nothing else; sent only while a post-copy page stream
    of that migration is served.  ``fast`` (with ``lane`` only): the source
    offers the lane's lean frames (:mod:`precopy.protocol.lane_frames`), used
    only if JOINED says ``fast`` too."""

    migration_id: str
    stream: int
    size: int
    chunk_pages: int
    lane: bool = False
    fast: bool = False

    def as_begin(self) -> Begin:
        """The region's geometry as a BEGIN, for checking PAGES (name and the rest are not this stream's)."""
        return Begin(migration_id=self.migration_id, name="stream", size=self.size, chunk_pages=self.chunk_pages)


@dataclass(frozen=True, slots=True)
class Joined:
    """The destination took the stream: PAGES may follow on it.  ``fast``: the answer to a lane's
    JOIN ``fast``: from now on the lane carries its lean frames only (:mod:`precopy.protocol.lane_frames`)."""

    fast: bool = False


@dataclass(frozen=True, slots=True)
class Sync:
    """A fence, on a migration's first connection: ``counts[i]`` is how many
    PAGES frames the source has sent so far on stream ``i + 1``.  The
    destination handles what follows (a DIGEST_REQUEST, COMMIT) only once it
    has written those pages: a digest table covers every page sent before it
    on any stream."""

    counts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Missing:
    """One piece of the bitmap of pages the destination does not hold correctly (bit ``p`` of byte
    ``p // 8``, least significant first): bytes [offset, offset+len) of total, which is the
    region's pages / 8 rounded up.  The source sends it before POSTCOPY; the destination sends
    it (what it still lacks) in answer to RESUME."""

    offset: int
    total: int
    data: Any  # bytes-like


@dataclass(frozen=True, slots=True)
class Postcopy:
    """Commit to post-copy: the destination resumes the workload with the missing pages absent
    (``checksum``: xxh3_64 of the device state, as COMMIT's); COMMITTED answers once it runs."""

    migration_id: str
    checksum: int


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """Pages the resumed workload faulted on, wanted before anything else (uint32, increasing)."""

    indices: np.ndarray


@dataclass(frozen=True, slots=True)
class Complete:
    """The destination placed every missing page (``pages`` of them): the source's copy may go.

    ``stats``: optional, how it went there, name -> number (faults, their
    latency in microseconds), as COMMITTED's ``timings``."""

    migration_id: str
    pages: int
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Resume:
    """A new connection takes up a broken post-copy page stream (``begin``: the migration's
    BEGIN fields, for the page numbers' bounds); the destination answers with the bitmap of the
    pages it still lacks (MISSING) and READY."""

    begin: Begin


Event = Union[
    Hello, HelloAck, Auth, AuthOk, Begin, Ready, Pages, DigestRequest,
    DigestTable, Switchover, DeviceState, Commit, Committed, Query, Outcome, Abort, Queued,
    Join, Joined, Sync,
    Missing, Postcopy, Request, Complete, Resume,
]


#: The kind of each event class.
KIND_OF: Final[dict[type, Kind]] = {
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
    Join: Kind.JOIN,
    Joined: Kind.JOINED,
    Sync: Kind.SYNC,
    Missing: Kind.MISSING,
    Postcopy: Kind.POSTCOPY,
    Request: Kind.REQUEST,
    Complete: Kind.COMPLETE,
    Resume: Kind.RESUME,
}

