"""Soak: many migrations back and forth between two precopy-dest daemons in two
network namespaces, with faults injected into a random third of them.

    python -m benchmarks.soak --migrations 200 --seed 1 [--json tally.json] [--results]

Two "hosts" (network namespaces ``soakNNNN-src`` = side A and ``-dst`` = side
B, joined by a veth pair shaped with ``tc tbf``) each run a ``precopy-dest``
daemon.  Several ``precopy-guest dirty`` guests (guest-control, device state,
half with kernel write tracking offered) start spread over both sides; each
migration moves one guest from one side to the other, the direction
alternating, with the one-shot ``precopy-source`` run in the source side's
namespace.  The receiving daemon's ``--on-resume`` hook fingerprints the
received region and starts the guest again on it (``hook`` below).

A random third of the migrations (exactly ``round(N/3)``, drawn from the
seed) get one fault, at a random moment -- a random byte position of the
source's stream, or a random protocol point (READY, a digest table, the
switchover, the device state, the final verification, COMMIT, COMMITTED):

* ``cut``            the link is cut (the fault proxy closes both sides,
                     after a random few bytes of the frame);
* ``stall``          the link becomes a black hole (no data, no FIN);
* ``kill-source``    SIGKILL of the source agent (its guardian settles the
                     workload);
* ``kill-dest``      SIGKILL of the receiving precopy-dest, restarted after
                     a random 0-10 s (after ~6 s the source has given up
                     asking: in doubt);
* ``restart-dest``   SIGTERM of the receiving precopy-dest (a daemon
                     restart), started again once it has exited.

The daemon of side A is never killed or restarted: it lives through the
whole run, so its RSS, open fds and threads measure leaks over ~N/2
migrations served (a third of them faulted).  Side B takes every daemon
fault; each of its incarnations is measured too.

After each migration the tally settles it: the destination's answer to an
outcome query (the protocol's QUERY, which also stops a migration still
live there) and its journal must agree; exit 0 must mean committed and exit
3 not; in-doubt ends (exit 4, or a guardian's IN DOUBT) are resolved by the
procedure of docs/FAILURES.md ("In doubt: what to do").  Then, for every
guest: exactly one running copy (its region changes) and no other guest
process; a committed region byte-exact (xxh3-128) against its paused source
copy, with the device-state file equal to the guest's last blob; an aborted
one resumed on its source with nothing left under its name on the
destination.  Any violation is printed and makes the exit status 1.

Needs root (namespaces) and ``ip``/``tc``; exits 2 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

FAULT_KINDS = ("cut", "stall", "kill-source", "kill-dest", "restart-dest")
#: Faults that hit the receiving daemon: only migrations into side B get them.
DEST_FAULTS = ("kill-dest", "restart-dest")
PORT = 7070
KEY = "c29hay10ZXN0LWtleS1vZi0zMi1ieXRlcy1leGFjdGx5IQ==\n"

#: Agent timeouts: a stall is noticed within IO_TIMEOUT_S; the destination
#: drops a silent migration after IDLE_TIMEOUT_S (the soak also closes the
#: proxy once the source has ended, which ends it at once).
IO_TIMEOUT_S = 4.0
CONNECT_TIMEOUT_S = 3.0
IDLE_TIMEOUT_S = 10.0
#: A killed destination comes back after a random delay up to this: the
#: source's outcome queries span ~6 s, so some come back too late (in doubt).
KILL_DEST_RESTART_MAX_S = 10.0


class SoakError(Exception):
    """The soak cannot go on (setup failed, a process did not start)."""


# -- small process helpers --------------------------------------------------


def _set_subreaper() -> None:
    """Orphans (hook-started guests, guardians of killed agents) become our children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise SoakError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def _children() -> set[int]:
    out: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            out.update(int(x) for x in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def _state(pid: int) -> str | None:
    """Process state letter, or None when gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:][:1].decode()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (reaping it if it is our child); True if it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        except ChildProcessError:
            if not _alive(pid):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            continue
    return out


def _proc_sample(pid: int) -> dict[str, Any]:
    """RSS (KiB), threads and open fds of a process (/proc/PID/status and /proc/PID/fd)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    fds = _fd_targets(pid)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(fds), "fd_list": fds}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- guests -----------------------------------------------------------------


def _guest_argv(work: Path, spec: dict[str, Any], side: str, memory: str) -> list[str]:
    argv = [PY, "-m", "precopy.guest", "dirty", "--memory", memory, "--rate", str(spec["rate"]),
            "--control", str(work / "sock" / f"{spec['name']}.{side}.sock"),
            "--device-state-size", str(spec["device_state"]),
            "--device-state-out", str(work / "ds" / f"{spec['name']}.{side}.bin"),
            "--seed", str(spec["seed"])]
    if not spec["tracking"]:
        argv.append("--no-tracking")
    return argv


