"""Post-copy (issue 22): a full-speed sweep that pre-copy cannot converge, moved by post-copy.

    python -m benchmarks.postcopy [--size-mib 1024] [--runs 3] [--postcopy auto|now|immediate] [--guest-start early]

Per run, interleaved, each on a fresh destination daemon over loopback:

* ``idle``: the same region with an idle guest, plain pre-copy: the yardstick
  for "time until the last page";
* ``sweep``: a full-speed sweep guest (every page's first byte, round and
  round: never converges), ``--postcopy auto`` (or ``now``; or ``immediate``: switched over
  right after the handshake, the post-copy push being the whole copy); the destination's
  ``--on-resume`` hook starts the same sweep guest with ``--postcopy`` --
  when the migration begins, held (``--guest-start early``, the default:
  ``precopy-dest --postcopy-guest-early``), or at the switchover
  (``--guest-start switchover``).
  Once COMPLETE came, the destination's guest is paused and its region held
  against the source's (paused at the switchover, ``--on-commit
  keep-stopped``): every byte but the first of every page must be the
  source's, and the first bytes must read as the destination's sweep over
  the source's -- each page incremented the same number of times, one more
  for those before where it stands (no page lost, none overwritten after
  the guest wrote it), exactly as many as the guest's own count of pages
  written says (its ``--stats-out``, once stopped; :func:`sweep_steps`).

Reports per run: pause to running on the destination (``switchover_ms``: the
source's pause until COMMITTED), time until the last page (start to
COMPLETE, against the idle migration's total), the throttle, pages faulted
and pushed, the fault latency on the destination (p50/p99/max).  Ratios
are taken within a run; absolute times need a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PAGE = 4096


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Run:
    """One migration: a region, a source guest, a destination daemon, the source agent."""

    def __init__(self, work: Path, size_mib: int, guest_args: list[str], hook: str | None,
                 dest_args: tuple[str, ...] = ()) -> None:
        self.work = work
        work.mkdir(parents=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.src = work / "vm.mem"
        subprocess.run([PY, "-m", "precopy.guest", "create", "--memory", str(self.src), "--size",
                        f"{size_mib}M", "--content", "random"], env=_env(), check=True)
        self.ctl = work / "g.sock"
        self.guest = self._start([PY, "-m", "precopy.guest", "dirty", "--memory", str(self.src), "--control",
                                  str(self.ctl), *guest_args])
        _wait(self.ctl.exists, 30, "the source guest")
        ready = work / "dest.addr"
        dest = [PY, "-m", "precopy_agents.dest_main", "--listen", "127.0.0.1:0", "--memory-dir",
                str(work / "dest"), "--ready-file", str(ready), "--log-level", "warning"]
        self.dest = self._start(dest + (["--on-resume", hook] if hook else []) + list(dest_args),
                                stderr=open(work / "dest.log", "wb"))
        _wait(lambda: ready.exists() and ready.read_text().endswith("\n"), 30, "precopy-dest")
        self.addr = ready.read_text().strip()

    def _start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env=_env(), cwd=ROOT, **kw)
        self.procs.append(p)
        return p

    def migrate(self, *extra: str) -> dict[str, Any]:
        report = self.work / "report.json"
        dest_cpu, src_cpu = _cpu_s(self.dest.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([PY, "-m", "precopy_agents.source_main", "--to", self.addr, "--memory", str(self.src),
                            "--guest-control", str(self.ctl), "--report", str(report), "--progress", "off",
                            "--log-level", "warning", *extra], env=_env(), cwd=ROOT, capture_output=True,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"precopy-source exited {r.returncode}: {r.stderr.decode()[-2000:]}")
        rep: dict[str, Any] = json.loads(report.read_text())
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # (the source agent: the one child reaped)
        rep["cpu_s"] = {"source": after.ru_utime + after.ru_stime - src_cpu.ru_utime - src_cpu.ru_stime,
                        "dest": _cpu_s(self.dest.pid) - dest_cpu}
        return rep

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_sweep(src: Path, dest: Path, written: int | None = None) -> dict[str, Any]:
    """The destination's region held against the source's (see the module docstring); ``written``:
    the pages the destination's sweep guest wrote, when known (:meth:`DestSweep.stop`)."""
    a = np.memmap(src, dtype=np.uint8, mode="r").reshape(-1, PAGE)
    b = np.memmap(dest, dtype=np.uint8, mode="r").reshape(-1, PAGE)
    rest_ok = True
    for lo in range(0, len(a), 16384):  # 64 MiB at a time
        if not np.array_equal(a[lo:lo + 16384, 1:], b[lo:lo + 16384, 1:]):
            rest_ok = False
            break
    return {"rest_exact": rest_ok, **sweep_steps(b[:, 0], a[:, 0], written)}


