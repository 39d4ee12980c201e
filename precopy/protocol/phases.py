"""The phase machine of a conversation: everything that decides which frame may come when lives here.

The model is h11's ``_state.py``: as much as possible is in one table,
:data:`TRANSITIONS` -- (phase, sender, kind) -> next phase -- which both
ends read, for what they send and for what they receive, so that no rule
applies to one side and not the other.  The rules that do not fit a table
are here too, as code next to it:

* ABORT is allowed from either side in any phase but the terminal ones
  (:data:`TERMINAL`) and always leads to ``ABORTED``;
* QUEUED (the table's ``awaiting ready`` loop) answers only a BEGIN that
  offered to wait and is not a dry run;
* a migration's chunk tables stay *by page* once one was asked for that way
  (:func:`check_by_page`);
* READY takes at most the streams BEGIN asked for, and SYNC is sent only
  where READY took more than one, with a count for each extra stream that
  never goes down (:func:`check_ready_streams`, :func:`check_sync`).

Within a phase, the order of frames that answer one another (a DIGEST_TABLE
per DIGEST_REQUEST, of the size asked for; DEVICE_STATE pieces one after
the other) is counted by the :class:`~precopy.protocol.connection.Connection`
and checked where those frames are decoded (:mod:`precopy.protocol.codec`).
docs/PROTOCOL.md prints this table; tests/test_protocol_doc.py checks that
it does, and tests/test_phase_table.py that a connection obeys it.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

import numpy as np

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol.messages import Begin, Kind, Role

__all__ = ["Phase", "TRANSITIONS", "TERMINAL", "HANDSHAKE", "allowed", "next_phase", "check_by_page",
           "check_ready_streams", "check_sync"]


class Phase(Enum):
    """Where a conversation stands; both ends track the same one (its value is what errors and docs say)."""

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
    JOIN_SENT = "awaiting joined"
    STREAMING = "streaming"
    POSTCOPY_SENT = "awaiting post-copy"
    POSTCOPY = "post-copy"
    RESUME_SENT = "awaiting resume"
    DONE = "done"
    ABORTED = "aborted"


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
    (Phase.AUTHENTICATED, S, Kind.JOIN): Phase.JOIN_SENT,
    (Phase.JOIN_SENT, D, Kind.JOINED): Phase.STREAMING,
    (Phase.STREAMING, S, Kind.PAGES): Phase.STREAMING,
    (Phase.STREAMING, D, Kind.REQUEST): Phase.STREAMING,
    (Phase.BEGIN_SENT, D, Kind.READY): Phase.COPYING,
    (Phase.BEGIN_SENT, D, Kind.QUEUED): Phase.BEGIN_SENT,
    (Phase.COPYING, S, Kind.PAGES): Phase.COPYING,
    (Phase.COPYING, S, Kind.DIGEST_REQUEST): Phase.COPYING,
    (Phase.COPYING, D, Kind.DIGEST_TABLE): Phase.COPYING,
    (Phase.COPYING, S, Kind.SWITCHOVER): Phase.PAUSED,
    (Phase.COPYING, S, Kind.SYNC): Phase.COPYING,
    (Phase.PAUSED, S, Kind.SYNC): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.PAGES): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.DIGEST_REQUEST): Phase.PAUSED,
    (Phase.PAUSED, D, Kind.DIGEST_TABLE): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.DEVICE_STATE): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.COMMIT): Phase.COMMIT_SENT,
    (Phase.COMMIT_SENT, D, Kind.COMMITTED): Phase.DONE,
    # Post-copy (only between peers whose HELLO and HELLO_ACK named "postcopy").
    (Phase.PAUSED, S, Kind.MISSING): Phase.PAUSED,
    (Phase.PAUSED, S, Kind.POSTCOPY): Phase.POSTCOPY_SENT,
    (Phase.POSTCOPY_SENT, D, Kind.COMMITTED): Phase.POSTCOPY,
    (Phase.POSTCOPY, S, Kind.PAGES): Phase.POSTCOPY,
    (Phase.POSTCOPY, D, Kind.REQUEST): Phase.POSTCOPY,
    (Phase.POSTCOPY, D, Kind.COMPLETE): Phase.DONE,
    (Phase.AUTHENTICATED, S, Kind.RESUME): Phase.RESUME_SENT,
    (Phase.RESUME_SENT, D, Kind.MISSING): Phase.RESUME_SENT,
    (Phase.RESUME_SENT, D, Kind.READY): Phase.POSTCOPY,
}
#: Phases after which nothing more may be sent, not even ABORT.
TERMINAL: Final = frozenset({Phase.DONE, Phase.ABORTED})
#: Phases before both sides are authenticated: the receive buffer stays small.
HANDSHAKE: Final = frozenset({Phase.HELLO, Phase.HELLO_ACK, Phase.AUTH, Phase.AUTH_OK})


def allowed(phase: Phase, sender: Role) -> frozenset[Kind]:
    """The kinds ``sender`` may send in ``phase`` (ABORT included where it may).

    QUEUED is listed where the table has it; it also needs a BEGIN that
    offered to wait (see :func:`next_phase`).
    """
    kinds = {kind for (ph, who, kind) in TRANSITIONS if ph is phase and who is sender}
    if phase not in TERMINAL:
        kinds.add(Kind.ABORT)
    return frozenset(kinds)


def next_phase(phase: Phase, sender: Role, kind: Kind, begin: Begin | None, *, local: bool) -> Phase:
    """The phase after ``kind`` from ``sender`` in ``phase``; raises if it is not allowed.

    ``begin`` is the conversation's BEGIN (None before it); ``local``: we
    are the sender, and a refusal is a :class:`LocalProtocolError` (the
    caller's mistake), else a :class:`RemoteProtocolError` (the peer's).
    """
    if kind is Kind.ABORT and phase not in TERMINAL:
        return Phase.ABORTED
    nxt = TRANSITIONS.get((phase, sender, kind))
    err = LocalProtocolError if local else RemoteProtocolError
    if kind is Kind.QUEUED and nxt is not None and (begin is None or not begin.wait or begin.dry_run):
        raise err(f"QUEUED from the {sender.value} answers a BEGIN that did not offer to wait "
                  "(no 'wait', or a dry run)")
    if nxt is None:
        who = "we" if local else "the peer"
        raise err(f"{kind.name} from the {sender.value} ({who}) is not allowed in phase '{phase.value}'")
    return nxt


def check_by_page(by_page: bool, pages_of: np.ndarray | None, asked_by_page: bool) -> None:
    """A DIGEST_REQUEST's ``bp``: never with ``pages_of``, and once asked for, asked for from then on.

    ``asked_by_page``: an earlier request of this migration asked for a
    chunk table by page.  Raises :class:`RemoteProtocolError` (a sender
    turns it into a :class:`LocalProtocolError`).
    """
    if by_page and pages_of is not None:
        raise RemoteProtocolError("DIGEST_REQUEST asks for page digests ('p') and a chunk table by page "
                                  "('bp') at once")
    if pages_of is None and asked_by_page and not by_page:
        raise RemoteProtocolError("DIGEST_REQUEST for a chunk table of chunk bytes after one by page "
                                  "('bp'): a migration's chunk tables stay by page once they are")


def check_ready_streams(streams: int, begin: Begin | None) -> None:
    """READY's ``streams``: at most what the BEGIN asked for.  Raises :class:`RemoteProtocolError`."""
    asked = begin.streams if begin is not None else 1
    if streams > asked:
        raise RemoteProtocolError(f"READY takes {streams} streams for a BEGIN that asked for {asked}")


def check_sync(counts: tuple[int, ...], streams: int, last: tuple[int, ...]) -> None:
    """A SYNC's counts: one per extra stream READY took, none lower than the last SYNC's.

    Raises :class:`RemoteProtocolError` (a sender turns it into a
    :class:`LocalProtocolError`).
    """
    if streams < 2:
        raise RemoteProtocolError("SYNC in a migration of one stream (READY took no more)")
    if len(counts) != streams - 1:
        raise RemoteProtocolError(f"SYNC counts {len(counts)} streams; the migration has {streams - 1} extra")
    if last and any(c < p for c, p in zip(counts, last)):
        raise RemoteProtocolError(f"SYNC counts {list(counts)} go below the last SYNC's {list(last)}")
