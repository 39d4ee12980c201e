"""The post-copy fault lane's ends in processes of their own (no interpreter lock shared with the push).

With the lane's end on a thread (:mod:`precopy.session.postcopy_lane`),
each step of a fault's round trip is a little Python between two system
calls, and each system call hands the interpreter lock to the agent's
event loop, busy with the push: getting it back costs up to the switch
interval, several times per fault (benchmarks/RESULTS.md, pcpre and lat22).
Here each end of the lane is a child process of its agent that runs the
same code (:func:`~precopy.session.postcopy_lane.serve_lane_requests`,
:meth:`~precopy.session.postcopy_lane.DestLane.work`) with an interpreter
of its own:

* the **source**'s child maps the paused region read-only itself and
  answers REQUESTs from its mapping; a page is claimed on the "still
  wanted" mask both processes map (:class:`~precopy.session.lane_shared.SharedArrays`)
  under a lock both take (:class:`~precopy.session.lane_shared.CrossLock`):
  it goes on one connection, once;
* the **destination**'s child holds a copy of the guest's userfaultfd and
  of the lane's socket; it reads the faults, REQUESTs them, and places the
  answers under the lock the session places pushes under, on the need file
  both map (:mod:`precopy.session.postcopy_state`): a page is placed once,
  never written after the guest could map it.  Its counts and fault
  latencies come back to the session when it ends (its last line).

The agent hands the child the connection after the lane's handshake (its
socket by ``pass_fds``, the protocol's phase), a JSON setup on stdin; the
child says ``ready`` on stdout once it serves, and at its end one JSON line
(``ok``, ``error``, its stats).  It dies with its agent
(``PR_SET_PDEATHSIG``).  Stopping it: ``SIGUSR1``, then the agent shuts the
socket's reading side (its blocked read returns); the agent waits for it,
so nothing is placed or claimed after the lane's stop returns.  A child
that fails (the lane cut, a protocol error) ends with ``ok: false``: the
agent raises, and the recovery is a broken link's (docs/FAILURES.md).
TLS lanes stay on a thread (the TLS session cannot be handed over).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from precopy.net.channel import Channel, LinkError
from precopy.protocol import Begin
from precopy.session.lane_shared import CrossLock, SharedArrays, dest_spec
from precopy.session.postcopy_pages import PagePlacer
from precopy.session.postcopy_state import mapped_from

__all__ = ["LANE_PROCESS", "process_lane_ok", "run_lane_process", "child_setup", "child_channel", "say", "prestart", "LaneChild",
           "ProcessLane", "SPIN_US", "LANE_CPU", "lane_cpu", "LANE_FAST"]

_log = logging.getLogger(__name__)

#: Serve the lane's ends in processes of their own where the channel allows (plain TCP; TLS: a
#: thread).  ``PRECOPY_LANE_THREAD=1`` in an agent's environment keeps the thread.
LANE_PROCESS = os.environ.get("PRECOPY_LANE_THREAD", "") != "1"
#: Offer and take the lane's lean frames (JOIN / JOINED ``fast``, :mod:`precopy.protocol.lane_frames`)
#: where both ends are child processes: their loops then run
#: :mod:`precopy.session.lane_fast_source` / :mod:`precopy.session.lane_fast_dest`.
#: ``PRECOPY_LANE_FAST=0`` in an agent's environment: never (the lane's frames as before).
LANE_FAST = os.environ.get("PRECOPY_LANE_FAST", "1") != "0"
#: How the lane's children are scheduled (``PRECOPY_LANE_SCHED``): ``fifo`` (SCHED_FIFO 1, where
#: the agent may: woken by a fault or an answer, a child runs at once instead of after the busy
#: push loops' slices -- remote p99 ~5 -> ~2.8 ms, benchmarks/RESULTS.md, lat22; a child blocks in
#: ``poll`` between its steps, unlike the thread whose FIFO was off: it shared the interpreter lock
#: with the loop), ``niceN`` (nice N, e.g. ``nice-10``) or anything else: normal.
LANE_SCHED = os.environ.get("PRECOPY_LANE_SCHED", "fifo")
#: Where the lane's children run (``PRECOPY_LANE_CPU``): ``auto`` -- when the lane's two ends are on
#: this host (its peer is a loopback address or this end's own), both children pin themselves to the
#: same CPU, the highest each may use, and only if they run SCHED_FIFO: a round trip is a ping-pong
#: (one end waits while the other works), and a wake-up across CPUs costs ~20-40 us each way on this
#: machine's VM, four per remote fault (benchmarks/RESULTS.md, "pin22": remote p50 ~385 -> ~213 us);
#: ``off``: never pinned; a CPU number: always pinned there.
LANE_CPU = os.environ.get("PRECOPY_LANE_CPU", "auto")
#: Longest wait for a child's ``ready`` (it imports numpy and the engine: ~0.1-0.3 s idle).
_READY_TIMEOUT_S = 30.0
#: Longest wait for a stopped child to end before it is killed.
_STOP_TIMEOUT_S = 10.0
#: The destination's child looks at the guest's userfaultfd and the lane without waiting for this
#: long (us) before it blocks in ``poll`` (:meth:`~precopy.session.postcopy_lane.DestLane._wait`).
SPIN_US = float(os.environ.get("PRECOPY_LANE_SPIN_US", "0"))
#: The child's last line holds every fault latency it measured (~20 bytes each).
_LINE_LIMIT = 256 * 1024 * 1024
_ROOT = str(Path(__file__).resolve().parents[2])


def process_lane_ok(chan: Channel) -> bool:
    """Whether ``chan``'s end of the lane can go to a child process (a plain socket channel)."""
    return LANE_PROCESS and type(chan) is Channel and chan.pending() == 0


