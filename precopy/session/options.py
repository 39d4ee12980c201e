"""What a migration is asked to do (:class:`SourceOptions`, checked when made) and what it shows (:class:`Progress`)."""

from __future__ import annotations

import os
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from precopy.memory.tracking import TRACKING_MODES
from precopy.policy.postcopy import check_postcopy
from precopy.policy.switchover import THROTTLE_RAMPS, check_throttle
from precopy.protocol import MAX_BATCH_PAGES, MAX_STREAMS, valid_name

__all__ = ["SourceOptions", "Progress", "HEADROOM_MODES", "STREAM_THREADS_MODES", "default_streams",
           "stream_threads_wanted", "usable_cpus"]

HEADROOM_MODES = ("spread", "fixed")
#: --stream-threads: each extra stream sent from a thread of its own where cores are to spare, always, never.
STREAM_THREADS_MODES = ("auto", "on", "off")


def default_streams(addresses: int) -> int:
    """``--streams`` when not given: one per destination address (``--to`` and each ``--stream-to``).

    The destination receives each extra stream on a thread of its own, and
    the source sends each from a thread of its own where it has cores to
    spare (stream_threads_wanted), but on this project's 2-CPU machine the
    two agents already take both CPUs: over one path 2 streams measure 1.00x
    and 4 1.10x (benchmarks/RESULTS.md, "Issue 21: a thread per stream on
    the destination").  Streams pay off where each link or NIC is the
    limit: one stream per link.
    """
    return max(1, addresses)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def stream_threads_wanted(mode: str, streams: int, cpus: int | None = None) -> bool:
    """Whether the source writes each extra stream from a thread of its own (``--stream-threads``).

    ``on``/``off`` as said (one stream: no extra stream, never).  ``auto``:
    only where the host has a core to spare for each, ``cpus`` (default:
    :func:`usable_cpus`) >= 2 x ``streams`` + 2 -- a core per stream for the
    source's sending, as many again for what shares the host with it (the
    workload being migrated; on one host, the destination's receiving
    threads) and two for the rest.  Where the cores are not there the
    threads only add a hand-off per frame: on this project's 2-CPU machine
    2 and 4 streams with threads measured 0.99x and 0.90x of the one loop
    (benchmarks/RESULTS.md, "Issue 21: a thread per stream on the
    source"), so there ``auto`` keeps the loop.
    """
    if mode not in STREAM_THREADS_MODES:
        raise ValueError(f"stream_threads must be auto, on or off, not {mode!r}")
    if streams < 2 or mode == "off":
        return False
    if mode == "on":
        return True
    return (usable_cpus() if cpus is None else cpus) >= 2 * streams + 2


