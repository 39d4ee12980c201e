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

from precopy.errors import MigrationAborted, MigrationInDoubt, PrecopyError
from precopy.session.options import SourceOptions
from precopy.session.source import migrate
from precopy.workload.base import Workload
from precopy.workload.control import GuestControl
from precopy.workload.qemu import QemuWorkload

from .common import EXIT_ABORTED, EXIT_IN_DOUBT, EXIT_OK, EXIT_USAGE, ProgressLine, run, setup_logging
from .config import effective_config, parse_with_config
from .source_args import build_parser, make_migration
from .summary import summary

__all__ = ["main", "build_parser", "make_migration", "summary"]

_log = logging.getLogger("precopy-source")


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