def resume_guest(work: Path, side: str, memory: str, mid: str, by: str) -> dict[str, Any]:
    """Start guest ``memory`` on ``side`` from its received region, once per migration.

    The destination's hook calls this, and so does the soak when a
    committed migration's hook never ran (docs/FAILURES.md: "resume the
    workload there (if the hook did not)"); a lock and a marker per
    migration id make sure only the first of them starts a guest.  The
    region is fingerprinted before the guest runs on it.
    """
    from precopy.guest import region_digest

    rdir = work / "resumed"
    with open(rdir / f"{mid}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = rdir / f"{mid}.json"
        if marker.exists():
            return json.loads(marker.read_text())  # type: ignore[no-any-return]
        name = Path(memory).name
        spec = json.loads((work / "guests.json").read_text())[name]
        digest = region_digest(memory)
        log = open(work / "logs" / f"guest-{name}-{side}-{mid}.log", "wb")
        proc = subprocess.Popen(_guest_argv(work, spec, side, memory), start_new_session=True, env=ENV,
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        info = {"pid": proc.pid, "digest": digest, "by": by, "side": side, "memory": memory}
        _write_json(marker, info)
        return info


def hook_main(args: argparse.Namespace) -> int:
    """The destination's --on-resume hook (run by /bin/sh in the daemon's namespace)."""
    resume_guest(Path(args.work), args.side, os.environ["PRECOPY_MEMORY"], os.environ["PRECOPY_MIGRATION_ID"],
                 "hook")
    return 0


@dataclass
class Guest:
    name: str
    spec: dict[str, Any]
    side: str
    pid: int
    popen: subprocess.Popen[bytes] | None = None


# -- the two sides ----------------------------------------------------------


@dataclass
class Incarnation:
    pid: int
    popen: subprocess.Popen[bytes]
    started_at: int  # migration index
    served: int = 0  # migrations received as destination
    samples: list[dict[str, Any]] = field(default_factory=list)
    ended: str | None = None


@dataclass
class Side:
    name: str  # "A" or "B"
    ns: str
    ip: str
    memdir: Path
    statedir: Path
    incs: list[Incarnation] = field(default_factory=list)

    @property
    def inc(self) -> Incarnation:
        return self.incs[-1]

    def journal(self, mid: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.statedir / ".precopy" / "journal" / f"{mid}.json").read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None


def _run_in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread that has entered network namespace ``ns``."""
    from precopy.lab.netns import enter_in_thread

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_in_thread(ns)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=target, name=f"in-{ns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- the soak ---------------------------------------------------------------


@dataclass
class Plan:
    kind: str
    trigger: str  # "bytes" or a protocol point
    direction: str = "c2s"
    after_bytes: int | None = None
    action: str = ""
    keep: int = 0
    restart_delay_s: float = 0.0


#: Protocol points a fault may be tied to: (name, direction, kind, meta, weight).
#: The commit window weighs more: it is where exactly-one-owner is decided.
def _points() -> list[tuple[str, str, Any, dict[str, Any] | None, int]]:
    from precopy.protocol import Kind

    return [("READY", "s2c", Kind.READY, None, 1),
            ("DIGEST_TABLE", "s2c", Kind.DIGEST_TABLE, None, 1),
            ("SWITCHOVER", "c2s", Kind.SWITCHOVER, None, 1),
            ("DEVICE_STATE", "c2s", Kind.DEVICE_STATE, None, 1),
            ("VERIFY", "c2s", Kind.DIGEST_REQUEST, {"final": True}, 1),
            ("COMMIT", "c2s", Kind.COMMIT, None, 3),
            ("COMMITTED", "s2c", Kind.COMMITTED, None, 2)]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed: int = args.seed
        self.rng = random.Random(self.seed)
        self.tag = f"soak{os.getpid() % 1000000}"
        self.work = Path(args.work_dir or "/dev/shm") / f"{self.tag}-{int(time.time())}"
        self.sides: dict[str, Side] = {}
        self.guests: dict[str, Guest] = {}
        self.hosts: Any = None
        self.records: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.popen_pids: set[int] = set()
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self.drill: int | None = None
        self.kinds = tuple(args.faults.split(","))
        bad = [k for k in self.kinds if k not in FAULT_KINDS]
        if bad:
            raise SoakError(f"unknown fault kind(s) {', '.join(bad)}; choose from {', '.join(FAULT_KINDS)}")

    # -- bookkeeping --

    def violation(self, i: int, msg: str) -> None:
        line = f"migration {i}: {msg}"
        print(f"soak: VIOLATION {line}", flush=True)
        self.violations.append(line)

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"soak [{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def reap(self) -> None:
        """Reap exited orphans that are not subprocess.Popen's to wait for."""
        for pid in _children() - self.popen_pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    # -- setup / teardown --

    def setup(self) -> None:
        from precopy.lab.netns import TwoHosts

        _set_subreaper()
        for d in ("sock", "ds", "logs", "resumed", "reports", "A/mem", "A/state", "B/mem", "B/state"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        key = self.work / "key"
        key.write_text(KEY)
        key.chmod(0o600)
        self.hosts = TwoHosts(self.tag, None if self.args.rate == "none" else self.args.rate).up()
        for name, ns, ip in (("A", self.hosts.src_ns, self.hosts.src_ip), ("B", self.hosts.dst_ns, self.hosts.dst_ip)):
            self.sides[name] = Side(name, ns, ip, self.work / name / "mem", self.work / name / "state")
        for side in self.sides.values():
            self.start_dest(side, at=0)
        specs = {}
        sizes = [int(s) for s in self.args.sizes_mib.split(",")]
        for k in range(self.args.guests):
            name = f"g{k}"
            specs[name] = {"name": name, "size_mib": sizes[k % len(sizes)],
                           "rate": self.rng.choice((500, 1000, 2000, 4000)),
                           "device_state": self.rng.choice((0, 4096, 65536)),
                           "tracking": k % 2 == 0, "seed": self.seed * 100 + k}
        _write_json(self.work / "guests.json", specs)
        for k, (name, spec) in enumerate(specs.items()):
            side = "A" if k % 2 == 0 else "B"
            memory = self.sides[side].memdir / name
            subprocess.run([PY, "-m", "precopy.guest", "create", "--memory", str(memory), "--size",
                            f"{spec['size_mib']}M", "--content", "half-text" if k % 2 else "random",
                            "--seed", str(spec["seed"])], env=ENV, cwd=ROOT, check=True)
            log = open(self.work / "logs" / f"guest-{name}-{side}-initial.log", "wb")
            p = subprocess.Popen(_guest_argv(self.work, spec, side, str(memory)), env=ENV, cwd=ROOT,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            self.popen_pids.add(p.pid)
            self.guests[name] = Guest(name, spec, side, p.pid, p)
        for g in self.guests.values():
            self.wait_socket(g)

    def wait_socket(self, g: Guest, timeout: float = 30.0) -> bool:
        sock = self.work / "sock" / f"{g.name}.{g.side}.sock"
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if not _alive(g.pid) or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def start_dest(self, side: Side, at: int) -> None:
        ready = self.work / f"dest-{side.name}.addr"
        ready.unlink(missing_ok=True)
        log = open(self.work / "logs" / f"dest-{side.name}.log", "ab")
        hook = f"exec {shlex.join([PY, '-m', 'benchmarks.soak', 'hook', '--work', str(self.work), '--side', side.name])}"
        p = subprocess.Popen(
            ["ip", "netns", "exec", side.ns, PY, "-m", "precopy_agents.dest_main", "--listen", f"{side.ip}:{PORT}",
             "--memory-dir", str(side.memdir), "--state-dir", str(side.statedir),
             "--auth-key-file", str(self.work / "key"), "--on-resume", hook, "--ready-file", str(ready),
             "--idle-timeout", str(IDLE_TIMEOUT_S), "--handshake-timeout", "5", "--log-format", "json"],
            env=ENV, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True)
        self.popen_pids.add(p.pid)
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().endswith("\n")):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SoakError(f"precopy-dest on side {side.name} did not start (exit {p.poll()}); "
                                f"see {self.work}/logs/dest-{side.name}.log")
            time.sleep(0.05)
        with self._lock:
            side.incs.append(Incarnation(p.pid, p, at))

    def teardown(self) -> None:
        marker = str(self.work)
        # Everything we started or that runs on our files: guests, hooks, agents, guardians.
        for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
            if pid != os.getpid() and any(marker in a for a in _cmdline(pid)):
                _kill(pid, signal.SIGCONT)
                _kill(pid, signal.SIGKILL)
        for side in self.sides.values():
            for inc in side.incs:
                if inc.popen.poll() is None:
                    inc.popen.terminate()
                    try:
                        inc.popen.wait(15)
                    except subprocess.TimeoutExpired:
                        inc.popen.kill()
                        inc.popen.wait()
        for g in self.guests.values():
            if g.popen is not None:
                g.popen.wait()
        self.reap()
        if self.hosts is not None:
            self.hosts.down()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- one migration --

    def plan(self, i: int, dst: Side, size: int) -> Plan | None:
        if i == self.drill:
            # The in-doubt drill: the receiving daemon dies as COMMIT reaches it and
            # stays down past the source's outcome queries (~6 s): exit 4, settled
            # by the procedure of docs/FAILURES.md.
            return Plan("kill-dest", "COMMIT", "c2s", action="kill", restart_delay_s=9.0)
        if i not in self.faulted:
            return None
        kinds = tuple(k for k in self.kinds if dst.name == "B" or k not in DEST_FAULTS)
        if not kinds:  # only daemon faults asked for, and this migration goes into A
            return None
        kind = self.rng.choice(kinds)
        if self.rng.random() < 0.5:
            plan = Plan(kind, "bytes", "c2s", after_bytes=self.rng.randrange(0, size + size // 10))
        else:
            points = _points()
            name, direction, _, _, _ = self.rng.choices(points, weights=[p[4] for p in points])[0]
            plan = Plan(kind, name, direction)
        if kind == "cut":
            plan.action, plan.keep = "cut", self.rng.choice((0, self.rng.randint(1, 64)))
        elif kind == "stall":
            plan.action = "stall"
        elif kind in ("kill-source", "kill-dest"):
            plan.action = self.rng.choice(("call", "kill"))  # after or instead of forwarding the frame
            plan.restart_delay_s = round(self.rng.uniform(0, KILL_DEST_RESTART_MAX_S), 2)
        else:
            plan.action = "call"
            plan.restart_delay_s = round(self.rng.uniform(0, 1), 2)
        return plan

    def migrate(self, i: int) -> None:
        from tests.faultproxy import Fault, FaultProxy

        want = "A" if i % 2 == 0 else "B"
        if not any(g.side == want for g in self.guests.values()):
            want = "B" if want == "A" else "A"  # every guest is on the other side
        src, dst = self.sides[want], self.sides["B" if want == "A" else "A"]
        g = self.rng.choice(sorted((x for x in self.guests.values() if x.side == src.name), key=lambda x: x.name))
        size = g.spec["size_mib"] << 20
        plan = self.plan(i, dst, size)
        mid = f"{self.tag}-s{self.seed}-m{i:04d}"
        rec: dict[str, Any] = {"i": i, "id": mid, "guest": g.name, "from": src.name, "to": dst.name, "drill": i == self.drill,
                               "fault": None if plan is None else plan.__dict__.copy(), "fired": False}
        agent_box: dict[str, subprocess.Popen[bytes]] = {}
        restarts: list[threading.Thread] = []
        dst_inc = dst.inc
        dst_inc.served += 1

        def kill_source() -> None:
            p = agent_box.get("agent")
            if p is not None:
                _kill(p.pid)

        def restart_dest(sig: int, delay: float) -> None:
            _kill(dst_inc.pid, sig)

            def later() -> None:
                try:
                    dst_inc.popen.wait(60)
                except subprocess.TimeoutExpired:
                    _kill(dst_inc.pid)
                    dst_inc.popen.wait()
                dst_inc.ended = "SIGKILL" if sig == signal.SIGKILL else f"SIGTERM, exit {dst_inc.popen.returncode}"
                time.sleep(delay)
                self.start_dest(dst, at=i)

            t = threading.Thread(target=later, name="restart-dest")
            restarts.append(t)
            t.start()

        proxy = None
        to = f"{dst.ip}:{PORT}"
        if plan is not None:
            callback: Callable[[], None] | None = None
            if plan.kind == "kill-source":
                callback = kill_source
            elif plan.kind == "kill-dest":
                callback = lambda: restart_dest(signal.SIGKILL, plan.restart_delay_s)  # noqa: E731
            elif plan.kind == "restart-dest":
                callback = lambda: restart_dest(signal.SIGTERM, plan.restart_delay_s)  # noqa: E731
            if plan.trigger == "bytes":
                fault = Fault(plan.action, after_bytes=plan.after_bytes, direction="c2s", keep=plan.keep,
                              callback=callback)
            else:
                _, direction, kind, meta, _ = next(p for p in _points() if p[0] == plan.trigger)
                fault = Fault(plan.action, kind=kind, meta=meta, direction=direction, keep=plan.keep,
                              callback=callback)
            proxy = FaultProxy((dst.ip, PORT), [fault], netns=src.ns).__enter__()
            to = proxy.addr
        report = self.work / "reports" / f"{mid}.json"
        alog = self.work / "logs" / f"source-{mid}.log"
        argv = ["ip", "netns", "exec", src.ns, PY, "-m", "precopy_agents.source_main", "--to", to,
                "--memory", str(src.memdir / g.name), "--guest-control", str(self.work / "sock" / f"{g.name}.{src.name}.sock"),
                "--auth-key-file", str(self.work / "key"), "--migration-id", mid, "--report", str(report),
                "--io-timeout", str(IO_TIMEOUT_S), "--connect-timeout", str(CONNECT_TIMEOUT_S),
                "--downtime-ms", str(self.args.downtime_ms), "--progress", "off", "--log-format", "json"]
        t = time.monotonic()
        with open(alog, "wb") as out:
            agent = subprocess.Popen(argv, env=ENV, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True)
        self.popen_pids.add(agent.pid)
        agent_box["agent"] = agent
        try:
            rc: int | None = agent.wait(300)
        except subprocess.TimeoutExpired:
            self.violation(i, "the source agent did not end within 300 s: killed")
            agent.kill()
            rc = agent.wait()
        rec["rc"], rec["seconds"] = rc, round(time.monotonic() - t, 2)
        self.popen_pids.discard(agent.pid)
        # A killed agent's guardian is our child now (subreaper): let it settle the workload.
        for pid in _children() - self.popen_pids:
            if "guardian.py" in " ".join(_cmdline(pid)):
                if not _wait_gone(pid, 90):
                    self.violation(i, f"guardian {pid} still running 90 s after its agent ended")
        for th in restarts:
            th.join()
        if proxy is not None:
            rec["fired"] = bool(proxy.faults[0].fired.is_set())
            proxy.__exit__(None, None, None)
        for side in self.sides.values():
            if side.inc.popen.poll() is not None:  # a daemon died without being asked to
                self.violation(i, f"precopy-dest on side {side.name} exited {side.inc.popen.returncode}")
                side.inc.ended = f"exit {side.inc.popen.returncode}"
                self.start_dest(side, at=i)
        t1 = time.monotonic()
        self.settle(i, rec, g, src, dst)
        self.reap()
        t2 = time.monotonic()
        self.check_guests(i)
        t3 = time.monotonic()
        self.sample(i, rec)
        rec["tally_s"] = [round(t2 - t1, 2), round(t3 - t2, 2), round(time.monotonic() - t3, 2)]
        self.records.append(rec)
        f = rec["fault"]
        self.log(f"#{i} {g.name} {src.name}->{dst.name} {rec['outcome']}"
                 + (f" [{f['kind']} @ {f['trigger']}{'' if rec['fired'] else ', not fired'}]" if f else "")
                 + (f" (in doubt, resolved: {rec['resolved']})" if rec.get("in_doubt") else "")
                 + f" rc={rc} {rec['seconds']} s")

    # -- settling one migration: the tally --

    def ask(self, dst: Side, mid: str) -> str:
        """The destination's answer to an outcome QUERY: committed / not-committed / unknown."""
        from precopy.session.guardian import _ask

        import asyncio

        from precopy.protocol.auth import load_key

        spec = {"host": dst.ip, "port": PORT, "migration_id": mid, "key": load_key(self.work / "key").hex(),
                "retries": 3, "connect_timeout": CONNECT_TIMEOUT_S, "io_timeout": 10.0}

        return str(_run_in_netns(dst.ns, lambda: asyncio.run(_ask(spec))))

    def settle(self, i: int, rec: dict[str, Any], g: Guest, src: Side, dst: Side) -> None:
        mid, rc = rec["id"], rec["rc"]
        alog = (self.work / "logs" / f"source-{mid}.log").read_text(errors="replace")
        guardian_in_doubt = "IN DOUBT" in alog
        answer = self.ask(dst, mid)
        journal = dst.journal(mid)
        jout = None if journal is None else journal.get("outcome")
        rec["journal"] = jout
        committed = jout == "committed"
        if (answer == "committed") != committed:
            self.violation(i, f"outcome query says {answer} but the journal says {jout}")
        if jout == "running":
            self.violation(i, "the journal still says running after the outcome query")
        in_doubt = rc == 4 or (rc == -signal.SIGKILL and guardian_in_doubt)
        rec["in_doubt"] = in_doubt
        if rc == 0 and not committed:
            self.violation(i, f"exit 0 but the destination did not commit (journal: {jout})")
        if rc == 3 and committed:
            self.violation(i, "exit 3 (rolled back) but the destination committed: two owners")
        if rc not in (0, 3, 4, -signal.SIGKILL):
            self.violation(i, f"precopy-source exited {rc} (an internal error?); see logs/source-{mid}.log")
        if rc == -signal.SIGKILL and rec["fault"] and rec["fault"]["kind"] != "kill-source":
            self.violation(i, "the source agent was killed by something else")
        sock = self.work / "sock" / f"{g.name}.{src.name}.sock"
        src_mem = src.memdir / g.name
        dst_mem = dst.memdir / g.name
        if committed:
            rec["outcome"] = "committed"
            # The workload runs on the destination: started by the hook, or by hand
            # when the daemon died before starting it (FAILURES.md, in doubt).
            marker = self.work / "resumed" / f"{mid}.json"
            deadline = time.monotonic() + 20
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            info = resume_guest(self.work, dst.name, str(dst_mem), mid, "hand")
            rec["resumed_by"] = info["by"]
            if in_doubt:
                rec["resolved"] = "committed"
            # The source copy must be paused, and byte-exact with what the destination resumed.
            if self.changes(src_mem, 1.0):
                self.violation(i, f"committed, but the source copy of {g.name} still runs: two owners")
            from precopy.guest import region_digest

            if region_digest(src_mem) != info["digest"]:
                self.violation(i, f"committed region {g.name} differs from its paused source copy")
            blob = (self.work / "ds" / f"{g.name}.{src.name}.bin")
            got = dst.statedir / f"{g.name}.device-state"
            if g.spec["device_state"] and (not blob.exists() or not got.exists()
                                           or blob.read_bytes() != got.read_bytes()):
                self.violation(i, f"device state of {g.name} on the destination is not the guest's last blob")
            _kill(g.pid)
            if g.popen is not None:
                g.popen.wait()
                self.popen_pids.discard(g.pid)
            elif not _wait_gone(g.pid, 10):
                self.violation(i, f"source copy {g.pid} of {g.name} would not die")
            g.side, g.pid, g.popen = dst.name, int(info["pid"]), None
            if not self.wait_socket(g):
                self.violation(i, f"{g.name} resumed on side {dst.name} did not come up")
        else:
            rec["outcome"] = "aborted"
            if in_doubt:
                rec["resolved"] = "aborted"
            if (self.work / "resumed" / f"{mid}.json").exists():
                self.violation(i, f"not committed, but a guest was resumed on side {dst.name}: two owners")
            if not self.changes(src_mem, 5.0):
                if in_doubt:
                    # The documented procedure: not committed -> resume the source copy by hand.
                    self.control(sock, {"op": "resume"})
                    rec["resumed_by"] = "hand"
                    if not self.changes(src_mem, 10.0):
                        self.violation(i, f"{g.name} did not resume on its source after an in-doubt end")
                else:
                    self.violation(i, f"aborted, but {g.name} does not run on its source: lost workload")
            elif in_doubt:
                self.violation(i, f"in doubt, but {g.name} runs on its source (should be left paused)")
            deadline = time.monotonic() + IDLE_TIMEOUT_S + 5
            while time.monotonic() < deadline and (dst_mem.exists() or list(dst.memdir.glob(f".{g.name}.*.partial"))):
                time.sleep(0.1)
            if dst_mem.exists():
                self.violation(i, f"aborted, but {dst_mem} is on the destination")
            if list(dst.memdir.glob(f".{g.name}.*.partial")):
                self.violation(i, f"aborted, but a partial region of {g.name} stayed on the destination")

    def control(self, sock: Path, req: dict[str, Any]) -> dict[str, Any]:
        import socket as _socket

        with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)  # type: ignore[no-any-return]

    def changes(self, path: Path, within: float) -> bool:
        """Whether the region at ``path`` changes within ``within`` seconds (its guest runs)."""
        from precopy.guest import region_digest

        try:
            first = region_digest(path)
        except FileNotFoundError:
            return False
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if region_digest(path) != first:
                return True
        return False

    def check_guests(self, i: int) -> None:
        """Every guest runs in exactly one place; no other guest process exists."""
        known = {g.pid: g for g in self.guests.values()}
        marker = str(self.work)
        for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
            argv = _cmdline(pid)
            if "precopy.guest" in argv and any(marker in a for a in argv) and _alive(pid) and pid not in known:
                self.violation(i, f"an unaccounted guest process {pid} runs: {' '.join(argv[2:6])}")
        for g in self.guests.values():
            if not _alive(g.pid):
                self.violation(i, f"{g.name}'s process {g.pid} on side {g.side} is gone: lost workload")
                continue
            if not self.changes(self.sides[g.side].memdir / g.name, 10.0):
                self.violation(i, f"{g.name} does not run on side {g.side}: lost workload")

    # -- leaks --

    def sample(self, i: int, rec: dict[str, Any]) -> None:
        """Both daemons at rest: RSS, threads, fds (fds waited for to settle: lingering links close in ~1 s)."""
        for side in self.sides.values():
            inc = side.inc
            s = _proc_sample(inc.pid)
            if inc.samples:
                deadline = time.monotonic() + 5
                while s["fds"] > inc.samples[0]["fds"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                    s = _proc_sample(inc.pid)
            if inc.samples:
                base = inc.samples[0]["fd_list"]
                s["fd_extra"] = [t.split(":", 1)[1] for t in s["fd_list"] if t not in base]
            inc.samples.append({"i": i, "served": inc.served, **s})

    # -- the run --

    def run(self) -> int:
        n = self.args.migrations
        self.faulted = set(self.rng.sample(range(n), round(n * self.args.fault_fraction)))
        # Migration 0 goes from A into B, where daemon faults are drawn.
        self.drill = 0 if self.args.in_doubt_drill and n else None
        if self.drill is not None and self.drill not in self.faulted and self.faulted:
            self.faulted.remove(max(self.faulted))  # still round(N/3) faulted in all
        if self.drill is not None:
            self.faulted.add(self.drill)
        self.setup()
        self.log(f"seed {self.seed}: {n} migrations, {len(self.faulted)} faulted, guests "
                 + ", ".join(f"{g.name} {g.spec['size_mib']} MiB @ {g.spec['rate']} pages/s on {g.side}"
                             for g in self.guests.values()) + f"; work dir {self.work}")
        for side in self.sides.values():
            self.sample(-1, {})
        for i in range(n):
            self.migrate(i)
        return 0

    def tally(self) -> dict[str, Any]:
        by_kind: dict[str, dict[str, int]] = {}
        for r in self.records:
            f = r["fault"]
            kind = "none" if f is None else (f["kind"] if r["fired"] else f"{f['kind']} (not fired)")
            row = by_kind.setdefault(kind, {"migrations": 0, "committed": 0, "aborted": 0, "in_doubt": 0,
                                            "resumed_by_hand": 0})
            row["migrations"] += 1
            row[r["outcome"]] += 1
            row["in_doubt"] += bool(r.get("in_doubt"))
            row["resumed_by_hand"] += r.get("resumed_by") == "hand"
        leaks = {}
        for side in self.sides.values():
            incs = []
            for inc in side.incs:
                warm = [s for s in inc.samples if s["served"] >= self.args.warmup]
                incs.append({"pid": inc.pid, "started_at": inc.started_at, "served": inc.served,
                             "ended": inc.ended, "start": warm[0] if warm else None,
                             "end": warm[-1] if warm else None,
                             "samples": [{k: v for k, v in x.items() if k != "fd_list"} for x in inc.samples]})
            leaks[side.name] = incs
        return {"seed": self.seed, "migrations": len(self.records), "faulted": len(self.faulted),
                "warmup": self.args.warmup,
                "by_kind": by_kind, "leaks": leaks, "violations": self.violations,
                "seconds": round(time.monotonic() - self.t0, 1), "records": self.records,
                "guests": {g.name: g.spec for g in self.guests.values()}, "rate": self.args.rate}


def check_leaks(tally: dict[str, Any], warmup: int) -> list[str]:
    """Leak verdicts on the long-lived daemon (side A) and every incarnation of side B.

    fds: exactly back to the warm baseline at rest (a leaked socket, file or
    pidfd per migration would show at once); threads: at most 4 over the
    warm baseline (the lazily started workers of the daemon's bounded pools,
    2 + 2 + asyncio's default executor); RSS: at most 16 MiB + 10 % over the
    warm baseline (allocator arenas and the largest region's receive
    buffers come and go; the per-migration leak this would hide is under
    16 MiB / (N/2) migrations served).
    """
    out = []
    for side, incs in tally["leaks"].items():
        for inc in incs:
            a, b = inc["start"], inc["end"]
            if a is None or b is None or inc["served"] <= warmup:
                continue
            who = f"precopy-dest {side} (pid {inc['pid']}, {inc['served']} migrations served)"
            if b["fds"] > a["fds"]:
                out.append(f"{who}: open fds {a['fds']} -> {b['fds']} (new: {', '.join(b.get('fd_extra') or [])}; "
                           f"first seen after migration "
                           f"{next((x['i'] for x in inc.get('samples', []) if x['fds'] > a['fds']), '?')})")
            if b["threads"] > a["threads"] + 4:
                out.append(f"{who}: threads {a['threads']} -> {b['threads']}")
            if b["rss_kib"] > a["rss_kib"] * 1.10 + 16 * 1024:
                steps = [(x["i"], x["rss_kib"]) for x in inc.get("samples", []) if x["served"] >= warmup]
                out.append(f"{who}: RSS {a['rss_kib']} -> {b['rss_kib']} KiB (after each migration: {steps})")
    return out


def render(tally: dict[str, Any], command: str) -> str:
    lines = [f"`{command}` (seed {tally['seed']}, {tally['migrations']} migrations, {tally['faulted']} with a "
             f"fault, {tally['seconds']:.0f} s, link {tally['rate']}):", "",
             "| fault | migrations | committed | aborted | in doubt (resolved) | resumed by hand |",
             "|---|---|---|---|---|---|"]
    order = ["none", *FAULT_KINDS]
    for kind in sorted(tally["by_kind"], key=lambda k: (order.index(k.split(" ")[0]), k)):
        r = tally["by_kind"][kind]
        lines.append(f"| {kind} | {r['migrations']} | {r['committed']} | {r['aborted']} | {r['in_doubt']} | "
                     f"{r['resumed_by_hand']} |")
    lines += ["", "| daemon | migrations served | RSS MiB start -> end | threads | open fds |", "|---|---|---|---|---|"]
    for side, incs in tally["leaks"].items():
        shown = incs if side == "A" else sorted(incs, key=lambda x: -x["served"])[:3]
        for inc in shown:
            a, b = inc["start"], inc["end"]
            if a is None:
                continue
            lines.append(f"| {side} pid {inc['pid']} | {inc['served']} | {a['rss_kib'] / 1024:.1f} -> "
                         f"{b['rss_kib'] / 1024:.1f} | {a['threads']} -> {b['threads']} | {a['fds']} -> {b['fds']} |")
    b = tally["leaks"].get("B", [])
    lines += ["", f"Side A's daemon ran through the whole soak; side B's took every daemon fault: {len(b)} "
              "incarnations, the three that served most shown. Start = after the daemon's first "
              f"{tally.get('warmup', '?')} migrations served, end = after the last; at rest between migrations. "
              "Rule: fds back to the start exactly, threads within +4, RSS within 16 MiB + 10 %.",
              "", f"Violations: {len(tally['violations'])}" + "".join(f"\n* {v}" for v in tally["violations"])]
    return "\n".join(lines) + "\n"


def update_results(results_md: Path, body: str, tally: dict[str, Any]) -> None:
    """Replace the text between the soak markers of RESULTS.md (appended the first time)."""
    import re

    begin, end = "<!-- soak:begin -->", "<!-- soak:end -->"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    verdict = "no violation, no leak" if not (tally["violations"] or tally["leak_verdicts"]) else "FAILED"
    section = f"{begin}\nRun {when}: {verdict}.\n\n{body}{end}"
    text = results_md.read_text()
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Soak: migrations with faults (`make soak`)\n\n{section}\n"
    results_md.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    hk = sub.add_parser("hook", help="(internal) the destination's --on-resume hook")
    hk.add_argument("--work", required=True)
    hk.add_argument("--side", required=True)
    ap.add_argument("--migrations", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--sizes-mib", default="16,32,48,64", help="region sizes, cycled over the guests")
    ap.add_argument("--rate", default="1gbit", help="tc rate of the link ('none': unshaped)")
    ap.add_argument("--downtime-ms", type=float, default=300)
    ap.add_argument("--faults", default=",".join(FAULT_KINDS),
                    help=f"fault kinds to draw from, comma-separated (default: all: {','.join(FAULT_KINDS)})")
    ap.add_argument("--fault-fraction", type=float, default=1 / 3,
                    help="share of the migrations that get a fault (default 1/3)")
    ap.add_argument("--in-doubt-drill", action="store_true",
                    help="migration 0 (one of the faulted third): the receiving daemon is killed as COMMIT "
                         "reaches it and comes back after 9 s, when the source has given up asking (exit 4)")
    ap.add_argument("--warmup", type=int, default=4, help="migrations a daemon serves before its leak baseline")
    ap.add_argument("--work-dir", help="parent of the work directory (default /dev/shm)")
    ap.add_argument("--json", help="write the tally here")
    ap.add_argument("--update-results", action="store_true",
                    help="rewrite the soak section of benchmarks/RESULTS.md with this run's tables")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, journals)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "hook":
        return hook_main(args)
    import logging

    # The outcome queries the tally makes log the engine's warnings: its own
    # lines say what matters.
    logging.basicConfig(level=logging.WARNING, format="soak: %(name)s: %(message)s")
    for name in ("precopy", "precopy-guardian"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from precopy.lab.netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"soak: cannot run: {reason}", file=sys.stderr)
        return 2
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    try:
        soak = Soak(args)
    except SoakError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python -m benchmarks.soak --migrations %d --seed %d%s" % (
        args.migrations, args.seed, " --in-doubt-drill" if args.in_doubt_drill else "")
    try:
        soak.run()
    except SoakError as exc:
        print(f"soak: {exc} (seed {args.seed})", file=sys.stderr)
        soak.violations.append(f"setup: {exc}")
    finally:
        tally = soak.tally()
        soak.teardown()
    leaks = check_leaks(tally, args.warmup)
    tally["leak_verdicts"] = leaks
    if args.json:
        _write_json(Path(args.json), tally)
    text = render(tally, command)
    print(text)
    if args.update_results:
        update_results(ROOT / "benchmarks" / "RESULTS.md", text, tally)
    for v in leaks:
        print(f"soak: LEAK {v}")
    bad = bool(tally["violations"] or leaks)
    print(f"soak: {'FAILED' if bad else 'passed'} (seed {args.seed}; rerun: {command})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
