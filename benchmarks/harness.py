"""The benchmark harness: a matrix of migrations next to yardsticks from the same run.

    python -m benchmarks.harness --matrix quick            # make bench (a few minutes)
    python -m benchmarks.harness --matrix full             # make bench-full (long; 4 GiB)
    python -m benchmarks.harness --matrix quick --update-results   # also rewrite RESULTS.md's section
    python -m benchmarks.harness --matrix promise --runs 100       # the downtime promise: runs within budget

Each scenario (region size, guest behaviour, content, downtime budget,
compression, link, precopy or stop-and-copy) runs ``--runs`` times with the
real agents as separate processes: a ``precopy-dest`` daemon, a
``precopy-guest dirty`` process and a ``precopy-source`` paused/resumed with
SIGSTOP/SIGCONT.  For every (size, content, link) the same run measures the
yardsticks: a raw socket copy of the same bytes between two processes on that
link (into a reused buffer, and into a fresh region file) and xxh3 over the
region.  The 1 Gbit/s link is two network namespaces joined by a veth pair
shaped with ``tc tbf`` (root only; skipped with a message otherwise).

Outputs under ``--out`` (default ``benchmarks/out/MATRIX``): ``runs.jsonl``
(one line per run: scenario, the full migration report, yardsticks, peak RSS of
both agents, the guest's achieved write rate), ``table.md`` and PNG plots.
Benchmarks report; they never fail on a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from precopy_agents.common import stop_process
from precopy.guest import create_region, parse_size
from precopy.lab.netns import TwoHosts, rate_bits_per_s, unavailable_reason

from .limits import hash_time, hash_time_2, raw_copy

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30

# Guest behaviours: arguments to ``precopy-guest dirty``.
WORKLOADS: dict[str, list[str]] = {
    "idle": ["--rate", "0"],
    "low": ["--rate", "2000", "--hot-fraction", "1"],          # 2,000 pages/s, uniform
    "high": ["--rate", "200000", "--hot-fraction", "1"],       # 200,000 pages/s, uniform
    "hotset": ["--rate", "50000", "--hot-fraction", "0.1", "--hot-weight", "0.9"],  # 10 % of pages, 90 % of writes
    "sweep": ["--pattern", "sweep"],                           # every page's first byte, full speed
}
NOMINAL_RATE = {"idle": 0, "low": 2000, "high": 200_000, "hotset": 50_000, "sweep": None}
LINK_BYTES_PER_S = {"loopback": 1.0e9}  # rough, only to bound a run's time


@dataclass(frozen=True)
class Scenario:
    size: str = "1G"
    workload: str = "idle"
    content: str = "random"      # random | half-text
    budget_ms: float = 50.0
    compress: str = "off"        # off | lz4 | auto
    link: str = "loopback"       # loopback | 1gbit (any tc rate)
    mode: str = "precopy"        # precopy | stop-and-copy
    #: fresh: the destination creates the region; existing: it already holds a
    #: region file of that name and size (other contents, every page written:
    #: a pre-provisioned host or an earlier migration) and receives into it.
    dest_region: str = "fresh"
    #: pid: the guest is paused with SIGSTOP and dirty pages found by digests;
    #: control: through its guest-control socket, which offers kernel write
    #: tracking (userfaultfd write-protect; --tracking auto picks it).
    control: str = "pid"
    #: What the source does when the budget is out of reach: the harness
    #: forces (to measure the pause anyway); the promise matrix aborts, as
    #: by default (a migration that cannot keep the budget never pauses).
    on_nonconvergence: str = "force"

    @property
    def key(self) -> str:
        key = (f"{self.size} {self.workload} {self.content} {self.budget_ms:g}ms {self.compress} "
               f"{self.link} {self.mode}")
        if self.dest_region != "fresh":
            key += f" {self.dest_region}-region"
        if self.control != "pid":
            key += " uffd-wp"
        if self.on_nonconvergence != "force":
            key += f" {self.on_nonconvergence}"
        return key

    @property
    def bytes(self) -> int:
        return parse_size(self.size)


def matrix(name: str) -> list[Scenario]:
    """The scenario lists behind ``make bench`` (quick) and ``make bench-full`` (full)."""
    s = Scenario()
    if name == "smoke":
        return [Scenario(size="16M", workload="low", budget_ms=300),
                Scenario(size="16M", workload="low", budget_ms=300, mode="stop-and-copy")]
    if name == "promise":
        # The downtime budget as a promise (issue 23): how many runs pause within it.
        base = replace(s, size="1G", budget_ms=50.0, on_nonconvergence="abort")
        return [replace(base, workload=w, control=c) for w in ("low", "high") for c in ("control", "pid")]
    if name == "quick":
        out = [replace(s, workload=w) for w in ("idle", "low", "high", "hotset", "sweep")]
        out += [replace(s, workload=w, mode="stop-and-copy") for w in ("idle", "low", "high")]
        out += [replace(s, workload="high", budget_ms=300)]
        out += [replace(s, size="256M", workload=w) for w in ("idle", "high")]
        out += [replace(s, size="256M", workload="idle", mode="stop-and-copy")]
        out += [replace(s, size="4G", workload="idle")]  # scaling: 4 GiB against 1 GiB
        out += [replace(s, workload="idle", compress="auto")]  # adaptive lz4 must not slow loopback down
        out += [replace(s, workload="idle", dest_region="existing")]  # no first touch on the destination
        out += [replace(s, size="4G", workload="idle", dest_region="existing")]  # scaling without first touch
        # The copy path alone: no digest scans of the whole region either.
        out += [replace(s, workload="idle", dest_region="existing", control="control")]
        # Kernel write tracking (a guest that offers it): no digest scan of the whole region in the pause.
        out += [replace(s, workload=w, control="control") for w in ("idle", "low", "high", "sweep")]
        net = replace(s, size="256M", link="1gbit")
        out += [replace(net, workload="idle"), replace(net, workload="low"),
                replace(net, workload="idle", content="half-text"),
                replace(net, workload="idle", content="half-text", compress="lz4"),
                replace(net, workload="idle", content="half-text", compress="auto")]
        return out
    if name == "full":
        out = []
        for size in ("256M", "1G", "4G"):
            out += [replace(s, size=size, workload=w) for w in ("idle", "low", "high", "hotset", "sweep")]
            out += [replace(s, size=size, workload=w, mode="stop-and-copy") for w in ("idle", "low", "high")]
        out += [replace(s, workload=w, budget_ms=300) for w in ("low", "high", "hotset", "sweep")]
        for content in ("random", "half-text"):
            for comp in ("off", "lz4"):
                out += [replace(s, workload=w, content=content, compress=comp) for w in ("idle", "low")
                        if (content, comp) != ("random", "off")]
        net = replace(s, link="1gbit")
        out += [replace(net, workload=w) for w in ("idle", "low", "high")]
        out += [replace(net, workload=w, mode="stop-and-copy") for w in ("idle", "low")]
        out += [replace(net, workload=w, content="half-text", compress=c) for w in ("idle", "low")
                for c in ("off", "lz4")]
        out += [replace(net, workload="low", budget_ms=300)]
        return out
    raise ValueError(f"unknown matrix {name!r}: use smoke, quick, full or promise")


# -- measuring helpers ----------------------------------------------------


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {path}")
        time.sleep(0.02)
    return path.read_text().strip()


def _rss_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class RssSampler:
    """Peak resident memory of some processes, beyond their shared mappings.

    ``RssAnon + RssFile``: the agent's own heap, buffers and code, without the
    region (a ``/dev/shm`` region counts as ``RssShmem``).  Sampled every 20 ms.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                r = _rss_kib(pid)
                if r:
                    self.peak[name] = max(self.peak[name], (r.get("RssAnon", 0) + r.get("RssFile", 0)) * 1024)
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Link:
    """Where the agents run: loopback, or two shaped namespaces."""

    name: str
    host: str = "127.0.0.1"
    src_prefix: tuple[str, ...] = ()
    dst_prefix: tuple[str, ...] = ()
    hosts: TwoHosts | None = None

    @property
    def bytes_per_s(self) -> float:
        if self.name == "loopback":
            return LINK_BYTES_PER_S["loopback"]
        return rate_bits_per_s(self.name) / 8


