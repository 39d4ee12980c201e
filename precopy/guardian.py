"""A guardian process: a paused workload is never orphaned by a dead source agent.

``precopy-source`` pauses its workload (SIGSTOP, or a guest-control
``pause``) during the switchover.  If the agent itself dies then (SIGKILL,
OOM killer, a crash of the interpreter), nobody would ever resume it.  The
guardian is a small separate process, started with the migration, that
watches the agent through a pipe: the agent writes its state to the pipe,
and the pipe's end of file tells the guardian the agent is gone.

States the agent declares (one line each) and what the guardian does if the
pipe ends (the agent died) in that state:

``idle``     (start, and again once the agent resumed its workload or knows
             the outcome) -- nothing; the guardian exits.
``armed``    (written *before* the workload is paused) -- the commit was
             never sent, so the destination can never commit: the guardian
             resumes the workload (SIGCONT / ``{"op": "resume"}``).  A resume
             of a workload that was not paused yet is harmless.
``commit``   (written *before* COMMIT is sent) -- the destination may own
             the workload now.  The guardian never resumes blindly: it asks
             the destination for the outcome by migration id (the same
             bounded retries as the agent, :meth:`SourceSession._resolve_outcome`).
             "Committed": the workload stays paused (or is stopped under
             ``--on-commit kill``); definitely "not committed": it resumes
             it; no answer: it stays paused and the guardian says, loudly,
             that the migration is in doubt.
``done``     the agent is exiting normally and has settled the workload
             itself (including "in doubt", exit 4): the guardian exits
             without touching it.

The guardian runs in its own session, so a Ctrl-C meant for the agent does
not reach it, and it holds nothing but the pipe, the workload's pid or
control-socket path and, for the outcome query, the destination's address
and key (sent through the pipe, never on a command line).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# Only the standard library at import time: the guardian starts with every
# migration, next to the copy, and should cost next to nothing.  The outcome
# query (rare) imports the engine when it is needed.

__all__ = ["Guardian", "main"]

_log = logging.getLogger("precopy-guardian")

IDLE, ARMED, COMMIT, DONE = "idle", "armed", "commit", "done"


class Guardian:
    """The agent's side: spawn the guardian, declare states, stop it.

    ``spec`` says how to resume the workload and how to ask the destination:
    ``{"workload": {"kind": "pid", "pid": N} | {"kind": "control", "path": P,
    "timeout": S}, "outcome": {"host", "port", "migration_id", "key" (hex or
    None), "tls" (None, or {"ca", "cert", "key"}: paths or None),
    "retries", "connect_timeout", "io_timeout"}, "on_commit": ...}``.
    Writes to the pipe are small and synchronous: a state is declared before
    the step it covers is taken.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            # Run as a script, not "-m precopy.guardian": importing the
            # package would load the whole engine (numpy, ...) for nothing.
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )
        assert self.proc.stdin is not None
        self._pipe = self.proc.stdin
        self.state = IDLE
        self._write(json.dumps(spec))

    def _write(self, line: str) -> None:
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except OSError as exc:  # the guardian died: the agent still works, unguarded
            _log.error("the guardian process is gone (%s): a crash of this agent would leave "
                       "a paused workload paused", exc)

    def declare(self, state: str) -> None:
        """Declare ``idle``, ``armed`` or ``commit`` (before the step it covers)."""
        if state not in (IDLE, ARMED, COMMIT):
            raise ValueError(f"unknown guardian state {state!r}")
        if state != self.state:
            self.state = state
            self._write(state)

    def close(self) -> None:
        """The agent settled the workload itself: let the guardian go."""
        self._write(DONE)
        try:
            self._pipe.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            _log.warning("guardian %d did not exit; leaving it", self.proc.pid)


# -- the guardian process -------------------------------------------------


class ResumeError(Exception):
    """The workload could not be resumed or stopped."""


