"""precopy-source serve: a long-running source daemon driven over a control socket.

The control endpoint is a Unix stream socket (mode 0600: whoever can open
it can migrate workloads) speaking JSON lines: one request object per line,
one answer object per line (``watch`` streams several).  Every answer has
``"ok"``; a refused request has ``"ok": false`` and ``"error"``.

* ``{"op": "start", "options": {"to": "10.0.0.2:7070", "memory": "/dev/shm/g",
  "pid": 4242, "downtime-ms": 300}}`` — or ``"argv": ["--to", ...]`` — starts
  a migration.  The options are exactly those of the one-shot
  ``precopy-source`` (same names as its flags, same validation); the
  daemon's ``[migration]`` config table supplies defaults.  Answer:
  ``{"ok": true, "id": ID}``.
* ``{"op": "status", "id": ID}`` — state (queued, running, committed,
  aborted, in-doubt, preflight-ok), progress (its ``phase``: queued, full
  copy, iterating, switchover, then the outcome), and the report once
  finished.  At most ``--max-active`` migrations run at once; the others
  are "queued" with ``queue_position`` (1: next), first come first served.
  A running migration the destination holds in its own queue shows
  ``queued_at`` "destination" and its position there.
* ``{"op": "watch", "id": ID}`` — progress lines ``{"ok": true, "event":
  "progress", ...}`` as the migration advances, then ``{"ok": true,
  "event": "done", "job": {...}}``.
* ``{"op": "cancel", "id": ID}`` — cancel: before the commit the workload
  resumes on the source (rolled back); after COMMIT was sent the outcome is
  asked of the destination, as for the one-shot command.
* ``{"op": "list"}`` — every migration this daemon knows, newest last,
  including past ones (their reports are kept in ``--report-dir``).

Paths in start options are the daemon's paths and must be absolute (a
relative one is refused; ``ctl`` makes them absolute for its caller).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

from precopy.policy.admission import Admission, Ticket, default_max_active
from precopy.errors import MigrationAborted, MigrationInDoubt, PrecopyError
from precopy.session.options import Progress, SourceOptions
from precopy.session.source import migrate
from precopy.session.tally import RECENT_KEPT, Tally
from precopy.workload.qemu import QemuWorkload
from precopy.workload.base import Workload
from precopy.workload.control import GuestControl

from .common import DEFAULT_CONTROL, EXIT_OK, EXIT_USAGE, Parser, add_common_args, parse_hostport, run, setup_logging
from .config import ConfigError, add_config_args, config_values, effective_config, load_config, parse_with_config
from .metrics import MetricsServer, source_metrics, tally_report
from .source_args import build_parser as build_start_parser
from .source_args import make_migration

__all__ = ["SourceDaemon", "build_parser", "main", "DEFAULT_CONTROL"]

_log = logging.getLogger("precopy-source")

#: A request line longer than this is refused (the connection is closed).
MAX_REQUEST = 1 << 20
#: Jobs kept in memory; older ones stay in their report files (--report-dir).
MAX_JOBS = RECENT_KEPT


class RequestError(Exception):
    """A control request that cannot be served; the message goes back to the client."""


@dataclass
class Job:
    id: str
    options: dict[str, Any]
    state: str = "running"
    started: float = field(default_factory=time.time)
    progress: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    task: asyncio.Task[Any] | None = None
    watchers: list[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=list)
    #: Place in this daemon's queue while "queued" (1: next), else 0.
    queue_position: int = 0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "state": self.state, "started": self.started,
                               "memory": self.options.get("memory"), "to": self.options.get("to")}
        if self.state == "queued":
            out["queue_position"] = self.queue_position
            out["queued_at"] = "source"
        elif self.state == "running" and self.progress is not None and self.progress.get("phase") == "queued":
            out["queue_position"] = self.progress.get("queue_position")
            out["queued_at"] = "destination"
        if self.progress is not None:
            out["progress"] = self.progress
        if self.report is not None:
            for k in ("downtime_ms", "expected_downtime_ms", "total_time_s", "bytes_on_wire", "error"):
                out[k] = self.report.get(k)
        return out


class _ParseError(Exception):
    pass


def _raising_parser() -> argparse.ArgumentParser:
    """The one-shot parser, reporting errors as exceptions instead of exiting."""
    p = build_start_parser()

    def error(message: str) -> NoReturn:
        raise _ParseError(message)

    def exit(status: int = 0, message: str | None = None) -> NoReturn:
        raise _ParseError(message or "help is not available in a start request")

    p.error = error  # type: ignore[method-assign]
    p.exit = exit  # type: ignore[method-assign]
    return p


class SourceDaemon:
    """Runs migrations on request; see the module docstring for the protocol."""

    def __init__(self, control: Path, report_dir: Path | None = None,
                 defaults: dict[str, Any] | None = None, max_active: int | None = None) -> None:
        self.control = control
        self.report_dir = report_dir
        self.defaults = dict(defaults or {})
        #: Migrations that move bytes at once; the others are "queued", in order.
        self.admission = Admission(default_max_active() if max_active is None else max_active)
        self.jobs: dict[str, Job] = {}
        #: Totals over every finished migration (the metrics' counters), past reports included.
        self.tally = Tally()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        if self.report_dir is not None:
            try:
                self.report_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PrecopyError(f"cannot create --report-dir {self.report_dir}: {exc.strerror}") from exc
            self._load_past()
        try:
            self.control.parent.mkdir(parents=True, exist_ok=True)
            if self.control.is_socket():
                self.control.unlink()  # a stale socket of an earlier run
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._handle, path=str(self.control),
                                                               limit=MAX_REQUEST)
            finally:
                os.umask(old)
        except OSError as exc:
            raise PrecopyError(f"cannot serve the control socket {self.control}: {exc.strerror or exc}") from exc
        _log.info("control socket %s", self.control)

    def _load_past(self) -> None:
        assert self.report_dir is not None
        for path in sorted(self.report_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)[-MAX_JOBS:]:
            try:
                rep = json.loads(path.read_text())
                job = Job(id=str(rep["migration_id"]), options=dict(rep.get("options") or {}),
                          state=str(rep["outcome"]), started=float(rep.get("started") or path.stat().st_mtime),
                          report=rep)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                _log.error("ignoring unreadable report %s: %s", path, exc)
                continue
            self.jobs[job.id] = job
            tally_report(self.tally, job.state, rep)

    async def close(self) -> None:
        """Stop serving; cancel running migrations (they roll back) and wait for them."""
        if self._server is not None:
            self._server.close()
        running = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        try:
            self.control.unlink()
        except FileNotFoundError:
            pass

    # -- requests ---------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._send(writer, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise RequestError("a request is a JSON object")
                    await self._dispatch(req, writer)
                except (ValueError, RequestError) as exc:
                    await self._send(writer, {"ok": False, "error": str(exc)})
        except ConnectionError as exc:
            _log.debug("control client went away: %s", exc)
        finally:
            self._conns.discard(task)
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    def _job(self, req: dict[str, Any]) -> Job:
        jid = req.get("id")
        if not isinstance(jid, str):
            raise RequestError("this request needs \"id\": the migration id (see \"list\")")
        job = self.jobs.get(jid)
        if job is None:
            raise RequestError(f"no migration {jid!r} here")
        return job

    async def _dispatch(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op = req.get("op")
        if op == "start":
            job = self.start_job(req)
            await self._send(writer, {"ok": True, "id": job.id})
        elif op == "status":
            job = self._job(req)
            await self._send(writer, {"ok": True, "job": job.summary(), "report": job.report})
        elif op == "list":
            await self._send(writer, {"ok": True, "jobs": [j.summary() for j in self.jobs.values()]})
        elif op == "cancel":
            job = self._job(req)
            if job.task is None or job.task.done():
                raise RequestError(f"migration {job.id} is not running (it is {job.state})")
            job.task.cancel()
            await self._send(writer, {"ok": True, "id": job.id, "state": "cancelling"})
        elif op == "watch":
            job = self._job(req)
            await self._watch(job, writer)
        else:
            raise RequestError(f"unknown op {op!r}: use start, status, watch, cancel or list")

    async def _watch(self, job: Job, writer: asyncio.StreamWriter) -> None:
        if job.task is None or job.task.done():
            await self._send(writer, {"ok": True, "event": "done", "job": job.summary(), "report": job.report})
            return
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
        job.watchers.append(q)
        try:
            while True:
                item = await q.get()
                if item is None:
                    await self._send(writer, {"ok": True, "event": "done", "job": job.summary(),
                                              "report": job.report})
                    return
                await self._send(writer, {"ok": True, "event": "progress", **item})
        finally:
            job.watchers.remove(q)

    # -- migrations -------------------------------------------------------

    def start_job(self, req: dict[str, Any]) -> Job:
        """Validate a start request and launch the migration.  Raises RequestError."""
        args = self._start_args(req)
        try:
            opts, workload = make_migration(args)
        except (PrecopyError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        shown = {k: v for k, v in _plain(vars(args)).items() if k not in ("config", "config_values", "help", "check_config")}
        job = Job(id=str(opts.migration_id), options=shown)
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            oldest = next(iter(self.jobs))
            if self.jobs[oldest].state == "running":
                break
            del self.jobs[oldest]
        job.task = asyncio.create_task(self._supervise(job, opts, workload, args.report))
        _log.info("migration %s started: %s -> %s", job.id, args.memory, shown.get("to"))
        return job

    def _start_args(self, req: dict[str, Any]) -> argparse.Namespace:
        """A start request's options, parsed and checked as the one-shot command's.  Raises RequestError."""
        parser = _raising_parser()
        try:
            values = config_values(parser, self.defaults)
            if "argv" in req:
                argv = req["argv"]
                if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                    raise RequestError("\"argv\" must be a list of strings")
            else:
                options = req.get("options")
                if not isinstance(options, dict):
                    raise RequestError("start needs \"options\" (a map of precopy-source options) or \"argv\"")
                values.update(config_values(parser, options))
                argv = []
            if "--config" in argv or any(a.startswith("--config=") for a in argv):
                raise RequestError("--config is not accepted in a start request")
            args = parse_with_config(parser, argv, values)
        except (ConfigError, _ParseError) as exc:
            raise RequestError(f"bad options: {exc}") from None
        for name in ("memory", "guest_control", "qmp", "report", "auth_key_file", "tls_ca", "tls_cert", "tls_key"):
            value = getattr(args, name, None)
            if isinstance(value, Path) and not value.is_absolute():
                raise RequestError(f"--{name.replace('_', '-')} {value} is a relative path: give an absolute one "
                                   f"(the daemon runs in {os.getcwd()}, not where the request came from)")
        if args.migration_id is None:
            args.migration_id = uuid.uuid4().hex
        if args.migration_id in self.jobs:
            raise RequestError(f"migration id {args.migration_id} was already used here")
        for other in self.jobs.values():
            if other.state in ("queued", "running") and other.options.get("memory") == str(args.memory):
                raise RequestError(f"{args.memory} is already being migrated (migration {other.id})")
        return args

    @staticmethod
    def _progress_to(job: Job) -> Callable[[Progress], None]:
        """The engine's progress callback for ``job``: kept, and passed to its watchers (at most 10/s)."""
        last = [0.0]

        def progress(p: Progress) -> None:
            before = job.progress.get("phase") if job.progress else None
            job.progress = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(p).items()}
            now = time.monotonic()
            if now - last[0] < 0.1 and p.phase == before:  # a new phase always goes out
                return
            last[0] = now
            for q in job.watchers:
                if not q.full():
                    q.put_nowait(job.progress)

        return progress

    async def _supervise(self, job: Job, opts: SourceOptions, workload: Workload, report_file: Path | None) -> None:
        try:
            await self._run_job(job, opts, workload)
        except Exception as exc:  # a bug must not take the daemon down; the job says why
            _log.exception("migration %s: internal error", job.id)
            job.state = "aborted"
            job.report = {"migration_id": job.id, "outcome": "aborted", "error": f"internal error: {exc}"}
        finally:
            self._finish(job, report_file)

    async def _run_job(self, job: Job, opts: SourceOptions, workload: Workload) -> None:
        # A QEMU VM's QMP socket is opened before the migration, as by the
        # one-shot command; a guest's control socket is probed on a dry run.
        if isinstance(workload, QemuWorkload) or (opts.dry_run and isinstance(workload, GuestControl)):
            try:
                await workload.connect()
            except PrecopyError as exc:
                await workload.close()
                job.state, job.report = "aborted", {"migration_id": job.id, "outcome": "aborted",
                                                    "error": f"cannot reach the workload: {exc}"}
                return
        ticket = None if opts.dry_run else self.admission.join(job.id)  # a dry run moves nothing
        waited = 0.0
        try:
            if ticket is not None:
                waited = await self._wait_turn(job, ticket)
            job.state, job.queue_position = "running", 0
            rep = await migrate(opts, workload, self._progress_to(job))
            _log.info("migration %s: %s", job.id, rep.outcome)
        except MigrationAborted as exc:
            rep = exc.report  # type: ignore[attr-defined]
            _log.error("migration %s aborted, the workload keeps running on the source: %s", job.id, exc)
        except MigrationInDoubt as exc:
            rep = exc.report  # type: ignore[attr-defined]
            _log.critical("migration %s: %s", job.id, exc)
        finally:
            if ticket is not None:
                self.admission.leave(ticket)
            if isinstance(workload, (GuestControl, QemuWorkload)):
                await workload.close()
        job.state = rep.outcome
        job.report = json.loads(rep.to_json())
        # The last progress said where the migration was; now it says how it ended.
        job.progress = {**(job.progress or {}), "phase": rep.outcome,
                        "round": rep.rounds[-1].round if rep.rounds else 0, "eta_s": None,
                        "expected_downtime_ms": rep.expected_downtime_ms, "downtime_ms": rep.downtime_ms,
                        "elapsed_s": round(rep.total_time_s, 4)}
        job.report["source_queued_s"] = round(waited, 3)  # before the engine's total_time_s began

    async def _wait_turn(self, job: Job, ticket: Ticket) -> float:
        """Wait (state "queued") until --max-active lets the job move bytes; the seconds waited."""
        t_queue = time.monotonic()
        while not await self.admission.wait(ticket):
            job.state, job.queue_position = "queued", self.admission.position(ticket)
            queued = {"phase": "queued", "queued_at": "source", "queue_position": job.queue_position}
            for q in job.watchers:
                if not q.full():
                    q.put_nowait(queued)
        waited = time.monotonic() - t_queue
        if job.state == "queued":
            _log.info("migration %s: its turn after %.1f s queued (--max-active %d)", job.id,
                      waited, self.admission.limit)
        return waited

    def _finish(self, job: Job, report_file: Path | None) -> None:
        if job.state in ("queued", "running"):  # cancelled before the engine produced a report
            job.state = "aborted"
            job.report = {"migration_id": job.id, "outcome": "aborted", "error": "cancelled"}
        if job.progress is not None and job.progress.get("phase") != job.state:
            job.progress = {**job.progress, "phase": job.state, "eta_s": None}
        assert job.report is not None
        tally_report(self.tally, job.state, job.report)
        job.report.setdefault("options", job.options)
        job.report.setdefault("started", job.started)
        text = json.dumps(job.report, indent=1) + "\n"
        for path in (report_file, self.report_dir / f"{job.id}.json" if self.report_dir else None):
            if path is None:
                continue
            try:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
            except OSError as exc:
                _log.error("cannot write report %s: %s", path, exc.strerror)
        for q in job.watchers:
            while q.full():
                q.get_nowait()
            q.put_nowait(None)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Namespace values as JSON: paths as strings, HOST:PORT joined."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple) and len(v) == 2:
            v = f"{v[0]}:{v[1]}"
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="precopy-source serve",
        description="Run as a daemon: migrations are started, watched, cancelled and listed over a local "
                    "control socket (JSON lines; 'precopy-source ctl' is a client).  Each start request "
                    "takes the options of the one-shot precopy-source.  The --config file may hold a "
                    "[migration] table of defaults for them (e.g. auth-key-file, downtime-ms).",
    )
    p.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL), metavar="SOCKET",
                   help=f"Unix socket to serve requests on, mode 0600 (default: {DEFAULT_CONTROL})")
    p.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="keep each migration's JSON report here as ID.json; 'list' shows them after a "
                        "restart too (default: none, reports only in memory)")
    p.add_argument("--metrics", type=parse_hostport, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    p.add_argument("--max-active", type=int, default=None, metavar="N",
                   help="migrations that move bytes at once; more start requests are accepted and wait "
                        "their turn in order (state \"queued\", queue_position; the wait counts toward "
                        "neither their downtime nor their --max-time) (default: one per two CPUs, "
                        f"here {default_max_active()})")
    add_common_args(p)
    add_config_args(p)
    return p


async def _serve(daemon: SourceDaemon, metrics: tuple[str, int] | None) -> int:
    await daemon.start()
    metrics_server = None
    if metrics is not None:
        metrics_server = MetricsServer(metrics[0], metrics[1], lambda: source_metrics(daemon.jobs.values(),
                                                                                   daemon.admission.limit,
                                                                                   daemon.tally))
        try:
            await metrics_server.start()
        except OSError as exc:
            await daemon.close()
            raise PrecopyError(str(exc.strerror)) from exc
    print(f"precopy-source serving {daemon.control}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def shut_down(sig: signal.Signals) -> None:
        _log.info("%s: shutting down (running migrations roll back)", sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shut_down, sig)
    await stop.wait()
    await daemon.close()
    if metrics_server is not None:
        await metrics_server.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # The [migration] table holds defaults for start requests; the rest are serve's options.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    file_values: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    if known.config is not None:
        try:
            data = load_config(known.config)
            defaults = data.pop("migration", {})
            if not isinstance(defaults, dict):
                raise ConfigError("key 'migration': must be a table of precopy-source options")
            config_values(_raising_parser(), defaults)
            file_values = config_values(parser, data)
        except (ConfigError, _ParseError) as exc:
            msg = str(exc)
            msg = msg if msg.startswith("config") else f"config {known.config}: {msg}"
            parser.exit(2, f"{parser.prog}: error: {msg}\n")
        argv = [a for i, a in enumerate(argv)
                if not (a == "--config" or a.startswith("--config=") or (i and argv[i - 1] == "--config"))]
    args = parse_with_config(parser, argv, file_values)
    setup_logging(args.log_level, args.log_format)
    if args.check_config:
        print(effective_config(args))
        if defaults:
            print("[migration]")
            print("\n".join(f"{k} = {json.dumps(v)}" for k, v in defaults.items()))
        print("precopy-source serve: configuration OK", file=sys.stderr)
        return EXIT_OK
    if args.max_active is not None and args.max_active < 1:
        parser.error("--max-active must be at least 1")
    daemon = SourceDaemon(args.control, args.report_dir, defaults, args.max_active)
    try:
        return run(_serve(daemon, args.metrics), args.event_loop)
    except PrecopyError as exc:
        print(f"precopy-source serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