def lane_cpu(how: str, local: str, peer: str, allowed: set[int]) -> tuple[int | None, bool]:
    """The CPU a lane's child pins itself to (:data:`LANE_CPU` = ``how``; ``local`` / ``peer``: the
    lane's addresses; ``allowed``: the agent's CPUs) and whether only at SCHED_FIFO; None: not pinned.
    Raises ``ValueError`` for a ``how`` that is none of ``auto``, ``off``, a CPU number."""
    if how == "off" or not allowed:
        return None, False
    if how != "auto":
        try:
            cpu = int(how)
        except ValueError:
            raise ValueError(f"PRECOPY_LANE_CPU={how!r}: use auto, off or a CPU number") from None
        if cpu not in allowed:
            raise ValueError(f"PRECOPY_LANE_CPU={cpu}: not one of this agent's CPUs {sorted(allowed)}")
        return cpu, False
    try:
        here = ipaddress.ip_address(peer).is_loopback or peer == local
    except ValueError:  # (not an IP address: an AF_UNIX test socket)
        here = False
    return (max(allowed), True) if here else (None, False)


def _lane_cpu(chan: Channel) -> tuple[int | None, bool]:
    try:
        local, peer = chan.sock.getsockname(), chan.sock.getpeername()
    except OSError as exc:  # (the lane is gone already: the child finds out)
        _log.debug("post-copy: the fault lane's addresses: %s", exc)
        return None, False
    if not (isinstance(local, tuple) and isinstance(peer, tuple)):
        return None, False
    try:
        return lane_cpu(LANE_CPU, str(local[0]), str(peer[0]), os.sched_getaffinity(0))
    except ValueError as exc:
        _log.warning("post-copy: the fault lane's processes are not pinned: %s", exc)
        return None, False


def conn_setup(chan: Channel) -> dict[str, Any]:
    """What the child needs of ``chan``'s protocol state (and the bytes read but not handled yet)."""
    conn = chan.conn
    begin = conn.begin
    left = bytes(conn._buf[conn._start:conn._end])
    return {"sock": chan.sock.fileno(), "role": conn.role.value, "phase": conn.phase.name,
            "begin": None if begin is None else [begin.migration_id, begin.name, begin.size, begin.chunk_pages],
            "buffered": left.hex()}


class LaneChild:
    """A lane's child process, started ahead of its lane (:func:`prestart`): its interpreter and
    the engine loaded (~0.5 s of CPU), it waits for the setup and the descriptors, which come over
    a Unix socket (``SCM_RIGHTS``).  It exits when that socket closes unused."""

    def __init__(self, proc: asyncio.subprocess.Process, ctl: socket.socket) -> None:
        self.proc = proc
        self.ctl = ctl

    @classmethod
    async def spawn(cls) -> LaneChild:
        ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ,
                       PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "precopy.session.postcopy_lane_child", str(theirs.fileno()),
                str(os.getpid()), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                pass_fds=[theirs.fileno()], env=env, limit=_LINE_LIMIT)
        except BaseException:
            ctl.close()
            raise
        finally:
            theirs.close()
        return cls(proc, ctl)

    def give(self, setup: dict[str, Any], fds: dict[str, int]) -> None:
        """Hand the child its lane: the setup (JSON) and ``fds`` (name -> descriptor, in the setup
        under the same names)."""
        names = list(fds)
        body = json.dumps({**setup, "fds": names}).encode()
        self.ctl.setblocking(True)
        socket.send_fds(self.ctl, [len(body).to_bytes(4, "little") + body], [fds[n] for n in names])

    def close(self) -> None:
        self.ctl.close()
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                _log.debug("the spare lane child ended already")


