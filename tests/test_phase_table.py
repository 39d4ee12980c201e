"""The phase table (``precopy.protocol.phases``) is the protocol: a connection obeys it, the docs print it.

Every (phase, sender, kind) the table allows is accepted by a
:class:`Connection` -- sent by that side, received by the other, both
ending in the table's next phase -- and every other combination is refused:
a :class:`LocalProtocolError` to the side that tries to send it, a
:class:`RemoteProtocolError` to the side that receives it, from the frame's
12-byte prefix alone.  Each connection pair is brought to its phase by a
real conversation along the table's own shortest path.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol import (
    NEED_DATA,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    AuthOk,
    Begin,
    Commit,
    Committed,
    Connection,
    DeviceState,
    DigestRequest,
    DigestTable,
    Event,
    Hello,
    HelloAck,
    Join,
    Joined,
    Complete,
    Kind,
    Missing,
    Outcome,
    Pages,
    Phase,
    Postcopy,
    Query,
    Queued,
    Ready,
    Request,
    Resume,
    Role,
    Switchover,
    Sync,
    encode_frame,
)
from precopy.protocol.codec import encode_event
from precopy.protocol.limits import PREFIX_SIZE
from precopy.protocol.phases import HANDSHAKE, TERMINAL, TRANSITIONS, allowed, next_phase

NPAGES, CHUNK_PAGES = 64, 8
BEGIN = Begin(migration_id="m1", name="region", size=NPAGES * PAGE_SIZE, chunk_pages=CHUNK_PAGES, wait=True,
              streams=2)
DOC = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()


def sample(kind: Kind) -> Event:
    """A valid event of ``kind`` for BEGIN's migration."""
    return {
        Kind.HELLO: Hello(PROTOCOL_VERSION, bytes(32)),
        Kind.HELLO_ACK: HelloAck(PROTOCOL_VERSION, bytes(32), b""),
        Kind.AUTH: Auth(mac=b""),
        Kind.AUTH_OK: AuthOk(),
        Kind.BEGIN: BEGIN,
        Kind.READY: Ready(streams=2),
        Kind.QUEUED: Queued(position=1, active=0, limit=1),
        Kind.PAGES: Pages(indices=np.array([3], dtype=np.uint32), zeros=np.array([5], dtype=np.uint32),
                          payload=bytes(PAGE_SIZE)),
        Kind.DIGEST_REQUEST: DigestRequest(seq=1),
        Kind.DIGEST_TABLE: DigestTable(seq=1, digests=np.zeros(NPAGES // CHUNK_PAGES, dtype=np.uint64)),
        Kind.SWITCHOVER: Switchover(),
        Kind.DEVICE_STATE: DeviceState(offset=0, total=3, data=b"abc"),
        Kind.COMMIT: Commit(migration_id="m1", checksum=0),
        Kind.COMMITTED: Committed(migration_id="m1", resumed=True),
        Kind.QUERY: Query(migration_id="m1"),
        Kind.OUTCOME: Outcome(migration_id="m1", committed=True, known=True),
        Kind.ABORT: Abort(code=1, reason="test"),
        Kind.JOIN: Join(migration_id="m1", stream=1, size=NPAGES * PAGE_SIZE, chunk_pages=CHUNK_PAGES),
        Kind.JOINED: Joined(),
        Kind.SYNC: Sync(counts=(0,)),
        Kind.MISSING: Missing(offset=0, total=NPAGES // 8, data=b"\x01" * (NPAGES // 8)),
        Kind.POSTCOPY: Postcopy(migration_id="m1", checksum=0),
        Kind.REQUEST: Request(indices=np.array([3, 4], dtype=np.uint32)),
        Kind.COMPLETE: Complete(migration_id="m1", pages=8),
        Kind.RESUME: Resume(begin=BEGIN),
    }[kind]


def _paths() -> dict[Phase, list[tuple[Role, Kind]]]:
    """The shortest conversation from HELLO to each phase, read off the table (ABORT for ABORTED)."""
    paths: dict[Phase, list[tuple[Role, Kind]]] = {Phase.HELLO: []}
    todo = deque([Phase.HELLO])
    while todo:
        phase = todo.popleft()
        for (ph, sender, kind), nxt in TRANSITIONS.items():
            if ph is phase and nxt not in paths:
                paths[nxt] = [*paths[phase], (sender, kind)]
                todo.append(nxt)
    paths[Phase.ABORTED] = [(Role.SOURCE, Kind.ABORT)]
    return paths


PATHS = _paths()


class Pair:
    """A source and a destination connection talking in memory."""

    def __init__(self) -> None:
        self.conns = {role: Connection(role, buffer_size=256 * 1024) for role in Role}

    def deliver(self, sender: Role, ev: Event) -> Event:
        data = b"".join(bytes(b) for b in self.conns[sender].send(ev))
        receiver = self.conns[sender.peer]
        receiver.receive_data(data)
        got = receiver.next_event()
        assert got is not NEED_DATA and type(got) is type(ev)
        return got

    @classmethod
    def in_phase(cls, phase: Phase) -> Pair:
        pair = cls()
        for sender, kind in PATHS[phase]:
            pair.deliver(sender, sample(kind))
        assert {c.phase for c in pair.conns.values()} == {phase}
        return pair


CASES = [(phase, sender, kind) for phase in Phase for sender in Role for kind in Kind]


def test_every_phase_is_reachable_and_only_the_terminal_ones_are_dead_ends() -> None:
    assert set(PATHS) == set(Phase)
    for phase in Phase:
        out = allowed(phase, Role.SOURCE) | allowed(phase, Role.DEST)
        assert bool(out) == (phase not in TERMINAL), phase
    assert HANDSHAKE < set(Phase) - TERMINAL


@pytest.mark.parametrize("phase, sender, kind", CASES,
                         ids=[f"{p.name}-{s.name}-{k.name}" for p, s, k in CASES])
def test_a_connection_does_what_the_table_says(phase: Phase, sender: Role, kind: Kind) -> None:
    pair = Pair.in_phase(phase)
    ev = sample(kind)
    if kind in allowed(phase, sender):
        if kind is Kind.DIGEST_TABLE:  # an answer: its request first (allowed wherever tables are)
            pair.deliver(Role.SOURCE, sample(Kind.DIGEST_REQUEST))
        got = pair.deliver(sender, ev)
        want = Phase.ABORTED if kind is Kind.ABORT else TRANSITIONS[(phase, sender, kind)]
        assert {c.phase for c in pair.conns.values()} == {want}
        assert encode_event(got)[1].keys() == encode_event(ev)[1].keys()
        return
    where = f"{kind.name} from the {sender.value} .* is not allowed in phase '{phase.value}'"
    if kind is Kind.DIGEST_TABLE:  # as if a request were pending: the phase alone must refuse it
        pair.conns[sender]._expected_tables.append(NPAGES // CHUNK_PAGES)
    with pytest.raises(LocalProtocolError, match=where):
        pair.conns[sender].send(ev)
    assert pair.conns[sender].phase is phase, "a refused send must not change the phase"
    receiver = pair.conns[sender.peer]
    frame = b"".join(bytes(b) for b in encode_frame(*encode_event(ev)))
    receiver.receive_data(frame[:PREFIX_SIZE])  # the prefix alone is enough to refuse it
    with pytest.raises(RemoteProtocolError, match=where):
        receiver.next_event()


def test_queued_needs_a_begin_that_offered_to_wait() -> None:
    """The one rule of the table that depends on a message: QUEUED answers only BEGIN(wait)."""
    for begin in (None, Begin(**{**_fields(BEGIN), "wait": False}), Begin(**{**_fields(BEGIN), "dry_run": True})):
        for local, err in ((True, LocalProtocolError), (False, RemoteProtocolError)):
            with pytest.raises(err, match="did not offer to wait"):
                next_phase(Phase.BEGIN_SENT, Role.DEST, Kind.QUEUED, begin, local=local)
    assert next_phase(Phase.BEGIN_SENT, Role.DEST, Kind.QUEUED, BEGIN, local=False) is Phase.BEGIN_SENT


def _fields(ev: Begin) -> dict[str, object]:
    return {f: getattr(ev, f) for f in ev.__dataclass_fields__}


def _doc_table() -> set[tuple[str, str, str, str]]:
    """The rows of docs/PROTOCOL.md's phase table: (phase, sender, kind, next phase)."""
    section = DOC.split("## Phases", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[2] in Kind.__members__:
            rows.add((cells[0], cells[1], cells[2], cells[3]))
    return rows


def test_the_docs_phase_table_is_this_table() -> None:
    rows = _doc_table()
    assert rows == {(ph.value, s.value, k.name, nxt.value) for (ph, s, k), nxt in TRANSITIONS.items()}
    named = {r[0] for r in rows} | {r[3] for r in rows}
    assert named == {p.value for p in Phase} - {Phase.ABORTED.value}, "a phase the docs do not name"
    # ABORTED is reached only by ABORT, which the docs state in words, as the code does:
    assert re.search(r"ABORT is accepted in any phase before DONE", DOC)
    assert {p for p in Phase if Kind.ABORT in allowed(p, Role.SOURCE)} == set(Phase) - TERMINAL
    assert {p for p in Phase if Kind.ABORT in allowed(p, Role.DEST)} == set(Phase) - TERMINAL
