"""The destination side: a server that accepts migrations.

Each accepted connection authenticates, then either migrates a region
(BEGIN) or asks about an earlier one (QUERY, answered from the journal).
A BEGIN is checked (a migration id used once, one migration per region
name, --max-migrations, --max-region, the preflight checks), then waits in
the admission queue for a slot if --max-active are moving bytes (QUEUED on
the wire), then one :class:`~precopy.session.receiver.Receiver` receives
the region and commits it.  The commit journal
(:mod:`precopy.session.journal`) is read at start: a daemon that stopped
between a commit record and the rename completes the rename.

Settings: :class:`~precopy.session.dest_options.DestOptions` (re-exported
here).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from precopy._version import __version__
from precopy.errors import AbortCode, AuthError, PrecopyError, RegionError, RemoteProtocolError
from precopy.memory.region import users_of
from precopy.net.channel import Channel, LinkError, PeerAborted, tune
from precopy.net.tls import make_channel
from precopy.policy.admission import Admission, Ticket
from precopy.protocol import (
    PROTOCOL_VERSION,
    Auth,
    AuthOk,
    Begin,
    Hello,
    HelloAck,
    Join,
    Outcome,
    Query,
    Queued,
    Ready,
    Resume,
    Role,
    auth,
)
from precopy.session import preflight
from precopy.session.dest_options import DestOptions
from precopy.session.dest_streams import StreamRegistry
from precopy.session.handshake import version_mismatch
from precopy.session.journal import DEVICE_STATE_SUFFIX, KEEP_DAYS, Journal, MigrationRecord
from precopy.session.postcopy_dest import LIVE, dest_caps, resume_postcopy
from precopy.session.postcopy_lane import join_lane
from precopy.session.postcopy_retake import retake_postcopies
from precopy.session.tally import RECENT_KEPT, Tally

#: Journal records are kept at least this long (and the newest RECENT_KEPT whatever their age).
JOURNAL_MIN_AGE_S = KEEP_DAYS * 86400.0
from precopy.session.receiver import Receiver

__all__ = ["DestOptions", "DestinationServer"]

_log = logging.getLogger(__name__)

#: A queued migration hears QUEUED at least this often (a keep-alive for
#: the source's I/O timeout; docs/PROTOCOL.md "The queue").
QUEUE_KEEPALIVE_S = 2.0


def _addr(addr: Any) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return str(addr)


class DestinationServer:
    """Accepts migrations on ``host:port`` until closed.

    ``await server.start()`` binds (``server.port`` is then the real port,
    useful with port 0); ``await server.serve_forever()`` runs until
    :meth:`close`.
    """

    def __init__(self, opts: DestOptions) -> None:
        self.opts = opts
        #: The newest migrations, oldest first: every running one and at most RECENT_KEPT in all.
        self.results: list[MigrationRecord] = []
        #: Totals over every migration finished since start (the metrics' counters).
        self.tally = Tally()
        self._journal_added = 0
        self._active: dict[str, tuple[MigrationRecord, asyncio.Task[Any]]] = {}
        self._names: set[str] = set()
        assert opts.max_active is not None
        #: Who moves bytes now and who waits (QUEUED), in order.
        self.admission = Admission(opts.max_active)
        self._waiting: set[str] = set()  # migration ids in the queue
        self._handshaking = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hooks: set[asyncio.Task[Any]] = set()
        self._sock: socket.socket | None = None
        self._serving: asyncio.Task[Any] | None = None
        self._closing = False
        self._hash_pool = ThreadPoolExecutor(2, thread_name_prefix="precopy-dhash")
        self._outer_pool = ThreadPoolExecutor(2, thread_name_prefix="precopy-dwork")
        self.journal: Journal | None = None
        self.port = opts.port
        #: Migrations receiving over several streams, where a JOIN finds its own.
        self.streams = StreamRegistry(opts.max_streams, opts.idle_timeout_s)

    async def start(self) -> None:
        assert self.opts.state_dir is not None
        try:
            self.opts.memory_dir.mkdir(parents=True, exist_ok=True)
            self.opts.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegionError(f"cannot use {exc.filename}: {exc.strerror}") from exc
        self.journal = Journal(self.opts.state_dir)
        self.journal.recover(self.opts.memory_dir, keep_partial=self.opts.keep_partial)
        self.journal.prune(RECENT_KEPT, JOURNAL_MIN_AGE_S)
        await retake_postcopies(self.journal, self.opts, self._tasks)  # before listening: a RESUME finds them
        infos = await asyncio.get_running_loop().getaddrinfo(self.opts.host, self.opts.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise PrecopyError(f"cannot listen on {self.opts.host}:{self.opts.port}: {exc.strerror}") from exc
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        if self.opts.auth_key is None:
            # On loopback only this machine's processes reach the port: said, not warned about.
            local = _is_loopback(self.opts.host)
            (_log.info if local else _log.warning)(
                "no --auth-key-file: any %s that reaches %s:%d can write migrations",
                "local process" if local else "peer", self.opts.host, self.port)
        _log.info("listening on %s:%d, regions in %s", self.opts.host, self.port, self.opts.memory_dir)
    async def serve_forever(self) -> None:
        """Accept connections until :meth:`close` (which ends this coroutine)."""
        assert self._sock is not None, "call start() first"
        self._serving = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                if self._closing:  # close() stopped us: a normal end
                    return
                raise
            except OSError as exc:
                if self._closing:
                    break
                _log.error("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if self._handshaking >= self.opts.max_connections:
                _log.warning("dropping %s at once: %d connections are already in the handshake "
                             "(--max-connections)", _addr(addr), self._handshaking)
                conn.close()
                continue
            tune(conn)
            self._handshaking += 1  # _handle takes it back when the handshake ends
            task = asyncio.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self, *, abort_in_flight: bool = True) -> None:
        """Stop accepting; abort (or wait for) migrations in flight; wait for hooks."""
        self._closing = True
        if abort_in_flight:
            for task in list(self._tasks):
                task.cancel()
        serving = self._serving
        if serving is not None and serving is not asyncio.current_task() and not serving.done():
            # Stop the accept before closing the socket: closing it under a
            # pending sock_accept would leave the loop watching a dead fd.
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._hooks:
            await asyncio.gather(*self._hooks, return_exceptions=True)
        self._hash_pool.shutdown(wait=True)
        self._outer_pool.shutdown(wait=True)

    # -- one connection ---------------------------------------------------

    async def _handle(self, sock: socket.socket) -> None:
        chan = make_channel(sock, Role.DEST, self.opts.tls_context)
        chan.send_timeout_s = self.opts.idle_timeout_s
        chan.linger_s = 1.0
        peer = chan.peer
        try:
            try:
                async with asyncio.timeout(self.opts.handshake_timeout_s):  # not wait_for: see Channel.events
                    ev = await self._handshake(chan)
            finally:
                self._handshaking -= 1
            if isinstance(ev, Query):
                await self._answer_query(chan, ev)
            elif isinstance(ev, Join):  # an extra stream, or a post-copy's fault lane
                await (join_lane(LIVE.get(ev.migration_id), chan, ev) if ev.lane else self.streams.join(chan, ev))
            elif isinstance(ev, Resume):
                await resume_postcopy(chan, ev, self.opts, self.journal)
            else:
                await self._migrate(chan, ev)
        except asyncio.TimeoutError:
            _log.warning("dropping %s: handshake not completed within %g s", peer,
                         self.opts.handshake_timeout_s)
            await chan.abort(AbortCode.TIMEOUT, "handshake timed out")
        except PeerAborted as exc:
            _log.warning("%s aborted: %s", peer, exc)
        except PrecopyError as exc:
            _log.warning("dropping %s: %s", peer, exc)
            await chan.abort(exc.code, str(exc))
        except asyncio.CancelledError:
            await chan.abort(AbortCode.CANCELLED, "destination is shutting down")
            raise
        except Exception as exc:  # a bug here must not take the daemon down
            _log.exception("internal error serving %s", peer)
            await chan.abort(AbortCode.INTERNAL, f"internal error on the destination: {exc}")
        finally:
            chan.close()

    async def _handshake(self, chan: Channel) -> Begin | Query | Join | Resume:
        key = self.opts.auth_key
        await chan.start()  # TLS, when configured
        hello: Hello = await chan.recv(Hello)
        if hello.version != PROTOCOL_VERSION:
            raise PrecopyError(version_mismatch("source", hello.version, hello.software), AbortCode.VERSION)
        nonce = auth.new_nonce()
        mac = auth.dest_mac(key, hello.nonce, nonce) if key is not None else b""
        await chan.send(HelloAck(PROTOCOL_VERSION, nonce, mac, __version__, dest_caps(self.opts, hello.caps, chan)))
        au: Auth = await chan.recv(Auth)
        if key is not None and not auth.verify(auth.source_mac(key, hello.nonce, nonce), au.mac):
            raise AuthError(f"peer {chan.peer} failed authentication (wrong or missing key)")
        await chan.send(AuthOk())
        return await chan.recv(Begin, Query, Join, Resume)  # type: ignore[no-any-return]

    async def _answer_query(self, chan: Channel, q: Query) -> None:
        active = self._active.get(q.migration_id)
        if active is not None and active[0].postcopy is None:  # (post-copy: it runs here, never stopped)
            # The source lost the link and asks: this migration must never
            # commit from here on; stop it, then answer from the journal.
            _log.warning("source asks about live migration %s: aborting it", q.migration_id)
            active[1].cancel()
            await asyncio.gather(active[1], return_exceptions=True)
        assert self.journal is not None
        rec = self.journal.read(q.migration_id)
        committed = rec is not None and rec.get("outcome") == "committed"
        await chan.send(Outcome(migration_id=q.migration_id, committed=committed, known=rec is not None))

    def _extra_checks(self) -> dict[str, Callable[[Sequence[str]], str]]:
        """Guest requirements the workload adapter checks itself (e.g. CRIU's: the same CRIU here)."""
        checks = getattr(self.opts.workload, "requirement_checks", None)
        return dict(checks()) if checks is not None else {}
    async def _migrate(self, chan: Channel, begin: Begin) -> None:
        """Serve one BEGIN: refuse it, answer a dry run, or admit it (after a wait in the
        queue, if it offers to wait) and receive the region."""
        self._check_begin(begin)
        existing = self._reusable(begin)
        passed = preflight.check_destination(size=begin.size, page_size=begin.page_size,
                                             memory_dir=self.opts.memory_dir, requires=begin.requires,
                                             have=begin.size if existing else 0, extra=self._extra_checks())
        if begin.dry_run:
            _log.info("dry run %s from %s: %s fits (%s)", begin.migration_id, chan.peer, begin.name,
                      "; ".join(passed))
            await chan.send(Ready())
            return
        t_queue = time.monotonic()
        ticket, existing = await self._admit(chan, begin, existing)
        rec = MigrationRecord(begin.migration_id, begin.name, begin.size, chan.peer)
        rec.queued_s = time.monotonic() - t_queue
        await self._receive(chan, begin, rec, ticket, existing)

    def _check_begin(self, begin: Begin) -> None:
        """Raise (:class:`PrecopyError`, :class:`RegionError`) if this BEGIN cannot be served here."""
        assert self.journal is not None
        if (begin.migration_id in self._active or begin.migration_id in self._waiting
                or self.journal.read(begin.migration_id) is not None):
            raise PrecopyError(f"migration id {begin.migration_id} was already used", AbortCode.BUSY)
        if begin.name.endswith(DEVICE_STATE_SUFFIX):
            # It would replace the device state of the region it names.
            raise RegionError(f"region name {begin.name!r} ends in {DEVICE_STATE_SUFFIX!r}, "
                              "which this destination uses for device-state files; use another --name")
        if not begin.dry_run and len(self._active) + len(self._waiting) >= self.opts.max_migrations:
            raise PrecopyError(
                f"this destination already serves {len(self._active)} migrations and queues "
                f"{len(self._waiting)} (its --max-migrations is {self.opts.max_migrations}); retry when "
                "one has finished", AbortCode.BUSY,
            )
        if begin.name in self._names:
            raise PrecopyError(
                f"region {begin.name!r} is already being migrated here; wait for it to finish "
                "or migrate under another --name", AbortCode.BUSY,
            )
        if begin.size > self.opts.max_region:
            raise RegionError(
                f"region {begin.name!r} is {begin.size >> 20} MiB, over this destination's limit of "
                f"{self.opts.max_region >> 20} MiB (precopy-dest --max-region)"
            )

    async def _admit(self, chan: Channel, begin: Begin, existing: bool) -> tuple[Ticket, bool]:
        """A slot to move bytes in: at once, or after the queue (whose wait may change whether
        the existing region can be reused; the preflight checks run again then).  Returns the
        ticket, for :meth:`Admission.leave`, and ``existing``."""
        ticket = self.admission.join(begin.migration_id, at_once=not begin.wait)
        if not ticket.admitted:
            self._names.add(begin.name)
            self._waiting.add(begin.migration_id)
            try:
                await self._queue(chan, begin, ticket)
                # Others were received meanwhile: what fit then may not now.
                existing = self._reusable(begin)
                preflight.check_destination(size=begin.size, page_size=begin.page_size,
                                            memory_dir=self.opts.memory_dir, requires=begin.requires,
                                            have=begin.size if existing else 0, extra=self._extra_checks())
            except BaseException:
                self.admission.leave(ticket)
                self._names.discard(begin.name)
                raise
            finally:
                self._waiting.discard(begin.migration_id)
        elif self.admission.active > self.admission.limit:
            _log.warning("migration %s from %s: the source cannot wait in the queue (a precopy-source from "
                         "before it): served at once, beyond --max-active %d", begin.migration_id, chan.peer,
                         self.admission.limit)
        return ticket, existing

    async def _receive(self, chan: Channel, begin: Begin, rec: MigrationRecord, ticket: Ticket,
                       existing: bool) -> None:
        """Receive an admitted migration; record how it ended; give its slot back."""
        assert self.journal is not None
        task = asyncio.current_task()
        assert task is not None
        self._active[begin.migration_id] = (rec, task)
        self._names.add(begin.name)
        self.results.append(rec)
        if len(self.results) > RECENT_KEPT:  # drop the oldest finished one
            old = next((r for r in self.results if r.outcome != "running"), None)
            if old is not None:
                self.results.remove(old)
        t0 = time.monotonic()
        try:
            await Receiver(chan, begin, rec, existing, opts=self.opts, journal=self.journal,
                           admission=self.admission, hash_pool=self._hash_pool, outer_pool=self._outer_pool,
                           run_hook=self.run_hook, streams=self.streams).run()
        except BaseException as exc:
            if rec.outcome != "committed":
                rec.outcome = "aborted"
                rec.error = str(exc) or type(exc).__name__
                if isinstance(exc, asyncio.CancelledError):
                    rec.error = "cancelled"
                try:
                    self.journal.write(rec)
                except RegionError as jexc:
                    _log.error("cannot record that migration %s aborted: %s", rec.migration_id, jexc)
            raise
        finally:
            rec.seconds = time.monotonic() - t0
            rec.bytes_received = chan.bytes_received
            self._finished(rec)
            del self._active[begin.migration_id]
            self._names.discard(begin.name)
            self.admission.leave(ticket)

    def _finished(self, rec: MigrationRecord) -> None:
        """Count a migration that ended; prune the journal now and then (:meth:`Journal.prune`)."""
        self.tally.add(rec.outcome, bytes=rec.bytes_received, rounds=rec.rounds,
                       downtime_s=None if rec.downtime_ms is None else rec.downtime_ms / 1e3)
        self._journal_added += 1
        if self._journal_added >= RECENT_KEPT // 10 and self.journal is not None:
            self._journal_added = 0
            self.journal.prune(RECENT_KEPT, JOURNAL_MIN_AGE_S)

    @property
    def in_flight(self) -> int:
        """Migrations being received now (admitted, not finished)."""
        return len(self._active)

    async def _queue(self, chan: Channel, begin: Begin, ticket: Ticket) -> None:
        """Hold a BEGIN that offered to wait until a slot is free, telling the source where it stands.

        QUEUED goes out at once, when the position changes and every
        QUEUE_KEEPALIVE_S.  A source that leaves meanwhile (ABORT, close) is
        noticed at the next of those and raises (PeerAborted, LinkError);
        its place goes to the next.
        """
        _log.info("migration %s from %s: queued at position %d (%d moving bytes, --max-active %d)",
                  begin.migration_id, chan.peer, self.admission.position(ticket), self.admission.active,
                  self.admission.limit)
        while not await self.admission.wait(ticket, QUEUE_KEEPALIVE_S):  # at once the first time
            await self._check_still_there(chan)
            await chan.send(Queued(position=self.admission.position(ticket), active=self.admission.active,
                                   limit=self.admission.limit))
        await self._check_still_there(chan)

    @staticmethod
    async def _check_still_there(chan: Channel) -> None:
        """Raise if the source, which sends nothing while queued, sent something or closed."""
        try:
            peek = chan.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # nothing: still waiting, as it should
        except OSError as exc:
            raise LinkError(f"connection to {chan.peer} failed while queued: {exc}") from exc
        if not peek:
            raise LinkError(f"{chan.peer} closed the connection while queued")
        # An ABORT (raises PeerAborted) or anything else (not allowed now: raises).
        async with asyncio.timeout(QUEUE_KEEPALIVE_S):
            ev = await chan.recv()
        raise RemoteProtocolError(f"{chan.peer} sent {type(ev).__name__} while queued")

    def _reusable(self, begin: Begin) -> bool:
        """Whether the region file already under ``begin.name`` can receive this migration.

        It must be a regular file of exactly the region's size that no
        process maps or holds open: a workload resumed here from an earlier
        migration keeps its memory (the commit then replaces the name, as
        for a fresh region).
        """
        if not self.opts.reuse_regions:
            return False
        final = self.opts.memory_dir / begin.name
        try:
            st = final.lstat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            _log.warning("cannot inspect %s (%s): receiving into a new region", final, exc.strerror)
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != begin.size:
            _log.info("%s exists but is not a %d-byte regular file: receiving into a new region",
                      final, begin.size)
            return False
        try:
            users = users_of(final)
        except OSError as exc:
            _log.warning("cannot tell who uses %s (%s): receiving into a new region", final, exc.strerror)
            return False
        if users:
            _log.info("%s is in use (pid %s): receiving into a new region", final,
                      ", ".join(map(str, users[:8])))
            return False
        return True

    async def run_hook(self, rec: MigrationRecord, memory: Path, device_state: Path) -> None:
        """Start the on-resume hook (not waiting for it); its exit code is logged."""
        cmd = self.opts.on_resume
        if not cmd:
            return
        env = dict(os.environ, PRECOPY_MEMORY=str(memory), PRECOPY_DEVICE_STATE=str(device_state),
                   PRECOPY_MIGRATION_ID=rec.migration_id)
        if rec.postcopy_control:  # post-copy: where the resumed guest must listen (docs/TRACKING.md)
            env["PRECOPY_POSTCOPY_CONTROL"] = rec.postcopy_control
        try:
            proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", cmd, env=env)
        except OSError as exc:
            _log.error("on-resume hook for %s could not start: %s", rec.migration_id, exc)
            return

        async def run() -> None:
            rec.hook_exit = await proc.wait()
            log = _log.info if rec.hook_exit == 0 else _log.error
            log("on-resume hook for %s exited with %d", rec.migration_id, rec.hook_exit)

        task = asyncio.create_task(run())
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
