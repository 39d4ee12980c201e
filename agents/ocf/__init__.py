"""precopy-ocf: precopy as a Pacemaker resource (``ocf:precopy:workload``).

    precopy-ocf install [--ocf-root DIR]   # writes DIR/resource.d/precopy/workload
    precopy-ocf resume                     # precopy-dest's --on-resume hook on every node
    precopy-ocf resolve RESOURCE committed|aborted   # settle a migration in doubt (source node)
    precopy-ocf ACTION                     # what Pacemaker runs, through the installed file
    precopy-ocf --version

One resource is one workload: a process mapping a region file (``memory``)
that can be started on a region, as precopy-dest's ``--on-resume`` starts a
migrated one.  ``migrate_to`` live-migrates it to the target node through
the local source daemon (``precopy-source serve``; the control protocol of
``precopy-source ctl``), ``migrate_from`` confirms it runs on the target,
where precopy-dest's hook (``precopy-ocf resume``) started it with the
resource's own ``start_command`` the moment the migration committed.

What each action promises (exit codes are OCF's):

* ``start`` succeeds only on the node that holds the workload's committed
  memory (the region file at ``memory``); elsewhere it fails with
  OCF_ERR_INSTALLED, which bans the resource from that node.  A node whose
  copy was migrated away no longer has the file (it is deleted, or kept
  under another name with ``keep_source_copy``), so the cluster can never
  start a second, stale copy — not even with fencing off after a split.
* ``migrate_to``: committed -> 0 (the paused source process is killed and
  its region retired at once); rolled back -> OCF_ERR_GENERIC with the
  workload running here again; in doubt -> OCF_ERR_GENERIC and the node is
  marked in doubt: ``start`` and ``monitor`` fail and ``stop`` refuses here
  until the outcome is known, so nothing starts a second copy and nothing
  kills the only one.  Configure ``op migrate_to on-fail=block`` so that a
  failed migration leaves the resource where it is (Pacemaker's default
  recovery would stop it on the source and start it anew).
* ``monitor``: 0 running here (also while it is paused by a migration in
  progress), 7 not running here, 1 failed (started here and died, or in
  doubt).
* ``stop`` ends the workload's process group (TERM, then KILL); its region
  stays, so a later ``start`` on this node runs it again from its memory.

State per node lives in ``state_dir`` (default /run/precopy-ocf): the
workload's pid and start time, a marker while a migration runs or is in
doubt, the last migration's report (``RESOURCE.report.json``) and logs.

The package: ``params`` (parameters, exit codes, meta-data), ``process``
(the workload's process, the log), ``daemon`` (the source daemon's control
socket, the migration markers), ``actions`` (what Pacemaker runs),
``resolve`` (the on-resume hook, settling a migration in doubt); here the
command line and ``install``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .actions import (
    ACTIONS,
    migrate_from,
    migrate_to,
    monitor,
    run_action,
    start,
    stop,
    validate,
)
from .daemon import DaemonError, job_state, retire_source, settle_markers
from .daemon import _write_marker as _write_marker
from .params import (
    DEFAULT_CONTROL,
    DEFAULT_STATE_DIR,
    OCF_ERR_ARGS,
    OCF_ERR_CONFIGURED,
    OCF_ERR_GENERIC,
    OCF_ERR_INSTALLED,
    OCF_ERR_PERM,
    OCF_ERR_UNIMPLEMENTED,
    OCF_NOT_RUNNING,
    OCF_SUCCESS,
    PARAMETERS,
    PROVIDER,
    TYPE,
    ConfigError,
    Params,
    check_dest,
    dest_address,
    meta_data,
)
from .process import _kill_group as _kill_group
from .process import _proc_state as _proc_state
from .process import _start_time as _start_time
from .process import record_pid, workload_pid
from .resolve import _params_from_cib, find_resource, resolve, resume_hook

__all__ = ["main", "Params", "dest_address", "meta_data", "OCF_SUCCESS", "OCF_ERR_GENERIC",
           "OCF_ERR_ARGS", "OCF_ERR_UNIMPLEMENTED", "OCF_ERR_INSTALLED", "OCF_ERR_CONFIGURED",
           "OCF_NOT_RUNNING",
           # the package's pieces, for the lab and the tests
           "ACTIONS", "DEFAULT_CONTROL", "DEFAULT_STATE_DIR", "OCF_ERR_PERM", "PARAMETERS", "PROVIDER", "TYPE",
           "ConfigError", "DaemonError", "check_dest", "find_resource", "install", "job_state", "migrate_from",
           "migrate_to", "monitor", "record_pid", "resolve", "resume_hook", "retire_source", "run_action",
           "settle_markers", "start", "stop", "validate", "workload_pid"]


def install(ocf_root: Path) -> Path:
    """Write OCF_ROOT/resource.d/precopy/workload, which runs this package (precopy_agents.ocf) with this interpreter."""
    d = ocf_root / "resource.d" / PROVIDER
    d.mkdir(parents=True, exist_ok=True)
    path = d / TYPE
    # meta-data is answered by the shell: Pacemaker's controller asks for it as
    # user hacluster, who may not be allowed to run this Python.
    text = ("#!/bin/sh\n# ocf:precopy:workload -- written by 'precopy-ocf install'\n"
            'if [ "$1" = meta-data ]; then\ncat <<\'PRECOPY_META_DATA\'\n'
            f"{meta_data()}PRECOPY_META_DATA\nexit 0\nfi\n"
            f"exec {shlex.quote(sys.executable)} -m precopy_agents.ocf \"$@\"\n")
    tmp = path.with_name(f".{TYPE}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install"]:
        ap = argparse.ArgumentParser(prog="precopy-ocf install",
                                     description="Install the OCF resource agent ocf:precopy:workload.")
        ap.add_argument("--ocf-root", type=Path,
                        default=Path(os.environ.get("OCF_ROOT", "/usr/lib/ocf")),
                        help="the OCF root (default: $OCF_ROOT or /usr/lib/ocf)")
        args = ap.parse_args(argv[1:])
        try:
            print(install(args.ocf_root))
        except OSError as exc:
            print(f"precopy-ocf install: cannot write under {args.ocf_root}: {exc.strerror}", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["--version"]:
        from precopy._version import __version__

        print(f"precopy-ocf {__version__}")
        return 0
    if argv[:1] == ["resume"]:
        return resume_hook()
    if argv[:1] == ["resolve"]:
        ap = argparse.ArgumentParser(
            prog="precopy-ocf resolve",
            description="On the source node of a migration in doubt: settle it once you know its outcome "
                        "(the target's precopy-dest journal, STATE_DIR/.precopy/journal/ID.json). Then "
                        "refresh the resource (README: 'What the agent promises under failures').")
        ap.add_argument("resource", help="the resource's name in the cluster")
        ap.add_argument("outcome", choices=["committed", "aborted"],
                        help="committed: the target holds it (the copy here is ended); aborted: it "
                             "resumes here")
        args = ap.parse_args(argv[1:])
        try:
            print(resolve(_params_from_cib(args.resource), args.outcome))
        except (RuntimeError, ConfigError, OSError, ET.ParseError, subprocess.TimeoutExpired) as exc:
            print(f"precopy-ocf resolve: {exc}", file=sys.stderr)
            return 1
        return 0
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        usage = "\n\n".join((__doc__ or "").split("\n\n")[:3]) + \
            f"\n\nACTION: {', '.join(ACTIONS)}, meta-data (OCF exit codes). README: 'Run it in a Pacemaker cluster'."
        if argv[:1] in (["-h"], ["--help"]):
            print(usage)
            return 0
        print(usage, file=sys.stderr)
        return 2
    return run_action(argv[0])

