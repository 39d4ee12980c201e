"""precopy-dest: the destination daemon.  Accepts migrations until stopped."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from precopy.policy.admission import default_max_active
from precopy.protocol.auth import load_key
from precopy.session.destination import DestinationServer, DestOptions
from precopy.errors import PrecopyError
from precopy.net.tls import server_context
from precopy.protocol import MAX_REGION, MAX_STREAMS
from precopy.workload.qemu import QemuDestination, check_dest_command
from precopy.workload.criu import find_criu
from precopy.workload.criu_dest import CriuDestination

from .common import EXIT_OK, EXIT_USAGE, Parser, add_common_args, parse_hostport, run, setup_logging
from .config import add_config_args, effective_config, parse_with_config
from .metrics import MetricsServer, dest_metrics

_log = logging.getLogger("precopy-dest")


def parse_size(text: str) -> int:
    """``4096``, ``64M``, ``1G``, ``2T`` (powers of 1024) -> bytes; argparse-friendly errors."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 512M or 64G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def exposure_refusal(host: str, has_key: bool, has_tls: bool, insecure: bool) -> str | None:
    """Why listening on ``host`` this way is refused, or None when it is allowed.

    A port that writes into memory is open only to this machine unless
    something stands in front of it: a key, TLS with client certificates or
    at least encryption, or an explicit ``--insecure``.
    """
    if has_key or has_tls or insecure:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"refusing to listen on {host or 'all addresses'} with neither --auth-key-file nor TLS: "
        "anyone who reaches that port could write a region here and have --on-resume run on it. "
        "Give --auth-key-file (and/or --tls-cert/--tls-key/--tls-ca), listen on 127.0.0.1, or pass "
        "--insecure if the network is trusted"
    )


def _add_postcopy_args(p: argparse.ArgumentParser) -> None:
    """Post-copy's timeouts (docs/FAILURES.md "Post-copy")."""
    p.add_argument("--postcopy-guest-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="post-copy: abort (the source resumes its copy) when the --on-resume guest has not "
                        "offered its userfaultfd within this long (default 60)")
    p.add_argument("--postcopy-resume-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="post-copy: how long a broken page stream waits for its source to resume it before "
                        "the migration is recorded broken (default 600; docs/FAILURES.md)")
    p.add_argument("--postcopy-guest-early", action="store_true",
                   help="post-copy: run --on-resume when a migration that may end in post-copy begins (its "
                        "guest held: resumed at the switchover, or after a pre-copy commit; stopped if the "
                        "migration ends without one) instead of at the switchover, so that the guest's start "
                        "is not downtime; the guest must read $PRECOPY_DEVICE_STATE when resumed "
                        "(docs/TRACKING.md)")


