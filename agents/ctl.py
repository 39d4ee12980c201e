"""precopy-source ctl: a client of the source daemon's control socket.

    precopy-source ctl [--json] start [--watch] -- --to HOST:PORT --memory PATH --pid PID [...]
    precopy-source ctl [--json] status ID
    precopy-source ctl [--json] watch ID
    precopy-source ctl [--json] cancel ID
    precopy-source ctl [--json] list

For people (the default): ``watch`` (and ``start --watch``) show a progress
line on a terminal and end with the summary the one-shot ``precopy-source``
prints; ``list`` is a table; ``status`` the job and its summary.  For
scripts, ``--json`` prints the daemon's answers as JSON, one object per line
(``watch``: the final ``done`` event; ``list``: one job per line).  Exit
codes: 0 success (for a watched migration: committed or preflight-ok); 1 the
daemon refused the request or is unreachable; 2 usage; 3 the watched
migration aborted (the workload runs on the source); 4 in doubt (left
paused).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from .common import (
    DEFAULT_CONTROL,
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_IN_DOUBT,
    EXIT_OK,
    Parser,
    ProgressLine,
    add_version_arg,
)
from .summary import summary

__all__ = ["main", "request", "build_parser"]

_EXIT_OF_STATE = {"committed": EXIT_OK, "preflight-ok": EXIT_OK, "aborted": EXIT_ABORTED,
                  "in-doubt": EXIT_IN_DOUBT}


class CtlError(Exception):
    pass


def _lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    f = sock.makefile("rb")
    for line in f:
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CtlError(f"the daemon sent something that is not JSON: {line[:80]!r}") from exc
        if not isinstance(obj, dict):
            raise CtlError("the daemon sent a non-object answer")
        yield obj


def request(control: Path, req: dict[str, Any], *, stream: bool = False,
            timeout_s: float | None = 30.0, wait_s: float = 0.0) -> Iterator[dict[str, Any]]:
    """Send one request; yield the answer (or, with ``stream``, every answer until "done")."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(None if stream else timeout_s)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                s.connect(str(control))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                # A daemon that is starting: its socket appears in a moment.
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                err: OSError = exc
            except OSError as exc:
                err = exc
            raise CtlError(f"cannot reach the source daemon at {control}: {err.strerror or err} "
                           "(is 'precopy-source serve' running? --control?)") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        for ans in _lines(s):
            yield ans
            if not stream or not ans.get("ok") or ans.get("event") == "done":
                return
        raise CtlError("the daemon closed the connection without answering")
    finally:
        s.close()


_WAIT_S = 0.0


def _one(control: Path, req: dict[str, Any]) -> dict[str, Any]:
    ans = next(request(control, req, wait_s=_WAIT_S))
    if not ans.get("ok"):
        raise CtlError(str(ans.get("error")))
    return ans


def _report_summary(report: dict[str, Any] | None, job: dict[str, Any]) -> str:
    """The one-shot command's summary of a finished job (or what is known of it)."""
    from precopy.session.report import MigrationReport

    data = dict(report or {"migration_id": job.get("id", "?"), "outcome": job.get("state", "?")})
    try:
        return summary(MigrationReport.from_dict(data))
    except (TypeError, ValueError) as exc:  # a report from another version: say so, show the gist
        return (f"migration {data.get('migration_id')}: {data.get('outcome')} "
                f"(its report could not be read: {exc}; --json shows it)")


def _age(started: Any) -> str:
    if not isinstance(started, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))


def _where(job: dict[str, Any]) -> str:
    """A job's progress, or how it ended, in a few words."""
    state = job.get("state")
    p = job.get("progress") or {}
    if state == "queued" or p.get("phase") == "queued":
        return f"queued at the {job.get('queued_at', 'source')}, position {job.get('queue_position')}"
    if state == "running":
        if p.get("phase") == "switchover":
            return "switchover (the workload is paused)"
        if not p:
            return "connecting"
        todo = p.get("pages_todo") or 0
        pct = 100.0 * (p.get("pages_done") or 0) / todo if todo else 0.0
        name = f"round {p.get('round')}" if p.get("round") else "full copy"
        return f"{name} {pct:.0f}%"
    if state == "committed" and job.get("downtime_ms") is not None:
        return f"downtime {job['downtime_ms']:.1f} ms, {job.get('total_time_s') or 0:.1f} s"
    if job.get("error"):
        return str(job["error"])
    return ""


