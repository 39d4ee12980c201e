"""precopy-dest: the destination daemon.  Accepts migrations until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from precopy.auth import load_key
from precopy.destination import DestinationServer, DestOptions
from precopy.errors import PrecopyError

from .common import EXIT_OK, EXIT_USAGE, add_common_args, parse_hostport, run, setup_logging

_log = logging.getLogger("precopy-dest")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="precopy-dest",
        description="Receive live migrations: each region is written under --memory-dir; after a "
                    "commit --on-resume runs with PRECOPY_MEMORY, PRECOPY_DEVICE_STATE and "
                    "PRECOPY_MIGRATION_ID set.",
    )
    p.add_argument("--listen", required=True, type=parse_hostport, metavar="HOST:PORT",
                   help="address to accept migrations on (port 0: pick one, printed at start)")
    p.add_argument("--memory-dir", required=True, type=Path, metavar="DIR",
                   help="where received regions are written (use /dev/shm/... for RAM)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="journal and device-state files (default: --memory-dir); required when "
                        "--memory-dir is hugetlbfs, which holds mappable files only")
    p.add_argument("--on-resume", metavar="CMD",
                   help="shell command run (via /bin/sh -c) after each commit to resume the workload")
    p.add_argument("--auth-key-file", type=Path, metavar="FILE",
                   help="pre-shared key; without it any peer that reaches the port may migrate in")
    p.add_argument("--keep-partial", action="store_true",
                   help="keep the partial region file of a failed migration (as .NAME.ID.partial)")
    p.add_argument("--no-populate", action="store_true",
                   help="do not prefault a new region in the background (its blocks are still reserved)")
    p.add_argument("--idle-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="drop a migration whose source sends nothing for this long (default 120)")
    p.add_argument("--ready-file", type=Path, metavar="FILE",
                   help="write HOST:PORT here once listening (for scripts using port 0)")
    add_common_args(p)
    return p


async def _serve(opts: DestOptions, ready_file: Path | None) -> int:
    server = DestinationServer(opts)
    await server.start()
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
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        key = load_key(args.auth_key_file) if args.auth_key_file else None
    except PrecopyError as exc:
        parser.print_usage(sys.stderr)
        print(f"precopy-dest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host, port = args.listen
    opts = DestOptions(memory_dir=args.memory_dir, state_dir=args.state_dir, host=host, port=port, auth_key=key,
                       on_resume=args.on_resume, keep_partial=args.keep_partial,
                       idle_timeout_s=args.idle_timeout, populate=not args.no_populate)
    try:
        return run(_serve(opts, args.ready_file), args.event_loop)
    except PrecopyError as exc:
        print(f"precopy-dest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