def _resume(workload: dict[str, Any], op: str = "resume") -> None:
    kind = workload.get("kind")
    if kind == "pid":
        pid = int(workload["pid"])
        os.kill(pid, signal.SIGCONT if op == "resume" else signal.SIGKILL)
        return
    if kind == "control":
        # The dead agent's control connection is closed by the kernel, so a
        # guest serving one connection at a time accepts this one next.
        timeout = float(workload.get("timeout", 5.0))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(workload["path"]))
            s.sendall(json.dumps({"op": op}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                data = s.recv(4096)
                if not data:
                    break
                reply += data
        try:
            ok = json.loads(reply).get("ok") is True
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise ResumeError(f"guest answered {op!r} with {reply[:200]!r}")
        return
    raise ResumeError(f"unknown workload kind {kind!r}")


class _Unused:
    """The outcome query needs no workload."""

    def describe(self) -> str:
        return "guardian"


async def _ask(outcome: dict[str, Any]) -> str:
    """``committed``, ``not-committed`` or ``unknown`` (with the reason logged)."""
    from precopy.errors import MigrationInDoubt, PrecopyError
    from precopy.source import SourceOptions, SourceSession

    key = bytes.fromhex(outcome["key"]) if outcome.get("key") else None
    tls = outcome.get("tls")
    tls_context = None
    if tls is not None:
        from precopy.tls import client_context

        try:
            tls_context = client_context(*(Path(tls[k]) if tls.get(k) else None
                                           for k in ("ca", "cert", "key")))
        except PrecopyError as exc:
            _log.critical("cannot set up TLS to ask the destination: %s", exc)
            return "unknown"
    opts = SourceOptions(
        host=str(outcome["host"]), port=int(outcome["port"]), memory="guardian",  # type: ignore[arg-type]
        auth_key=key, tls_context=tls_context, migration_id=str(outcome["migration_id"]),
        outcome_retries=int(outcome.get("retries", 6)),
        connect_timeout_s=float(outcome.get("connect_timeout", 10.0)),
        io_timeout_s=float(outcome.get("io_timeout", 60.0)),
    )
    session = SourceSession(opts, _Unused())  # type: ignore[arg-type]
    try:
        await session._resolve_outcome(PrecopyError("the source agent died after sending COMMIT"))
    except MigrationInDoubt as exc:
        _log.critical("%s", exc)
        return "unknown"
    except PrecopyError as exc:
        _log.warning("%s", exc)
        return "not-committed"
    finally:
        session._hash_pool.shutdown(wait=False)
        session._outer_pool.shutdown(wait=False)
    return "committed"


def _on_agent_death(state: str, spec: dict[str, Any]) -> int:
    workload = spec.get("workload", {})
    what = f"pid {workload.get('pid')}" if workload.get("kind") == "pid" else f"guest {workload.get('path')}"
    if state == ARMED:
        _log.error("the source agent died before sending COMMIT: resuming the workload (%s) "
                   "on the source", what)
        try:
            _resume(workload)
        except (OSError, ResumeError) as exc:
            _log.critical("could not resume the workload (%s): %s; resume it by hand", what, exc)
            return 1
        return 0
    if state == COMMIT:
        mid = spec.get("outcome", {}).get("migration_id")
        _log.warning("the source agent died after sending COMMIT for migration %s: asking the "
                     "destination for the outcome", mid)
        import asyncio

        answer = asyncio.run(_ask(spec["outcome"]))
        if answer == "not-committed":
            _log.error("migration %s was not committed: resuming the workload (%s) on the source",
                       mid, what)
            try:
                _resume(workload)
            except (OSError, ResumeError) as exc:
                _log.critical("could not resume the workload (%s): %s; resume it by hand", what, exc)
                return 1
            return 0
        if answer == "committed":
            _log.warning("migration %s committed: the workload runs on the destination; the "
                         "source copy (%s) stays paused", mid, what)
            if spec.get("on_commit") == "kill":
                try:
                    _resume(workload, "stop")
                except (OSError, ResumeError) as exc:
                    _log.error("could not stop the source workload (%s): %s", what, exc)
            return 0
        _log.critical("migration %s is IN DOUBT: the workload (%s) is left PAUSED on the source; "
                      "check the destination for the migration id, then resume or kill it by hand",
                      mid, what)
        return 4
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s precopy-guardian[%(process)d] %(levelname)s %(message)s")
    # Only the pipe's end may end the guardian: not a Ctrl-C or a hang-up
    # meant for the agent.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    first = sys.stdin.buffer.readline()
    try:
        spec = json.loads(first)
    except ValueError:
        _log.error("bad specification from the agent: %r", first[:200])
        return 2
    state = IDLE
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").strip()
        if line == DONE:
            return 0
        if line in (IDLE, ARMED, COMMIT):
            state = line
        else:
            _log.error("ignoring unknown state %r from the agent", line)
    return _on_agent_death(state, spec)


if __name__ == "__main__":
    # Run as a script: import the engine from the package this file is in.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.exit(main())
