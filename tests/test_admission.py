"""Admission (issue 29): a bounded number of migrations move bytes at once, the rest wait in order.

The FIFO itself is pure (``precopy.policy.admission``); the destination's queue is
driven in process over loopback with fake workloads: queued sources hear
their place (QUEUED, docs/PROTOCOL.md), keep their workloads running, and
go in the order they came.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

import precopy.session.contention
import precopy.session.source
from precopy.policy.admission import Admission, default_max_active
from precopy.errors import MigrationAborted
from precopy.session.contention import ContentionMeter
from precopy.session.options import Progress
from precopy.protocol import Begin

from .test_engine import FakeWorkload, make_region, options, serve


# --------------------------------------------------------------------------
# The FIFO, pure


def test_default_is_one_per_two_cpus_and_at_least_one() -> None:
    assert default_max_active() >= 1


def test_admits_up_to_the_limit_then_queues_in_order() -> None:
    adm = Admission(2)
    a, b, c, d = (adm.join(k) for k in "abcd")
    assert (a.admitted, b.admitted, c.admitted, d.admitted) == (True, True, False, False)
    assert (adm.active, adm.queued) == (2, 2)
    assert (adm.position(a), adm.position(c), adm.position(d)) == (0, 1, 2)
    adm.leave(b)
    assert c.admitted and not d.admitted and adm.position(d) == 1
    adm.leave(c)
    adm.leave(c)  # idempotent: gives back nothing twice
    assert d.admitted and (adm.active, adm.queued) == (2, 0)


def test_a_newcomer_never_overtakes_the_queue() -> None:
    adm = Admission(1)
    a, b = adm.join("a"), adm.join("b")
    adm.leave(a)
    assert b.admitted
    c = adm.join("c")
    assert not c.admitted  # the slot went to b, who waited


def test_leaving_the_queue_moves_those_behind() -> None:
    adm = Admission(1)
    adm.join("a")
    b, c = adm.join("b"), adm.join("c")
    c.moved.clear()
    adm.leave(b)
    assert not b.admitted and adm.position(c) == 1 and c.moved.is_set()


def test_at_once_admits_beyond_the_limit() -> None:
    adm = Admission(1)
    adm.join("a")
    old = adm.join("old-source", at_once=True)
    assert old.admitted and adm.active == 2


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Admission(0)


async def test_wait_returns_on_admission_or_timeout() -> None:
    adm = Admission(1)
    a, b = adm.join("a"), adm.join("b")
    assert not await adm.wait(b)  # the join itself was a move: returns at once
    t = time.monotonic()
    assert not await adm.wait(b, 0.05)
    assert time.monotonic() - t >= 0.04
    asyncio.get_running_loop().call_later(0.05, adm.leave, a)
    assert await adm.wait(b, 5.0)


# --------------------------------------------------------------------------
# The destination's queue, in process


async def _until(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Gate:
    """Holds each migration at its pause until released; records the order of pauses."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.release = asyncio.Event()

    def workload(self, name: str) -> FakeWorkload:
        async def hold() -> None:
            self.order.append(name)
            await self.release.wait()
        return FakeWorkload(on_pause=hold)


async def test_queued_migrations_wait_their_turn_and_hear_their_place(work: Path, dest_dir: Path) -> None:
    regions = [work / f"q{i}.mem" for i in range(3)]
    maps = [make_region(p, 128, seed=i) for i, p in enumerate(regions)]
    gate = Gate()
    heard: dict[str, list[int]] = {p.name: [] for p in regions}

    def progress_of(name: str):
        def cb(p: Progress) -> None:
            if p.phase == "queued":
                heard[name].append(p.queue_position)
        return cb

    async with serve(dest_dir, max_active=1) as server:
        tasks = []
        for p in regions:
            tasks.append(asyncio.create_task(precopy.session.source.migrate(
                options(server, p), gate.workload(p.name), progress_of(p.name))))
            # In order: each BEGIN reaches the destination before the next is sent.
            deadline = time.monotonic() + 20
            while server.admission.active + server.admission.queued < len(tasks):
                assert time.monotonic() < deadline, "a migration never reached the destination"
                await asyncio.sleep(0.01)
        deadline = time.monotonic() + 20
        while not gate.order:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # The first holds its slot at its pause; the others are queued, their workloads untouched.
        assert gate.order == ["q0.mem"]
        assert (server.admission.active, server.admission.queued) == (1, 2)
        await asyncio.sleep(2.5)  # a keep-alive period: QUEUED again
        assert heard["q0.mem"] == []
        assert heard["q1.mem"][:1] == [1] and len(heard["q1.mem"]) >= 2, heard
        assert heard["q2.mem"][:1] == [2], heard
        assert gate.order == ["q0.mem"]
        gate.release.set()
        reports = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert gate.order == [p.name for p in regions]  # first come, first served
    assert [r.outcome for r in reports] == ["committed"] * 3
    assert reports[0].queued_s == 0 and reports[1].queued_s > 2 and reports[2].queued_s > 2
    assert 1 in heard["q2.mem"]  # it moved up when the first finished
    for p in regions:
        assert (dest_dir / p.name).read_bytes() == p.read_bytes()
    recs = {r.name: r for r in server.results}
    assert recs["q2.mem"].queued_s > 2
    del maps


