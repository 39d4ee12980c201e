"""precopy-source's options: the parser and what parsed options become.

Shared by the one-shot command (``source_main``) and the daemon
(``source_daemon``, whose start requests take the same options), so that
neither entry point imports the other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from precopy.errors import PrecopyError
from precopy.protocol import PAGE_SIZE
from precopy.net.tls import client_context
from precopy.protocol.auth import load_key
from precopy.session.options import STREAM_THREADS_MODES, SourceOptions
from precopy.workload.base import Workload
from precopy.workload.control import GuestControl
from precopy.workload.signals import SignalWorkload
from precopy.workload.criu_source import criu_workload
from precopy.workload.qemu import QemuWorkload

from .common import Parser, add_common_args, parse_hostport
from .config import add_config_args

__all__ = ["build_parser", "make_migration"]


def build_parser() -> argparse.ArgumentParser:
    """precopy-source's options: the one-shot command's and those of a ``serve`` start request."""
    p = Parser(
        prog="precopy-source",
        description="Live-migrate a running workload's memory region to a precopy-dest daemon.",
        epilog="Exit codes: 0 committed; 2 usage; 3 aborted, workload runs on the source; "
               "4 in doubt, workload left paused.  Also: 'precopy-source serve --help' (a daemon "
               "driven over a control socket) and 'precopy-source ctl --help' (its client).",
    )
    _add_workload_args(p)
    _add_policy_args(p)
    _add_throttle_args(p)
    _add_transfer_args(p)
    _add_tls_args(p)
    _add_run_args(p)
    add_common_args(p)
    add_config_args(p)
    return p


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    """Where to, which region, which workload (--pid, --guest-control or --qmp)."""
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
    p.add_argument("--criu", action="store_true",
                   help="with --pid: checkpoint the process with CRIU (>= 4.2) at the switchover and restore it "
                        "on the destination (precopy-dest --criu): its threads, registers, files and sockets "
                        "move, not only its memory; the process must be started by 'precopy-guest run' "
                        "(see README, 'Any process, with CRIU') (default: off)")
    p.add_argument("--criu-bin", metavar="PATH",
                   help="the CRIU executable, the same path on both hosts (default: $PRECOPY_CRIU, criu on PATH, "
                        "or /var/lib/precopy/criu/criu from 'make criu')")


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    """When to switch over or give up: the downtime budget and the convergence limits."""
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
    p.add_argument("--on-nonconvergence", choices=["abort", "force", "postcopy"], default="abort",
                   help="abort: roll back, exit 3; force: switch over anyway; postcopy: switch over to "
                        "post-copy (see --postcopy) (default abort)")
    p.add_argument("--postcopy", choices=["off", "auto", "now", "immediate"], default="off",
                   help="post-copy: run the workload on the destination at once and fetch the pages it "
                        "lacks on demand (the destination's --on-resume guest must take part: "
                        "docs/TRACKING.md). auto: when pre-copy would throttle, abort or force instead; "
                        "now: right after the full copy; immediate: before any copy, right after the "
                        "handshake (every page the region's file holds is sent once, by the post-copy "
                        "stream; no tracking, no rounds, one stream); off: never (default: from "
                        "post-copy's switchover on there is no rollback: docs/FAILURES.md)")
    p.add_argument("--postcopy-lane", action="store_true",
                   help="post-copy: the resumed workload's faults and their answers on a connection of "
                        "their own, served by a child process at each end (a thread over TLS; QEMU's "
                        "postcopy-preempt), when the destination offers it: a page faulted on does not "
                        "queue behind the push; between two child processes in lean binary frames. Remote fault "
                        "p50 ~70 us against ~700 without, p99 ~1 ms on loopback. Off by default: on a host short of CPUs the "
                        "workload, answered faster, takes CPU from the push, which ends later (a 1 GiB sweep: "
                        "1.6x an idle migration against 1.2x; benchmarks/RESULTS.md, issue 22)")


def _add_throttle_args(p: argparse.ArgumentParser) -> None:
    """Auto-converge: how much of the workload's time it may be kept stopped."""
    p.add_argument("--throttle", choices=["auto", "off"], default="auto",
                   help="auto-converge: when the dirty set will not shrink to the budget (see "
                        "--throttle-ramp), keep the workload "
                        "stopped part of the time (SIGSTOP/SIGCONT duty cycle with --pid; with --guest-control "
                        "the guest's throttle op, or for a guest without it the same duty cycle on the "
                        "process serving the socket; a QEMU VM is not throttled); off: never (default auto)")
    p.add_argument("--throttle-ramp", choices=["predict", "step"], default="predict",
                   help="how the throttle rises. predict: from the last round's send and dirty rates, "
                        "project the next rounds; once they would not bring the dirty set to the budget "
                        "within 5 rounds, jump to the lowest throttle that does within 3. step (QEMU's "
                        "auto-converge): two rounds in a row dirtying more than half of what they sent "
                        "(the downtime over budget and its trend not reaching it soon) start "
                        "--throttle-initial, every further two add --throttle-step. Either way the "
                        "throttle never steps down before the switchover (default predict; "
                        "README.md, Auto-converge)")
    p.add_argument("--throttle-initial", type=int, default=20, metavar="PCT",
                   help="first throttle of the step ramp (and of predict's rounds without rates: with "
                        "digests, the first after the full copy), percent of the workload's time stopped "
                        "(default 20)")
    p.add_argument("--throttle-step", type=int, default=10, metavar="PCT",
                   help="added at each further trigger of the step ramp (default 10)")
    p.add_argument("--throttle-max", type=int, default=99, metavar="PCT",
                   help="the highest throttle, at most 99 (default 99)")