#: A child started ahead, per event loop (:func:`prestart`).
_SPARE: dict[asyncio.AbstractEventLoop, asyncio.Task[LaneChild]] = {}


def prestart() -> None:
    """Start a lane's child now, for the next :func:`run_lane_process` of this event loop: its
    imports take ~0.5 s of CPU, during which the session serves the faults on the page stream."""
    loop = asyncio.get_running_loop()
    for other in [lp for lp in _SPARE if lp.is_closed()]:
        del _SPARE[other]
    if LANE_PROCESS and loop not in _SPARE:
        _SPARE[loop] = loop.create_task(LaneChild.spawn())


async def _take() -> LaneChild:
    task = _SPARE.pop(asyncio.get_running_loop(), None)
    if task is not None:
        try:
            child = await task
        except OSError as exc:
            _log.warning("the fault lane's spare process did not start: %s", exc)
        else:
            if child.proc.returncode is None:
                return child
            child.close()
    return await LaneChild.spawn()


async def run_lane_process(chan: Channel, setup: dict[str, Any], fds: dict[str, int],
                           on_ready: Callable[[], None] | None = None,
                           on_stats: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the lane's end in a child until it ends or this is cancelled.

    ``fds``: the descriptors the child takes (by their setup names; ``sock`` is ``chan``'s).
    ``on_ready`` is called once the child serves; ``on_stats`` with what it counted, however it
    ends (when it could say).  Raises :class:`LinkError` when the child failed (the lane is lost);
    cancelled, it stops the child and waits for it first.
    """
    chan._unwatch()  # the child reads it from now on
    cpu, fifo_only = _lane_cpu(chan)
    setup = {**setup, "conn": conn_setup(chan), "sched": LANE_SCHED, "cpu": cpu, "cpu_fifo_only": fifo_only,
             "log_level": logging.getLogger().getEffectiveLevel()}
    child = await _take()
    proc = child.proc
    assert proc.stdout is not None
    line = b""
    try:
        child.give(setup, {"sock": chan.sock.fileno(), **fds})
        async with asyncio.timeout(_READY_TIMEOUT_S):
            first = await proc.stdout.readline()
        if first.strip() != b"ready":
            line = first
            raise LinkError(f"the fault lane's process did not start ({first[:200]!r})")
        if on_ready is not None:
            on_ready()
        line = await proc.stdout.readline()
        await proc.wait()
    except BaseException:
        await _stop(proc, chan)
        if not line:
            line = await asyncio.shield(proc.stdout.read())
        _result(line, proc.returncode, on_stats, quiet=True)
        raise
    finally:
        child.ctl.close()
    _result(line, proc.returncode, on_stats)


def _result(line: bytes, rc: int | None, on_stats: Callable[[dict[str, Any]], None] | None,
            quiet: bool = False) -> None:
    """The child's last line: its stats to ``on_stats``; raises when it failed (unless ``quiet``:
    the caller raises already)."""
    try:
        last = json.loads(line) if line.strip() else None
    except ValueError:
        last = None
    if last is None:
        _log.log(logging.DEBUG if quiet else logging.WARNING,
                 "the fault lane's process ended (exit %s) without saying what it counted", rc)
        if not quiet:
            raise LinkError(f"the fault lane's process ended (exit {rc}) without its result")
        return
    if on_stats is not None:
        on_stats(last.get("stats") or {})
    if not last.get("ok") and not quiet:
        raise LinkError(f"the fault lane failed: {last.get('error')}")


async def _stop(proc: asyncio.subprocess.Process, chan: Channel) -> None:
    """Stop the child (SIGUSR1, its socket's reading side shut) and wait for it, however often
    cancelled meanwhile; killed when it does not end in time."""
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            _log.debug("the fault lane's process ended already")
    try:
        chan.sock.shutdown(socket.SHUT_RD)
    except OSError as exc:
        _log.debug("the fault lane's socket: %s", exc)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while proc.returncode is None:
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                await asyncio.shield(proc.wait())
        except asyncio.CancelledError:
            continue
        except TimeoutError:
            _log.warning("the fault lane's process %d did not stop: killed", proc.pid)
            proc.kill()
            await asyncio.shield(proc.wait())


# -- the child ---------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(3)


def child_channel(cs: dict[str, Any]) -> Channel:
    """The lane's channel in the child: the socket handed over, the protocol where the agent left it."""
    from precopy.protocol import Begin, Role
    from precopy.protocol.phases import Phase

    sock = socket.socket(fileno=cs["sock"])
    sock.setblocking(True)

    async def make() -> Channel:
        return Channel(sock, Role(cs["role"]))

    chan = asyncio.new_event_loop().run_until_complete(make())
    chan.conn.phase = Phase[cs["phase"]]
    if cs["begin"] is not None:
        mid, name, size, chunk = cs["begin"]
        chan.conn.begin = Begin(migration_id=mid, name=name, size=size, chunk_pages=chunk)
    left = bytes.fromhex(cs["buffered"])
    if left:
        chan.conn.receive_data(left)
    return chan


def child_setup() -> tuple[dict[str, Any], threading.Event]:
    """In the child (``argv``: the control socket's descriptor, the agent's pid): die with the
    agent, wait for the lane (:meth:`LaneChild.give`), log as the agent does.  Returns the setup
    (descriptors in place of their names) and the event SIGUSR1 sets."""
    ctl_fd, parent = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent)
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    with socket.socket(fileno=ctl_fd) as ctl:
        msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 16)
        if len(msg) < 4:
            sys.exit(0)  # the agent closed it: not needed
        body = msg[4:]
        while len(body) < int.from_bytes(msg[:4], "little"):
            more = ctl.recv(1 << 20)
            if not more:
                raise ValueError("the fault lane's setup was cut short")
            body += more
    setup = json.loads(body)
    setup.update(zip(setup.pop("fds"), fds))
    setup["conn"]["sock"] = setup["sock"]
    logging.basicConfig(level=int(setup["log_level"]), stream=sys.stderr,
                        format="%(asctime)s precopy-lane[%(process)d] %(levelname)s %(message)s")
    fifo = _prioritize(str(setup.get("sched", "")))
    _pin(setup.get("cpu"), fifo or not setup.get("cpu_fifo_only"))
    return setup, stop


