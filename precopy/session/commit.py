"""The committer: COMMIT, its answer, and the outcome when the answer is lost (DESIGN invariant 3).

Once COMMIT is out the destination may own the workload: the source never
resumes it blindly.  A lost answer is asked for on new connections
(:func:`resolve_outcome`); a definite "not committed" rolls back, no
answer at all leaves the migration in doubt with the workload paused.
The guardian process (:mod:`precopy.session.guardian`) asks the same way
for a source agent that died after sending COMMIT: this module needs
neither the session nor the guardian.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from precopy.errors import AbortCode, MigrationInDoubt, PrecopyError
from precopy.net.channel import Channel, PeerAborted, connect
from precopy.net.tls import make_channel
from precopy.protocol import Commit, Committed, Outcome, Query, Role
from precopy.session.handshake import handshake

__all__ = ["OutcomeTarget", "Committer", "describe", "query_outcome", "resolve_outcome"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutcomeTarget:
    """Where and how to ask for a migration's outcome."""

    host: str
    port: int
    migration_id: str
    auth_key: bytes | None = None
    tls_context: ssl.SSLContext | None = None
    connect_timeout_s: float = 10.0
    io_timeout_s: float = 60.0
    retries: int = 6

    @property
    def destination(self) -> str:
        return f"{self.host}:{self.port}"


def describe(exc: BaseException) -> str:
    """What went wrong, in words (a cancellation says so)."""
    if isinstance(exc, asyncio.CancelledError):
        return "migration cancelled"
    return str(exc) or type(exc).__name__


async def query_outcome(target: OutcomeTarget) -> Outcome:
    """Ask the destination once, on a new connection, what became of the migration.

    Raises what connecting and the handshake raise (:class:`PrecopyError`,
    ``OSError``, ``asyncio.TimeoutError``).
    """
    sock = await connect(target.host, target.port, target.connect_timeout_s)
    chan = make_channel(sock, Role.SOURCE, target.tls_context, target.host)
    chan.send_timeout_s = target.io_timeout_s
    try:
        await handshake(chan, target.auth_key, target.io_timeout_s)
        await chan.send(Query(migration_id=target.migration_id))
        out: Outcome = await asyncio.wait_for(chan.recv(Outcome), target.io_timeout_s)
        return out
    finally:
        chan.close()


class NotCommitted(PrecopyError):
    """The destination says, definitely, that it did not and will not commit: roll back."""


async def resolve_outcome(target: OutcomeTarget, cause: BaseException, chan: Channel | None = None) -> None:
    """The commit was sent but not confirmed: ask the destination what happened.

    Returns if it committed.  Raises :class:`NotCommitted` if it definitely
    did not, :class:`MigrationInDoubt` if that cannot be learned in
    ``target.retries`` queries.  ``chan``, the migration's own connection,
    is closed first.
    """
    _log.warning("commit not confirmed (%s); asking the destination for the outcome", cause)
    if chan is not None:
        chan.close()
    delay = 0.2
    last: BaseException = cause
    for attempt in range(target.retries):
        try:
            outcome = await query_outcome(target)
        except (PrecopyError, OSError, asyncio.TimeoutError) as exc:
            last = exc
            _log.warning("outcome query %d failed: %s", attempt + 1, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if outcome.committed:
            _log.info("destination confirms migration %s committed", outcome.migration_id)
            return
        if outcome.known:
            # Definitely not committed: the destination will never commit it.
            raise NotCommitted(f"destination reports the migration was not committed "
                               f"({describe(cause)})",
                               getattr(cause, "code", AbortCode.LINK)) from cause
        last = PrecopyError("destination has no record of this migration")
        break
    raise MigrationInDoubt(
        f"migration {target.migration_id}: commit sent but its outcome is unknown ({last}); "
        "the workload is left PAUSED on the source. Check the destination "
        f"({target.destination}) for the migration id, then resume or kill the workload by hand.",
        AbortCode.LINK,
    ) from cause


class Committer:
    """Sends COMMIT once and learns its outcome; says where the migration stands.

    ``sent``: COMMIT is out (from here on the source must ask, never resume
    blindly).  ``confirmed``: the destination committed.  ``not_committed``:
    it said, definitely, that it did not (a rollback is safe).
    """

    def __init__(self, target: OutcomeTarget) -> None:
        self.target = target
        self.sent = False
        self.confirmed = False
        self.not_committed = False
        #: What was sent is POSTCOPY (precopy.session.postcopy_source): confirmed only once the
        #: destination holds every page.
        self.postcopy = False

    @property
    def postcopy_unfinished(self) -> bool:
        """POSTCOPY is out, not refused, and the destination does not hold every page yet."""
        return self.postcopy and not self.confirmed and not self.not_committed

    @property
    def in_doubt(self) -> bool:
        """COMMIT is out and no definite "not committed" came back: resuming could make two owners."""
        return self.sent and not self.not_committed

    async def commit(self, send: Callable[[Any], Awaitable[int]], expect: Callable[[type], Awaitable[Any]],
                     checksum: int, chan: Channel | None) -> Committed | None:
        """Send COMMIT (through ``send``) and wait for COMMITTED (through ``expect``).

        Returns the destination's COMMITTED, or None when the answer was
        lost and the outcome query said committed.  Raises
        :class:`PrecopyError` when the destination refused (an ABORT on this
        connection) or says it did not commit, :class:`MigrationInDoubt`
        when the outcome cannot be learned or the answer is not ours.
        """
        self.sent = True
        await send(Commit(migration_id=self.target.migration_id, checksum=checksum))
        try:
            done: Committed = await expect(Committed)
        except PeerAborted as exc:
            # The destination answered COMMIT with ABORT on this connection:
            # it records the migration as aborted before it says so, and it
            # never commits an aborted migration.  A definite "not committed".
            self.not_committed = True
            raise PrecopyError(f"the destination refused the commit: {exc}", exc.code) from exc
        except PrecopyError as exc:
            await self.resolve(exc, chan)
            self.confirmed = True
            return None
        if done.migration_id != self.target.migration_id:
            raise MigrationInDoubt(
                f"destination confirmed migration {done.migration_id!r}, not ours; "
                "workload left paused", AbortCode.PROTOCOL,
            )
        if not done.resumed:
            _log.error("the destination committed but could not resume the workload: see its log")
        self.confirmed = True
        return done

    async def resolve(self, cause: BaseException, chan: Channel | None = None, *, postcopy_answer: bool = False) -> None:
        """:func:`resolve_outcome`, remembering a definite "not committed".

        Once POSTCOPY is out "committed" is not the end (the destination may
        lack pages only the paused copy holds): an interruption then raises
        :class:`MigrationInDoubt` (the guardian takes the page stream up);
        ``postcopy_answer``: the caller is post-copy itself, asking about its lost COMMITTED.
        """
        if self.postcopy_unfinished and not postcopy_answer:
            raise MigrationInDoubt(
                f"interrupted during post-copy ({describe(cause)}); the workload is left PAUSED here: it "
                "holds pages the destination lacks, which the guardian serves (docs/FAILURES.md)", AbortCode.LINK)
        try:
            await resolve_outcome(self.target, cause, chan)
        except NotCommitted:
            self.not_committed = True
            raise
