"""Post-copy's fault matrix (docs/FAILURES.md "Post-copy"): every post-copy phase x {cut, stall,
SIGKILL of the source agent, SIGKILL of the destination agent}, with real agents, real det guests and
the fault proxy, each cell asserting its documented end:

* ``source``: the fault came before the destination could resume the guest: the source's copy runs
  again (exit 3, or its guardian resumed it), no guest was ever started on the destination;
* ``dest``: the workload runs on the destination and every page arrived byte-exact (the resumed det
  guest's digest equals an unmigrated run's), the source's copy was never resumed (killed under
  ``--on-commit kill``, or left paused at the step the device state names).

A destination agent killed is restarted at once (as systemd would), on the same state directory.

The cells run a few at a time (each is a migration of its own, mostly waiting), the first test to
need one starts them all; each test then checks its own.  No timing assertions: the timeouts below
only bound waits.
"""

from __future__ import annotations

import json
import shlex
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from precopy.protocol import Kind

from .conftest import ENV, PY, SH_PY, ROOT, Dest, Procs, create_region, guest, start_dest, wait_for
from .faultproxy import C2S, S2C, Fault, FaultProxy
from .test_faults import dport
from .test_postcopy import reference_digest

pytestmark = pytest.mark.integration

#: The det guest's steps: the source's runs slowly (paused long before its end), the resumed one at full
#: speed to the end, where its digest (which reads every page) must equal an unmigrated run's.
STEPS = 20000
SOURCE_STEP_US = 1000
#: Cells run at once (each mostly waits: on its guests, a timeout, a retry).
PARALLEL = 4


@dataclass(frozen=True)
class Phase:
    """Where in post-copy the fault strikes: a frame (the first of its kind after POSTCOPY went by, for
    the frames that follow it), its direction, and whether it is delivered before the fault.  On whichever
    connection carries it: a destination slow to start its guest (a loaded machine) may see the source
    ask for the outcome and take the stream up on a new connection before the phase comes."""

    kind: Kind
    direction: str
    after: bool = False
    #: Pushes wait until the guest faulted (the first REQUEST), so that one comes.
    hold_pushes: bool = False
    #: Each of the first SLOW_FRAMES pushes is delayed by SLOW_S, so that the lane opens before the
    #: push ends (a whole 8 MiB region goes in ~0.2 s).
    slow_pushes: bool = False


PHASES: dict[str, Phase] = {
    "missing": Phase(Kind.MISSING, C2S),  # the missing-page bitmap sent, the workload paused
    "postcopy": Phase(Kind.POSTCOPY, C2S),  # the point of no return in flight
    "committed": Phase(Kind.COMMITTED, S2C),  # the guest resumed on the destination, its answer in flight
    "request": Phase(Kind.REQUEST, S2C, hold_pushes=True),  # the resumed guest's first fault
    # The lane just opened (its JOINED delivered): its children start on it -- with the lean frames
    # (precopy.protocol.lane_frames) -- and find it cut, stalled, or their peer gone.
    "lane-joined": Phase(Kind.JOINED, S2C, after=True, slow_pushes=True),
    "pushing": Phase(Kind.PAGES, C2S),  # the background push
    "complete": Phase(Kind.COMPLETE, S2C),  # every page placed, COMPLETE in flight
    "after-complete": Phase(Kind.COMPLETE, S2C, after=True),  # COMPLETE delivered
}
ACTIONS = ("cut", "stall", "kill-source", "kill-dest")
#: The --postcopy immediate modes (every page missing; the destination starts its guest early).
IMMEDIATE = ("immediate", "lane-immediate")
#: ``slow_pushes``: the first pushes (512 pages each) delayed this long each.
SLOW_FRAMES, SLOW_S = 8, 0.25
#: Before POSTCOPY reaches the destination nothing runs there: the source's copy resumes.
BEFORE = ("missing", "postcopy")


def expected(phase: str, action: str) -> str:
    if action == "kill-dest-and-guest":
        return "doubt"  # recovery impossible: nothing holds the guest's userfaultfd any more
    return "source" if phase in BEFORE else "dest"


