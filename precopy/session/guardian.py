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
             the outcome) -- nothing (a QEMU VM gets its migration settings
             back, see below); the guardian exits.
``armed``    (written *before* the workload is paused) -- the commit was
             never sent, so the destination can never commit: the guardian
             resumes the workload (SIGCONT / ``{"op": "resume"}``, after a
             SIGCONT to the guest's process in case the agent's SIGSTOP duty
             cycle left it stopped / QMP ``cont``).  A resume of a workload that was not paused yet is
             harmless.
``commit``   (written *before* COMMIT is sent) -- the destination may own
             the workload now.  The guardian never resumes blindly: it asks
             the destination for the outcome by migration id (the same
             bounded retries as the agent: :func:`precopy.session.commit.resolve_outcome`).
             "Committed": the workload stays paused (or is stopped under
             ``--on-commit kill``); definitely "not committed": it resumes
             it; no answer: it stays paused and the guardian says, loudly,
             that the migration is in doubt.
``postcopy`` (written *before* POSTCOPY is sent) -- the workload may run
             on the destination with pages that only the paused copy here
             holds.  The guardian never resumes it: it takes the page stream
             up itself (RESUME on a new connection, the same retries as the
             agent: :func:`precopy.session.postcopy_stream.finish_stream`,
             from the region named in the spec's ``region``) and, once the
             destination has every page, settles the workload as after a
             commit; if the destination says it never resumed the workload
             (a definite "not committed") it resumes it here; if neither can
             be learned -- or the destination committed but has no stream to
             resume (it lost it) -- the workload stays paused, loudly, exit 4.
``done``     the agent is exiting normally and has settled the workload
             itself (including "in doubt", exit 4): the guardian exits
             without touching it.

A QEMU VM (``--qmp``) is settled over its QMP socket, which the dead
agent's connection no longer holds: whatever the state, the guardian puts
back the migration settings the agent changed (``x-ignore-shared``,
``max-bandwidth``, recorded when the agent connected) unless it quits the VM,
and removes the agent's device-state save file; to resume, it first cancels
a device-state save still in flight, then ``cont`` (only if the VM ran when
the migration began).  A VM left paused (committed, or in doubt) keeps its
state: only its settings change, as the agent itself would have done.

The guardian runs in its own session, so a Ctrl-C meant for the agent does
not reach it, and it holds nothing but the pipe, the workload's pid,
control-socket or QMP-socket path and, for the outcome query, the destination's address
and key (sent through the pipe, never on a command line).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

# Only the standard library at import time: the guardian starts with every
# migration, next to the copy, and should cost next to nothing.  The outcome
# query (rare) imports the engine when it is needed.

__all__ = ["Guardian", "main"]

_log = logging.getLogger("precopy-guardian")

IDLE, ARMED, COMMIT, DONE, POSTCOPY = "idle", "armed", "commit", "done", "postcopy"


class Guardian:
    """The agent's side: spawn the guardian, declare states, stop it.

    ``spec`` says how to resume the workload and how to ask the destination:
    ``{"workload": {"kind": "pid", "pid": N} | {"kind": "control", "path": P,
    "timeout": S} | {"kind": "qmp", "path": P, "timeout": S, "was_running":
    bool, "restore": [[command, arguments], ...], "state_files": PREFIX},
    "outcome": {"host", "port", "migration_id", "key" (hex or
    None), "tls" (None, or {"ca", "cert", "key"}: paths or None),
    "retries", "connect_timeout", "io_timeout"}, "on_commit": ...}``.
    Writes to the pipe are small and synchronous: a state is declared before
    the step it covers is taken.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        here = Path(__file__).resolve()
        self.proc = subprocess.Popen(
            # Run as a script, not "-m precopy.session.guardian": importing the
            # package would load the whole engine (numpy, ...) for nothing; and
            # its first stage, which loads this module only if it must act
            # (precopy.session.guardian_boot), without site (-S).
            [sys.executable, "-S", str(here.with_name("guardian_boot.py")), str(here)], stdin=subprocess.PIPE,
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
        """Declare ``idle``, ``armed`` or ``commit`` (before the step it covers; ``postcopy``: :meth:`postcopy`)."""
        if state not in (IDLE, ARMED, COMMIT):
            raise ValueError(f"unknown guardian state {state!r}")
        if state != self.state:
            self.state = state
            self._write(state)

    def postcopy(self, region: dict[str, Any]) -> None:
        """Declare ``postcopy`` (before POSTCOPY is sent), with the region the guardian would serve
        the pages from: ``{"memory": path, "name": ..., "size": bytes}``."""
        self.state = POSTCOPY
        self._write(f"{POSTCOPY} {json.dumps(region)}")

    def close(self, *, detach: bool = False) -> None:
        """The agent settled the workload itself: let the guardian go.

        ``detach``: it did not (post-copy unfinished): the guardian settles it
        as if this agent had died, and is not waited for.
        """
        if detach:
            try:
                self._pipe.close()
            except OSError:
                pass
            return
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


#: QMP lines we read are small; a longer one means something is wrong.
_QMP_MAX_LINE = 1 << 20
#: ``query-migrate`` statuses in which no outgoing migration is in flight.
_MIGRATION_IDLE = ("none", "completed", "failed", "cancelled")


class _QMP:
    """A minimal blocking QMP client: greeting, ``qmp_capabilities``, commands.

    QEMU serves one client per ``-qmp unix:PATH,server=on`` socket; it
    accepts the next one once the previous one is gone.  The dead agent's
    connection is closed by the kernel, so this connect may wait in the
    socket's backlog for a moment until QEMU notices: ``timeout`` bounds
    every wait.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self._buf = b""
        self._next_id = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            greeting = self._read("the greeting (QEMU greets one client at a time: is another "
                                  "one connected?)")
            if "QMP" not in greeting:
                raise ResumeError(f"{path} is not a QMP socket: it greeted with {str(greeting)[:200]}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> _QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _read(self, what: str) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise ResumeError(f"QEMU ({self.path}) sent nothing for {self.timeout} s while the "
                                  f"guardian waited for {what}") from None
            if not data:
                raise ResumeError(f"QEMU closed its QMP socket {self.path} while the guardian waited "
                                  f"for {what}")
            self._buf += data
            if len(self._buf) > _QMP_MAX_LINE:
                raise ResumeError(f"QEMU ({self.path}) sent an over-long line")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise ResumeError(f"QEMU ({self.path}) sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise ResumeError(f"QEMU ({self.path}) sent a JSON {type(msg).__name__}, not an object")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; its ``return`` value.  Raises :class:`ResumeError` or OSError."""
        self._next_id += 1
        cid = f"precopy-guardian-{self._next_id}"
        req: dict[str, Any] = {"execute": command, "id": cid}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read(f"the answer to {command!r}")
            if "event" in msg:
                continue
            if msg.get("id") != cid:
                raise ResumeError(f"QMP {command!r}: QEMU answered another request: {str(msg)[:200]}")
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise ResumeError(f"QEMU refused {command!r}: {err.get('class', '?')}: "
                                  f"{err.get('desc', msg['error'])}")
            return msg.get("return")


def _qmp_connect(workload: dict[str, Any]) -> _QMP:
    """Connect, retrying for ``timeout`` while QEMU's listen backlog refuses."""
    timeout = float(workload.get("timeout", 10.0))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _QMP(str(workload["path"]), timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _migration_status(q: _QMP) -> str:
    info = q.execute("query-migrate")
    return str(info.get("status", "none")) if isinstance(info, dict) else "none"


def _wait_migration_end(q: _QMP, timeout: float) -> str:
    """Poll until no outgoing migration is in flight; the last status seen."""
    deadline = time.monotonic() + timeout
    status = _migration_status(q)
    while status not in _MIGRATION_IDLE and time.monotonic() < deadline:
        time.sleep(0.02)
        status = _migration_status(q)
    return status


def _settle_qemu(workload: dict[str, Any], op: str) -> None:
    """Settle a QEMU VM over QMP.

    ``resume``: cancel a device-state save the agent left in flight, ``cont``
    (only if the VM ran when the migration began), then restore the
    migration settings the agent changed; ``keep``: restore the settings
    only (the VM stays as it is); ``stop``: ``quit``.  Raises
    :class:`ResumeError` or OSError if the VM could not be resumed or
    stopped; a setting that cannot be restored is logged, not raised.
    """
    timeout = float(workload.get("timeout", 10.0))
    with _qmp_connect(workload) as q:
        if op == "stop":
            try:
                q.execute("quit")
            except ResumeError as exc:
                if "closed its QMP socket" not in str(exc):  # QEMU may exit before it answers
                    raise
            return
        if op == "resume":
            status = _migration_status(q)
            if status not in _MIGRATION_IDLE:
                # A save blocked on its output can stay "cancelling" for a
                # while; QEMU accepts cont meanwhile, and nothing will ever
                # load that state: resume first, wait for the end after.
                _log.warning("QEMU's device-state save is still %s: cancelling it", status)
                q.execute("migrate_cancel")
            if workload.get("was_running", True):
                q.execute("cont")
                _log.info("the VM runs again on the source (QMP cont)")
            else:
                _log.warning("the VM was not running when the migration began: it is left as it is")
        status = _wait_migration_end(q, timeout)
        if status not in _MIGRATION_IDLE:
            _log.error("QEMU's migration is still %s after %s s: cannot restore the VM's migration "
                       "settings; once it ends, set them by hand over QMP: %s", status, timeout,
                       json.dumps(workload.get("restore", [])))
            return
        failed = []
        for cmd, args in workload.get("restore", []):
            try:
                q.execute(str(cmd), args)
            except ResumeError as exc:
                failed.append(f"{cmd} {json.dumps(args)}: {exc}")
        if failed:
            _log.error("could not restore the VM's migration settings; set them by hand over QMP: %s",
                       "; ".join(failed))
        elif workload.get("restore"):
            _log.info("restored the VM's migration settings (x-ignore-shared, max-bandwidth)")


def _remove_leftovers(workload: dict[str, Any]) -> None:
    """A QEMU agent killed during its device-state save leaves the save file behind."""
    prefix = workload.get("state_files")
    if workload.get("kind") != "qmp" or not prefix:
        return
    where = Path(str(prefix))
    for leftover in where.parent.glob(where.name + "*"):
        try:
            leftover.unlink()
        except OSError as exc:
            _log.error("cannot remove the agent's device-state file %s: %s", leftover, exc)



def _resume_or_say(workload: dict[str, Any], what: str) -> int:
    """Resume the workload; exit status 0, or 1 after saying it must be resumed by hand."""
    try:
        _resume(workload)
    except (OSError, ResumeError) as exc:
        _log.critical("could not resume the workload (%s): %s; resume it by hand", what, exc)
        return 1
    return 0

def _resume(workload: dict[str, Any], op: str = "resume") -> None:
    """``op``: ``resume`` the workload, ``stop`` (kill) it, or ``keep`` it as it is.

    ``keep`` matters only for a QEMU VM, whose migration settings are put back.
    Raises :class:`ResumeError` or OSError.
    """
    kind = workload.get("kind")
    if kind == "qmp":
        _settle_qemu(workload, op)
        return
    if op == "keep":
        return
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
            if workload.get("sigcont"):
                _cont_peer(s)
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


def _cont_peer(s: socket.socket) -> None:
    """SIGCONT the process serving the connected control socket ``s`` (SO_PEERCRED).

    A guest without the throttle op is throttled by the agent's SIGSTOP duty
    cycle; the agent may have died with the guest stopped, which could then
    answer nothing.  Continuing a running process changes nothing.
    """
    pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    if pid <= 1 or pid == os.getpid():
        return  # not visible from here (another pid namespace), or nothing to continue
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # the guest is gone: the resume request says so
    except PermissionError:
        _log.warning("not allowed to SIGCONT the guest's process %d: if the agent left it stopped, "
                     "continue it by hand (kill -CONT %d)", pid, pid)


def _target(outcome: dict[str, Any]) -> Any:
    """The OutcomeTarget of the spec's ``outcome`` (None, logged, when its TLS cannot be set up)."""
    from precopy.errors import PrecopyError
    from precopy.session.commit import OutcomeTarget

    key = bytes.fromhex(outcome["key"]) if outcome.get("key") else None
    tls = outcome.get("tls")
    tls_context = None
    if tls is not None:
        from precopy.net.tls import client_context

        try:
            tls_context = client_context(*(Path(tls[k]) if tls.get(k) else None
                                           for k in ("ca", "cert", "key")))
        except PrecopyError as exc:
            _log.critical("cannot set up TLS to ask the destination: %s", exc)
            return None
    return OutcomeTarget(
        host=str(outcome["host"]), port=int(outcome["port"]), migration_id=str(outcome["migration_id"]),
        auth_key=key, tls_context=tls_context, retries=int(outcome.get("retries", 6)),
        connect_timeout_s=float(outcome.get("connect_timeout", 10.0)),
        io_timeout_s=float(outcome.get("io_timeout", 60.0)),
    )


async def _ask(outcome: dict[str, Any]) -> str:
    """``committed``, ``not-committed`` or ``unknown`` (with the reason logged)."""
    from precopy.errors import MigrationInDoubt, PrecopyError
    from precopy.session.commit import resolve_outcome

    target = _target(outcome)
    if target is None:
        return "unknown"
    try:
        await resolve_outcome(target, PrecopyError("the source agent died after sending COMMIT"))
    except MigrationInDoubt as exc:
        _log.critical("%s", exc)
        return "unknown"
    except PrecopyError as exc:
        _log.warning("%s", exc)
        return "not-committed"
    return "committed"


def _describe(workload: dict[str, Any]) -> str:
    kind = workload.get("kind")
    if kind == "pid":
        return f"pid {workload.get('pid')}"
    if kind == "qmp":
        return f"QEMU VM, QMP {workload.get('path')}"
    return f"guest {workload.get('path')}"


def _keep(workload: dict[str, Any], what: str) -> None:
    """The workload stays as it is; a QEMU VM gets its migration settings back."""
    if workload.get("kind") != "qmp":
        return
    try:
        _resume(workload, "keep")
    except (OSError, ResumeError) as exc:
        _log.error("could not restore the VM's migration settings (%s): %s; set x-ignore-shared and "
                   "max-bandwidth back by hand over QMP", what, exc)


def _on_agent_death(state: str, spec: dict[str, Any]) -> int:
    workload = spec.get("workload", {})
    what = _describe(workload)
    _remove_leftovers(workload)
    if state == ARMED:
        _log.error("the source agent died before sending COMMIT: resuming the workload (%s) "
                   "on the source", what)
        return _resume_or_say(workload, what)
    if state == POSTCOPY:
        import asyncio

        from precopy.session.postcopy_stream import finish_stream

        target = _target(spec["outcome"])
        answer = asyncio.run(finish_stream(target, spec.get("region", {}))) if target is not None else "unknown"
        state = COMMIT  # settled as a commit: the outcome is known now, or in doubt
        # (never asked again: "committed" alone does not mean every page arrived)
        spec = {**spec, "known": answer}
    if state == COMMIT:
        mid = spec.get("outcome", {}).get("migration_id")
        _log.warning("the source agent died after sending COMMIT for migration %s: asking the "
                     "destination for the outcome", mid)
        import asyncio

        answer = spec["known"] if "known" in spec else asyncio.run(_ask(spec["outcome"]))
        if answer == "not-committed":
            _log.error("migration %s was not committed: resuming the workload (%s) on the source",
                       mid, what)
            return _resume_or_say(workload, what)
        if answer == "committed":
            _log.warning("migration %s committed: the workload runs on the destination; the "
                         "source copy (%s) stays paused", mid, what)
            if spec.get("on_commit") == "kill":
                try:
                    _resume(workload, "stop")
                except (OSError, ResumeError) as exc:
                    _log.error("could not stop the source workload (%s): %s", what, exc)
            else:
                _keep(workload, what)
            return 0
        _keep(workload, what)
        resume_how = {"pid": "kill -CONT", "qmp": "QMP cont", "control": '{"op": "resume"}'}.get(
            str(workload.get("kind")), "resume")
        _log.critical("migration %s is IN DOUBT: the workload (%s) is left PAUSED on the source; "
                      "check the destination for the migration id, then resume it by hand (%s) "
                      "or kill it", mid, what, resume_how)
        return 4
    if state == IDLE:
        # Not paused (or already the destination's): only a VM's settings to put back.
        _keep(workload, what)
    return 0


def main() -> int:
    """Run as a script: read the agent's pipe to its end, then :func:`settle`."""
    return settle(sys.stdin.buffer)


def settle(lines: Iterable[bytes]) -> int:
    """The guardian's work on the agent's pipe: ``lines``, the specification first, to the pipe's
    end (or the first ``done``).  precopy.session.guardian_boot hands over the lines it read."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s precopy-guardian[%(process)d] %(levelname)s %(message)s")
    # Only the pipe's end may end the guardian: not a Ctrl-C or a hang-up
    # meant for the agent.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    it = iter(lines)
    first = next(it, b"")
    try:
        spec = json.loads(first)
    except ValueError:
        _log.error("bad specification from the agent: %r", first[:200])
        return 2
    state = IDLE
    for raw in it:
        line = raw.decode(errors="replace").strip()
        if line == DONE:
            return 0
        if line in (IDLE, ARMED, COMMIT):
            state = line
        elif line.startswith(POSTCOPY + " "):
            state = POSTCOPY
            try:
                spec["region"] = json.loads(line[len(POSTCOPY) + 1:])
            except ValueError:
                _log.error("bad post-copy region from the agent: %r", line[:200])
        else:
            _log.error("ignoring unknown state %r from the agent", line)
    return _on_agent_death(state, spec)


if __name__ == "__main__":
    # Run as a script: import the engine from the package this file is in.
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    sys.exit(main())