async def test_a_source_that_leaves_the_queue_gives_its_place_to_the_next(work: Path, dest_dir: Path) -> None:
    regions = [work / f"l{i}.mem" for i in range(3)]
    maps = [make_region(p, 64, seed=i) for i, p in enumerate(regions)]
    gate = Gate()
    async with serve(dest_dir, max_active=1) as server:
        first = asyncio.create_task(precopy.session.source.migrate(options(server, regions[0]), gate.workload("l0")))
        await _until(lambda: bool(gate.order), "the first to pause")
        quitter_wl = FakeWorkload()
        quitter = asyncio.create_task(precopy.session.source.migrate(options(server, regions[1]), quitter_wl))
        await _until(lambda: server.admission.queued >= 1, "the second to queue")
        last = asyncio.create_task(precopy.session.source.migrate(options(server, regions[2]), gate.workload("l2")))
        await _until(lambda: server.admission.queued >= 2, "the third to queue")
        quitter.cancel()
        with pytest.raises(MigrationAborted, match="cancelled"):
            await quitter
        assert quitter_wl.calls == []  # never paused: it runs on at the source
        deadline = time.monotonic() + 20
        while server.admission.queued != 1:  # the destination noticed (at its next keep-alive at most)
            assert time.monotonic() < deadline, "the destination kept a place for a source that left"
            await asyncio.sleep(0.05)
        gate.release.set()
        reps = await asyncio.wait_for(asyncio.gather(first, last), 60)
    assert [r.outcome for r in reps] == ["committed"] * 2 and gate.order == ["l0", "l2"]
    assert not (dest_dir / "l1.mem").exists()
    del maps


async def test_a_source_that_cannot_wait_is_served_at_once(work: Path, dest_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A precopy-source from before the queue sends no ``wait``: never QUEUED (it would not
    know the frame), served at once beyond --max-active, as before."""
    regions = [work / f"o{i}.mem" for i in range(2)]
    maps = [make_region(p, 64, seed=i) for i, p in enumerate(regions)]
    gate = Gate()
    monkeypatch.setattr(precopy.session.source, "Begin",
                        lambda **kw: dataclasses.replace(Begin(**kw), wait=False))
    async with serve(dest_dir, max_active=1) as server:
        tasks = [asyncio.create_task(precopy.session.source.migrate(options(server, p), gate.workload(p.name)))
                 for p in regions]
        deadline = time.monotonic() + 20
        while len(gate.order) < 2:  # both reached their pause: both moved bytes at once
            assert time.monotonic() < deadline, f"only {gate.order} paused"
            await asyncio.sleep(0.01)
        assert server.admission.active == 2 and server.admission.queued == 0
        gate.release.set()
        reps = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert [r.outcome for r in reps] == ["committed"] * 2
    del maps


# --------------------------------------------------------------------------
# What the session tells the stop rule about contention


def test_the_session_measures_contention_over_the_round_without_its_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, waited, steal = [100.0], [1.0], [(0, 1000)]
    monkeypatch.setattr(precopy.session.contention.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(precopy.session.contention, "cpu_wait_s", lambda: waited[0])
    monkeypatch.setattr(precopy.session.contention, "steal_ticks", lambda: steal[0])
    sched = [(5.0, 1.0)]  # the process's threads: run, wait
    monkeypatch.setattr(precopy.session.contention, "process_sched", lambda: sched[0])
    meter = ContentionMeter("me")
    meter.measure(0)  # the mark: the round starts here
    clock[0], waited[0], steal[0] = 101.0, 1.5, (10, 1100)
    monkeypatch.setattr(precopy.session.contention, "SENDING", {"me", "other"})
    c = meter.measure(3)  # the destination's last table said 3 others
    assert (c.source_peers, c.dest_peers) == (1, 3)
    assert c.cpu_wait_share == pytest.approx(0.5) and c.steal_share == pytest.approx(0.1)
    # A round that slept 0.75 s of its 1 s waiting for contention to pass: the 0.1 s
    # the sender waited was of 0.25 s awake.
    meter.slept = 0.75
    clock[0], waited[0] = 102.0, 1.6
    c = meter.measure(3)
    assert c.cpu_wait_share == pytest.approx(0.4) and c.steal_share == 0.0
    # The hashing threads starved while the loop's thread waited on the network: 0.3 s
    # run, 0.6 s waited of their runnable time.
    clock[0], waited[0], sched[0] = 103.0, 1.6, (5.3, 1.6)
    c = meter.measure(3)
    assert c.cpu_wait_share == pytest.approx(0.6 / 0.9)