def _prioritize(how: str) -> bool:
    """The child's scheduling (:data:`LANE_SCHED`): woken by a fault or an answer, it should run
    before the busy push loops' time slices end.  Returns whether it runs SCHED_FIFO."""
    try:
        if how == "fifo":
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            return True
        if how.startswith("nice"):
            os.setpriority(os.PRIO_PROCESS, 0, int(how[4:] or -10))
    except (OSError, ValueError) as exc:
        _log.info("post-copy: the fault lane's process runs at normal priority (%s: %s)", how, exc)
    return False


def _pin(cpu: Any, ok: bool) -> None:
    """The child's CPU (:data:`LANE_CPU`, chosen by :func:`lane_cpu`); ``ok``: its condition holds."""
    if cpu is None:
        return
    if not ok:
        _log.info("post-copy: the fault lane's process is not pinned to CPU %s (it does not run SCHED_FIFO)", cpu)
        return
    try:
        os.sched_setaffinity(0, {int(cpu)})
    except OSError as exc:
        _log.info("post-copy: the fault lane's process is not pinned to CPU %s: %s", cpu, exc)


def say(line: str) -> None:
    """A line to the agent (``ready``; the last one, JSON)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ProcessLane:
    """The destination session's side of its lane's child: the state they share (see the module
    docstring); made once per post-copy, for each lane it serves."""

    def __init__(self, placer: PagePlacer, need_path: str) -> None:
        self.shared = SharedArrays.create("precopy-lane", dest_spec(placer.npages))
        self.shared["placed_t"][:] = placer._placed_t
        placer._placed_t = self.shared["placed_t"]
        self.clock = self.shared["clock"]
        self.need_path = need_path
        self.lock = CrossLock.open(need_path)

    @staticmethod
    def need_file(placer: PagePlacer) -> str | None:
        """The need file the placer's mask is mapped from (None: a mask of its own: no child)."""
        return mapped_from(placer.need)

    def setup(self, placer: PagePlacer, begin: Begin, io_timeout_s: float) -> dict[str, Any]:
        return {"side": "dest", "need_path": self.need_path, "start": placer.start, "npages": placer.npages,
                "minor": placer.minor, "io_timeout_s": io_timeout_s, "spin_us": SPIN_US,
                "begin": [begin.migration_id, begin.name, begin.size, begin.chunk_pages]}

    def close(self) -> None:
        self.lock.close()
        self.shared.close()