class Bench:
    def __init__(self, work: Path, out: Path, runs: int, log: Any, *,
                 dest_args: Sequence[str] = (), source_args: Sequence[str] = (), yardsticks: bool = True) -> None:
        self.work, self.out, self.runs, self.log = work, out, runs, log
        self.measure_yardsticks = yardsticks
        # Extra daemon options, for A/B runs of one scenario (--dest-arg, --source-arg).
        self.dest_args, self.source_args = tuple(dest_args), tuple(source_args)
        self.links: dict[str, Link] = {}
        self.dests: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
        self.regions: dict[tuple[str, str], Path] = {}
        self.yardsticks: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.skipped: list[str] = []

    # links and daemons ------------------------------------------------------

    def link(self, name: str) -> Link | None:
        if name in self.links:
            return self.links[name]
        if name == "loopback":
            link = Link("loopback")
        else:
            reason = unavailable_reason()
            if reason:
                self.skipped.append(f"link {name}: {reason}")
                self.log(f"skipping the {name} link: {reason}")
                return None
            hosts = TwoHosts(f"pcb{os.getpid() % 10000}", rate=name).up()
            link = Link(name, host=hosts.dst_ip, src_prefix=tuple(hosts.exec_prefix(hosts.src_ns)),
                        dst_prefix=tuple(hosts.exec_prefix(hosts.dst_ns)), hosts=hosts)
            self.log(f"link {name}: namespaces {hosts.src_ns} -> {hosts.dst_ns} ({hosts.dst_ip}), tc tbf {name}")
        self.links[name] = link
        return link

    def dest(self, link: Link) -> tuple[subprocess.Popen[bytes], str, Path]:
        if link.name in self.dests:
            return self.dests[link.name]
        ddir = self.work / f"dest-{link.name}"
        ready = self.work / f"dest-{link.name}.addr"
        log = open(self.work / f"dest-{link.name}.log", "wb")
        proc = subprocess.Popen([*link.dst_prefix, PY, "-m", "precopy_agents.dest_main", "--listen", f"{link.host}:0",
                                 "--memory-dir", str(ddir), "--ready-file", str(ready), "--log-level", "warning",
                                 # a private veth pair between two namespaces: no key needed
                                 "--insecure", *self.dest_args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
        addr = _wait_file(ready, proc)
        self.dests[link.name] = (proc, addr, ddir)
        return self.dests[link.name]

    def close(self) -> None:
        for proc, _, _ in self.dests.values():
            stop_process(proc)
        for link in self.links.values():
            if link.hosts is not None:
                link.hosts.down()

    # regions and yardsticks -------------------------------------------------

    def region(self, sc: Scenario) -> Path:
        key = (sc.size, sc.content)
        if key not in self.regions:
            path = self.work / f"guest-{sc.size}-{sc.content}.mem"
            self.log(f"creating {path.name} ({sc.size}, {sc.content})")
            create_region(path, sc.bytes, sc.content, 1)
            self.regions[key] = path
        return self.regions[key]

    def yardstick(self, sc: Scenario, link: Link) -> dict[str, Any]:
        key = (sc.size, sc.content, sc.link)
        if not self.measure_yardsticks:
            return {}
        if key not in self.yardsticks:
            region = self.region(sc)
            kw: dict[str, Any] = dict(host=link.host, recv_prefix=link.dst_prefix, send_prefix=link.src_prefix)
            n = 3
            self.log(f"yardsticks for {sc.size} {sc.content} on {sc.link}: raw copies x{n}, xxh3 x{n}")
            link_s = [raw_copy(region, fresh=False, **kw) for _ in range(n)]
            fresh_s = [raw_copy(region, fresh=True, **kw) for _ in range(n)]
            existing_s = [raw_copy(region, fresh=False, into="existing", **kw) for _ in range(n)]
            hash_s = [hash_time(region) for _ in range(n)]
            hash2_s = [hash_time_2(region) for _ in range(n)]
            self.yardsticks[key] = {
                "raw_link_s": statistics.median(link_s), "raw_link_runs_s": link_s,
                "raw_fresh_s": statistics.median(fresh_s), "raw_fresh_runs_s": fresh_s,
                "raw_existing_s": statistics.median(existing_s), "raw_existing_runs_s": existing_s,
                "xxh3_s": statistics.median(hash_s), "xxh3_runs_s": hash_s,
                "xxh3_2_s": statistics.median(hash2_s), "xxh3_2_runs_s": hash2_s,
            }
        return self.yardsticks[key]

    # one migration -----------------------------------------------------------

    def run_once(self, sc: Scenario, run: int) -> dict[str, Any] | None:
        link = self.link(sc.link)
        if link is None:
            return None
        yard = self.yardstick(sc, link)
        region = self.region(sc)
        dest, addr, ddir = self.dest(link)
        tag = f"r{run}"
        stats = self.work / f"guest-{tag}.json"
        stats.unlink(missing_ok=True)
        ctl = self.work / f"guest-{tag}.sock"
        ctl.unlink(missing_ok=True)
        control = ["--control", str(ctl)] if sc.control == "control" else []
        guest = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(region),
                                  "--content", sc.content, "--seed", str(run + 1), "--stats-out", str(stats),
                                  *control, *WORKLOADS[sc.workload]], cwd=ROOT, env=_env())
        report = self.work / f"report-{tag}.json"
        report.unlink(missing_ok=True)
        if sc.dest_region == "existing":
            # What a pre-provisioned host or an earlier migration left: the right
            # size, every page written, other contents (so every page moves).
            ddir.mkdir(parents=True, exist_ok=True)
            create_region(ddir / "bench", sc.bytes, sc.content, 1000 + run)
        # bound the run: enough for the full copy a few times over, then give up (forced switchover)
        max_time = max(15.0, 3 * sc.bytes / link.bytes_per_s + 5)
        if sc.workload in ("high", "sweep"):
            # Auto-converge steps the throttle up every two rounds of a second or
            # more each (as QEMU does): give it the time to get there.
            max_time = max(max_time, 60.0)
        src = None
        cpu: dict[str, float] = {}
        try:
            time.sleep(0.7)  # the guest maps its region and starts writing
            if sc.control == "control":
                deadline = time.monotonic() + 10
                while not ctl.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            who = ["--guest-control", str(ctl)] if sc.control == "control" else ["--pid", str(guest.pid)]
            argv = [*link.src_prefix, PY, "-m", "precopy_agents.source_main", "--to", addr, "--memory", str(region),
                    *who, "--name", "bench", "--downtime-ms", f"{sc.budget_ms:g}",
                    "--compress", sc.compress, "--mode", sc.mode, "--max-time", f"{max_time:g}",
                    "--on-nonconvergence", sc.on_nonconvergence, "--report", str(report), "--progress", "off",
                    "--log-level", "warning", *self.source_args]
            t = time.monotonic()
            # CPU seconds: the source's (and of the children it waited for, its
            # guardian) from this process's reaped-children usage, the daemon's
            # and the guest's from /proc (all their threads).
            c0, d0, g0 = children_cpu_s(), proc_cpu_s(dest.pid), proc_cpu_s(guest.pid)
            src = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)
            with RssSampler({"source": src.pid, "dest": dest.pid}) as rss:
                rc = src.wait(max_time * 3 + 60)
            wall = time.monotonic() - t
            cpu["source"] = children_cpu_s() - c0
            time.sleep(0.2)  # the daemon ends the migration (closes the region, the journal) after the reply
            cpu["dest"], cpu["guest"] = proc_cpu_s(dest.pid) - d0, proc_cpu_s(guest.pid) - g0
        finally:
            if src is not None and src.poll() is None:
                stop_process(src)
            # (its stats are written on the way out: a starved guest may take seconds to get there)
            stop_process(guest, timeout_s=60)
            for f in ddir.glob("bench*"):
                f.unlink()
        rep = json.loads(report.read_text()) if report.exists() else {"outcome": "no report"}
        gst = json.loads(stats.read_text()) if stats.exists() else {}
        achieved = gst.get("pages_written", 0) / gst["seconds"] if gst.get("seconds") else None
        return {
            "scenario": asdict(sc), "key": sc.key, "run": run, "when": time.time(), "exit_code": rc,
            "wall_s": wall, "report": rep, "yardsticks": yard,
            "peak_rss_bytes": rss.peak, "region_bytes": sc.bytes, "cpu_s": cpu,
            "guest": {"pages_written": gst.get("pages_written"), "seconds": gst.get("seconds"),
                      "achieved_pps": achieved, "nominal_pps": NOMINAL_RATE[sc.workload]},
        }


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used, all its threads (``/proc/PID/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's children that have been waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# -- summarising -----------------------------------------------------------


def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _fmt(xs: Sequence[float], unit: str, scale: float = 1.0, digits: int = 1) -> str:
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}{unit}"
    return f"{_med(xs):.{digits}f}{unit} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def group(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["key"], []).append(r)
    return out