def _add_criu_args(p: argparse.ArgumentParser) -> None:
    """--criu and --criu-bin: restore processes checkpointed by CRIU."""
    p.add_argument("--criu", action="store_true",
                   help="restore processes checkpointed by CRIU (precopy-source --criu): at COMMIT, before "
                        "committing, the received region is linked at the path it had on the source (on the "
                        "file system of --memory-dir) and the process restored, stopped; after the commit it "
                        "is continued. A failed restore is not committed (the source resumes its process). "
                        "Needs CRIU >= 4.2, the same executable at the same path as the source's ('make criu') "
                        "(default: off)")
    p.add_argument("--criu-bin", metavar="PATH",
                   help="the CRIU executable (default: $PRECOPY_CRIU, criu on PATH, or "
                        "/var/lib/precopy/criu/criu from 'make criu')")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="precopy-dest",
        description="Receive live migrations: each region is written under --memory-dir; after a "
                    "commit --on-resume runs with PRECOPY_MEMORY, PRECOPY_DEVICE_STATE and "
                    "PRECOPY_MIGRATION_ID set.",
    )
    p.add_argument("--listen", required=True, type=parse_hostport, metavar="HOST:PORT",
                   help="address to accept migrations on (port 0: pick one, printed at start; "
                        "required, on the command line or in --config)")
    p.add_argument("--memory-dir", required=True, type=Path, metavar="DIR",
                   help="where received regions are written (use /dev/shm/... for RAM; required)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="journal and device-state files (default: --memory-dir); required when "
                        "--memory-dir is hugetlbfs, which holds mappable files only")
    p.add_argument("--on-resume", metavar="CMD",
                   help="shell command run (via /bin/sh -c) after each commit to resume the workload "
                        "(default: none)")
    p.add_argument("--qemu-cmd", metavar="CMD",
                   help="migrate QEMU VMs: for each migration start this QEMU command line (split like "
                        "a shell would; no shell runs it) with {memory} replaced by the region file being "
                        "received (its memory-backend-file mem-path, share=on) and {qmp} by a QMP socket "
                        "path; it must contain '-incoming defer'. After the commit the VM loads its device "
                        "state and runs. Also: {size} bytes, {name}, {migration_id} (default: none)")
    _add_criu_args(p)
    _add_postcopy_args(p)
    p.add_argument("--auth-key-file", type=Path, metavar="FILE",
                   help="pre-shared key; without it any peer that reaches the port may migrate in "
                        "(default: none)")
    p.add_argument("--keep-partial", action="store_true",
                   help="keep the partial region file of a failed migration (as .NAME.ID.partial)")
    p.add_argument("--no-populate", action="store_true",
                   help="do not prefault new regions in the background (hugetlbfs: its blocks are still "
                        "reserved; tmpfs: pages are then written by pwrite, not received straight into the "
                        "mapping; default: prefault)")
    p.add_argument("--no-reuse-regions", action="store_true",
                   help="always receive into a new region file; by default a region file already under the "
                        "migration's name, of its size and used by no process, is received into (a repeat "
                        "migration or a pre-provisioned host: no first touch of fresh memory, no second copy's "
                        "space; it is consumed, even if the migration fails)")
    p.add_argument("--idle-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="drop a migration whose source sends nothing for this long (default 120)")
    p.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="drop a connection that has not authenticated and begun within this long "
                        "(default 10)")
    p.add_argument("--max-migrations", type=int, default=8, metavar="N",
                   help="migrations accepted at once, moving bytes or queued (--max-active); more are "
                        "refused as busy (default 8)")
    p.add_argument("--max-active", type=int, default=None, metavar="N",
                   help="migrations moving bytes at once; the others accepted wait their turn in order "
                        "(the source hears its place and keeps its workload running; the wait counts "
                        "toward neither its downtime nor its --max-time) (default: one per two CPUs, "
                        f"here {default_max_active()})")
    p.add_argument("--max-region", type=parse_size, default=MAX_REGION, metavar="SIZE",
                   help="largest region accepted, e.g. 64G (default 1T)")
    p.add_argument("--max-streams", type=int, default=8, metavar="N",
                   help="connections one migration may use for its pages (a source's --streams); a source "
                        "asking for more gets this many, 1 turns extra streams off (default 8)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="connections still in the handshake at once; more are closed at once "
                        "(default 64)")
    tls = p.add_argument_group("security (see docs/SECURITY.md)")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="serve TLS with this certificate (chain); needs --tls-key (default: none, no TLS)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM",
                     help="private key of --tls-cert (mode 0600; default: none)")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM",
                     help="require client certificates signed by this CA (mutual TLS; default: none)")
    tls.add_argument("--insecure", action="store_true",
                     help="allow listening on a non-loopback address with neither "
                          "--auth-key-file nor TLS")
    p.add_argument("--ready-file", type=Path, metavar="FILE",
                   help="write HOST:PORT here once listening (for scripts using port 0; default: none)")
    p.add_argument("--metrics", type=parse_hostport, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    add_common_args(p)
    add_config_args(p)
    return p


async def _serve(opts: DestOptions, ready_file: Path | None, qemu_cmd: str | None,
                 metrics: tuple[str, int] | None = None) -> int:
    if qemu_cmd:
        opts.workload = QemuDestination(qemu_cmd)
    server = DestinationServer(opts)
    await server.start()
    metrics_server = None
    if metrics is not None:
        metrics_server = MetricsServer(metrics[0], metrics[1], lambda: dest_metrics(server))
        try:
            await metrics_server.start()
        except OSError as exc:
            await server.close()
            raise PrecopyError(str(exc.strerror)) from exc
    if ready_file:
        ready_file.write_text(f"{opts.host}:{server.port}\n")
    print(f"precopy-dest listening on {opts.host}:{server.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def shut_down(sig: signal.Signals) -> None:
        _log.info("%s: shutting down", sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shut_down, sig)
    serving = asyncio.create_task(server.serve_forever())
    await stop.wait()
    await server.close(abort_in_flight=True)
    if metrics_server is not None:
        await metrics_server.close()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    if isinstance(opts.workload, (QemuDestination, CriuDestination)):
        await opts.workload.close()
    return EXIT_OK


def check_config(args: argparse.Namespace, opts: DestOptions) -> int:
    """--check-config: the options are valid (parsed, key readable); can the directories be used?"""
    problems = []
    for key, d in (("memory-dir", opts.memory_dir), ("state-dir", opts.state_dir)):
        assert d is not None
        probe = d
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".precopy-check-", dir=probe))  # can we create in it?
        except OSError as exc:
            problems.append(f"key '{key}': {d} cannot be created or written here ({probe}: {exc.strerror})")
    if problems:
        for line in problems:
            print(f"precopy-dest: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    print(effective_config(args))
    print("precopy-dest: configuration OK", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_config(parser, argv)
    setup_logging(args.log_level, args.log_format)
    try:
        key = load_key(args.auth_key_file) if args.auth_key_file else None
    except PrecopyError as exc:
        print(f"precopy-dest: error: key 'auth-key-file': {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        tls_context = None
        if args.tls_cert or args.tls_key or args.tls_ca:
            if not (args.tls_cert and args.tls_key):
                raise PrecopyError("TLS needs both --tls-cert and --tls-key (--tls-ca adds client "
                                   "certificate checks)")
            tls_context = server_context(args.tls_cert, args.tls_key, args.tls_ca)
        refusal = exposure_refusal(args.listen[0], key is not None, tls_context is not None,
                                   args.insecure)
        if refusal:
            raise PrecopyError(refusal)
        for flag, value in (("--max-migrations", args.max_migrations),
                            ("--max-connections", args.max_connections),
                            ("--max-streams", args.max_streams),
                            ("--max-active", 1 if args.max_active is None else args.max_active)):
            if value < 1:
                raise PrecopyError(f"{flag} must be at least 1")
        if args.max_streams > MAX_STREAMS:
            raise PrecopyError(f"--max-streams must be at most {MAX_STREAMS}")
        if not args.handshake_timeout > 0:
            raise PrecopyError("--handshake-timeout must be positive")
    except PrecopyError as exc:
        print(f"precopy-dest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host, port = args.listen
    if args.qemu_cmd:
        try:
            check_dest_command(args.qemu_cmd)
        except ValueError as exc:
            print(f"precopy-dest: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    opts = DestOptions(memory_dir=args.memory_dir, state_dir=args.state_dir, host=host, port=port, auth_key=key,
                       on_resume=args.on_resume, keep_partial=args.keep_partial,
                       idle_timeout_s=args.idle_timeout, populate=not args.no_populate,
                       postcopy_guest_timeout_s=args.postcopy_guest_timeout,
                       postcopy_resume_timeout_s=args.postcopy_resume_timeout,
                       postcopy_guest_early=args.postcopy_guest_early,
                       reuse_regions=not args.no_reuse_regions,
                       tls_context=tls_context, handshake_timeout_s=args.handshake_timeout,
                       max_migrations=args.max_migrations, max_connections=args.max_connections,
                       max_active=args.max_active, max_streams=args.max_streams,
                       max_region=args.max_region)
    if args.criu:
        try:
            if args.qemu_cmd:
                raise PrecopyError("--criu and --qemu-cmd exclude each other")
            opts.workload = CriuDestination(find_criu(args.criu_bin))
        except PrecopyError as exc:
            print(f"precopy-dest: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.check_config:
        return check_config(args, opts)
    try:
        return run(_serve(opts, args.ready_file, args.qemu_cmd, args.metrics), args.event_loop)
    except PrecopyError as exc:
        print(f"precopy-dest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