@dataclass
class Cell:
    phase: str
    action: str
    dir: Path
    mode: str = "now"  # --postcopy (immediate: the cell's id says so)
    procs: Procs = field(default_factory=Procs)
    dests: list[Dest] = field(default_factory=list)
    source: subprocess.Popen[bytes] | None = None
    rc: int | None = None
    report: dict[str, Any] | None = None
    log: str = ""
    fault: Fault | None = None
    source_guest: subprocess.Popen[bytes] | None = None
    restarted: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.phase}-{self.action}" if self.mode == "now" else f"{self.mode}-{self.phase}-{self.action}"

    def dest_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("dest*.log")))

    def why(self) -> str:
        return (f"cell {self.id}: {self.seconds:.1f} s, rc={self.rc} report={json.dumps(self.report)[:1500]}\n--- source log\n"
                f"{self.log[-6000:]}\n--- dest log\n{self.dest_log()[-8000:]}")


def _hook(cell: Cell) -> str:
    """The destination's on-resume hook: a det guest taking part in post-copy, its pid recorded."""
    q = shlex.quote
    return (f"echo $$ > {q(str(cell.dir / 'guest.pid'))}; exec {SH_PY} -m precopy.guest det --memory "
            f"\"$PRECOPY_MEMORY\" --device-state \"$PRECOPY_DEVICE_STATE\" --steps {STEPS} "
            f"--digest-out {q(str(cell.dir / 'resumed.json'))} "
            "--control \"$PRECOPY_POSTCOPY_CONTROL\" --postcopy")


def _start_dest(cell: Cell) -> Dest:
    n = len(cell.dests)
    early = ("--postcopy-guest-early",) if cell.mode in IMMEDIATE else ()  # (READY waits for the guest)
    d = start_dest(cell.procs, cell.dir, "--on-resume", _hook(cell), *early, ready_timeout=120)  # (several at once)
    os.replace(d.log, cell.dir / f"dest{n}.log")  # (a restart writes dest.log afresh: keep each)
    d.log = cell.dir / f"dest{n}.log"
    cell.dests.append(d)
    return d


def _faults(cell: Cell, proxy_box: dict[str, FaultProxy]) -> list[Fault]:
    phase = PHASES[cell.phase]
    seen, faulted = threading.Event(), threading.Event()
    # (after the cell's own fault: a fault on POSTCOPY acts before it is delivered)
    marks = [Fault("call", kind=Kind.POSTCOPY, callback=seen.set)]
    faults: list[Fault] = []

    def when(meta: dict[str, Any]) -> bool:
        if phase.kind in (Kind.MISSING, Kind.POSTCOPY):
            return True
        if phase.kind == Kind.REQUEST:
            faulted.set()
        return seen.is_set()

    if phase.slow_pushes:
        faults += [Fault("delay", kind=Kind.PAGES, nth=n, where=lambda meta: seen.is_set(), conn=None, seconds=SLOW_S)
                   for n in range(1, SLOW_FRAMES + 1)]
    if phase.hold_pushes:  # the first push waits for the guest's first fault (bounded)
        faults.append(Fault("delay", kind=Kind.PAGES, where=lambda meta: seen.is_set(), conn=None,
                            callback=lambda: None if faulted.wait(60) else None))

    def kill_source() -> None:
        assert cell.source is not None
        cell.source.kill()

    def kill_dest() -> None:
        dead = cell.dests[-1]
        dead.proc.kill()
        dead.proc.wait()
        if cell.action == "kill-dest-and-guest":
            wait_for((cell.dir / "guest.pid").exists, timeout=60, what="the destination's guest")
            _kill_pidfile(cell.dir / "guest.pid")
        try:
            new = _start_dest(cell)
            proxy_box["p"].upstream = ("127.0.0.1", dport(new))
        except BaseException as exc:  # noqa: BLE001 -- reported by the cell's checks
            cell.errors.append(f"restarting the destination: {exc!r}")
        cell.restarted.set()

    # The frame's sender dies with it unsent ("hold": nothing more passes); its receiver dies as it
    # arrives ("kill": the dead peer's close reaches the other side).  After COMPLETE: right after it.
    sender_is_source = phase.direction == C2S
    if cell.action == "cut":
        fault = Fault("cut", kind=phase.kind, direction=phase.direction, where=when, after=phase.after, conn=None,
                      keep=20)
    elif cell.action == "stall":
        fault = Fault("stall", kind=phase.kind, direction=phase.direction, where=when, after=phase.after, conn=None)
    else:
        victim_is_source = cell.action == "kill-source"  # (else the destination: kill-dest[-and-guest])
        how = "hold" if victim_is_source == sender_is_source and not phase.after else "kill"
        fault = Fault(how, kind=phase.kind, direction=phase.direction, where=when, after=phase.after, conn=None,
                      callback=kill_source if victim_is_source else kill_dest)
    cell.fault = fault
    return [fault, *marks, *faults]