def _converged(r: dict[str, Any]) -> bool:
    rep = r["report"]
    return rep.get("outcome") == "committed" and not rep.get("forced")


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| size | guest | content | link | budget | lz4 | mode | tracking | dest region | committed (not forced) | "
        "total s | downtime ms | expected ms | rounds | wire ÷ region | GB/s | guest writes/s | max throttle % | "
        "peak RSS src / dst MiB |",
        "|" + "---|" * 19,
    ]
    for key, rs in group(records).items():
        sc = rs[0]["scenario"]
        reps = [r["report"] for r in rs]
        ok = [r for r in rs if r["report"].get("outcome") == "committed"]
        conv = sum(1 for r in rs if _converged(r))
        total = [r["report"]["total_time_s"] for r in ok]
        down = [r["report"]["downtime_ms"] for r in ok]
        exp = [r["report"]["expected_downtime_ms"] for r in ok]
        rounds = [len(r["report"]["rounds"]) for r in ok]
        wire = [r["report"]["bytes_on_wire"] / r["region_bytes"] for r in ok]
        gbps = [r["region_bytes"] / 1e9 / r["report"]["total_time_s"] for r in ok]
        rate = [r["guest"]["achieved_pps"] for r in rs if r["guest"]["achieved_pps"] is not None]
        rss_s = _med([r["peak_rss_bytes"]["source"] for r in rs]) / MiB
        rss_d = _med([r["peak_rss_bytes"]["dest"] for r in rs]) / MiB
        lines.append(
            f"| {sc['size']} | {sc['workload']} | {sc['content']} | {sc['link']} | {sc['budget_ms']:g} ms | "
            f"{sc['compress']} | {sc['mode']} | {'/'.join(sorted({str(r.get('tracking', 'digest')) for r in reps}))} | "
            f"{sc.get('dest_region', 'fresh')} | {len(ok)}/{len(reps)} ({conv}) | {_fmt(total, '', digits=2)} | "
            f"{_fmt(down, '')} | {_fmt(exp, '')} | {_fmt(rounds, '', digits=0)} | {_fmt(wire, '', digits=2)} | "
            f"{_fmt(gbps, '', digits=2)} | {_fmt(rate, '', digits=0)} | "
            f"{_fmt([_max_throttle(r) for r in reps], '', digits=0)} | {rss_s:.0f} / {rss_d:.0f} |")
    return "\n".join(lines)


