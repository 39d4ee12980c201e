"""What both daemons share: logging, addresses, event loops, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import json
import logging
import signal
import subprocess
import sys
import time
from typing import Any, Coroutine, TypeVar

__all__ = [
    "DEFAULT_CONTROL", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_ABORTED", "EXIT_IN_DOUBT",
    "parse_hostport", "setup_logging", "run", "add_common_args", "add_version_arg", "Parser", "usage_error",
]

T = TypeVar("T")

#: The source daemon's control socket (``precopy-source serve --control``; ``ctl --control``).
DEFAULT_CONTROL = "/run/precopy/source.sock"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
EXIT_IN_DOUBT = 4


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block only for an unknown flag.

    A bad value, a missing option or a bad config key is one line that says
    what is wrong and where to look (``--help``), exit 2.
    """

    def error(self, message: str) -> Any:  # NoReturn, as argparse's
        if message.startswith("unrecognized arguments"):
            self.print_usage(sys.stderr)
        usage_error(self.prog, message)


def usage_error(prog: str, message: str) -> Any:  # NoReturn
    """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit 2 (usage)."""
    sys.stderr.write(f"{prog}: error: {message} (see {prog} --help)\n")
    sys.exit(EXIT_USAGE)


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); argparse-friendly errors."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {port!r} in {text!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port {p} out of range")
    return host, p


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    """``fmt``: ``auto`` (human on a TTY, JSON lines otherwise), ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()):
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class VersionAction(argparse._VersionAction):
    """``--version``: ``PROG VERSION``, exit 0.  precopy is imported only when asked (it costs ~0.5 s)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from precopy._version import __version__

        print(f"{parser.prog} {__version__}", flush=True)
        parser.exit()


def add_version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action=VersionAction, help="print precopy's version and exit")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info)")
    p.add_argument("--log-format", default="auto", choices=["auto", "text", "json"],
                   help="log format: auto = text on a terminal, JSON lines otherwise (default: auto)")
    p.add_argument("--event-loop", default="uvloop", choices=["uvloop", "asyncio"],
                   help="event loop implementation (default: uvloop)")
    add_version_arg(p)


#: glibc's mallopt parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3


def return_large_frees(threshold: int = 256 * 1024) -> bool:
    """Have glibc map every allocation from ``threshold`` bytes up on its own, and unmap it when freed.

    By default glibc raises that threshold each time a large mapped block is
    freed (up to 32 MiB), so the NumPy temporaries of a scan (page masks and
    digest tables of a few MiB) soon come from the heap, whose freed space
    is kept: the digest sweep's source peaked at 62-70 MiB beyond the region
    over three runs, 58-61 MiB with the threshold fixed (same times).
    Returns whether it took effect (False on a C library without mallopt).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def run(coro: Coroutine[Any, Any, T], loop: str) -> T:
    # The hot loops allocate many short-lived objects that reference counting
    # frees: collect cycles less often, and never walk the imported modules'
    # objects again (gc.freeze), which cost ~2 % of a migration's CPU.
    return_large_frees()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class ProgressLine:
    """One self-rewriting status line on a TTY; silent otherwise."""

    def __init__(self, stream: Any = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._width = 0
        if self.enabled:
            # A log line printed while the progress line is shown would be
            # glued to its end: clear the line first (it is redrawn next time).
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._clear_for_log)

    def _clear_for_log(self, record: logging.LogRecord) -> bool:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
            self._last = 0.0
        return True

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        queued = getattr(p, "phase", "") == "queued"
        # At most ten redraws a second, but never skip the line that ends a
        # phase (a quick full copy's 100 % would otherwise be lost).
        final = getattr(p, "phase", "") == "switchover"
        if now - self._last < 0.1 and not final and (queued or p.pages_done < p.pages_todo):
            return
        self._last = now
        if queued:
            line = (f"queued at the {getattr(p, 'queued_at', 'destination')}, position "
                    f"{p.queue_position} (the workload runs on; nothing moves yet)")
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            return
        if getattr(p, "phase", "") == "switchover":
            line = (f"switchover after {p.round} rounds: the workload is paused, the last pages go "
                    f"(expected downtime {p.expected_downtime_ms or 0:.0f} ms)")
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            return
        pct = 100.0 * p.pages_done / p.pages_todo if p.pages_todo else 100.0
        parts = [
            f"round {p.round}" if p.round else "full copy",
            f"{pct:5.1f}%",
            f"{human_bytes(p.pages_done * 4096)}/{human_bytes(p.pages_todo * 4096)}",
            f"{p.page_rate_bps / 1e6:7.1f} MB/s",
            f"link {p.bandwidth_bps / 1e6:.0f} MB/s",
        ]
        if p.round:
            parts.append(f"dirty {p.dirty_pages} pages ({p.dirty_rate_pps:.0f}/s)")
        if getattr(p, "throttle_pct", 0):
            parts.append(f"throttle {p.throttle_pct}%")
        if p.expected_downtime_ms is not None:
            parts.append(f"expected downtime {p.expected_downtime_ms:.0f} ms")
        if p.eta_s is not None and p.pages_done < p.pages_todo:
            parts.append(f"ETA {p.eta_s:.1f} s")
        line = "  ".join(parts)
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def done(self) -> None:
        """Keep the last line on screen and move below it."""
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._clear_for_log)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    """Stop a child we started, by its PID: SIGCONT (a stopped process cannot act
    on SIGTERM), SIGTERM, then SIGKILL if it does not exit within ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