def _table(jobs: list[dict[str, Any]]) -> str:
    rows = [("ID", "STATE", "STARTED", "MEMORY", "TO", "")]
    for job in jobs:
        rows.append((str(job.get("id")), str(job.get("state")), _age(job.get("started")),
                     str(job.get("memory") or "-"), str(job.get("to") or "-"), _where(job)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows).rstrip()


def _watch(control: Path, jid: str, progress: str, as_json: bool = True) -> int:
    line = ProgressLine(stream=sys.stderr, enabled={"auto": None, "on": True, "off": False}[progress])
    done: dict[str, Any] = {}
    try:
        for ans in request(control, {"op": "watch", "id": jid}, stream=True, wait_s=_WAIT_S):
            if not ans.get("ok"):
                raise CtlError(str(ans.get("error")))
            if ans.get("event") == "progress":
                line(SimpleNamespace(**{k: v for k, v in ans.items() if k not in ("ok", "event")}))
            elif ans.get("event") == "done":
                done = ans
    finally:
        line.done()
    job = done.get("job", {})
    if as_json:
        print(json.dumps(done), flush=True)
    else:
        print(_report_summary(done.get("report"), job), flush=True)
    return _EXIT_OF_STATE.get(str(job.get("state")), EXIT_FAILURE)


#: precopy-source options whose value is a path (made absolute before a start request).
_PATH_OPTIONS = ("--memory", "--guest-control", "--qmp", "--report", "--auth-key-file", "--tls-ca",
                 "--tls-cert", "--tls-key")


def _absolute(argv: list[str]) -> list[str]:
    """Relative path values made absolute against this directory: the daemon's is not the caller's."""
    out = list(argv)
    for i, a in enumerate(out):
        name, eq, value = a.partition("=")
        if name in _PATH_OPTIONS and eq and value and not value.startswith("/"):
            out[i] = f"{name}={os.path.abspath(value)}"
        elif a in _PATH_OPTIONS and i + 1 < len(out) and out[i + 1] and not out[i + 1].startswith(("/", "-")):
            out[i + 1] = os.path.abspath(out[i + 1])
    return out


def _json_here(sp: argparse.ArgumentParser) -> None:
    """--json after the command too (``ctl list --json``), as before it."""
    sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="JSON for scripts, as ctl --json")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="precopy-source ctl",
        description="Drive a running 'precopy-source serve' over its control socket.",
        epilog="Exit codes: 0 ok (a watched migration committed); 1 refused or unreachable; 2 usage; "
               "3 the watched migration aborted; 4 in doubt.",
    )
    p.add_argument("--control", type=Path, default=Path(os.environ.get("PRECOPY_CONTROL", DEFAULT_CONTROL)),
                   metavar="SOCKET",
                   help=f"the daemon's control socket (default: $PRECOPY_CONTROL or {DEFAULT_CONTROL})")
    p.add_argument("--json", action="store_true",
                   help="print the daemon's answers as JSON, one object per line, for scripts (default: "
                        "for people: a summary, a table)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress line while watching (default auto: on a terminal)")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for a daemon that is starting (no socket yet) (default 5)")
    add_version_arg(p)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    st = sub.add_parser("start", help="start a migration; the options after -- are precopy-source's",
                        description="Start a migration. Everything after -- is passed as precopy-source "
                                    "options (see precopy-source --help); prints its id (--json: "
                                    "{\"ok\": true, \"id\": ID}). Relative paths are made absolute "
                                    "here: the daemon resolves none.")
    st.add_argument("--watch", action="store_true",
                    help="then follow it until it ends; exit code as precopy-source's")
    _json_here(st)
    st.add_argument("options", nargs=argparse.REMAINDER, help="precopy-source options (required)")
    for name, text in (("status", "state, progress and report of a migration"),
                       ("watch", "follow a migration until it ends"),
                       ("cancel", "cancel a running migration (it rolls back)")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("id", help="migration id, from start or list (required)")
        _json_here(sp)
    _json_here(sub.add_parser("list", help="all migrations this daemon knows, past ones included",
                              description="all migrations this daemon knows, past ones included"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    global _WAIT_S
    _WAIT_S = args.wait
    try:
        if args.cmd == "start":
            opts = args.options[1:] if args.options[:1] == ["--"] else args.options
            if not opts:
                parser.error("start needs precopy-source options after --")
            ans = _one(args.control, {"op": "start", "argv": _absolute(opts)})
            if args.json:
                print(json.dumps(ans), flush=True)
            elif not args.watch:
                print(f"migration {ans['id']} started (precopy-source ctl watch {ans['id']} follows it)",
                      flush=True)
            return _watch(args.control, str(ans["id"]), args.progress, args.json) if args.watch else EXIT_OK
        if args.cmd == "watch":
            return _watch(args.control, args.id, args.progress, args.json)
        if args.cmd == "list":
            ans = _one(args.control, {"op": "list"})
            jobs = [j for j in ans.get("jobs", []) if isinstance(j, dict)]
            if args.json:
                for job in jobs:
                    print(json.dumps(job))
            else:
                print(_table(jobs) if jobs else "no migrations yet", flush=True)
            return EXIT_OK
        ans = _one(args.control, {"op": args.cmd, "id": args.id})
        if args.json:
            print(json.dumps(ans), flush=True)
        elif args.cmd == "cancel":
            print(f"migration {args.id}: cancelling (it rolls back; the workload resumes on the source)",
                  flush=True)
        else:
            job = ans.get("job") or {}
            print(_table([job]), flush=True)
            if job.get("state") not in ("queued", "running"):
                print(_report_summary(ans.get("report"), job), flush=True)
        return EXIT_OK
    except CtlError as exc:
        print(f"precopy-source ctl: {exc}", file=sys.stderr)
        return EXIT_FAILURE
