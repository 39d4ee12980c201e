"""precopy-source ctl: a client of the source daemon's control socket.

    precopy-source ctl start [--watch] -- --to HOST:PORT --memory PATH --pid PID [...]
    precopy-source ctl status ID
    precopy-source ctl watch ID
    precopy-source ctl cancel ID
    precopy-source ctl list

Answers are printed as JSON (one object per line) on stdout; ``watch`` (and
``start --watch``) show a progress line on a terminal and end with the
job as JSON.  Exit codes: 0 success (for a watched migration: committed or
preflight-ok); 1 the daemon refused the request or is unreachable; 2
usage; 3 the watched migration aborted (the workload runs on the source);
4 in doubt (left paused).
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

from .common import EXIT_ABORTED, EXIT_FAILURE, EXIT_IN_DOUBT, EXIT_OK, ProgressLine
from .source_daemon import DEFAULT_CONTROL

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


def _watch(control: Path, jid: str, progress: str) -> int:
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
    print(json.dumps(done), flush=True)
    return _EXIT_OF_STATE.get(str(done.get("job", {}).get("state")), EXIT_FAILURE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="precopy-source ctl",
        description="Drive a running 'precopy-source serve' over its control socket.",
        epilog="Exit codes: 0 ok (a watched migration committed); 1 refused or unreachable; 2 usage; "
               "3 the watched migration aborted; 4 in doubt.",
    )
    p.add_argument("--control", type=Path, default=Path(os.environ.get("PRECOPY_CONTROL", DEFAULT_CONTROL)),
                   metavar="SOCKET",
                   help=f"the daemon's control socket (default: $PRECOPY_CONTROL or {DEFAULT_CONTROL})")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress line while watching (default auto: on a terminal)")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for a daemon that is starting (no socket yet) (default 5)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    st = sub.add_parser("start", help="start a migration; the options after -- are precopy-source's",
                        description="Start a migration. Everything after -- is passed as precopy-source "
                                    "options (see precopy-source --help); prints {\"ok\": true, \"id\": ID}.")
    st.add_argument("--watch", action="store_true",
                    help="then follow it until it ends; exit code as precopy-source's")
    st.add_argument("options", nargs=argparse.REMAINDER, help="precopy-source options (required)")
    for name, text in (("status", "state, progress and report of a migration"),
                       ("watch", "follow a migration until it ends"),
                       ("cancel", "cancel a running migration (it rolls back)")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("id", help="migration id, from start or list (required)")
    sub.add_parser("list", help="all migrations this daemon knows, past ones included",
                   description="all migrations this daemon knows, past ones included")
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
            ans = _one(args.control, {"op": "start", "argv": opts})
            print(json.dumps(ans), flush=True)
            return _watch(args.control, str(ans["id"]), args.progress) if args.watch else EXIT_OK
        if args.cmd == "watch":
            return _watch(args.control, args.id, args.progress)
        if args.cmd == "list":
            ans = _one(args.control, {"op": "list"})
            for job in ans.get("jobs", []):
                print(json.dumps(job))
            return EXIT_OK
        ans = _one(args.control, {"op": args.cmd, "id": args.id})
        print(json.dumps(ans), flush=True)
        return EXIT_OK
    except CtlError as exc:
        print(f"precopy-source ctl: {exc}", file=sys.stderr)
        return EXIT_FAILURE