def yardstick_table(records: list[dict[str, Any]]) -> str:
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        sc = r["scenario"]
        seen.setdefault((sc["size"], sc["content"], sc["link"]), {**r["yardsticks"], "bytes": r["region_bytes"]})
    lines = ["| size | content | link | raw copy, reused buffer | raw copy into a fresh file "
             "| raw copy into an existing file | xxh3 | xxh3, two threads |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(y: dict[str, Any], key: str, gb: float, ms: bool = False) -> str:
        if key not in y:  # a record from before this yardstick
            return "n/a"
        v = y[key]
        return f"{v * 1e3:.1f} ms ({gb / v:.1f} GB/s)" if ms else f"{v:.3f} s ({gb / v:.2f} GB/s)"

    for (size, content, link), y in seen.items():
        gb = y["bytes"] / 1e9
        lines.append(f"| {size} | {content} | {link} | {cell(y, 'raw_link_s', gb)} | {cell(y, 'raw_fresh_s', gb)} | "
                     f"{cell(y, 'raw_existing_s', gb)} | {cell(y, 'xxh3_s', gb, True)} | "
                     f"{cell(y, 'xxh3_2_s', gb, True)} |")
    return "\n".join(lines)


def headline(records: list[dict[str, Any]]) -> str:
    """The figures the benchmark issue asks for, for the largest quick size (1 GiB)."""
    g = group(records)

    def pick(**kw: Any) -> list[dict[str, Any]]:
        return g.get(Scenario(**kw).key, [])

    out = []
    idle = [r for r in pick(workload="idle") if r["report"].get("outcome") == "committed"]
    if idle:
        y = idle[0]["yardsticks"]
        t = _med([r["report"]["total_time_s"] for r in idle])
        out.append(f"* 1 GiB idle: {t:.3f} s, {1.0737 / t:.2f} GB/s; raw loopback link copy ÷ migration time = "
                   f"{y['raw_link_s'] / t:.2f}, raw fresh-file copy ÷ migration time = {y['raw_fresh_s'] / t:.2f}.")
    for w, label in (("low", "2,000 pages/s"), ("high", "200,000 pages/s"), ("hotset", "hot set")):
        rs = [r for r in pick(workload=w) if r["report"].get("outcome") == "committed"]
        if rs:
            d = [r["report"]["downtime_ms"] for r in rs]
            within = sum(1 for x in d if x <= 50)
            conv = sum(1 for r in rs if _converged(r))
            out.append(f"* 1 GiB {label}, 50 ms budget: downtime {_fmt(d, ' ms')}, {within}/{len(d)} within budget, "
                       f"{conv}/{len(rs)} converged without forcing.")
    sw = pick(workload="sweep")
    if sw:
        conv = sum(1 for r in sw if _converged(r))
        d = [r["report"]["downtime_ms"] for r in sw if r["report"].get("downtime_ms") is not None]
        out.append(f"* 1 GiB full-speed sweep: converged in {conv}/{len(sw)} runs"
                   + (f"; forced switchover downtime {_fmt(d, ' ms')}" if d else "") + ".")
    for w in ("idle", "low", "high"):
        pre = [r["report"]["downtime_ms"] for r in pick(workload=w) if r["report"].get("downtime_ms")]
        snc = [r["report"]["downtime_ms"] for r in pick(workload=w, mode="stop-and-copy")
               if r["report"].get("downtime_ms")]
        if pre and snc:
            out.append(f"* stop-and-copy downtime ÷ precopy downtime, 1 GiB {w}: {_med(snc):.0f} ms ÷ "
                       f"{_med(pre):.1f} ms = {_med(snc) / _med(pre):.1f}×.")
    return "\n".join(out)


_DEFAULTS = {"size": "1G", "workload": "idle", "content": "random", "budget_ms": 50.0, "compress": "off",
             "link": "loopback", "mode": "precopy", "dest_region": "fresh", "control": "pid"}


def select(records: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    """Records of the scenario ``kw`` names (unnamed fields at their defaults); tolerant of older JSONL."""
    want = {**_DEFAULTS, **kw}
    return [r for r in records if all(r["scenario"].get(k, _DEFAULTS.get(k)) == v for k, v in want.items())]


def _committed(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rs if r["report"].get("outcome") == "committed"]


def _max_throttle(rep: dict[str, Any]) -> float:
    return max([float(rd.get("throttle_pct") or 0) for rd in rep.get("rounds", [])] or [0.0])


def _scan_ratio(rs: list[dict[str, Any]]) -> list[float]:
    """Per run: median digest-scan time of the live rounds ÷ the xxh3 yardstick (whole region)."""
    out = []
    for r in rs:
        rep = r["report"]
        if rep.get("tracking", "digest") != "digest":
            continue
        scans = [rd["scan_seconds"] for rd in rep.get("rounds", []) if rd["kind"] == "iterative"
                 and rd.get("scan_seconds")]
        if scans:
            out.append(_med(scans) / r["yardsticks"]["xxh3_s"])
    return out


def targets(records: list[dict[str, Any]]) -> str:
    """Issue 5's targets, each with its figure from this run and whether it is met."""
    rows: list[tuple[str, str, bool | None]] = []

    def ratio_row(label: str, rs: list[dict[str, Any]], yard: str, bound: float, also: str | None = None) -> None:
        ok = _committed(rs)
        if not ok:
            return
        t = _med([r["report"]["total_time_s"] for r in ok])
        y = ok[0]["yardsticks"][yard]
        figure = f"{y:.3f} s ÷ {t:.3f} s = {y / t:.2f}"
        if also and also in ok[0]["yardsticks"]:
            # The same ratio against a copy that also writes every byte into the region's memory.
            z = ok[0]["yardsticks"][also]
            figure += f" (raw copy into an existing file: {z:.3f} s ÷ {t:.3f} s = {z / t:.2f})"
        rows.append((label, figure, y / t >= bound))

    ratio_row("1 GiB idle: raw copy into a fresh file ÷ migration time ≥ 0.8",
              select(records, workload="idle"), "raw_fresh_s", 0.8)
    ratio_row("1 GiB idle, destination region exists: raw link copy ÷ migration time ≥ 0.7",
              select(records, workload="idle", dest_region="existing", control="pid"), "raw_link_s", 0.7,
              "raw_existing_s")
    ratio_row("1 GiB idle, destination region exists, uffd-wp (no digest scans): raw link copy ÷ migration time ≥ 0.7",
              select(records, workload="idle", dest_region="existing", control="control"), "raw_link_s", 0.7,
              "raw_existing_s")
    for w in ("idle", "low", "high"):
        sr = _scan_ratio(select(records, workload=w))
        if sr:
            rows.append((f"1 GiB {w}: live digest scan ÷ xxh3 of the region ≤ 1.5 (median of rounds per run)",
                         _fmt(sr, "", digits=2), max(sr) <= 1.5))
    for control, how in (("pid", "digests"), ("control", "uffd-wp")):
        for w, label in (("low", "2,000"), ("high", "200,000")):
            rs = select(records, workload=w, control=control)
            ok = _committed(rs)
            if not rs:
                continue
            down = [r["report"]["downtime_ms"] for r in ok]
            within = sum(1 for r in ok if r["report"]["downtime_ms"] <= r["report"]["downtime_budget_ms"]
                         and not r["report"].get("forced"))
            floor = ""
            if control == "pid" and ok and "xxh3_2_s" in ok[0]["yardsticks"]:
                # A paused digest scan reads the whole region: no faster than both cores hash it.
                floor = f" (reading the region on both cores: {ok[0]['yardsticks']['xxh3_2_s'] * 1e3:.1f} ms)"
            rows.append((f"1 GiB {label} pages/s ({how}): downtime within 50 ms in every run",
                         f"{_fmt(down, ' ms')}; {within}/{len(rs)} within{floor}", within == len(rs)))
            acc = [r["report"]["downtime_ms"] / r["report"]["expected_downtime_ms"] for r in ok
                   if r["report"].get("expected_downtime_ms")]
            good = sum(1 for a in acc if 0.75 <= a <= 1.25)
            rows.append((f"1 GiB {label} pages/s ({how}): measured ÷ expected downtime within 0.75–1.25",
                         f"{_fmt(acc, '', digits=2)}; {good}/{len(rs)} within", good == len(rs)))
        high = _committed(select(records, workload="high", control=control))
        if high:
            wire = [r["report"]["bytes_on_wire"] / r["region_bytes"] for r in high]
            conv = sum(1 for r in high if _converged(r))
            rows.append((f"1 GiB 200,000 pages/s ({how}): converges; wire bytes ≤ 2 × region",
                         f"{conv}/{len(high)} converged; wire ÷ region {_fmt(wire, '', digits=2)}",
                         conv == len(high) and max(wire) <= 2.0))
    for w, label, control in (("sweep", "full-speed sweep", "pid"), ("sweep", "full-speed sweep (uffd-wp)", "control"),
                              ("idle", "idle", "pid"), ("low", "2,000 pages/s", "pid"),
                              ("low", "2,000 pages/s (uffd-wp)", "control")):
        rs = select(records, workload=w, control=control)
        if not rs:
            continue
        thr = [_max_throttle(r["report"]) for r in rs]
        conv = sum(1 for r in rs if _converged(r))
        if w == "sweep":
            rows.append((f"1 GiB {label}: converges by throttling",
                         f"{conv}/{len(rs)} converged; max throttle {_fmt(thr, ' %', digits=0)}",
                         conv == len(rs) and min(thr) > 0))
        else:
            rows.append((f"1 GiB {label}: never throttled", f"max throttle {_fmt(thr, ' %', digits=0)}",
                         max(thr) == 0))
    net = _committed(select(records, size="256M", link="1gbit"))
    if net:
        y, t = net[0]["yardsticks"]["raw_link_s"], _med([r["report"]["total_time_s"] for r in net])
        rows.append(("1 Gbit/s link, 256 MiB idle random: raw link copy ÷ migration time ≥ 0.9",
                     f"{y:.3f} s ÷ {t:.3f} s = {y / t:.2f}", y / t >= 0.9))
    for comp in ("lz4", "auto"):
        lz = _committed(select(records, size="256M", link="1gbit", content="half-text", compress=comp))
        if lz:
            y, t = lz[0]["yardsticks"]["raw_link_s"], _med([r["report"]["total_time_s"] for r in lz])
            rows.append((f"1 Gbit/s, half-text, --compress {comp}: effective rate ÷ link rate ≥ 1.3",
                         f"{y:.3f} s ÷ {t:.3f} s = {y / t:.2f}", y / t >= 1.3))
    for region, how in (("fresh", ""), ("existing", ", destination region exists")):
        one = _committed(select(records, workload="idle", dest_region=region))
        four = _committed(select(records, size="4G", workload="idle", dest_region=region))
        if one and four:
            a, b = (_med([r["report"]["total_time_s"] for r in x]) for x in (one, four))
            ya, yb = one[0]["yardsticks"]["raw_fresh_s"], four[0]["yardsticks"]["raw_fresh_s"]
            note = f" (raw copies into fresh files: {yb / ya:.2f}×)" if region == "fresh" else ""
            rows.append((f"4 GiB idle time ÷ 1 GiB idle time ≤ 4.3{how}",
                         f"{b:.2f} s ÷ {a:.2f} s = {b / a:.2f}{note}", b / a <= 4.3))
    for size in ("1G", "4G"):
        rs = [r for r in records if r["scenario"]["size"] == size and r.get("peak_rss_bytes")]
        if not rs:
            continue
        limit = rs[0]["region_bytes"] // 4096 * 16 + 64 * MiB
        worst = {side: max(r["peak_rss_bytes"][side] for r in rs) for side in ("source", "dest")}
        which = {side: max(rs, key=lambda r: r["peak_rss_bytes"][side])["scenario"] for side in ("source", "dest")}
        rows.append((f"{size}: agent memory beyond the region ≤ 16 B/page + 64 MiB = {limit / MiB:.0f} MiB "
                     "(peak over every scenario)",
                     f"source {worst['source'] / MiB:.0f} MiB ({which['source']['workload']} "
                     f"{which['source']['mode']}), destination {worst['dest'] / MiB:.0f} MiB",
                     max(worst.values()) <= limit))
    if not rows:
        return "(no scenario of the issue's targets in this run)"
    lines = ["| target | this run | met |", "|---|---|---|"]
    lines += [f"| {t} | {f} | {'yes' if m else 'no' if m is not None else '?'} |" for t, f, m in rows]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------


def plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    made: list[Path] = []
    g = group(records)
    ok = [r for r in records if r["report"].get("outcome") == "committed"]

    # 1. per-round dirty pages and bytes sent, median-total run of each dirtying precopy scenario
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, rs in g.items():
        sc = rs[0]["scenario"]
        if sc["mode"] != "precopy" or sc["workload"] == "idle" or sc["link"] != "loopback":
            continue
        rs = sorted((r for r in rs if r["report"].get("rounds")), key=lambda r: r["report"]["total_time_s"])
        if not rs:
            continue
        r = rs[len(rs) // 2]
        rounds = r["report"]["rounds"]
        x = [x["round"] for x in rounds]
        label = f"{sc['size']} {sc['workload']} {sc['budget_ms']:g}ms"
        ax1.plot(x, [max(x["pages_dirty"], 1) for x in rounds], marker="o", label=label)
        ax2.plot(x, [max(x["bytes_on_wire"], 1) / MiB for x in rounds], marker="o", label=label)
    ax1.set(yscale="log", xlabel="round (0 = full copy, last = paused)", ylabel="dirty pages",
            title="Dirty pages per round")
    ax2.set(yscale="log", xlabel="round", ylabel="MiB on the wire", title="Bytes sent per round")
    _legend(ax1, fontsize=7)
    fig.tight_layout()
    made.append(_save(fig, out / "rounds.png"))

    # 2. downtime vs dirty rate, precopy and stop-and-copy
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mode, marker in (("precopy", "o"), ("stop-and-copy", "s")):
        # the nominal rate: a stop-and-copy guest is paused most of its life, so its achieved average is not it
        pts = [(r["guest"]["nominal_pps"] or 0, r["report"]["downtime_ms"]) for r in ok
               if r["scenario"]["mode"] == mode and r["scenario"]["link"] == "loopback"
               and r["scenario"]["budget_ms"] == 50 and r["scenario"]["size"] == "1G"
               and r["scenario"]["workload"] != "sweep"]
        if pts:
            ax.scatter([max(p[0], 1) for p in pts], [p[1] for p in pts], marker=marker, label=mode)
    ax.axhline(50, color="grey", linestyle="--", label="50 ms budget")
    ax.set(xscale="log", yscale="log", xlabel="guest writes, pages/s, nominal (idle plotted at 1)",
           ylabel="downtime, ms", title="Downtime vs dirty rate (1 GiB, loopback)")
    _legend(ax)
    fig.tight_layout()
    made.append(_save(fig, out / "downtime_vs_rate.png"))

    # 3. total time vs region size (idle), with the raw copies
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mode in ("precopy", "stop-and-copy"):
        by: dict[int, list[float]] = {}
        for r in ok:
            sc = r["scenario"]
            if sc["mode"] == mode and sc["workload"] == "idle" and sc["link"] == "loopback" \
                    and sc["content"] == "random":
                by.setdefault(r["region_bytes"], []).append(r["report"]["total_time_s"])
        if by:
            xs = sorted(by)
            ax.plot([x / GiB for x in xs], [_med(by[x]) for x in xs], marker="o", label=f"{mode}, idle")
    ys: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["scenario"]["link"] == "loopback" and r["scenario"]["content"] == "random":
            ys[r["region_bytes"]] = r["yardsticks"]
    if ys:
        xs = sorted(ys)
        ax.plot([x / GiB for x in xs], [ys[x]["raw_fresh_s"] for x in xs], linestyle="--", label="raw copy, fresh file")
        ax.plot([x / GiB for x in xs], [ys[x]["raw_link_s"] for x in xs], linestyle=":", label="raw copy, link")
    ax.set(xlabel="region, GiB", ylabel="total time, s", title="Total time vs region size (loopback)")
    _legend(ax)
    fig.tight_layout()
    made.append(_save(fig, out / "total_vs_size.png"))

    # 4. expected vs measured downtime
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pts = [(r["report"]["expected_downtime_ms"], r["report"]["downtime_ms"], r["scenario"]["budget_ms"])
           for r in ok if r["report"].get("expected_downtime_ms") and not r["report"].get("forced")
           and r["scenario"]["mode"] == "precopy"]
    for budget, marker in ((50.0, "o"), (300.0, "s")):
        sel = [p for p in pts if p[2] == budget]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, label=f"precopy, {budget:g} ms budget")
    if pts:
        hi = max(max(p[0], p[1]) for p in pts) * 1.1
        ax.plot([0, hi], [0, hi], color="grey", label="measured = expected")
        ax.fill_between([0, hi], [0, hi * 0.75], [0, hi * 1.25], color="grey", alpha=0.15, label="±25 %")
    ax.set(xlabel="expected downtime at switchover, ms", ylabel="measured downtime, ms",
           title="Expected vs measured downtime\n(converged runs)")
    _legend(ax, fontsize=8)
    fig.tight_layout()
    made.append(_save(fig, out / "expected_vs_measured.png"))
    plt.close("all")
    return made


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)
    else:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


# -- the report -------------------------------------------------------------


def machine_notes() -> str:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB"
    except OSError:
        pass
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem}, Linux {platform.release()}, Python {platform.python_version()}; "
            "agents, guest and yardsticks on one host, regions in /dev/shm")