def sweep_steps(dest_first: np.ndarray, src_first: np.ndarray, written: int | None = None) -> dict[str, Any]:
    """Whether the destination's first bytes read as its sweep continued over the source's.

    A sweep guest that ran ``k`` whole sweeps on the destination and stands at
    page ``c`` has added ``k + 1`` to every page before ``c`` and ``k`` to the
    rest.  A first byte is a ``uint8``: ``k`` is known only mod 256 (a 32 MiB
    sweep takes well under a millisecond, so ``k`` is any residue), and so is
    ``d`` (destination - source): one value on every page, or ``k + 1`` then
    ``k`` **mod 256** -- ``k = 255`` reads as d = 0 before ``c`` and 255 after,
    and is a correct sweep.  ``sweeps`` is ``k`` mod 256, ``at_page`` is ``c``
    (0: no step), ``runs`` each run of equal d (the first 16), ``steps`` their
    number less one.

    With ``written`` (the pages the destination's guest wrote, counted by
    the guest itself) ``k`` and ``c`` are known, ``divmod(written, pages)``,
    and every page's d must be exactly what they say (``expected_sweeps``,
    ``expected_at_page``): that also catches a copy one whole sweep stale,
    which the shape alone cannot tell from one sweep fewer on the destination.
    """
    d = (dest_first.astype(np.int16) - src_first.astype(np.int16)) % 256
    steps = np.flatnonzero(np.diff(d) != 0)
    sweep_ok = bool(len(steps) == 0 or (len(steps) == 1 and (int(d[0]) - int(d[-1])) % 256 == 1))
    starts = [0, *(int(i) + 1 for i in steps[:15])]  # (what a failure looks like: each run of equal d)
    out: dict[str, Any] = {"sweep_ok": sweep_ok, "sweeps": int(d[-1]) if len(d) else 0,
                           "at_page": int(steps[0] + 1) if len(steps) else 0,
                           "runs": [[p, int(d[p])] for p in starts], "steps": int(len(steps))}
    if written is not None and len(d):
        k, c = divmod(written, len(d))
        want = np.full(len(d), k % 256, dtype=np.int16)
        want[:c] = (k + 1) % 256
        out.update(written=written, expected_sweeps=k % 256, expected_at_page=c)
        out["sweep_ok"] = sweep_ok and bool(np.array_equal(d, want))
    return out


async def _pause(path: str) -> None:
    from precopy.workload.control import GuestControl

    g = GuestControl(path, timeout_s=30)
    await g.pause()
    await g.close()


