"""precopy-source: live-migrate one workload's memory to a precopy-dest.

Exit codes: 0 committed (the workload runs on the destination); 2 usage
error; 3 aborted and rolled back (the workload runs on the source); 4 in
doubt (the workload is left paused: see the message).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from precopy.protocol.auth import load_key
from precopy.net.tls import client_context
from precopy.errors import MigrationAborted, MigrationInDoubt, PrecopyError
from precopy.memory.region import PAGE_SIZE
from precopy.workload.qemu import QemuWorkload
from precopy.session.report import MigrationReport
from precopy.session.source import SourceOptions, migrate
from precopy.workload.base import Workload
from precopy.workload.control import GuestControl
from precopy.workload.signals import SignalWorkload

from .config import add_config_args, effective_config, parse_with_config
from .common import (
    EXIT_ABORTED,
    EXIT_IN_DOUBT,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    ProgressLine,
    add_common_args,
    human_bytes,
    parse_hostport,
    run,
    setup_logging,
)

_log = logging.getLogger("precopy-source")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="precopy-source",
        description="Live-migrate a running workload's memory region to a precopy-dest daemon.",
        epilog="Exit codes: 0 committed; 2 usage; 3 aborted, workload runs on the source; "
               "4 in doubt, workload left paused.  Also: 'precopy-source serve --help' (a daemon "
               "driven over a control socket) and 'precopy-source ctl --help' (its client).",
    )
    p.add_argument("--to", required=True, type=parse_hostport, metavar="HOST:PORT",
                   help="the destination daemon (precopy-dest --listen; required)")
    p.add_argument("--memory", required=True, type=Path, metavar="PATH",
                   help="the workload's memory region file (shared mapping, size a multiple of 4 KiB; required)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int,
                     help="pause the workload process with SIGSTOP/SIGCONT (this or --guest-control is required)")
    who.add_argument("--guest-control", type=Path, metavar="SOCKET",
                     help="cooperative guest: JSON-lines control socket (pause returns device state; "
                          "default: none)")
    who.add_argument("--qmp", type=Path, metavar="SOCKET",
                     help="a QEMU VM's QMP socket: its RAM (memory-backend-file,share=on) is --memory, "
                          "its device state is saved with x-ignore-shared at the switchover (default: none)")
    p.add_argument("--name", help="region name on the destination (default: basename of --memory)")
    p.add_argument("--downtime-ms", type=float, default=300.0,
                   help="downtime budget: switch over when the expected pause fits in it less a margin for "
                        "the estimate's error (see --headroom) (default 300)")
    p.add_argument("--headroom", choices=["spread", "fixed"], default="spread",
                   help="the margin under --downtime-ms: spread: from the spread the live rounds measured "
                        "in each part of the pause (scan cost, send rate, dirty rate; 5-50%% of the budget, "
                        "25%% until there are samples); fixed: always 25%% (default spread)")
    p.add_argument("--max-downtime-ms", type=float, metavar="MS",
                   help="hard cap on the pause (at least --downtime-ms): once paused, if the pause would pass "
                        "it before COMMIT is sent (checked before the final scan, each final batch, the device "
                        "state, verification and COMMIT), roll back: the workload resumes on the source, exit 3, "
                        "the report's cap_hit says where; after COMMIT is sent the commit stands "
                        "(default: no cap)")
    p.add_argument("--max-rounds", type=int, default=30,
                   help="iterative rounds before giving up on convergence (default 30; rounds measured "
                        "under contention count only with --on-nonconvergence force)")
    p.add_argument("--max-time", type=float, default=600.0, metavar="SECONDS",
                   help="time before giving up on convergence (default 600; 0 = unbounded)")
    p.add_argument("--on-nonconvergence", choices=["abort", "force"], default="abort",
                   help="abort: roll back, exit 3; force: switch over anyway (default abort)")
    p.add_argument("--throttle", choices=["auto", "off"], default="auto",
                   help="auto-converge: when the dirty set will not shrink (two rounds in a row dirtying "
                        "more than half of what they sent, the downtime over budget), keep the workload "
                        "stopped part of the time (SIGSTOP/SIGCONT duty cycle with --pid; with --guest-control "
                        "the guest's throttle op, or for a guest without it the same duty cycle on the "
                        "process serving the socket; a QEMU VM is not throttled); off: never (default auto)")
    p.add_argument("--throttle-initial", type=int, default=20, metavar="PCT",
                   help="first throttle, percent of the workload's time stopped (default 20)")
    p.add_argument("--throttle-step", type=int, default=10, metavar="PCT",
                   help="added at each further trigger (default 10)")
    p.add_argument("--throttle-max", type=int, default=99, metavar="PCT",
                   help="the highest throttle, at most 99 (default 99)")
    p.add_argument("--mode", choices=["precopy", "stop-and-copy"], default="precopy",
                   help="precopy: copy while the workload runs, pause only for the rest; stop-and-copy: pause "
                        "first and copy everything while paused (the baseline Quick Migration and CRIU use) "
                        "(default: precopy)")
    p.add_argument("--compress", choices=["off", "lz4", "auto"], default="auto",
                   help="lz4 per batch: off, always, or auto when the link is slower than lz4 (default auto)")
    p.add_argument("--tracking", choices=["auto", "digest", "uffd-wp"], default="auto",
                   help="how dirty pages are found: digest (rehash and compare), uffd-wp (kernel write "
                        "tracking offered by a --guest-control guest; Linux >= 6.7; fails if unavailable), "
                        "or auto: uffd-wp when offered and supported, digests otherwise (default auto)")
    p.add_argument("--auth-key-file", type=Path, metavar="FILE",
                   help="pre-shared key (same file as precopy-dest's); both sides prove they hold it (default: none)")
    p.add_argument("--on-commit", choices=["keep-stopped", "kill"], default="keep-stopped",
                   help="after commit, leave the source workload stopped or kill it (default keep-stopped)")
    tls = p.add_argument_group("TLS (see docs/SECURITY.md)")
    tls.add_argument("--tls", action="store_true",
                     help="connect with TLS, verifying the destination against the system CAs "
                          "(implied by --tls-ca/--tls-cert)")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM",
                     help="CA that signed the destination's certificate (its name or IP must match --to; "
                          "default: the system CAs)")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="client certificate, for a destination that requires one (with --tls-key; default: none)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert (mode 0600; default: none)")
    p.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here (default: none)")
    p.add_argument("--batch-pages", type=int, default=256, help="pages per batch (default 256)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to try to reach the destination, also while it refuses connections "
                        "(a daemon that is starting) (default 10)")
    p.add_argument("--io-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a destination that neither answers nor accepts data for this long is a "
                        "failed link (default 60)")
    p.add_argument("--outcome-retries", type=int, default=6, metavar="N",
                   help="after a lost commit confirmation, ask the destination this many times "
                        "(backing off from 0.2 to 5 s) before ending in doubt (default 6)")
    p.add_argument("--guest-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long a guest may take to answer a control request (default 5)")
    p.add_argument("--migration-id", help="id for this migration (default: random)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="live progress line: round, dirty pages, rate, expected downtime, ETA (default auto: on a terminal)")
    p.add_argument("--dry-run", action="store_true",
                   help="preflight only: connect, authenticate, ask the destination whether the region fits "
                        "(space, memory, page size, guest requirements), exit 0 if it does, 3 if not; "
                        "nothing is paused or sent")
    add_common_args(p)
    add_config_args(p)
    return p


def summary(rep: MigrationReport) -> str:
    if rep.outcome == "preflight-ok":
        return (f"preflight {rep.migration_id}: OK, {rep.destination} accepts {human_bytes(rep.region_bytes)} "
                f"({rep.memory}); nothing was paused or sent")
    if not rep.rounds and rep.downtime_ms is None and rep.paused_ms is None and not rep.bytes_on_wire:
        # It ended before any page moved (refused, unreachable, cancelled while queued).
        lines = [f"migration {rep.migration_id}: {rep.outcome}, before any page moved"]
        if rep.region_bytes:
            lines.append(f"  region      {human_bytes(rep.region_bytes)} ({rep.memory})")
        if rep.error:
            lines.append(f"  error       {rep.error}")
        return "\n".join(lines)
    secs = rep.total_time_s or 1e-9
    lines = [
        f"migration {rep.migration_id}: {rep.outcome}",
        f"  region      {human_bytes(rep.region_bytes)} ({rep.memory})"
        + ("; the destination received it into its existing copy"
           + (f", which already held {rep.pages_already_there} pages" if rep.pages_already_there else "")
           if rep.dest_region == "existing" else ""),
        f"  total time  {rep.total_time_s:.3f} s in {len(rep.rounds)} rounds",
        f"  on the wire {human_bytes(rep.bytes_on_wire)} ({rep.bytes_on_wire / secs / 1e6:.0f} MB/s average),"
        f" {rep.pages_sent} pages sent, {rep.zero_pages} zero pages",
    ]
    if rep.downtime_ms is not None:
        expected = ("" if rep.expected_downtime_ms is None
                    else f"expected {rep.expected_downtime_ms:.1f} ms, ")
        cap = "" if rep.max_downtime_ms is None else f", cap {rep.max_downtime_ms:g} ms"
        lines.append(f"  downtime    {rep.downtime_ms:.1f} ms ({expected}budget {rep.downtime_budget_ms:.0f} ms{cap}"
                     f"{', stop-and-copy' if rep.mode == 'stop-and-copy' else ''})")
    elif rep.paused_ms is not None:
        lines.append(f"  paused      {rep.paused_ms:.1f} ms on the source, then resumed there"
                     + (f" (cap {rep.max_downtime_ms:g} ms hit before {rep.cap_hit.replace('_', ' ')})"
                        if rep.cap_hit else ""))
    lines.append(f"  tracking    {rep.tracking} ({rep.tracking_reason})")
    if rep.max_throttle_pct:
        # (A round cut short by a failure is not in the report: maybe none is.)
        throttled = [r.round for r in rep.rounds if r.throttle_pct]
        where = f", in {len(throttled)} rounds ({throttled[0]}-{throttled[-1]})" if throttled else ""
        how = {"sigstop": ", SIGSTOP/SIGCONT duty cycle", "guest-op": ", the guest's throttle op"}.get(
            str(rep.throttle_method), "")
        lines.append(f"  throttle    up to {rep.max_throttle_pct} % of the workload's time stopped{where}{how}")
    lines.append(f"  verify      {rep.verify_repairs} pages repaired; device state {rep.device_state_bytes} bytes")
    if rep.phases_ms:
        lines.append("  downtime split (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in rep.phases_ms.items()))
    if rep.expected_phases_ms:
        lines.append("  expected split (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in rep.expected_phases_ms.items()))
    if rep.outcome == "committed":
        lines.append("  source copy " + _source_copy(rep))
    if rep.error:
        lines.append(f"  error       {rep.error}")
    return "\n".join(lines)


def _source_copy(rep: MigrationReport) -> str:
    """What became of the workload on the source after a commit, and what to do about it."""
    if rep.on_commit == "kill":
        return f"ended at the commit (--on-commit kill): {rep.workload}"
    if rep.workload.startswith("pid "):
        release = f"kill -KILL {rep.workload.split()[1]}"
    elif rep.workload.startswith("QEMU"):
        release = "QMP quit, or kill the source QEMU"
    else:
        release = 'the guest\'s "stop" op, or kill its process'
    return (f"left stopped ({rep.workload}; --on-commit keep-stopped): precopy never resumes it; "
            f"once the destination's copy is confirmed, release it: {release}")


async def _main(args: argparse.Namespace, opts: SourceOptions, workload: Workload) -> int:
    progress = ProgressLine(enabled={"auto": None, "on": True, "off": False}[args.progress])
    if isinstance(workload, QemuWorkload):
        try:
            await workload.connect()
        except PrecopyError as exc:
            await workload.close()
            print(f"precopy-source: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if opts.dry_run and isinstance(workload, GuestControl):
        try:
            await workload.connect()  # the guest's control socket answers
        except PrecopyError as exc:
            print(f"precopy-source: preflight failed: {exc}", file=sys.stderr)
            return EXIT_ABORTED
    task = asyncio.create_task(migrate(opts, workload, progress))
    loop = asyncio.get_running_loop()

    def cancel(sig: signal.Signals) -> None:
        _log.warning("%s: cancelling the migration (it rolls back)", sig.name)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel, sig)
    code = EXIT_OK
    try:
        try:
            rep = await task
        finally:
            progress.done()  # end the progress line before any log line
    except MigrationAborted as exc:
        rep = exc.report  # type: ignore[attr-defined]
        code = EXIT_ABORTED
        if opts.dry_run:
            _log.error("preflight failed (nothing was paused or sent): %s", exc)
        else:
            _log.error("migration aborted, the workload keeps running on the source: %s", exc)
    except MigrationInDoubt as exc:
        rep = exc.report  # type: ignore[attr-defined]
        code = EXIT_IN_DOUBT
        _log.critical("%s", exc)
    finally:
        if isinstance(workload, (GuestControl, QemuWorkload)):
            await workload.close()
    if args.report:
        try:
            args.report.write_text(rep.to_json() + "\n")
        except OSError as exc:
            _log.error("cannot write report %s: %s", args.report, exc.strerror)
    print(summary(rep), flush=True)
    return code


def make_migration(args: argparse.Namespace) -> tuple[SourceOptions, Workload]:
    """The engine's options and workload adapter for parsed arguments.

    Shared by the one-shot command and ``serve`` (whose start requests carry
    the same options).  Raises PrecopyError or ValueError on bad values.
    """
    key = load_key(args.auth_key_file) if args.auth_key_file else None
    tls_context = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls_context = client_context(args.tls_ca, args.tls_cert, args.tls_key)
    host, port = args.to
    opts = SourceOptions(
        host=host, port=port, memory=args.memory, name=args.name, downtime_ms=args.downtime_ms,
        max_rounds=args.max_rounds, max_time_s=args.max_time or None,
        on_nonconvergence=args.on_nonconvergence, compress=args.compress, auth_key=key,
        batch_pages=args.batch_pages, on_commit=args.on_commit,
        connect_timeout_s=args.connect_timeout, migration_id=args.migration_id, mode=args.mode,
        dry_run=args.dry_run, tls_context=tls_context,
        io_timeout_s=args.io_timeout, outcome_retries=args.outcome_retries, guardian=True,
        tls_files={k: str(v) if v else None for k, v in
                   (("ca", args.tls_ca), ("cert", args.tls_cert), ("key", args.tls_key))},
        tracking=args.tracking, throttle=args.throttle, throttle_initial_pct=args.throttle_initial,
        throttle_step_pct=args.throttle_step, throttle_max_pct=args.throttle_max,
        max_downtime_ms=args.max_downtime_ms, headroom=args.headroom,
    )
    if not args.memory.exists():
        raise PrecopyError(f"memory region {args.memory} does not exist")
    size = args.memory.stat().st_size
    if args.memory.is_file() and (size == 0 or size % PAGE_SIZE):
        # Checked here, not only when the engine maps it: a usage error (exit 2), nothing started.
        raise PrecopyError(f"memory region {args.memory} is {size} bytes: it must be a non-empty multiple "
                           f"of {PAGE_SIZE}: is --memory the file the workload maps?")
    workload: Workload
    if args.pid is not None:
        workload = SignalWorkload(args.pid)
    elif args.qmp is not None:
        workload = QemuWorkload(args.qmp, memory=args.memory, timeout_s=max(args.guest_timeout, 10.0))
    else:
        workload = GuestControl(args.guest_control, timeout_s=args.guest_timeout)
    return opts, workload


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from .source_daemon import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["ctl"]:
        from .ctl import main as ctl_main

        return ctl_main(argv[1:])
    parser = build_parser()
    args = parse_with_config(parser, argv)
    setup_logging(args.log_level, args.log_format)
    try:
        opts, workload = make_migration(args)
    except (PrecopyError, ValueError) as exc:
        print(f"precopy-source: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        print(effective_config(args))
        print("precopy-source: configuration OK", file=sys.stderr)
        return EXIT_OK
    return run(_main(args, opts, workload), args.event_loop)


if __name__ == "__main__":
    sys.exit(main())