def run_cell(cell: Cell) -> None:
    """One migration with the cell's fault, up to the source agent's end (the checks wait for the rest)."""
    t0 = time.monotonic()
    try:
        _run_cell(cell)
    finally:
        cell.seconds = time.monotonic() - t0
        print(f"cell {cell.id}: {cell.seconds:.1f} s, rc {cell.rc}")


def _mode_args(mode: str) -> tuple[str, ...]:
    if mode.startswith("lane"):
        return ("--postcopy", "immediate" if mode in IMMEDIATE else "now", "--postcopy-lane")
    return ("--postcopy", mode)


def _run_cell(cell: Cell) -> None:
    cell.dir.mkdir(parents=True)
    src, ctl = cell.dir / "vm.mem", cell.dir / "det.sock"
    create_region(src, "8M", seed=7)
    _start_dest(cell)
    cell.source_guest = cell.procs.start(
        *guest("det", "--memory", str(src), "--steps", str(STEPS), "--control", str(ctl),
               "--step-sleep-us", str(SOURCE_STEP_US)), stdout=open(cell.dir / "det.out", "wb"))
    wait_for(ctl.exists, timeout=60, what="the source's det guest")
    box: dict[str, FaultProxy] = {}
    report = cell.dir / "report.json"
    with FaultProxy(("127.0.0.1", dport(cell.dests[0])), []) as proxy:
        box["p"] = proxy
        proxy.faults = _faults(cell, box)
        cell.source = subprocess.Popen(
            [PY, "-m", "precopy_agents.source_main", "--to", proxy.addr, "--memory", str(src),
             "--guest-control", str(ctl), *_mode_args(cell.mode), "--on-commit", "kill", "--io-timeout", "5",
             "--outcome-retries", "6", "--connect-timeout", "2", "--report", str(report),
             "--log-format", "json", "--progress", "off"],
            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(cell.dir / "source.log", "wb"))
        cell.procs.procs.append(cell.source)
        cell.rc = cell.source.wait(240)
        cell.log = (cell.dir / "source.log").read_text(errors="replace")
        cell.report = json.loads(report.read_text()) if report.exists() else None
        _wait_guardian(cell)  # it may serve through the proxy: keep it up meanwhile
        if cell.action.startswith("kill-dest") and cell.fault is not None and cell.fault.fired.is_set():
            cell.restarted.wait(60)
        if expected(cell.phase, cell.action) == "dest":
            try:
                wait_for((cell.dir / "resumed.json").exists, timeout=120,
                         what="the resumed det guest to finish")
            except AssertionError as exc:
                cell.errors.append(str(exc))