class DestSweep:
    """The destination's guest, started by its daemon's ``--on-resume`` :attr:`hook` (not by us): where it
    says its control path and PID, and the pages it wrote once stopped (``--stats-out``)."""

    def __init__(self, work: Path, guest_args: list[str]) -> None:
        self.ctl, self.pid, self.stats = work / "sweep-ctl", work / "sweep-pid", work / "sweep-stats.json"
        q = shlex.quote  # (a checkout's or work directory's path may hold spaces)
        self.hook = (f"echo $$ > {q(str(self.pid))}; echo \"$PRECOPY_POSTCOPY_CONTROL\" > {q(str(self.ctl))}; "
                     f"exec {q(PY)} -m precopy.guest dirty --memory \"$PRECOPY_MEMORY\" {shlex.join(guest_args)} "
                     f"--control \"$PRECOPY_POSTCOPY_CONTROL\" --postcopy --stats-out {q(str(self.stats))}")

    def pause(self) -> None:
        """Park it (its region stops changing)."""
        _wait(lambda: self.ctl.exists() and self.ctl.read_text().endswith("\n"), 30,
              "the destination guest's control path")
        asyncio.run(_pause(self.ctl.read_text().strip()))

    def stop(self, timeout: float = 30.0) -> int:
        """Stop it (SIGTERM: a paused guest exits without writing again); the pages it wrote."""
        os.kill(int(self.pid.read_text()), signal.SIGTERM)
        _wait(self.stats.exists, timeout, "the destination guest's --stats-out")
        return int(json.loads(self.stats.read_text())["pages_written"])

    def kill(self) -> None:
        """SIGKILL it if it is still there (the end of a run, whatever happened)."""
        try:
            os.kill(int(self.pid.read_text()), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass


#: The guests: the sweep (never converges; its invariant checked), or random writes (random faults:
#: the remote fault latency without the sweep chasing the in-order push).
WRITERS = {"sweep": ["--pattern", "sweep"], "random": ["--rate", "20000", "--hot-fraction", "1"]}


def one(work: Path, size_mib: int, mode: str, writer: str = "sweep", early: bool = True,
        lane: bool = False) -> dict[str, Any]:
    idle = Run(work / "idle", size_mib, ["--rate", "0"], None)
    try:
        idle_rep = idle.migrate()
        t_idle, idle_cpu = idle_rep["total_time_s"], idle_rep["cpu_s"]
    finally:
        idle.close()
    guest = DestSweep(work, WRITERS[writer])
    sweep = Run(work / "sweep", size_mib, WRITERS[writer], guest.hook, ("--postcopy-guest-early",) if early else ())
    try:
        rep = sweep.migrate("--postcopy", mode, *(("--postcopy-lane",) if lane else ()))
        pc = rep["postcopy"] or {}
        guest.pause()
        check = (check_sweep(sweep.src, sweep.work / "dest" / "vm.mem", guest.stop()) if writer == "sweep"
                 else {"rest_exact": None, "sweep_ok": None, "sweeps": 0, "at_page": 0})
    finally:
        guest.kill()
        sweep.close()
    return {"idle_total_s": t_idle, "total_s": rep["total_time_s"], "switchover_ms": pc.get("switchover_ms"),
            "last_page_s": pc.get("last_page_s"), "max_throttle_pct": rep["max_throttle_pct"],
            "rounds": len(rep["rounds"]), "pages_missing": pc.get("pages_missing"),
            "faulted": pc.get("pages_faulted"), "requested": pc.get("pages_requested"),
            "pushed": pc.get("pages_pushed"), "fault_p50_us": pc.get("fault_p50_us"),
            "fault_p99_us": pc.get("fault_p99_us"), "fault_max_us": pc.get("fault_max_us"),
            "remote_faults": pc.get("remote_faults"), "remote_p50_us": pc.get("remote_p50_us"),
            "remote_p99_us": pc.get("remote_p99_us"), "inflight_p50_us": pc.get("inflight_p50_us"),
            "inflight_p99_us": pc.get("inflight_p99_us"), "load": os.getloadavg()[0],
            "phases_ms": rep["phases_ms"], "cpu_s": rep["cpu_s"], "idle_cpu_s": idle_cpu,
            "push_cpu_s": {"source": pc.get("push_cpu_s"), "dest": pc.get("dest_push_cpu_s")}, **check}


def _us(r: dict[str, Any], kind: str) -> str:
    p50, p99 = r.get(f"{kind}_p50_us"), r.get(f"{kind}_p99_us")
    return "-" if p50 is None else f"{p50:.0f} / {p99:.0f}"


def table(rows: list[dict[str, Any]], size_mib: int, mode: str, command: str, writer: str = "sweep") -> str:
    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in rows if r[key] is not None)

    what = "full-speed sweep" if writer == "sweep" else "random writes, 20,000 pages/s"
    lines = [f"`{command}` -- {len(rows)} runs, {size_mib} MiB, {what}, `--postcopy {mode}`, loopback", "",
             "| run | load | pause to running (ms) | total (s) | idle total (s) | ratio (<= 1.5) | pause to last "
             "page (s) | throttle % | missing | faulted (remote) | pushed | fault p50 / p99 / max (us) | remote "
             "p50 / p99 | in flight p50 / p99 | bytes exact | sweep invariant |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(
            f"| {i + 1} | {r['load']:.1f} | {r['switchover_ms']:.1f} | {r['total_s']:.2f} | {r['idle_total_s']:.2f} | "
            f"{r['total_s'] / r['idle_total_s']:.2f} | {r['last_page_s']:.2f} | {r['max_throttle_pct']} | "
            f"{r['pages_missing']} | {r['faulted']} ({r['remote_faults'] or 0}) | {r['pushed']} | "
            f"{r['fault_p50_us'] or 0:.0f} / {r['fault_p99_us'] or 0:.0f} / {r['fault_max_us'] or 0:.0f} | "
            f"{_us(r, 'remote')} | {_us(r, 'inflight')} | {r['rest_exact']} | {r['sweep_ok']} ({r['sweeps']} sweeps) |")
    ratios = [r["total_s"] / r["idle_total_s"] for r in rows]
    if any(r["fault_p50_us"] is None for r in rows):
        return "\n".join(lines)
    lines += ["", f"Medians: pause to running {med('switchover_ms'):.1f} ms (target <= 10), time until the last "
              f"page / idle migration {statistics.median(ratios):.2f} (target <= 1.5), fault p50 "
              f"{med('fault_p50_us'):.0f} us (<= 200), p99 {med('fault_p99_us'):.0f} us (<= 2,000)."]
    kinds = [f"{name} p50 {statistics.median(v50):.0f} / p99 {statistics.median(v99):.0f} us ({len(v50)} runs)"
             for name, kind in (("remote", "remote"), ("in flight", "inflight"))
             for v50, v99 in [([r[f"{kind}_p50_us"] for r in rows if r.get(f"{kind}_p50_us") is not None],
                               [r[f"{kind}_p99_us"] for r in rows if r.get(f"{kind}_p99_us") is not None])] if v50]
    if kinds:
        lines += ["", "Fault medians by kind: " + "; ".join(kinds) + "."]
    keys = sorted({k for r in rows for k in r["phases_ms"]})
    phases = ", ".join(f"{k} {statistics.median(r['phases_ms'].get(k, 0.0) for r in rows):.1f}" for k in keys)
    lines += ["", f"Median phases (ms): {phases}; pause to the last page {med('last_page_s'):.2f} s "
              f"({statistics.median(r['last_page_s'] / r['idle_total_s'] for r in rows):.2f}x the idle migration)."]
    lines += ["", _cpu_line(rows, size_mib)]
    return "\n".join(lines)


