"""Exactly one owner when the link breaks around the commit (DESIGN invariant 3).

The source sent COMMIT but never saw COMMITTED: it must ask the destination
for the outcome and resume its workload only on a definite "not committed";
when it cannot learn the outcome it ends in doubt with the workload paused.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

import precopy.session.destination as destination
from precopy.net.channel import LinkError
from precopy.errors import MigrationAborted, MigrationInDoubt
from precopy.protocol import Committed
from precopy.session.journal import Journal, MigrationRecord
from precopy.session.receiver import Receiver

from .test_engine import FakeWorkload, make_region, migrate, serve, settled


def _cut(chan: Any) -> None:
    chan.sock.shutdown(socket.SHUT_RDWR)


def _before_committed(monkeypatch: pytest.MonkeyPatch,
                      hook: Callable[[Any], Awaitable[None]]) -> None:
    """Let the destination commit for real, but run ``hook(migration)`` just
    before it sends COMMITTED (to cut the link or delay the confirmation)."""
    orig = Receiver._commit

    async def commit(self: Any, ev: Any) -> None:
        real_send = self.chan.send

        async def send(event: Any) -> int:
            if isinstance(event, Committed):
                await hook(self)
            return await real_send(event)

        self.chan.send = send
        await orig(self, ev)

    monkeypatch.setattr(Receiver, "_commit", commit)


async def test_commit_persisted_but_confirmation_lost(work: Path, dest_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Committed on the destination, link cut before COMMITTED: the source learns 'committed'."""

    async def cut(migration: Any) -> None:
        _cut(migration.chan)
        raise LinkError("test: link cut before COMMITTED")

    _before_committed(monkeypatch, cut)
    src = work / "vm.mem"
    mm = make_region(src, 256)
    wl = FakeWorkload(blob=b"state")
    async with serve(dest_dir) as server:
        report = await migrate(server, src, wl)
        await settled(server)
    assert report.outcome == "committed"
    assert wl.calls == ["pause"]  # never resumed on the source: it runs on the destination
    assert (dest_dir / "vm.mem").read_bytes() == src.read_bytes()
    del mm


