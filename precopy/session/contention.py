"""What competes with a migration for the CPUs and the link, measured over each round.

The stop rule (:class:`precopy.policy.switchover.Contention`) waits out
contention rather than add to it; this measures it from the scheduler's
counters (/proc) and from the other migrations of this process and of the
destination.
"""

from __future__ import annotations

import os
import time

from precopy.policy.switchover import Contention

__all__ = ["SENDING", "ContentionMeter", "cpu_wait_s", "process_sched", "steal_ticks"]


def cpu_wait_s() -> float:
    """Seconds the calling thread has waited for a CPU (runnable, not running); 0.0 where unknown."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def process_sched() -> tuple[float, float]:
    """Seconds this process's threads have run and waited for a CPU, summed; (0, 0) where unknown.

    A migration's CPU work is mostly in its hashing and scanning threads,
    whose waits the event loop's thread never sees.
    """
    run = wait = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0, 0.0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return run / 1e9, wait / 1e9


def steal_ticks() -> tuple[int, int]:
    """(steal, all) CPU ticks of the host so far (/proc/stat); (0, 0) where unknown."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


#: Migrations of this process moving bytes now (past the destination's
#: queue): the others are contention for each (precopy.policy.switchover.Contention).
SENDING: set[str] = set()


class ContentionMeter:
    """What competed with one migration since the last :meth:`measure` (the round just done).

    ``slept``: of the time since then, how long the migration slept waiting
    for contention to pass (never runnable: not the round's).
    """

    def __init__(self, migration_id: str) -> None:
        self.migration_id = migration_id
        #: At the last measure: (monotonic, this thread's CPU wait, steal ticks, the process's (run, wait)).
        self.mark: tuple[float, float, tuple[int, int], tuple[float, float]] = (0.0, 0.0, (0, 0), (0.0, 0.0))
        self.slept = 0.0

    def measure(self, dest_peers: int) -> Contention:
        """Contention since the last call; ``dest_peers``: the other migrations the destination receives."""
        now, waited, steal, (run, pwait) = time.monotonic(), cpu_wait_s(), steal_ticks(), process_sched()
        t0, w0, s0, (run0, pwait0) = self.mark
        self.mark = (now, waited, steal, (run, pwait))
        # Time spent waiting for contention to pass (asleep, never runnable) is not the round's.
        wall = now - t0 - self.slept if t0 else 0.0
        self.slept = 0.0
        ticks = steal[1] - s0[1]
        # The share of the round the event loop's thread waited for a CPU, or
        # of the time the process's threads (hashing, scanning) were runnable,
        # the larger: a starved scan inflates the floor with the loop idle.
        share = min(max(waited - w0, 0.0) / wall, 1.0) if wall > 0 else 0.0
        busy_s = max(run - run0, 0.0) + max(pwait - pwait0, 0.0)
        if t0 and busy_s >= 0.01:
            share = max(share, max(pwait - pwait0, 0.0) / busy_s)
        return Contention(
            source_peers=len(SENDING - {self.migration_id}),
            dest_peers=dest_peers,
            cpu_wait_share=share,
            steal_share=(steal[0] - s0[0]) / ticks if t0 and ticks > 0 else 0.0,
        )
