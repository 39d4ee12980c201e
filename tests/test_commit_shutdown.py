"""The destination shutting down around a commit (in process, deterministic)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import precopy.session.destination as destination
from precopy.session.receiver import Receiver
from precopy.errors import MigrationAborted

from .test_engine import FakeWorkload, make_region, migrate, serve, settled


async def test_shutdown_during_commit_still_confirms(work: Path, dest_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """close() (SIGTERM) while a committed migration spawns its hook: COMMITTED is still
    sent, so the source learns 'committed' on the same connection (no in-doubt)."""
    orig = destination.DestinationServer.run_hook
    closing: list[asyncio.Task[Any]] = []

    async def slow_hook(self: Any, rec: Any, memory: Path, device_state: Path) -> None:
        closing.append(asyncio.create_task(self.close()))  # the daemon is told to stop now
        await asyncio.sleep(0.3)
        await orig(self, rec, memory, device_state)

    monkeypatch.setattr(destination.DestinationServer, "run_hook", slow_hook)
    src = work / "vm.mem"
    mm = make_region(src, 128)
    wl = FakeWorkload(blob=b"dev")
    async with serve(dest_dir) as server:
        report = await migrate(server, src, wl, outcome_retries=1)
        await asyncio.gather(*closing)
    assert report.outcome == "committed"
    assert wl.calls == ["pause"]
    assert (dest_dir / "vm.mem").read_bytes() == src.read_bytes()
    del mm


async def test_abort_in_answer_to_commit_is_definite(work: Path, dest_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination answers COMMIT with ABORT (here: it is shutting down before it
    committed): that is a definite 'not committed'; the source resumes without asking."""

    servers: list[Any] = []

    async def shut_down_instead(self: Any, ev: Any) -> None:
        asyncio.get_running_loop().call_soon(lambda: [t.cancel() for t in servers[0]._tasks])
        await asyncio.sleep(10)

    monkeypatch.setattr(Receiver, "_commit", shut_down_instead)
    asked: list[Any] = []
    orig_answer = destination.DestinationServer._answer_query

    async def answer(self: Any, chan: Any, q: Any) -> None:
        asked.append(q)
        await orig_answer(self, chan, q)

    monkeypatch.setattr(destination.DestinationServer, "_answer_query", answer)
    src = work / "vm.mem"
    mm = make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        servers.append(server)
        with pytest.raises(MigrationAborted, match="refused the commit"):
            await migrate(server, src, wl)
        await settled(server)
        assert [r.outcome for r in server.results] == ["aborted"]
    assert wl.calls == ["pause", "resume"]
    assert asked == []
    assert not (dest_dir / "vm.mem").exists()
    assert not list(dest_dir.glob(".*.partial"))
    del mm


async def test_a_committed_migration_never_sends_abort(work: Path, dest_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled twice after the rename (the confirmation itself interrupted): the
    destination closes without ABORT, so the source asks and learns 'committed'."""
    orig = destination.DestinationServer.run_hook

    async def hook_cancelled_twice(self: Any, rec: Any, memory: Path, device_state: Path) -> None:
        task = next(iter(self._tasks))
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0.1)
        await orig(self, rec, memory, device_state)

    monkeypatch.setattr(destination.DestinationServer, "run_hook", hook_cancelled_twice)
    src = work / "vm.mem"
    mm = make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        report = await migrate(server, src, wl)
        await settled(server)
    assert report.outcome == "committed"
    assert wl.calls == ["pause"]
    assert (dest_dir / "vm.mem").read_bytes() == src.read_bytes()
    del mm
