"""The fault lane's child process at each end (:mod:`precopy.session.postcopy_lane_proc`): its work.

* :func:`serve_source`: the source's lane thread's loop
  (:func:`~precopy.session.postcopy_lane.serve_lane_requests`) over
  :class:`SharedAnswering` -- the paused region mapped read-only here, a page
  claimed on the mask the agent's page stream shares
  (:meth:`~precopy.session.postcopy_stream.PageStream.share`).
* :func:`serve_dest`: the destination's lane loop
  (:meth:`~precopy.session.postcopy_lane.DestLane.work`) with a
  :class:`~precopy.session.postcopy_pages.PagePlacer` of its own over the
  need file the session maps too, the placement times shared, placing under
  the session's lock; what it counted goes back to the session
  (:func:`placer_stats`, merged by :meth:`~precopy.session.postcopy_pages.PagePlacer.merge`).

Where JOIN and JOINED agreed on the lane's lean frames (setup ``fast``), each
runs its lean loop instead, on the bare socket:
:func:`~precopy.session.lane_fast_source.serve_source_fast`,
:class:`~precopy.session.lane_fast_dest.FastDestLane`.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import threading
from typing import Any, Callable

import numpy as np

from precopy.errors import PrecopyError
from precopy.memory.region import GuestMemory
from precopy.net.channel import Channel
from precopy.protocol import Begin, Pages
from precopy.session.lane_fast_dest import FastDestLane
from precopy.session.lane_fast_source import serve_source_fast
from precopy.session.lane_shared import CrossLock, SharedArrays, dest_spec, dump_trace, source_spec
from precopy.session.postcopy_backlog import PushBacklog
from precopy.session.postcopy_lane import DestLane, serve_lane_requests
from precopy.session.postcopy_lane_proc import child_channel, child_setup, say
from precopy.session.postcopy_pages import PagePlacer
from precopy.session.postcopy_stream import pages_from_mapping

__all__ = ["serve_source", "serve_dest", "SharedAnswering", "placer_stats", "cpu_s", "main"]


def cpu_s() -> float:
    """CPU seconds (user + system) this process used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class SharedAnswering:
    """The source child's :class:`~precopy.session.postcopy_lane.Answering`: claims on the shared
    mask under the shared lock; answers counted in the shared counters (the agent folds them in)."""

    def __init__(self, mem: GuestMemory, shared: SharedArrays, lock: Any) -> None:
        self.mem = mem
        self.need = shared["need"]
        self.counters = shared["counters"]
        self.lock = lock

    def claim(self, indices: np.ndarray) -> np.ndarray:
        with self.lock:
            want: np.ndarray = indices[self.need[indices]]
            self.need[want] = False
        return want

    def frame(self, idx: np.ndarray) -> Pages:
        return pages_from_mapping(self.mem, idx)

    def answered(self, pages: np.ndarray, nbytes: int) -> None:
        with self.lock:
            self.counters[0] = int(pages.max())  # the last page answered: the push goes on after it
            self.counters[1] += len(pages)
            self.counters[2] += nbytes


def _lean_socket(cs: dict[str, Any]) -> tuple[socket.socket, bytes]:
    """A lean lane's socket in the child, and the bytes the agent read past JOINED (if any)."""
    sock = socket.socket(fileno=int(cs["sock"]))
    sock.setblocking(True)
    return sock, bytes.fromhex(cs["buffered"])


def serve_source(chan: Channel | None, setup: dict[str, Any], stop: threading.Event, ready: Callable[[], None],
                 out: dict[str, Any]) -> None:
    """The source's child (``chan`` None: the lean frames, on the setup's socket): ``out`` gets its
    CPU, however it ends."""
    npages = int(setup["npages"])
    shared = SharedArrays(int(setup["shared_fd"]), source_spec(npages))
    lock = CrossLock.open(f"/proc/self/fd/{int(setup['shared_fd'])}")
    mem = GuestMemory.open(setup["memory"], writable=False)
    try:
        ready()
        if chan is None:  # the lean frames (lane_fast_source)
            sock, initial = _lean_socket(setup["conn"])
            serve_source_fast(sock, initial, npages, mem.view, shared["need"], shared["counters"], lock,
                              float(setup["io_timeout_s"]), stop)
        else:
            serve_lane_requests(chan, SharedAnswering(mem, shared, lock), npages, float(setup["io_timeout_s"]), stop)
    finally:
        out["cpu_s"] = cpu_s()
        lock.close()
        mem.close()


