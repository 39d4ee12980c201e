"""How many migrations move bytes at once: the rest wait their turn, in order.

Both daemons admit migrations through an :class:`Admission`: the
destination before it creates a region (the source hears QUEUED meanwhile,
docs/PROTOCOL.md), the source daemon before it connects.  A migration that
waits costs nothing: its workload runs on untouched, and neither its
downtime estimate nor its ``--max-time`` counts the wait.

Eight migrations at once on two cores measured each other's pauses: one
gave up on a "downtime floor" of ~350 ms that is ~20 ms alone (issue 29).
One at a time, a drain of N takes about N times one migration, and each
is measured alone.  No I/O here; asyncio only for the waiting.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Admission", "Ticket", "default_max_active"]


def default_max_active() -> int:
    """Migrations moving bytes at once by default: one per two CPUs this process may use, at least one.

    A migration keeps about one core busy on each side (hashing, copying
    into the socket or out of it); the other half is the workloads' and
    the daemon's own.  On the project's 2-core machines: one.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


@dataclass(eq=False)
class Ticket:
    """One migration's place: waiting (``position`` >= 1) or admitted."""

    key: str
    admitted: bool = False
    #: Set when admitted or when the queue ahead moved (cleared by the waiter).
    moved: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    left: bool = False


class Admission:
    """At most ``limit`` admitted tickets at once; the others wait, first come first served."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the number of migrations at once must be at least 1, not {limit}")
        self.limit = limit
        self._active: list[Ticket] = []
        self._queue: deque[Ticket] = deque()

    @property
    def active(self) -> int:
        """Tickets admitted now."""
        return len(self._active)

    @property
    def queued(self) -> int:
        """Tickets waiting now."""
        return len(self._queue)

    def position(self, ticket: Ticket) -> int:
        """1 for the next to be admitted, 2 after it, ...; 0 once admitted (or gone)."""
        try:
            return self._queue.index(ticket) + 1
        except ValueError:
            return 0

    def join(self, key: str, *, at_once: bool = False) -> Ticket:
        """Take a place: admitted at once if a slot is free and nobody waits, else last in line.

        ``at_once``: admit even beyond the limit (a peer that cannot wait).
        """
        ticket = Ticket(key)
        if at_once or (len(self._active) < self.limit and not self._queue):
            ticket.admitted = True
            self._active.append(ticket)
        else:
            self._queue.append(ticket)
        ticket.moved.set()
        return ticket

    async def wait(self, ticket: Ticket, timeout_s: float | None = None) -> bool:
        """Wait until admitted or the queue ahead moves (or ``timeout_s``); returns ``ticket.admitted``."""
        if not ticket.admitted:
            try:
                async with asyncio.timeout(timeout_s):
                    await ticket.moved.wait()
            except TimeoutError:
                pass
        ticket.moved.clear()
        return ticket.admitted

    def leave(self, ticket: Ticket) -> None:
        """Give the slot back, or the place in line; admits whoever is next.  Idempotent."""
        if ticket.left:
            return
        ticket.left = True
        if ticket.admitted:
            self._active.remove(ticket)
        else:
            self._queue.remove(ticket)
        self._admit()
        for waiting in self._queue:
            waiting.moved.set()  # positions changed

    def _admit(self) -> None:
        while self._queue and len(self._active) < self.limit:
            nxt = self._queue.popleft()
            nxt.admitted = True
            self._active.append(nxt)
            nxt.moved.set()
