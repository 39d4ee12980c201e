"""The destination side: a server that accepts migrations.

Each accepted connection authenticates, then either migrates a region
(BEGIN) or asks about an earlier one (QUERY).  A migration receives pages
into ``<memory-dir>/.<name>.<id>.partial``, keeps chunk digests of what it
holds fresh, and on COMMIT:

1. checks the device state is complete and intact (and asks the
   workload adapter, if any, whether it can resume here),
2. writes ``<name>.device-state``,
3. persists the commit record (fsync'd journal entry naming both files),
4. renames the partial region to ``<name>``,
5. resumes the workload adapter (e.g. loads a QEMU VM's device state,
   waiting since BEGIN on the region file) and runs the on-resume hook,
6. confirms COMMITTED to the source.

Anything that ends a migration before step 3 removes its partial file: a
region file under its final name is always complete.  A daemon that stops
between steps 3 and 4 completes the rename when it starts again.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import os
import socket
import ssl
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from precopy.protocol import auth

from precopy.session import preflight
from precopy.policy.admission import Admission, Ticket, default_max_active
from precopy.net.channel import Channel, LinkError, PeerAborted, tune
from precopy.memory.digest import ChunkTracker, chunk_pages_of, page_digests
from precopy.errors import AbortCode, AuthError, PrecopyError, RegionError, RemoteProtocolError
from precopy.memory.region import GuestMemory, clear_exception_frames, users_of
from precopy.net.tls import make_channel
from precopy.memory.tracking import TMPFS_MAGIC, fs_magic
from precopy.workload.base import DestWorkload
from precopy.protocol import (
    MAX_DEVICE_STATE,
    MAX_REGION,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Auth,
    AuthOk,
    Begin,
    Commit,
    Committed,
    DeviceState,
    DigestRequest,
    DigestTable,
    Hello,
    HelloAck,
    Outcome,
    Pages,
    Query,
    Queued,
    Ready,
    Role,
    Switchover,
    page_payload,
)

__all__ = ["DestOptions", "DestinationServer"]

_log = logging.getLogger(__name__)

#: ``<state-dir>/<name>.device-state`` holds a committed region's device state.
DEVICE_STATE_SUFFIX = ".device-state"
#: A queued migration hears QUEUED at least this often (a keep-alive for
#: the source's I/O timeout; docs/PROTOCOL.md "The queue").
QUEUE_KEEPALIVE_S = 2.0


@dataclass
class DestOptions:
    """Settings of a destination daemon.  See ``precopy-dest --help``."""

    memory_dir: Path
    #: Journal and device-state files (default: memory_dir).  Needed when
    #: memory_dir is hugetlbfs, which holds mappable files only.
    state_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7070
    auth_key: bytes | None = None
    #: TLS for every connection (precopy.net.tls.server_context); None: plain TCP.
    tls_context: ssl.SSLContext | None = None
    on_resume: str | None = None
    keep_partial: bool = False
    max_device_state: int = MAX_DEVICE_STATE
    handshake_timeout_s: float = 10.0
    #: Largest region a source may migrate in (bytes); larger BEGINs are refused.
    max_region: int = MAX_REGION
    #: Migrations accepted at once, moving bytes or queued; one more is
    #: refused with ABORT busy.
    max_migrations: int = 8
    #: Migrations moving bytes at once; the others accepted wait in a FIFO
    #: queue (QUEUED on the wire).  None: one per two CPUs (default_max_active).
    max_active: int | None = None
    #: Connections still in the handshake at once; more are closed unread.
    max_connections: int = 64
    idle_timeout_s: float = 120.0
    populate: bool = True
    #: Receive into a region file already under the migration's name (a
    #: repeat migration, a pre-provisioned host) when it has the right size
    #: and no process maps or holds it: no first touch of fresh memory and,
    #: on tmpfs, no second copy's worth of space.
    reuse_regions: bool = True
    #: Started when a migration begins, resumed after its commit (before
    #: COMMITTED), discarded when it ends without one (e.g. a QEMU VM).
    workload: DestWorkload | None = None

    def __post_init__(self) -> None:
        self.memory_dir = Path(self.memory_dir)
        self.state_dir = Path(self.state_dir) if self.state_dir is not None else self.memory_dir
        if self.max_active is None:
            self.max_active = default_max_active()
        if self.max_active < 1:
            raise ValueError(f"max_active must be at least 1, not {self.max_active}")


@dataclass
class MigrationRecord:
    migration_id: str
    name: str
    size: int
    peer: str
    outcome: str = "running"
    error: str | None = None
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    bytes_received: int = 0
    device_state_bytes: int = 0
    memory: str | None = None
    partial: str | None = None
    hook_exit: int | None = None
    #: Iterative digest requests answered (the source's rounds).
    rounds: int = 0
    #: From SWITCHOVER (the source paused) to the resume here, as seen here.
    downtime_ms: float | None = None
    #: Received into the region file already under its name (not a new one).
    reused_region: bool = False
    #: Pages received straight into the region (no second copy; existing regions).
    pages_in_place: int = 0
    #: Waiting in the queue for a slot (--max-active) before READY.
    queued_s: float = 0.0


class _Journal:
    """Durable per-migration records: ``<state-dir>/.precopy/journal/<id>.json``."""

    def __init__(self, root: Path) -> None:
        self.dir = root / ".precopy" / "journal"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegionError(f"cannot create the journal directory {self.dir}: {exc.strerror}") from exc
        # Fail at start, not at the first commit, where files cannot be
        # written (hugetlbfs holds mappable files only).
        self.write({"migration_id": ".probe", "outcome": "probe"})
        (self.dir / ".probe.json").unlink()

    def write(self, rec: MigrationRecord | dict[str, Any]) -> None:
        """Replace the record durably (write, fsync, rename, fsync the directory).

        Raises :class:`RegionError` when the record cannot be written.
        """
        fields = rec if isinstance(rec, dict) else rec.__dict__
        path = self.dir / f"{fields['migration_id']}.json"
        tmp = path.with_suffix(".tmp")
        data = json.dumps(fields).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise RegionError(
                f"cannot write the journal in {self.dir}: {exc.strerror} (a hugetlbfs --memory-dir "
                "needs a --state-dir on an ordinary file system)"
            ) from exc

    def entries(self) -> list[dict[str, Any]]:
        """Every readable record (unreadable ones are logged and skipped)."""
        out = []
        for path in sorted(self.dir.glob("*.json")):
            rec = self.read(path.stem)
            if rec is not None:
                out.append(rec)
        return out

    def read(self, migration_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / f"{migration_id}.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            _log.error("journal entry for %s is unreadable: %s", migration_id, exc)
            return None
        return data if isinstance(data, dict) else None


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
        self.results: list[MigrationRecord] = []
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
        self.journal: _Journal | None = None
        self.port = opts.port

    async def start(self) -> None:
        assert self.opts.state_dir is not None
        try:
            self.opts.memory_dir.mkdir(parents=True, exist_ok=True)
            self.opts.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegionError(f"cannot use {exc.filename}: {exc.strerror}") from exc
        self.journal = _Journal(self.opts.state_dir)
        self._cleanup_stale_partials()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.opts.host, self.opts.port, type=socket.SOCK_STREAM,
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

    def _cleanup_stale_partials(self) -> None:
        """Recover from a daemon that stopped mid-migration.

        A migration the journal calls committed whose region is still under
        its partial name (the daemon stopped between the commit record and
        the rename) is completed: the region belongs here now, the source
        keeps its copy paused.  Migrations still "running" can no longer
        commit: they are recorded as aborted.  Other partial files are
        removed (or kept with --keep-partial).
        """
        assert self.journal is not None
        for rec in self.journal.entries():
            mid = str(rec.get("migration_id"))
            if rec.get("outcome") == "committed" and rec.get("partial") and rec.get("memory"):
                partial, final = Path(str(rec["partial"])), Path(str(rec["memory"]))
                if partial.exists():
                    os.replace(partial, final)
                    _log.critical(
                        "migration %s was committed but this daemon stopped before resuming it: the "
                        "region is now %s; resume the workload there by hand (its source keeps its "
                        "copy paused)", mid, final,
                    )
            elif rec.get("outcome") == "running":
                rec["outcome"] = "aborted"
                rec["error"] = "the destination daemon stopped during the migration"
                self.journal.write(rec)
                _log.warning("migration %s was interrupted by a daemon restart: recorded as aborted", mid)
        for p in self.opts.memory_dir.glob(".*.partial"):
            if self.opts.keep_partial:
                _log.warning("keeping partial region %s from an earlier run (--keep-partial)", p)
                continue
            _log.warning("removing partial region %s left by an earlier run", p)
            p.unlink(missing_ok=True)

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

    async def _handshake(self, chan: Channel) -> Begin | Query:
        key = self.opts.auth_key
        await chan.start()  # TLS, when configured
        hello: Hello = await chan.recv(Hello)
        if hello.version != PROTOCOL_VERSION:
            raise PrecopyError(
                f"peer speaks protocol {hello.version}, we speak {PROTOCOL_VERSION}", AbortCode.VERSION
            )
        nonce = auth.new_nonce()
        mac = auth.dest_mac(key, hello.nonce, nonce) if key is not None else b""
        await chan.send(HelloAck(version=PROTOCOL_VERSION, nonce=nonce, mac=mac))
        au: Auth = await chan.recv(Auth)
        if key is not None and not auth.verify(auth.source_mac(key, hello.nonce, nonce), au.mac):
            raise AuthError(f"peer {chan.peer} failed authentication (wrong or missing key)")
        await chan.send(AuthOk())
        ev = await chan.recv(Begin, Query)
        return ev  # type: ignore[no-any-return]

    async def _answer_query(self, chan: Channel, q: Query) -> None:
        active = self._active.get(q.migration_id)
        if active is not None:
            # The source lost the link and asks: this migration must never
            # commit from here on; stop it, then answer from the journal.
            _log.warning("source asks about live migration %s: aborting it", q.migration_id)
            active[1].cancel()
            await asyncio.gather(active[1], return_exceptions=True)
        assert self.journal is not None
        rec = self.journal.read(q.migration_id)
        committed = rec is not None and rec.get("outcome") == "committed"
        await chan.send(Outcome(migration_id=q.migration_id, committed=committed, known=rec is not None))

    async def _migrate(self, chan: Channel, begin: Begin) -> None:
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
        existing = self._reusable(begin)
        passed = preflight.check_destination(size=begin.size, page_size=begin.page_size,
                                             memory_dir=self.opts.memory_dir, requires=begin.requires,
                                             have=begin.size if existing else 0)
        if begin.dry_run:
            _log.info("dry run %s from %s: %s fits (%s)", begin.migration_id, chan.peer, begin.name,
                      "; ".join(passed))
            await chan.send(Ready())
            return
        t_queue = time.monotonic()
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
                                            have=begin.size if existing else 0)
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
        rec = MigrationRecord(begin.migration_id, begin.name, begin.size, chan.peer)
        rec.queued_s = time.monotonic() - t_queue
        task = asyncio.current_task()
        assert task is not None
        self._active[begin.migration_id] = (rec, task)
        self._names.add(begin.name)
        self.results.append(rec)
        t0 = time.monotonic()
        try:
            await _DestMigration(self, chan, begin, rec, existing).run()
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
            del self._active[begin.migration_id]
            self._names.discard(begin.name)
            self.admission.leave(ticket)

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


class _DestMigration:
    """Receiving one region."""

    def __init__(self, server: DestinationServer, chan: Channel, begin: Begin, rec: MigrationRecord,
                 existing: bool = False) -> None:
        self.server = server
        #: Receive into the region file already under the final name (see
        #: DestinationServer._reusable): renamed to the partial name first.
        self.existing = existing
        self.opts = server.opts
        self.chan = chan
        self.begin = begin
        self.rec = rec
        self.partial = self.opts.memory_dir / f".{begin.name}.{begin.migration_id}.partial"
        self.final = self.opts.memory_dir / begin.name
        assert self.opts.state_dir is not None
        self.device_state_path = self.opts.state_dir / f"{begin.name}{DEVICE_STATE_SUFFIX}"
        self.device = bytearray()
        self.device_total: int | None = None
        self.t_switchover: float | None = None

    def _others(self) -> int:
        """Other migrations moving bytes here now (told to the source: contention)."""
        return max(self.server.admission.active - 1, 0)

    def _open_region(self) -> GuestMemory:
        if self.existing:
            try:
                os.replace(self.final, self.partial)
                mem = GuestMemory.open(self.partial)
            except (OSError, RegionError) as exc:
                _log.warning("cannot take over %s (%s): receiving into a new region", self.final, exc)
                self.existing = False
            else:
                _log.info("migration %s: receiving into the existing region %s", self.begin.migration_id,
                          self.final)
                self.rec.reused_region = True
                return mem
        return GuestMemory.create(self.partial, self.begin.size, preallocate=False)

    async def run(self) -> None:
        mem = self._open_region()
        committed = False
        tracker: ChunkTracker | None = None
        try:
            if self.existing:
                # What it holds is hashed when first asked for, and only where
                # the migration has not overwritten whole chunks by then.
                tracker = ChunkTracker.unread(mem.view, self.begin.chunk_pages, self.server._hash_pool)
            else:
                tracker = ChunkTracker.zeroed(mem.view, self.begin.chunk_pages, self.server._hash_pool)
            if self.opts.workload is not None:
                await self.opts.workload.prepare(self.begin.migration_id, self.begin.name, self.partial,
                                                 self.begin.size)
            assert self.server.journal is not None
            self.server.journal.write(self.rec)
            await self.chan.send(Ready(existing=self.existing))
            _log.info("migration %s from %s: receiving %s (%d MiB)", self.begin.migration_id,
                      self.chan.peer, self.begin.name, self.begin.size >> 20)
            committed = await self._receive(mem, tracker)
        finally:
            if tracker is not None:
                tracker.close()
            clear_exception_frames(sys.exc_info()[1])  # their views of the region: see there
            mem.close()
            if not committed and self.opts.workload is not None:
                await asyncio.shield(self.opts.workload.discard(self.begin.migration_id))
            if not committed:
                if self.opts.keep_partial:
                    _log.warning("kept partial region %s (--keep-partial)", self.partial)
                else:
                    self.partial.unlink(missing_ok=True)

    async def _receive(self, mem: GuestMemory, tracker: ChunkTracker) -> bool:
        loop = asyncio.get_running_loop()
        # Pages that may hold something other than zeros, all with a block:
        # none in a fresh file; in an existing region, all but its holes.
        written = ~mem.hole_pages() if self.existing else np.zeros(mem.npages, dtype=bool)
        # The source sends the holes of its region first, as zero pages: the
        # region is prepared when the first data arrives, skipping them.
        declared_zero = np.zeros(mem.npages, dtype=bool)
        preparing = self.existing  # an existing region has its blocks
        # A new tmpfs region is mapped in writable ahead of the receiver once
        # data arrives (Preparation.start_populate_ahead): runs received
        # where that is done go straight into the mapping, as into an
        # existing region's pages; the rest by pwrite.
        existing = self.existing
        ahead = not existing and self.opts.populate and fs_magic(self.partial) == TMPFS_MAGIC
        if existing:
            # Its pages exist: runs of them are received straight into the
            # mapping, no second copy (pwrite from the receive buffer).
            mem.prep.start_map_in(written)
        if existing or ahead:
            # (No reference to self here: the connection holds the sink, and
            # a cycle through it kept each migration's buffers until a full
            # garbage collection, ~5 MiB a migration.)

            def sink(indices: np.ndarray) -> memoryview | None:
                first, last = int(indices[0]), int(indices[-1])
                if last - first + 1 != len(indices):
                    return None  # scattered
                if not (written[first:last + 1].all() if existing else mem.prep.populated(first, last)):
                    return None  # into holes, or not mapped in yet (pwrite: ENOSPC, not SIGBUS)
                return mem.view[first * PAGE_SIZE:(last + 1) * PAGE_SIZE]

            self.chan.conn.payload_sink = sink
        try:
            async for ev in self.chan.events(self.opts.idle_timeout_s):
                if isinstance(ev, Pages):
                    # Pages never written are still zero in the fresh file.
                    z = ev.zeros[written[ev.zeros]] if len(ev.zeros) else ev.zeros
                    if len(ev.zeros):
                        declared_zero[ev.zeros] = True
                    if len(ev.indices):
                        declared_zero[ev.indices] = False
                        if not preparing:
                            mem.prep.start_prepare(populate=self.opts.populate, skip=declared_zero.copy())
                            if ahead:
                                mem.prep.start_populate_ahead(~declared_zero)
                            preparing = True
                    if len(ev.indices) or z.size:
                        top = max(int(ev.indices[-1]) if len(ev.indices) else 0, int(z[-1]) if z.size else 0)
                        while not mem.prep.reserved_through(top):
                            # Never write where the file system has not allocated yet.
                            await asyncio.sleep(0.001)
                        mem.prep.reserve_skipped(ev.indices)
                    if len(ev.indices):
                        data = page_payload(ev, chunk_pages=self.begin.chunk_pages)
                        if ev.in_place:
                            self.rec.pages_in_place += len(ev.indices)
                        else:
                            mem.write_pages(ev.indices, data, allocated=written[ev.indices])
                        written[ev.indices] = True
                        tracker.received(ev.indices, data, ev.chunk_digests)
                    if z.size:
                        mem.zero(z)
                        tracker.zeroed_pages(z)
                elif isinstance(ev, DigestRequest) and ev.pages_of is not None:
                    # The source's record of pages it sent without hashing them.
                    pages = chunk_pages_of(ev.pages_of, self.begin.chunk_pages, mem.npages)
                    if tracker.page_table is not None:
                        # By page, every page's digest is kept as it landed
                        # (read back from the region): no need to read them again.
                        held = tracker.page_table[pages]
                    else:
                        held = await loop.run_in_executor(self.server._outer_pool, page_digests, mem.pages, pages)
                    await self.chan.send(DigestTable(seq=ev.seq, digests=held, others=self._others()))
                elif isinstance(ev, DigestRequest):
                    if not ev.final:
                        self.rec.rounds += 1
                    t = time.monotonic()
                    if ev.by_page and tracker.page_table is None:
                        # From now on chunk digests derive from page digests;
                        # pages never written in a fresh file read as zeros
                        # unread (reading would allocate them).
                        hashed = await loop.run_in_executor(self.server._outer_pool, tracker.by_page, written.copy())
                        _log.debug("chunk tables by page for %s: %d pages hashed in %.1f ms", self.begin.migration_id,
                                   hashed, (time.monotonic() - t) * 1e3)
                    stale = int(tracker.stale.sum() + tracker.cold.sum())
                    table = await loop.run_in_executor(self.server._outer_pool, tracker.table)
                    _log.debug("digest table for %s: %d stale chunks rehashed in %.1f ms", self.begin.migration_id,
                               stale, (time.monotonic() - t) * 1e3)
                    await self.chan.send(DigestTable(seq=ev.seq, digests=table, others=self._others()))
                elif isinstance(ev, Switchover):
                    self.t_switchover = time.monotonic()
                    _log.info("migration %s: source paused the workload", self.begin.migration_id)
                    # Downtime has begun: stop competing with it for CPU and
                    # memory bandwidth.  The few pages still to come fault in.
                    mem.prep.stop_populate(wait=False)
                elif isinstance(ev, DeviceState):
                    if ev.total > self.opts.max_device_state:
                        raise RemoteProtocolError(
                            f"device state of {ev.total} bytes exceeds this destination's limit "
                            f"({self.opts.max_device_state})"
                        )
                    if self.device_total is not None and ev.total != self.device_total:
                        raise RemoteProtocolError("DEVICE_STATE pieces disagree on the total size")
                    self.device_total = ev.total
                    self.device += ev.data
                elif isinstance(ev, Commit):
                    _log.debug("migration %s: %d pages received straight into the region", self.begin.migration_id,
                               self.rec.pages_in_place)
                    await self._commit(ev)
                    return True
                else:
                    raise RemoteProtocolError(f"unexpected {type(ev).__name__} during a migration")
            raise LinkError(f"{self.chan.peer} closed the connection mid-migration")
        finally:
            self.chan.conn.release_sink()  # it holds the region: not past the migration

    async def _commit(self, ev: Commit) -> None:
        if ev.migration_id != self.begin.migration_id:
            raise RemoteProtocolError(f"COMMIT names migration {ev.migration_id!r}")
        total = self.device_total or 0
        if len(self.device) != total:
            raise RemoteProtocolError(f"device state incomplete: {len(self.device)} of {total} bytes")
        if xxhash.xxh3_64_intdigest(self.device) != ev.checksum:
            raise RemoteProtocolError("device state checksum mismatch")
        if self.opts.workload is not None:
            await self.opts.workload.check(self.begin.migration_id)  # last chance to say no
        journal = self.server.journal
        assert journal is not None
        try:
            tmp = self.device_state_path.with_name(f".{self.device_state_path.name}.tmp")
            tmp.write_bytes(self.device)
            os.replace(tmp, self.device_state_path)
        except OSError as exc:
            raise RegionError(f"cannot write the device state {self.device_state_path}: {exc}") from exc
        # Write-ahead: the commit record (naming both files) is durable before
        # the region takes its final name, and both before the workload
        # resumes.  A daemon that stops in between completes the rename at
        # its next start (_cleanup_stale_partials).
        record = copy.copy(self.rec)
        record.outcome, record.memory, record.partial = "committed", str(self.final), str(self.partial)
        record.device_state_bytes = len(self.device)
        try:
            journal.write(record)
        except RegionError as exc:
            raise RegionError(f"cannot record the commit in the journal: {exc}") from exc
        try:
            os.replace(self.partial, self.final)
        except OSError as exc:
            # Take the commit back, or the source would be told "committed".
            self.rec.error = f"cannot move the region into place: {exc}"
            self.rec.outcome = "aborted"
            try:
                journal.write(self.rec)
            except RegionError as jexc:
                _log.critical("migration %s: region not moved into place (%s) and the journal "
                              "cannot be corrected (%s)", self.rec.migration_id, exc, jexc)
            raise RegionError(self.rec.error) from exc
        self.rec.outcome, self.rec.memory = "committed", str(self.final)
        self.rec.device_state_bytes = len(self.device)
        self.chan.settled = True  # an ABORT from here on would tell the source to resume
        # Not even a cancellation (the daemon shutting down) may stop the
        # workload from resuming now, nor its source from being told: a
        # source left without COMMITTED while this daemon is gone would end
        # in doubt.  The confirmation is bounded by the send timeout.
        finish = asyncio.ensure_future(self._resume_and_confirm())
        cancelled = False
        while not finish.done():
            try:
                await asyncio.shield(finish)
            except asyncio.CancelledError:
                if not cancelled:
                    _log.warning("migration %s is committed: confirming it before shutting down",
                                 self.begin.migration_id)
                cancelled = True
        finish.result()
        if cancelled:
            raise asyncio.CancelledError()

    async def _resume_and_confirm(self) -> None:
        resumed, timings = True, {}
        if self.opts.workload is not None:
            try:
                timings = await self.opts.workload.resume(
                    self.begin.migration_id, self.final, self.device_state_path)
            except PrecopyError as exc:
                resumed = False
                _log.critical("migration %s is committed here but its workload did not resume: %s; "
                              "resume it by hand from %s and %s", self.begin.migration_id, exc,
                              self.final, self.device_state_path)
        await self.server.run_hook(self.rec, self.final, self.device_state_path)
        if self.t_switchover is not None:
            self.rec.downtime_ms = (time.monotonic() - self.t_switchover) * 1e3
        _log.info("migration %s committed: %s", self.begin.migration_id, self.final)
        # Confirm after the hook is spawned: the source measures downtime
        # up to this message, i.e. until the workload resumes here.
        try:
            await self.chan.send(Committed(migration_id=self.begin.migration_id, resumed=resumed,
                                           timings=timings))
        except PrecopyError as exc:
            _log.warning("could not confirm commit of %s (the source will ask): %s",
                         self.begin.migration_id, exc)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