class ChildHost:
    """The :class:`~precopy.session.postcopy_lane.LaneHost` of the destination's child."""

    def __init__(self, placer: PagePlacer, begin: Begin, uffd: int, clock: np.ndarray) -> None:
        self.placer: PagePlacer | None = placer
        self.lock = threading.Lock()  # (one thread here: the claims across processes are the placer's)
        self.begin = begin
        self._uffd = uffd
        self.backlog = PushBacklog()  # (stays empty: the session holds nothing back while a lane runs)
        self._clock = clock

    @property
    def _seen_empty(self) -> float:
        """The session's last look at an empty userfaultfd (it looks between its frames)."""
        return float(self._clock[0])

    def _place_held(self, frame: Any) -> None:
        assert self.placer is not None
        if frame is not None:
            indices, data, zeros = frame
            self.placer.place(indices, None if data is None else memoryview(data), zeros)

    def _on_fault(self) -> None:
        raise AssertionError("the lane's child reads the faults in its loop")


class ChildLane(DestLane):
    """:class:`DestLane` in the child: the shared mask counted after its placements (the placer
    does) and when idle."""

    look_first = True

    def __init__(self, host: ChildHost) -> None:
        super().__init__(host)  # type: ignore[arg-type]

    def settle(self, idle: bool) -> None:
        placer = self.host.placer
        assert placer is not None
        if idle:  # (the session's placements: it ends the lane itself when it places the last)
            placer.recount()


def serve_dest(chan: Channel | None, setup: dict[str, Any], stop: threading.Event, ready: Callable[[], None],
               out: dict[str, Any]) -> None:
    """The destination's child (``chan`` None: the lean frames, on the setup's socket): ``out`` gets
    what it counted, however it ends."""
    npages = int(setup["npages"])
    need = np.memmap(setup["need_path"], dtype=bool, mode="r+", offset=1, shape=(npages,)).view(np.ndarray)
    shared = SharedArrays(int(setup["shared_fd"]), dest_spec(npages))
    lock = CrossLock.open(setup["need_path"])
    mid, name, size, chunk = setup["begin"]
    begin = Begin(migration_id=mid, name=name, size=size, chunk_pages=chunk)
    placer = PagePlacer(int(setup["uffd"]), int(setup["start"]), npages, np.zeros(0, dtype=np.uint32),
                        int(setup["region_fd"]), minor=bool(setup["minor"]))
    placer.need, placer._placed_t = need, shared["placed_t"]
    placer.share_claims(lock, shared["taken"])
    placer.recount()
    lane: ChildLane | FastDestLane
    if chan is None:  # the lean frames (lane_fast_dest)
        sock, initial = _lean_socket(setup["conn"])
        lane = FastDestLane(placer, sock, initial, shared["clock"], float(setup.get("spin_us", 0)) / 1e6)
    else:
        lane = ChildLane(ChildHost(placer, begin, int(setup["uffd"]), shared["clock"]))
        lane.spin_s = float(setup.get("spin_us", 0)) / 1e6
    try:
        ready()
        if isinstance(lane, FastDestLane):
            lane.run(stop, float(setup["io_timeout_s"]))
        else:
            lane.work(chan, stop, float(setup["io_timeout_s"]))  # type: ignore[arg-type]
    finally:
        out.update(placer_stats(placer), requests=lane.requests, cpu_s=cpu_s())
        lock.close()
        os.close(int(setup["region_fd"]))


def placer_stats(placer: PagePlacer) -> dict[str, Any]:
    """What a child's placer counted, for :meth:`~precopy.session.postcopy_pages.PagePlacer.merge`."""
    return {"faults": placer.faults, "zero_faults": placer.zero_faults, "duplicates": placer.duplicates,
            "present": placer.present, "pushed": placer.pushed, "latencies": placer.latencies,
            "remote": placer.remote_latencies, "inflight": placer.inflight_latencies,
            "outstanding": [[int(p), t] for p, t in placer._fault_t.items()]}


def main() -> int:
    """The child (``python -m precopy.session.postcopy_lane_child FD PID``): the setup from the
    agent, ``ready`` and then one JSON line on stdout (:mod:`precopy.session.postcopy_lane_proc`)."""
    setup, stop = child_setup()
    out: dict[str, Any] = {"ok": True, "stats": {}}
    try:
        chan = None if setup.get("fast") else child_channel(setup["conn"])
        if setup["side"] == "source":
            serve_source(chan, setup, stop, lambda: say("ready"), out["stats"])
        else:
            serve_dest(chan, setup, stop, lambda: say("ready"), out["stats"])
    except (PrecopyError, OSError, ValueError) as exc:
        out.update(ok=False, error=str(exc) or type(exc).__name__)
    out["stats"]["cpus"] = sorted(os.sched_getaffinity(0))  # (where it ran: postcopy_lane_proc.LANE_CPU)
    dump_trace(setup["side"])
    say(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