@dataclass
class SourceOptions:
    """Everything a migration needs besides the workload.  See ``precopy-source --help``."""

    host: str
    port: int
    memory: Path
    name: str | None = None
    downtime_ms: float = 300.0
    max_rounds: int = 30
    max_time_s: float | None = 600.0
    on_nonconvergence: str = "abort"
    compress: str = "off"  # off | lz4 | auto
    auth_key: bytes | None = None
    #: TLS to the destination (precopy.net.tls.client_context); None: plain TCP.
    tls_context: ssl.SSLContext | None = None
    batch_pages: int = 256
    chunk_pages: int = 32
    on_commit: str = "keep-stopped"  # keep-stopped | kill
    connect_timeout_s: float = 10.0
    io_timeout_s: float = 60.0
    migration_id: str | None = None
    outcome_retries: int = 6
    #: Preflight only: connect, handshake, ask the destination whether the
    #: region fits, and stop (report outcome "preflight-ok"); nothing moves.
    dry_run: bool = False
    mode: str = "precopy"  # precopy | stop-and-copy (the baseline: pause first, copy everything paused)
    #: Start a guardian process that resumes a paused workload if this
    #: process dies before COMMIT is sent (see precopy.session.guardian).
    guardian: bool = False
    #: The files ``tls_context`` was made from ({"ca", "cert", "key"}, each a
    #: path or None), so that the guardian process can ask the destination
    #: over TLS too.  Without them a guardian cannot reach a TLS-only
    #: destination and leaves an in-doubt workload paused.
    tls_files: dict[str, str | None] | None = None
    #: How dirty pages are found: ``digest`` (rehash and compare), ``uffd-wp``
    #: (the kernel, offered by the guest; docs/TRACKING.md) or ``auto``
    #: (uffd-wp when the guest offers it and the kernel supports it).
    tracking: str = "auto"
    #: Auto-converge: throttle a workload whose dirty set will not shrink
    #: (``auto``) or never (``off``); percentages of its time stopped: the
    #: first throttle, the step per further trigger, the cap
    #: (precopy.policy.switchover.SwitchoverPolicy); how it rises: ``predict``
    #: (to what a projection of the rounds needs, precopy.policy.converge) or
    #: ``step`` (QEMU's: the first throttle, then a step per further trigger).
    throttle: str = "auto"
    throttle_ramp: str = "predict"
    throttle_initial_pct: int = 20
    throttle_step_pct: int = 10
    throttle_max_pct: int = 99
    #: A hard cap on the pause (ms; None: none): once paused, a migration
    #: that would pass it before the commit is sent rolls back instead
    #: (precopy.policy.downtime).  At least ``downtime_ms``.
    max_downtime_ms: float | None = None
    #: How far under the budget the expected downtime must fall to switch
    #: over: ``spread`` (from the measured spread of the pause's parts,
    #: precopy.policy.downtime.switchover_margin) or ``fixed`` (25 % of the budget).
    headroom: str = "spread"
    #: TCP connections for the pages (precopy.session.streams; docs/PROTOCOL.md
    #: "Streams"); None: one per destination address (default_streams).
    streams: int | None = None
    #: Each extra stream written from a thread of its own (precopy.session.stream_sender):
    #: ``auto`` (where the host has cores to spare: stream_threads_wanted), ``on``, ``off``.
    stream_threads: str = "auto"
    #: More destination addresses (host, port): stream k goes to the
    #: (k mod count)-th of [(host, port), *stream_to] -- one per link or NIC.
    stream_to: list[tuple[str, int]] = field(default_factory=list)
    #: Local addresses to connect from: stream k from the (k mod count)-th (empty: the kernel's choice).
    bind: list[str] = field(default_factory=list)
    #: Post-copy (precopy.policy.postcopy): ``off``, ``auto`` (instead of
    #: throttling, aborting or forcing), ``now`` (after the full copy) or
    #: ``immediate`` (before any copy: precopy.session.postcopy_immediate).
    postcopy: str = "off"
    #: Post-copy's faults on a connection of their own when the destination offers one
    #: (``--postcopy-lane``, precopy.session.postcopy_lane); off: on the page stream's connection.
    #: Off by default: it cuts the remote faults' latency (~700 -> ~70 us p50) but the workload,
    #: answered faster, takes CPU from the push on a busy 2-CPU host (benchmarks/RESULTS.md, issue 22).
    postcopy_lane: bool = False

    def __post_init__(self) -> None:
        self.memory = Path(self.memory)
        if self.name is None:
            self.name = self.memory.name
        if not valid_name(self.name):
            raise ValueError(f"region name {self.name!r} must be a plain file name ([A-Za-z0-9._-])")
        if not 1 <= self.batch_pages <= MAX_BATCH_PAGES:
            raise ValueError(f"batch_pages must be 1..{MAX_BATCH_PAGES}")
        if self.chunk_pages < 1 or self.chunk_pages & (self.chunk_pages - 1) or self.chunk_pages > 4096:
            raise ValueError("chunk_pages must be a power of two up to 4096")
        if self.compress not in ("off", "lz4", "auto"):
            raise ValueError(f"compress must be off, lz4 or auto, not {self.compress!r}")
        if self.mode not in ("precopy", "stop-and-copy"):
            raise ValueError(f"mode must be precopy or stop-and-copy, not {self.mode!r}")
        if self.tracking not in TRACKING_MODES:
            raise ValueError(f"tracking must be one of {', '.join(TRACKING_MODES)}, not {self.tracking!r}")
        if self.tracking == "uffd-wp" and self.mode == "stop-and-copy":
            raise ValueError("tracking uffd-wp needs mode precopy (stop-and-copy tracks nothing: it pauses first)")
        if self.on_commit not in ("keep-stopped", "kill"):
            raise ValueError(f"on_commit must be keep-stopped or kill, not {self.on_commit!r}")
        check_throttle(self.throttle, self.throttle_initial_pct, self.throttle_step_pct, self.throttle_max_pct)
        if self.throttle_ramp not in THROTTLE_RAMPS:
            raise ValueError(f"throttle_ramp must be predict or step, not {self.throttle_ramp!r}")
        check_postcopy(self.postcopy, self.on_nonconvergence, self.mode)
        if self.headroom not in HEADROOM_MODES:
            raise ValueError(f"headroom must be spread or fixed, not {self.headroom!r}")
        if self.max_downtime_ms is not None:
            if not self.max_downtime_ms > 0:
                raise ValueError(f"max_downtime_ms must be positive, not {self.max_downtime_ms!r}")
            if self.max_downtime_ms < self.downtime_ms:
                raise ValueError(
                    f"max downtime {self.max_downtime_ms:g} ms is under the downtime budget {self.downtime_ms:g} ms: "
                    "the switchover aims under the budget and the cap is the line never to cross, so lower "
                    "--downtime-ms to the cap or below")
        if self.postcopy == "immediate":  # every page goes by the post-copy stream: one connection
            if self.streams is not None and self.streams > 1:
                raise ValueError("postcopy immediate sends every page on one connection (the post-copy "
                                 f"stream): streams {self.streams} does not apply")
            self.streams = 1
        if self.streams is None:
            self.streams = default_streams(1 + len(self.stream_to))
        if not 1 <= self.streams <= MAX_STREAMS:
            raise ValueError(f"streams must be 1..{MAX_STREAMS}, not {self.streams}")
        if self.stream_threads not in STREAM_THREADS_MODES:
            raise ValueError(f"stream_threads must be auto, on or off, not {self.stream_threads!r}")
        if self.migration_id is None:
            self.migration_id = uuid.uuid4().hex
        if not valid_name(self.migration_id):
            raise ValueError("migration_id must be a plain token ([A-Za-z0-9._-])")


@dataclass
class Progress:
    """What a progress display shows; passed to the progress callback."""

    phase: str
    round: int
    pages_done: int
    pages_todo: int
    dirty_pages: int
    bandwidth_bps: float
    dirty_rate_pps: float
    expected_downtime_ms: float | None
    elapsed_s: float
    eta_s: float | None = None
    #: Page bytes moved per second in this round (before compression).
    page_rate_bps: float = 0.0
    #: How hard the workload is throttled (percent of its time stopped; 0: not).
    throttle_pct: int = 0
    #: Phase "queued": the place in the destination's queue (1: next).
    queue_position: int = 0