def _add_transfer_args(p: argparse.ArgumentParser) -> None:
    """How pages are found, sent and authenticated; what becomes of the source copy."""
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
    _add_stream_args(p)


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    """Several TCP connections for the pages (docs/PROTOCOL.md "Streams")."""
    p.add_argument("--streams", type=int, default=None, metavar="N",
                   help="TCP connections for the pages, each authenticated on its own; the region is cut in "
                        "4 MiB stripes dealt round robin over them; digest tables, switchover and commit stay on "
                        "the first; the destination may take fewer (its --max-streams) (default: one per "
                        "destination address, i.e. 1 + the number of --stream-to)")
    p.add_argument("--stream-threads", choices=list(STREAM_THREADS_MODES), default="auto",
                   help="write each extra stream from a thread of its own (its sendmsg and TLS on a core of "
                        "their own) instead of from the one event loop; auto: only where this host has cores to "
                        "spare, at least 2 x streams + 2 CPUs (default auto: on a 2-CPU host, the loop)")
    p.add_argument("--stream-to", type=parse_hostport, action="append", default=[], metavar="HOST:PORT",
                   help="another address of the destination (another NIC; repeatable): stream k goes to the "
                        "(k mod n)-th of --to and these (default: none, every stream to --to)")
    p.add_argument("--bind", action="append", default=[], metavar="ADDR",
                   help="local address to connect from (repeatable): stream k from the (k mod n)-th; pair it "
                        "with --stream-to to spread the streams over NICs (default: the kernel's choice)")


def _add_tls_args(p: argparse.ArgumentParser) -> None:
    """The TLS group."""
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


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """The report, batching, timeouts, the migration id, progress and the dry run."""
    p.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here (default: none)")
    p.add_argument("--batch-pages", type=int, default=256,
                   help="pages per batch (default 256; while the workload runs, runs of pages sent "
                   "straight from memory go in batches of up to 1024, the protocol's largest)")
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
        throttle_step_pct=args.throttle_step, throttle_max_pct=args.throttle_max, throttle_ramp=args.throttle_ramp,
        max_downtime_ms=args.max_downtime_ms, headroom=args.headroom, postcopy=args.postcopy,
        postcopy_lane=args.postcopy_lane, streams=args.streams, stream_to=list(args.stream_to), bind=list(args.bind),
        stream_threads=args.stream_threads,
    )
    if not args.memory.exists():
        raise PrecopyError(f"memory region {args.memory} does not exist")
    size = args.memory.stat().st_size
    if args.memory.is_file() and (size == 0 or size % PAGE_SIZE):
        # Checked here, not only when the engine maps it: a usage error (exit 2), nothing started.
        raise PrecopyError(f"memory region {args.memory} is {size} bytes: it must be a non-empty multiple "
                           f"of {PAGE_SIZE}: is --memory the file the workload maps?")
    workload: Workload
    if getattr(args, "criu", False):
        if args.pid is None:
            raise PrecopyError("--criu needs --pid (the process to checkpoint)")
        workload = criu_workload(args.pid, args.memory, args.criu_bin)
    elif args.pid is not None:
        workload = SignalWorkload(args.pid)
    elif args.qmp is not None:
        workload = QemuWorkload(args.qmp, memory=args.memory, timeout_s=max(args.guest_timeout, 10.0))
    else:
        workload = GuestControl(args.guest_control, timeout_s=args.guest_timeout)
    return opts, workload