def _guardians(log: Path) -> list[int]:
    """The guardian processes writing to ``log`` (the source agent's standard error)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if "guardian.py" in (entry / "cmdline").read_text() and os.readlink(entry / "fd" / "2") == str(log):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_guardian(cell: Cell) -> None:
    """The source agent's guardian, when it outlives the agent (killed, or post-copy unfinished), settles
    the workload: wait until it has."""
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    pids = _guardians(cell.dir / "source.log")
    wait_for(lambda: not any(alive(p) for p in pids), timeout=180,
             what=f"cell {cell.id}: the guardian to settle the workload")
    cell.log = (cell.dir / "source.log").read_text(errors="replace")


def _guest_step(ctl: Path, resume: bool) -> int:
    """The det guest's step, from a pause's device state (resumed after it if ``resume``).  A raw
    client: GuestControl would resume a guest whose pause failed, and this one may be paused for good."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(ctl))
        reader = sock.makefile("rb")
        sock.sendall(b'{"op": "pause"}\n')
        reply = json.loads(reader.readline())
        assert reply.get("ok"), reply
        blob = reader.read(int(reply["device_state_len"]))
        if resume:
            sock.sendall(b'{"op": "resume"}\n')
            assert json.loads(reader.readline()).get("ok")
    return int(msgpack.unpackb(blob)["step"])


def check_source_runs(cell: Cell) -> None:
    """Rolled back: the source's copy runs again; nothing ever ran on the destination."""
    if cell.action == "kill-source":
        assert cell.rc == -signal.SIGKILL, cell.why()
    else:
        assert cell.rc == 3 and cell.report is not None and cell.report["outcome"] == "aborted", cell.why()
    ctl = cell.dir / "det.sock"
    first = _guest_step(ctl, resume=True)
    wait_for(lambda: _guest_step(ctl, resume=True) > first, timeout=60,
             what=f"cell {cell.id}: the source's guest to run again")
    assert not (cell.dir / "guest.pid").exists(), "a guest was started on the destination\n" + cell.why()
    assert not (cell.dir / "dest" / "vm.mem").exists(), "the region was committed on the destination"


def check_dest_runs(cell: Cell, reference: str) -> None:
    """Post-copy finished: every page on the destination byte-exact, the source's copy never resumed."""
    if cell.action == "kill-source" and not (PHASES[cell.phase].after and cell.rc == 0):
        assert cell.rc == -signal.SIGKILL, cell.why()  # (after COMPLETE: it may have ended first)
    else:
        assert cell.rc == 0 and cell.report is not None and cell.report["outcome"] == "committed", cell.why()
        pc = cell.report["postcopy"]
        assert pc["duplicates"] == 0, pc
        # (A stalled lane is not a stalled page stream: the push brings every page, and the post-copy
        # ends without a reconnection.)
        if (cell.phase, cell.action) == ("lane-joined", "stall"):
            pass
        elif not PHASES[cell.phase].after or cell.phase == "lane-joined":
            assert pc["reconnects"] >= 1, pc  # the stream was taken up again, not rolled back
    got = json.loads((cell.dir / "resumed.json").read_text())
    assert got == {"steps": STEPS, "digest": reference}, cell.why()
    journal = cell.dir / "dest" / ".precopy" / "journal"
    wait_for(lambda: any(json.loads(p.read_text()).get("postcopy") == "complete" for p in journal.glob("*.json")),
             timeout=60, what=f"cell {cell.id}: the destination to record post-copy complete")
    # The source's copy never ran past the pause: stopped (--on-commit kill) or still paused there.
    det = cell.source_guest
    assert det is not None
    assert "digest" not in (cell.dir / "det.out").read_text(), "the source's copy ran to its end"
    if det.poll() is None:
        paused_at = int(msgpack.unpackb((cell.dir / "dest" / "vm.mem.device-state").read_bytes())["step"])
        try:
            step = _guest_step(cell.dir / "det.sock", resume=False)
        except OSError:  # its socket is gone: it is being stopped (--on-commit kill)
            det.wait(60)
        else:
            assert step == paused_at, "the source's copy was resumed"