async def test_link_cut_before_commit_persisted_rolls_back(work: Path, dest_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMIT reached a destination that failed before persisting: definite 'not committed'."""

    async def cut_instead(self: Any, ev: Any) -> None:
        _cut(self.chan)
        raise LinkError("test: destination failed before persisting the commit")

    monkeypatch.setattr(Receiver, "_commit", cut_instead)
    src = work / "vm.mem"
    mm = make_region(src, 256)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        with pytest.raises(MigrationAborted) as ei:
            await migrate(server, src, wl)
        await settled(server)
    assert "not committed" in str(ei.value)
    assert wl.calls == ["pause", "resume"]  # the workload runs on the source again
    assert not (dest_dir / "vm.mem").exists()
    assert not list(dest_dir.glob(".*.partial"))
    del mm


async def test_destination_gone_after_commit_sent_is_in_doubt(work: Path, dest_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody answers after COMMIT: exit 'in doubt', workload left paused."""
    servers: list[Any] = []

    async def vanish(self: Any, ev: Any) -> None:
        _cut(self.chan)
        # The whole daemon goes away: no one will answer the outcome query.
        servers[0]._sock.close()
        raise asyncio.CancelledError()

    monkeypatch.setattr(Receiver, "_commit", vanish)
    src = work / "vm.mem"
    mm = make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        servers.append(server)
        with pytest.raises(MigrationInDoubt) as ei:
            await migrate(server, src, wl, outcome_retries=2)
    assert "PAUSED" in str(ei.value)
    assert ei.value.report.outcome == "in-doubt"  # type: ignore[attr-defined]
    assert wl.calls == ["pause"]  # never resumed: it might be running on the destination
    del mm


async def test_journal_failure_at_commit_rolls_back(work: Path, dest_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit cannot be made durable: not committed, region not in place, source resumes."""
    orig = Journal.write

    def failing(self: Any, rec: Any) -> None:
        fields = rec if isinstance(rec, dict) else rec.__dict__
        if fields.get("outcome") == "committed":
            from precopy.errors import RegionError

            raise RegionError("cannot write the journal in test: No space left on device")
        orig(self, rec)

    monkeypatch.setattr(Journal, "write", failing)
    src = work / "vm.mem"
    mm = make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        with pytest.raises(MigrationAborted, match="journal"):
            await migrate(server, src, wl)
        await settled(server)
        assert [r.outcome for r in server.results] == ["aborted"]
    assert wl.calls == ["pause", "resume"]
    assert not (dest_dir / "vm.mem").exists()
    assert not list(dest_dir.glob(".*.partial"))
    del mm


async def test_restart_completes_a_committed_migration_and_aborts_running_ones(dest_dir: Path) -> None:
    """Write-ahead recovery: committed-but-not-renamed is finished, 'running' becomes 'aborted'."""
    from precopy.session.destination import DestinationServer, DestOptions

    dest_dir.mkdir(parents=True)
    journal = Journal(dest_dir)
    partial = dest_dir / ".vm.mem.m-committed.partial"
    partial.write_bytes(b"x" * 4096)
    done = MigrationRecord("m-committed", "vm.mem", 4096, "peer", outcome="committed",
                           memory=str(dest_dir / "vm.mem"), partial=str(partial))
    journal.write(done)
    running_partial = dest_dir / ".other.m-running.partial"
    running_partial.write_bytes(b"y" * 4096)
    journal.write(MigrationRecord("m-running", "other", 4096, "peer"))

    server = DestinationServer(DestOptions(memory_dir=dest_dir, port=0))
    await server.start()
    try:
        assert (dest_dir / "vm.mem").read_bytes() == b"x" * 4096
        assert not partial.exists()
        assert not running_partial.exists()
        assert journal.read("m-running")["outcome"] == "aborted"  # type: ignore[index]
        assert journal.read("m-committed")["outcome"] == "committed"  # type: ignore[index]
    finally:
        await server.close()


async def _run_until_commit_sent(server: Any, src: Path, wl: FakeWorkload) -> tuple[Any, asyncio.Task[Any]]:
    from precopy.session.source import SourceOptions, SourceSession

    session = SourceSession(SourceOptions(host="127.0.0.1", port=server.port, memory=src,
                                          io_timeout_s=10, outcome_retries=3), wl)
    task = asyncio.create_task(session.run())
    for _ in range(500):
        if session.committer.sent or task.done():
            break
        await asyncio.sleep(0.01)
    assert session.committer.sent, "the migration never reached COMMIT"
    return session, task


async def test_interrupt_after_commit_sent_asks_and_keeps_a_committed_migration(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT (a cancel) while waiting for COMMITTED: the source asks, learns 'committed', never resumes."""

    async def late(migration: Any) -> None:
        await asyncio.sleep(0.5)  # committed and resumed here, confirmed late

    _before_committed(monkeypatch, late)
    src = work / "vm.mem"
    mm = make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        session, task = await _run_until_commit_sent(server, src, wl)
        await asyncio.sleep(0.1)
        task.cancel()
        report = await task
        await settled(server)
    assert report.outcome == "committed"
    assert wl.calls == ["pause"]
    assert (dest_dir / "vm.mem").exists()
    del mm


async def test_interrupt_after_commit_sent_rolls_back_when_not_committed(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination had not committed yet: the query stops it for good, the source resumes."""

    async def stuck_commit(self: Any, ev: Any) -> None:
        await asyncio.sleep(60)

    monkeypatch.setattr(Receiver, "_commit", stuck_commit)
    src = work / "vm.mem"
    mm = make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        session, task = await _run_until_commit_sent(server, src, wl)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(MigrationAborted, match="not committed"):
            await task
        await settled(server)
    assert wl.calls == ["pause", "resume"]
    assert not (dest_dir / "vm.mem").exists()
    del mm


async def test_second_interrupt_while_asking_leaves_the_workload_paused(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted again before the outcome is known: in doubt, never resumed."""

    async def stuck_commit(self: Any, ev: Any) -> None:
        await asyncio.sleep(60)

    async def slow_answer(self: Any, chan: Any, q: Any) -> None:
        await asyncio.sleep(60)

    monkeypatch.setattr(Receiver, "_commit", stuck_commit)
    monkeypatch.setattr(destination.DestinationServer, "_answer_query", slow_answer)
    src = work / "vm.mem"
    mm = make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        session, task = await _run_until_commit_sent(server, src, wl)
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.3)  # now it is asking the destination
        task.cancel()
        with pytest.raises(MigrationInDoubt, match="PAUSED"):
            await task
    assert wl.calls == ["pause"]
    del mm