def _cpu_line(rows: list[dict[str, Any]], size_mib: int) -> str:
    """Median CPU seconds per GiB of each agent: during the push (COMMITTED to the last page), the whole
    post-copy migration, the idle pre-copy migration."""
    gib = size_mib / 1024

    def med(get: Any) -> str:
        vals = [v for r in rows if (v := get(r)) is not None]
        return f"{statistics.median(vals) / gib:.2f}" if vals else "-"

    return ("CPU-s/GiB, median (source / destination): during the push "
            f"{med(lambda r: r['push_cpu_s']['source'])} / {med(lambda r: r['push_cpu_s']['dest'])}; the whole "
            f"migration {med(lambda r: r['cpu_s']['source'])} / {med(lambda r: r['cpu_s']['dest'])}; the idle "
            f"pre-copy {med(lambda r: r['idle_cpu_s']['source'])} / {med(lambda r: r['idle_cpu_s']['dest'])}.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--postcopy", default="auto", choices=["auto", "now", "immediate"])
    ap.add_argument("--writer", default="sweep", choices=sorted(WRITERS))
    ap.add_argument("--guest-start", default="early", choices=["early", "switchover"],
                    help="when the destination's hook starts its guest (default early: --postcopy-guest-early)")
    ap.add_argument("--lane", action="store_true", help="the source with --postcopy-lane (the faults on a "
                    "connection of their own)")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm") / f"precopy-bench-pc-{os.getpid()}")
    args = ap.parse_args()
    command = "python -m benchmarks.postcopy " + " ".join(sys.argv[1:])
    rows = []
    try:
        for i in range(args.runs):
            row = one(args.work / f"run{i}", args.size_mib, args.postcopy, args.writer, args.guest_start == "early",
                      args.lane)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print(table(rows, args.size_mib, args.postcopy, command, args.writer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
