"""Command line of ``precopy-guest``: argument parsing and :func:`main`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from precopy._version import __version__

from .common import GuestError
from .det import run_det
from .launch import add_run_parser
from .dirty import DIRTY_CONTENTS, DIRTY_PATTERNS, run_dirty
from .region import CREATE_CONTENTS, parse_size, run_create

__all__ = ["build_parser", "main"]


def _size_arg(text: str) -> int:
    """argparse type for sizes with K/M/G suffixes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _non_negative_float(text: str) -> float:
    """argparse type for a float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type for a float > 0."""
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _unit_fraction(text: str) -> float:
    """argparse type for a float in [0, 1]."""
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type for an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_create_parser(subparsers: Any) -> None:
    """Register the ``create`` subcommand."""
    parser = subparsers.add_parser("create", help="create and fill a memory region file")
    parser.add_argument("--memory", required=True, help="region file to create or truncate")
    parser.add_argument(
        "--size", required=True, type=_size_arg, help="size, multiple of 4096 (e.g. 256M, 1G)"
    )
    parser.add_argument("--content", choices=CREATE_CONTENTS, default="random")
    parser.add_argument("--seed", type=int, default=0, help="content seed (default 0)")
    parser.set_defaults(func=run_create)


def _add_dirty_parser(subparsers: Any) -> None:
    """Register the ``dirty`` subcommand."""
    parser = subparsers.add_parser("dirty", help="map a region and keep dirtying pages")
    parser.add_argument("--memory", required=True, help="existing region file")
    parser.add_argument(
        "--rate", type=_non_negative_float, default=1000.0,
        help="page writes per second (0 = idle; default 1000)",
    )
    parser.add_argument(
        "--pattern", choices=DIRTY_PATTERNS, default="random",
        help="random paced writes, or sweep: increment every page's first byte at full speed",
    )
    parser.add_argument(
        "--sweep-rate", type=_non_negative_float, default=0.0,
        help="with --pattern sweep: pages per second, in order, wrapping around (default 0: full speed)",
    )
    parser.add_argument(
        "--hot-fraction", type=_unit_fraction, default=0.1,
        help="fraction of pages (from the start) forming the hot set (default 0.1)",
    )
    parser.add_argument(
        "--hot-weight", type=_unit_fraction, default=0.9,
        help="probability a write goes to the hot set (default 0.9)",
    )
    parser.add_argument("--content", choices=DIRTY_CONTENTS, default="random")
    parser.add_argument("--control", help="Unix socket path for pause/resume/stop/track/throttle")
    parser.add_argument(
        "--no-tracking", action="store_true",
        help="do not offer the agent kernel write tracking (the 'track' op; docs/TRACKING.md)",
    )
    parser.add_argument(
        "--no-throttle", action="store_true",
        help="do not offer the optional 'throttle' op (answer it not-ok, as a guest without it "
             "would: the agent then throttles with SIGSTOP/SIGCONT)",
    )
    parser.add_argument(
        "--duration", type=_positive_float, default=None,
        help="seconds to run (default: until stopped)",
    )
    parser.add_argument(
        "--postcopy", action="store_true",
        help="resumed by a post-copy migration: start held, offer the destination agent a userfaultfd "
             "for the missing pages (the 'postcopy' op; docs/TRACKING.md) and run on 'resume'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device-state-size", type=_size_arg, default=0,
        help="bytes of device state returned by each pause (default 0)",
    )
    parser.add_argument("--device-state-out", help="also write each pause's blob here")
    parser.add_argument("--stats-out", help='write {"pages_written", "seconds"} JSON here on exit')
    parser.set_defaults(func=run_dirty)


def _add_det_parser(subparsers: Any) -> None:
    """Register the ``det`` subcommand."""
    parser = subparsers.add_parser("det", help="deterministic guest with a digest at the end")
    parser.add_argument("--memory", required=True, help="existing region file")
    parser.add_argument("--steps", required=True, type=_non_negative_int, help="total steps")
    parser.add_argument(
        "--device-state", help="msgpack blob from a pause reply to resume from (empty = fresh)"
    )
    parser.add_argument("--control", help="Unix socket path for pause/resume/stop/track/throttle")
    parser.add_argument(
        "--no-tracking", action="store_true",
        help="do not offer the agent kernel write tracking (the 'track' op; docs/TRACKING.md)",
    )
    parser.add_argument(
        "--no-throttle", action="store_true",
        help="do not offer the optional 'throttle' op (answer it not-ok, as a guest without it "
             "would: the agent then throttles with SIGSTOP/SIGCONT)",
    )
    parser.add_argument(
        "--postcopy", action="store_true",
        help="resumed by a post-copy migration: start held, offer the destination agent a userfaultfd "
             "for the missing pages (the 'postcopy' op; docs/TRACKING.md) and run on 'resume', "
             "reading --device-state then (it may not exist before: precopy-dest --postcopy-guest-early)",
    )
    parser.add_argument("--seed", type=int, default=1, help="RNG seed for a fresh start")
    parser.add_argument(
        "--step-sleep-us", type=_non_negative_float, default=0.0,
        help="microseconds to sleep between steps (default 0)",
    )
    parser.add_argument("--digest-out", help='also write {"steps", "digest"} JSON here')
    parser.set_defaults(func=run_det)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``precopy-guest`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="precopy-guest",
        description="Demo guest workloads that map and modify a shared memory region, and the launcher "
                    "of any program to be moved with CRIU (run).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_create_parser(subparsers)
    _add_dirty_parser(subparsers)
    _add_det_parser(subparsers)
    add_run_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``precopy-guest``; return the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GuestError as exc:
        print(f"precopy-guest {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"precopy-guest {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