def check_in_doubt(cell: Cell) -> None:
    """Recovery impossible: exit 4, post-copy BROKEN, the source's copy paused where it was (it holds the
    pages the destination lacks), the journal saying `postcopy: broken` (its guest is gone)."""
    assert cell.rc == 4 and cell.report is not None and cell.report["outcome"] == "in-doubt", cell.why()
    assert "BROKEN" in cell.report["error"], cell.why()
    det = cell.source_guest
    assert det is not None and det.poll() is None, "the source's copy is gone\n" + cell.why()
    paused_at = int(msgpack.unpackb((cell.dir / "dest" / "vm.mem.device-state").read_bytes())["step"])
    assert _guest_step(cell.dir / "det.sock", resume=False) == paused_at, "the source's copy was resumed"
    assert not (cell.dir / "resumed.json").exists(), "the destination's guest finished with pages missing"
    records = [json.loads(p.read_text()) for p in (cell.dir / "dest" / ".precopy" / "journal").glob("*.json")]
    assert [r["postcopy"] for r in records] == ["broken"], records


#: Every phase x every action; and once, recovery made impossible (the destination's guest killed with
#: its daemon: the pages it lacked are only in the source's paused copy).  Then --postcopy immediate
#: (every page in the stream): the push x every action, COMMITTED in flight cut and its source killed.
#: Then ``lane`` (``--postcopy now --postcopy-lane``: faults and answers on a connection of their own):
#: the REQUEST, on the lane, x every action, and the push cut; and with --postcopy immediate, the lane
#: just opened (its children on the lean frames) x every action.
CELLS = ([(p, a, "now") for p in PHASES if p != "lane-joined" for a in ACTIONS] + [("pushing", "kill-dest-and-guest", "now")]
         + [("pushing", a, "immediate") for a in ACTIONS]
         + [("committed", "cut", "immediate"), ("committed", "kill-source", "immediate")]
         + [("request", a, "lane") for a in ACTIONS] + [("pushing", "cut", "lane")]
         + [("lane-joined", a, "lane-immediate") for a in ACTIONS])


class Matrix:
    """Runs the selected cells, PARALLEL at a time, once per session."""

    def __init__(self, base: Path, reference: str, wanted: list[tuple[str, str, str]]) -> None:
        self.cells = {(p, a, m): Cell(p, a, base / f"{m}-{p}-{a}", m) for p, a, m in wanted}
        self.reference = reference
        self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="pc-matrix")
        self.futures: dict[tuple[str, str, str], Future[None]] = {
            key: self._pool.submit(run_cell, cell) for key, cell in self.cells.items()}

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self._pool.shutdown(wait=True)
        for cell in self.cells.values():
            _kill_pidfile(cell.dir / "guest.pid")
            cell.procs.stop_all()


def _kill_pidfile(pidfile: Path) -> None:
    try:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    wanted = [item.callspec.params["cell"] for item in request.session.items
              if item.path == request.path and hasattr(item, "callspec") and "cell" in item.callspec.params]
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path_factory.getbasetemp()
    base = base / f"precopy-pcmatrix-{os.getpid()}-{time.monotonic_ns()}"
    base.mkdir()
    procs = Procs()
    try:
        ref = reference_digest(procs, base, STEPS)
        m = Matrix(base, ref, wanted)
        try:
            yield m
        finally:
            m.close()
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.parametrize("cell", CELLS, ids=[f"{p}-{a}" if m == "now" else f"{m}-{p}-{a}" for p, a, m in CELLS])
def test_postcopy_fault_matrix(matrix: Matrix, cell: tuple[str, str, str]) -> None:
    c = matrix.cells[cell]
    matrix.futures[cell].result(timeout=600)
    assert not c.errors, f"{c.errors}\n{c.why()}"
    assert c.fault is not None and c.fault.fired.is_set(), "the fault never struck\n" + c.why()
    if c.mode in IMMEDIATE:  # nothing was copied before the pause: every page came by the stream
        assert c.report is None or c.report["postcopy"] is None or \
            c.report["postcopy"]["pages_missing"] == 2048, c.why()
    if expected(c.phase, c.action) == "source":
        check_source_runs(c)
    elif expected(c.phase, c.action) == "doubt":
        check_in_doubt(c)
    else:
        check_dest_runs(c, matrix.reference)