def markdown(records: list[dict[str, Any]], command: str, plots_rel: list[str], skipped: list[str]) -> str:
    parts = [
        f"Command: `{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine_notes()}.",
        "Each cell: median (min–max) over the runs; \"committed (not forced)\" counts runs that committed and, "
        "in brackets, those that met the budget without a forced switchover (the harness passes "
        "`--on-nonconvergence force` and bounds each run's time). Guest writes/s is what the guest achieved "
        "over its life, paused time included. Peak RSS is RssAnon + RssFile (the region, in /dev/shm, is "
        "RssShmem and not counted). GB/s is region bytes ÷ total time.",
        "",
        "### Headline (1 GiB, loopback, incompressible)",
        "",
        headline(records) or "(no 1 GiB scenarios in this run)",
        "",
        "### Performance targets (issue 5)",
        "",
        targets(records),
        "",
        "### Yardsticks (same run)",
        "",
        yardstick_table(records),
        "",
        "### Migrations",
        "",
        table(records),
    ]
    if skipped:
        parts += ["", "Skipped: " + "; ".join(skipped) + "."]
    if plots_rel:
        parts += ["", "### Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots_rel]
    return "\n".join(parts) + "\n"


def _quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``xs``: with 100 runs, q = 0.99 is the 99th."""
    ys = sorted(xs)
    return ys[min(len(ys), max(1, math.ceil(q * len(ys) - 1e-9))) - 1]


def _abort_kind(error: str) -> str:
    """A short name for why a run aborted, for the tally."""
    for prefix, kind in (("cannot converge: the downtime floor", "floor over the budget"),
                         ("did not converge after", "no convergence in --max-time/--max-rounds"),
                         ("downtime cap hit", "cap")):
        if error.startswith(prefix):
            return kind
    return error[:40] or "unknown"


def promise_tally(records: list[dict[str, Any]]) -> str:
    """Per scenario: how many runs paused within the budget, and what the others did.

    "Within" is a committed run whose downtime_ms is at most the budget.  A
    run that aborted without ever pausing (the budget out of reach: the
    floor over it, or no convergence) broke no promise and moved nothing.
    """
    lines = [
        "| scenario | runs | paused within budget | over budget | aborted, never paused | aborted after the pause "
        "| downtime ms: median / p99 / max | measured ÷ expected, median (min–max) | margin ms, median | rounds "
        "| wire ÷ region | max throttle % | guest writes/s |",
        "|" + "---|" * 13,
    ]
    for key, rs in group(records).items():
        budget = rs[0]["scenario"]["budget_ms"]
        reps = [r["report"] for r in rs]
        done = [p for p in reps if p.get("outcome") == "committed" and p.get("downtime_ms") is not None]
        within = [p for p in done if p["downtime_ms"] <= budget]
        aborted = [p for p in reps if p.get("outcome") == "aborted"]
        after = [p for p in aborted if p.get("paused_ms") is not None]
        down = [p["downtime_ms"] for p in done]
        ratio = [p["downtime_ms"] / p["expected_downtime_ms"] for p in done if p.get("expected_downtime_ms")]
        margin = [p["switchover_margin_ms"] for p in done if p.get("switchover_margin_ms") is not None]
        why: dict[str, int] = {}
        for p in aborted:
            if p.get("paused_ms") is None:
                reason = _abort_kind(p.get("error") or "")
                why[reason] = why.get(reason, 0) + 1
        said = ", ".join(f"{k} {n}" for k, n in sorted(why.items(), key=lambda kv: -kv[1]))
        # Of the committed runs: what auto-converge cost the wire and the guest.
        ok = [r for r in rs if r["report"] in done]
        wire = [r["report"]["bytes_on_wire"] / r["region_bytes"] for r in ok
                if r.get("region_bytes") and r["report"].get("bytes_on_wire") is not None]
        writes = [r["guest"]["achieved_pps"] for r in ok if (r.get("guest") or {}).get("achieved_pps") is not None]
        lines.append(
            f"| {key} | {len(reps)} | **{len(within)}/{len(reps)}** | {len(done) - len(within)} | "
            f"{len(aborted) - len(after)}{f' ({said})' if said else ''} | {len(after)} | "
            + (f"{_med(down):.1f} / {_quantile(down, 0.99):.1f} / {max(down):.1f}" if down else "n/a")
            + f" | {_fmt(ratio, '', digits=2)} | {_fmt(margin, '', digits=1)} | "
            f"{_fmt([len(p.get('rounds', [])) for p in done], '', digits=0)} | {_fmt(wire, '', digits=2)} | "
            f"{_fmt([_max_throttle(p) for p in done], '', digits=0)} | {_fmt(writes, '', digits=0)} |")
    return "\n".join(lines)


def promise_markdown(records: list[dict[str, Any]], command: str) -> str:
    return "\n".join([
        f"Command: `{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine_notes()}.",
        "Scenarios interleaved run by run; each run a fresh guest and source (`--on-nonconvergence abort`, "
        "the default). Downtime is the report's `downtime_ms` (pause on the source to the destination's "
        "confirmation); the margin is `switchover_margin_ms`, how far under the budget the expected "
        "downtime had to fall. Wire ÷ region, max throttle and guest writes/s (what the guest achieved "
        "over its life, paused and throttled time included) are of the committed runs.",
        "",
        promise_tally(records),
    ]) + "\n"


def update_results(results_md: Path, matrix_name: str, body: str) -> None:
    begin, end = f"<!-- harness:{matrix_name}:begin -->", f"<!-- harness:{matrix_name}:end -->"
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    section = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Harness: `{matrix_name}` matrix\n\n{section}\n"
    results_md.write_text(text)


def run_matrix(scenarios: list[Scenario], runs: int, out: Path, log: Any, *, dest_args: Sequence[str] = (),
               source_args: Sequence[str] = (), yardsticks: bool = True,
               interleave: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    work = Path(tempfile.mkdtemp(prefix="precopy-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    bench = Bench(work, out, runs, log, dest_args=dest_args, source_args=source_args, yardsticks=yardsticks)
    records: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "runs.jsonl"
    jsonl.write_text("")
    try:
        # group by link and region so each namespace, daemon and region is made once
        order = sorted(scenarios, key=lambda s: (s.link != "loopback", s.link, s.bytes, s.content))
        # Interleaved (run 1 of every scenario, then run 2, ...): a machine
        # busier for a while weighs on every scenario alike.
        batches = [order] * runs if interleave else [[sc] * runs for sc in order]
        dropped: set[int] = set()
        for b, batch in enumerate(batches):
            for j, sc in enumerate(batch):
                i, run = (j + 1, b) if interleave else (b + 1, j)
                if i in dropped:
                    continue
                rec = bench.run_once(sc, run)
                if rec is None:
                    dropped.add(i)
                    continue
                rep = rec["report"]
                log(f"[{i}/{len(order)}] {sc.key} run {run + 1}/{runs}: {rep.get('outcome')}"
                    + (f", total {rep['total_time_s']:.2f} s, downtime {rep['downtime_ms']:.1f} ms"
                       if rep.get("downtime_ms") is not None else f" ({rep.get('error') or rep.get('reason')})"))
                records.append(rec)
                with jsonl.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if interleave:
                continue
            # a region file is dropped when no later scenario uses it: keeps /dev/shm small for 4 GiB
            later = {(s.size, s.content) for s in order[b + 1:]}
            for key in [k for k in bench.regions if k not in later]:
                bench.regions.pop(key).unlink(missing_ok=True)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return records, bench.skipped


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", choices=("smoke", "quick", "full", "promise"), default="quick",
                    help="scenario list: quick (make bench), full (make bench-full), smoke (tiny; the test suite), "
                         "promise (1 GiB, 50 ms, 2,000 and 200,000 pages/s, uffd-wp and digests, interleaved, "
                         "no yardsticks: a tally of runs paused within the budget; use --runs 100) "
                         "(default: quick)")
    ap.add_argument("--runs", type=int, default=3, help="repeats of each scenario (default: 3)")
    ap.add_argument("--only", default="", metavar="REGEX",
                    help="run only scenarios whose key matches, e.g. '1G .*idle' (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: benchmarks/out/MATRIX)")
    ap.add_argument("--update-results", action="store_true",
                    help="copy the table and plots into benchmarks/results/MATRIX and rewrite that section of "
                         "benchmarks/RESULTS.md (default: off)")
    ap.add_argument("--from-jsonl", type=Path, default=None, metavar="FILE",
                    help="do not run anything: rebuild the table and plots from an earlier runs.jsonl")
    ap.add_argument("--dest-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to every precopy-dest (repeatable; for A/B runs, e.g. --dest-arg=--no-populate)")
    ap.add_argument("--source-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to every precopy-source (repeatable; e.g. --source-arg=--batch-pages=512)")
    args = ap.parse_args(argv)
    # A SIGTERM (a runner's timeout, kill PID) unwinds like Ctrl-C: each run's
    # `finally` stops its guest and agent, the daemons stop, the work dir goes.
    # Only while the matrix runs: a process that calls main() (a test) gets its own back.
    before = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(ap, args, argv)
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """main() after its arguments: run (or rebuild) the matrix, write the table and plots."""
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    out = args.out or ROOT / "benchmarks" / "out" / args.matrix

    def log(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    skipped: list[str] = []
    if args.from_jsonl:
        records = [json.loads(ln) for ln in args.from_jsonl.read_text().splitlines() if ln.strip()]
        out.mkdir(parents=True, exist_ok=True)
    else:
        scenarios = matrix(args.matrix)
        if args.only:
            pat = re.compile(args.only)
            scenarios = [s for s in scenarios if pat.search(s.key)]
        if not scenarios:
            ap.error("no scenario matches --only")
        log(f"{len(scenarios)} scenarios x {args.runs} runs; writing {out}")
        promise = args.matrix == "promise"
        records, skipped = run_matrix(scenarios, args.runs, out, log, dest_args=args.dest_arg,
                                      source_args=args.source_arg, yardsticks=not promise, interleave=promise)
    if not records:
        print("bench: no run completed", file=sys.stderr)
        return 1
    command = "python -m benchmarks.harness " + " ".join(argv if argv is not None else sys.argv[1:])
    dest_dir = ROOT / "benchmarks" / "results" / args.matrix if args.update_results else out
    dest_dir.mkdir(parents=True, exist_ok=True)
    if args.matrix == "promise":
        body = promise_markdown(records, command)
    else:
        made = plots(records, dest_dir)
        rel_base = ROOT / "benchmarks" if args.update_results else out
        body = markdown(records, command, [str(p.relative_to(rel_base)) for p in made], skipped)
    (out / "table.md").write_text(body)
    print(body)
    if args.update_results:
        if (out / "runs.jsonl").exists() and out != dest_dir:
            shutil.copy(out / "runs.jsonl", dest_dir / "runs.jsonl")
        update_results(ROOT / "benchmarks" / "RESULTS.md", args.matrix, body)
        log(f"updated benchmarks/RESULTS.md and {dest_dir.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
