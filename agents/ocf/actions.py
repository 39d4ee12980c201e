"""The OCF actions Pacemaker runs: start, stop, monitor, migrate_to, migrate_from, validate-all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .daemon import (
    DaemonError,
    _one,
    _read_marker,
    _requests,
    _write_marker,
    retire_source,
    settle_markers,
)
from .params import (
    OCF_ERR_ARGS,
    OCF_ERR_CONFIGURED,
    OCF_ERR_GENERIC,
    OCF_ERR_INSTALLED,
    OCF_ERR_UNIMPLEMENTED,
    OCF_NOT_RUNNING,
    OCF_SUCCESS,
    ConfigError,
    Params,
    check_dest,
    dest_address,
    meta_data,
)
from .process import (
    _device_state_path,
    _kill_group,
    _log,
    _start_time,
    _workload_env,
    record_pid,
    workload_pid,
)

# -- actions ------------------------------------------------------------------------

def _timeout_s(default: float) -> float:
    try:
        return int(os.environ["OCF_RESKEY_CRM_meta_timeout"]) / 1000.0
    except (KeyError, ValueError):
        return default


def monitor(p: Params) -> int:
    pending = settle_markers(p)
    if pending == "in-doubt":
        _log(p, "error", f"a migration of {p.resource} from this node is in doubt: see {p.in_doubt_file}")
        return OCF_ERR_GENERIC
    pid = workload_pid(p)
    if pid is not None:
        return OCF_SUCCESS
    if pending == "running":
        return OCF_SUCCESS
    if p.pid_file.exists():
        _log(p, "error", f"the workload started here (pid file {p.pid_file}) is gone")
        return OCF_ERR_GENERIC
    return OCF_NOT_RUNNING


def start(p: Params) -> int:
    pending = settle_markers(p)
    if pending is not None:
        _log(p, "error", f"refusing to start: a migration of {p.resource} from this node is {pending}")
        return OCF_ERR_GENERIC
    if workload_pid(p) is not None:
        return OCF_SUCCESS
    if not p.memory.is_file():
        _log(p, "error", f"refusing to start: the workload's memory {p.memory} is not on this node "
                         "(it runs only where its committed memory is)")
        return OCF_ERR_INSTALLED
    p.state_dir.mkdir(parents=True, exist_ok=True)
    env = _workload_env(p, _device_state_path(p), "")
    with open(p.log_file, "ab") as log:
        proc = subprocess.Popen(["/bin/sh", "-c", p.start_command], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd="/")
    record_pid(p, proc.pid)
    return _confirm_running(p, proc.pid, min(5.0, _timeout_s(60) / 2), "start")


def _confirm_running(p: Params, pid: int, wait_s: float, what: str) -> int:
    """The workload lives after a short while (and its control socket, if any, exists)."""
    t0 = time.monotonic()
    sock = Path(p.guest_control) if p.guest_control else None
    while time.monotonic() < t0 + wait_s:
        if _start_time(pid) is None:
            break
        # a command that fails at once fails within the first 0.3 s
        if (sock is None or sock.exists()) and time.monotonic() >= t0 + 0.3:
            _log(p, "info", f"{what}: workload running (pid {pid})")
            return OCF_SUCCESS
        time.sleep(0.05)
    if _start_time(pid) is None:
        _log(p, "error", f"{what}: the workload exited at once; see {p.log_file}")
        p.pid_file.unlink(missing_ok=True)
        return OCF_ERR_GENERIC
    _log(p, "error", f"{what}: its control socket {sock} did not appear within {wait_s:.0f} s")
    return OCF_ERR_GENERIC


def stop(p: Params) -> int:
    pending = settle_markers(p)
    if pending == "running":
        m = _read_marker(p.migrating_file) or {}
        mid = str(m.get("id"))
        _log(p, "warning", f"stop during migration {mid}: cancelling it")
        try:
            _one(p.control, {"op": "cancel", "id": mid})
        except DaemonError as exc:
            _log(p, "error", f"cannot cancel migration {mid}: {exc}")
        deadline = time.monotonic() + max(5.0, _timeout_s(60) - 10)
        while pending == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            pending = settle_markers(p)
    if pending is not None:
        _log(p, "error", f"refusing to stop: a migration of {p.resource} from this node is {pending}; "
                         "its only copy may be the paused one here (see the README, 'in doubt')")
        return OCF_ERR_GENERIC
    pid = workload_pid(p)
    if pid is not None and not _kill_group(pid, max(2.0, _timeout_s(60) / 2 - 5)):
        _log(p, "error", f"the workload (pid {pid}) does not end")
        return OCF_ERR_GENERIC
    p.pid_file.unlink(missing_ok=True)
    return OCF_SUCCESS


def _source_argv(p: Params, to: str, pid: int, migration_id: str) -> list[str]:
    argv = ["--to", to, "--memory", str(p.memory), "--downtime-ms", f"{p.downtime_ms:g}",
            "--migration-id", migration_id, "--on-commit", "keep-stopped"]
    argv += ["--guest-control", p.guest_control] if p.guest_control else ["--pid", str(pid)]
    if p.auth_key_file:
        argv += ["--auth-key-file", p.auth_key_file]
    if p.tls:
        argv.append("--tls")
    for flag, value in (("--tls-ca", p.tls_ca), ("--tls-cert", p.tls_cert), ("--tls-key", p.tls_key)):
        if value:
            argv += [flag, value]
    return argv + p.source_options


def migrate_to(p: Params) -> int:
    target = os.environ.get("OCF_RESKEY_CRM_meta_migrate_target", "")
    if not target:
        _log(p, "error", "migrate_to without OCF_RESKEY_CRM_meta_migrate_target")
        return OCF_ERR_ARGS
    to = dest_address(p.dest, target)
    pending = settle_markers(p)
    if pending is not None:
        _log(p, "error", f"cannot migrate: an earlier migration from this node is {pending}")
        return OCF_ERR_GENERIC
    pid = workload_pid(p)
    if pid is None:
        _log(p, "error", "cannot migrate: the workload is not running here")
        return OCF_ERR_GENERIC
    mid = uuid.uuid4().hex
    marker = {"id": mid, "target": target, "to": to, "started": time.time()}
    _write_marker(p.migrating_file, marker)
    try:
        ans = _one(p.control, {"op": "start", "argv": _source_argv(p, to, pid, mid)})
    except DaemonError as exc:
        p.migrating_file.unlink(missing_ok=True)
        _log(p, "error", f"migration to {target} ({to}) not started: {exc}")
        return OCF_ERR_GENERIC
    _log(p, "info", f"migration {ans.get('id')} to {target} ({to}) started")
    # Stop waiting (and cancel: before the commit it rolls back) in time to
    # answer Pacemaker before it kills this action.
    deadline = time.monotonic() + max(10.0, _timeout_s(600) - 15)
    done = _watch(p, mid, deadline)
    state = str(done.get("job", {}).get("state")) if done else "in-doubt"
    report = done.get("report") if done else None
    if report:
        try:
            _write_marker(p.report_file, report)
        except OSError as exc:
            _log(p, "warning", f"cannot save the report: {exc.strerror}")
    summary = ""
    if isinstance(report, dict):
        summary = (f" (downtime {report.get('downtime_ms')} ms, expected {report.get('expected_downtime_ms')}, "
                   f"total {report.get('total_time_s')} s)")
    if state == "committed":
        retire_source(p, mid)
        _log(p, "info", f"migration {mid} to {target} committed{summary}")
        return OCF_SUCCESS
    if state == "aborted":
        p.migrating_file.unlink(missing_ok=True)
        err = report.get("error") if isinstance(report, dict) else None
        alive = workload_pid(p) is not None
        _log(p, "error", f"migration {mid} to {target} rolled back ({err}); the workload "
                         f"{'runs here again' if alive else 'is NOT running here'}")
        return OCF_ERR_GENERIC
    _write_marker(p.in_doubt_file, dict(marker, state=state))
    p.migrating_file.unlink(missing_ok=True)
    _log(p, "crit", f"migration {mid} to {target} is IN DOUBT ({state}): the workload is paused here and "
                    f"may run on {target}; this node refuses start/stop of {p.resource} until resolved")
    return OCF_ERR_GENERIC


def _watch(p: Params, mid: str, deadline: float) -> dict[str, Any] | None:
    """Follow the migration until it ends; cancel it at the deadline.  None: lost track of it."""
    cancelled = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 and not cancelled:
            _log(p, "error", f"migration {mid} is taking longer than this action may: cancelling it")
            try:
                _one(p.control, {"op": "cancel", "id": mid})
            except DaemonError as exc:
                _log(p, "warning", f"cancel: {exc}")
            cancelled = True
        try:
            for ans in _requests(p.control, {"op": "watch", "id": mid}, stream=True,
                                 timeout_s=max(1.0, remaining) if not cancelled else 60.0):
                if not ans.get("ok"):
                    raise DaemonError(str(ans.get("error")))
                if ans.get("event") == "done":
                    return ans
        except DaemonError as exc:
            if "timed out" not in str(exc):
                _log(p, "error", f"migration {mid}: {exc}")
                try:
                    st = _one(p.control, {"op": "status", "id": mid})
                    if st.get("job", {}).get("state") != "running":
                        return {"job": st.get("job"), "report": st.get("report")}
                except DaemonError:
                    return None
            if cancelled and time.monotonic() > deadline + 10:
                return None


def migrate_from(p: Params) -> int:
    source = os.environ.get("OCF_RESKEY_CRM_meta_migrate_source", "?")
    deadline = time.monotonic() + max(5.0, _timeout_s(60) - 5)
    while time.monotonic() < deadline:
        pid = workload_pid(p)
        if pid is not None and p.memory.is_file():
            _log(p, "info", f"migrated in from {source}: workload running (pid {pid})")
            return OCF_SUCCESS
        time.sleep(0.1)
    if p.memory.is_file():
        _log(p, "error", f"the migration from {source} committed here but the workload is not running "
                         f"(precopy-dest's --on-resume 'precopy-ocf resume'? see {p.log_file})")
    else:
        _log(p, "error", f"no migration from {source} arrived here ({p.memory} is absent)")
    return OCF_ERR_GENERIC


def validate(p: Params) -> int:
    problems = []
    for name, path in (("auth_key_file", p.auth_key_file), ("tls_ca", p.tls_ca), ("tls_cert", p.tls_cert),
                       ("tls_key", p.tls_key)):
        if path and not os.access(path, os.R_OK):
            problems.append(f"{name}={path} is not readable on this node")
    if not os.access("/bin/sh", os.X_OK):
        problems.append("/bin/sh is missing")
    if problems:
        for line in problems:
            _log(p, "error", line)
        return OCF_ERR_INSTALLED
    return OCF_SUCCESS


ACTIONS = {"start": start, "stop": stop, "monitor": monitor, "migrate_to": migrate_to,
           "migrate_from": migrate_from, "validate-all": validate}


def run_action(action: str) -> int:
    if action == "meta-data":
        print(meta_data(), end="")
        return OCF_SUCCESS
    if action not in ACTIONS:
        print(f"precopy-ocf: unknown action {action!r} (use {', '.join(ACTIONS)}, meta-data)", file=sys.stderr)
        return OCF_ERR_UNIMPLEMENTED
    try:
        p = Params.from_env()
        check_dest(p.dest)
    except ConfigError as exc:
        _log(None, "error", str(exc))
        # a probe or stop of a misconfigured resource must not fail the node
        if action == "stop" or (action == "monitor" and os.environ.get("OCF_RESKEY_CRM_meta_interval", "0") == "0"):
            return OCF_NOT_RUNNING if action == "monitor" else OCF_SUCCESS
        return OCF_ERR_CONFIGURED
    try:
        return ACTIONS[action](p)
    except ConfigError as exc:
        _log(p, "error", str(exc))
        return OCF_ERR_CONFIGURED
    except (OSError, RuntimeError) as exc:
        _log(p, "error", f"{action}: {exc}")
        return OCF_ERR_GENERIC
