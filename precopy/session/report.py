"""The migration report (DESIGN "contracts"): plain data, JSON out."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from precopy._version import __version__

__all__ = ["RoundReport", "MigrationReport"]


@dataclass
class RoundReport:
    """One round: round 0 is the full copy, the last is the final (paused) pass."""

    round: int
    kind: str  # "full", "iterative", "final", "repair"
    pages_scanned: int
    pages_dirty: int
    pages_sent: int
    zero_pages: int
    bytes_on_wire: int
    seconds: float
    scan_seconds: float = 0.0
    #: Finding the dirty pages: the digest scan, or the kernel tracker's scan.
    detect_seconds: float = 0.0
    send_seconds: float = 0.0
    bandwidth_bps: float = 0.0
    dirty_rate_pps: float = 0.0
    expected_downtime_ms: float | None = None
    #: The workload's throttle during the round (percent of its time stopped).
    throttle_pct: int = 0
    #: Of ``send_seconds``: the sending thread runnable but waiting for a CPU,
    #: and waiting for room in the socket (the receiver or the link slower).
    send_cpu_wait_seconds: float = 0.0
    send_blocked_seconds: float = 0.0


@dataclass
class MigrationReport:
    migration_id: str
    outcome: str = "running"  # committed | aborted | in-doubt
    source: str = ""
    destination: str = ""
    memory: str = ""
    region_bytes: int = 0
    page_size: int = 4096
    workload: str = ""
    mode: str = "precopy"  # precopy | stop-and-copy
    downtime_budget_ms: float = 0.0
    total_time_s: float = 0.0
    #: Of ``total_time_s``: waiting in the destination's queue (QUEUED)
    #: before anything moved.  (The source daemon's own queue comes before
    #: ``total_time_s`` begins: its reports add ``source_queued_s``.)
    queued_s: float = 0.0
    downtime_ms: float | None = None
    expected_downtime_ms: float | None = None
    downtime_overshoot_ms: float | None = None
    #: --max-downtime-ms, the hard cap (None: none).
    max_downtime_ms: float | None = None
    #: Where the cap was hit: the step it would have been passed before
    #: ("final_scan", "final_pages", "device_state", "verify", "commit":
    #: rolled back, outcome "aborted"), or "after_commit" (passed once COMMIT
    #: was out: the commit stands).  None: not hit.
    cap_hit: str | None = None
    #: How long the workload was paused on the source: until the commit was
    #: confirmed (as ``downtime_ms``), or until a rollback resumed it.
    paused_ms: float | None = None
    forced: bool = False
    #: The highest throttle put on the workload (auto-converge), percent.
    max_throttle_pct: int = 0
    #: How the workload was throttled: "sigstop" (a SIGSTOP/SIGCONT duty
    #: cycle: --pid, or a guest-control guest without the throttle op),
    #: "guest-op" (the guest's throttle op), "adapter" (another adapter's
    #: own way); None: never throttled.
    throttle_method: str | None = None
    rounds: list[RoundReport] = field(default_factory=list)
    bytes_on_wire: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    verify_repairs: int = 0
    device_state_bytes: int = 0
    compression: str = "off"
    tracking: str = "digest"  # digest | uffd-wp: how dirty pages were found (none: --postcopy immediate)
    tracking_reason: str = ""  # why that tracker (e.g. why auto fell back to digests)
    #: What the chunk tables compared hash: "chunks" (their bytes), or
    #: "pages" (their pages' digests; with kernel tracking, once a writer
    #: scatters over most chunks: a page written costs a 4 KiB hash, not 128 KiB).
    verification: str = "chunks"
    #: "new": received into a new file; "existing": into the region file the
    #: destination already held under that name (a repeat migration, a
    #: pre-provisioned host).
    dest_region: str = "new"
    #: Pages not sent in the full copy because that existing region already
    #: held them (a repeat migration).
    pages_already_there: int = 0
    #: TCP connections that carried the pages (--streams; the destination
    #: may take fewer than asked), and the bytes each carried (the first
    #: connection's include everything that is not a page).
    streams: int = 1
    stream_bytes: list[int] = field(default_factory=list)
    #: Whether the extra streams were written from a thread each (--stream-threads; false
    #: with one stream, and where ``auto`` found no cores to spare).
    stream_threads: bool = False
    bandwidth_bps: float = 0.0
    #: What became of the source's copy after a commit: "keep-stopped" (left
    #: paused, never resumed by precopy: the operator ends it once the
    #: destination's copy is confirmed) or "kill" (ended at the commit).
    on_commit: str = "keep-stopped"
    error: str | None = None
    reason: str | None = None
    #: The precopy version of the source that wrote this report, and the
    #: destination's as its HELLO_ACK said (None: it did not say -- a
    #: destination from before versions were announced).
    precopy_version: str | None = __version__
    dest_version: str | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    #: The parts of ``expected_downtime_ms``, to hold against ``phases_ms``:
    #: final_scan, final_pages (pages and device state, at the rate expected
    #: paused), verify, overhead (pause, round trips, commit).
    expected_phases_ms: dict[str, float] = field(default_factory=dict)
    #: At the switchover, how far under the budget the expected downtime had
    #: to fall (the budget less this was the target), and per part of the
    #: pause how far it might run over its estimate (ms; "speedup": room for
    #: a pause that sends no faster than the live rounds did).
    switchover_margin_ms: float | None = None
    margin_parts_ms: dict[str, float] = field(default_factory=dict)
    #: "spread" (from the parts' measured spread), or "fixed" (the budget's
    #: fixed share: --headroom fixed, or too few samples yet).
    margin_basis: str | None = None
    #: Post-copy (None: none): ``switchover_ms`` (pause to the workload running
    #: on the destination), ``pages_missing`` (left for post-copy),
    #: ``pages_faulted`` (fetched because the workload touched them),
    #: ``pages_pushed`` (sent in order), ``fault_p50_us``/``fault_p99_us``/
    #: ``fault_max_us`` (fault to page placed, on the destination), the same
    #: apart for ``remote_*`` (pages not sent yet: fetched on REQUEST; and
    #: ``remote_faults``) and ``inflight_*`` (pages already pushed),
    #: ``last_page_s`` (pause to COMPLETE: every page in place), ``reconnects``;
    #: with --postcopy immediate ``mode`` and ``holes`` (not missing: zeros).
    postcopy: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MigrationReport":
        """A report from its JSON form (keys it does not know, e.g. a daemon's ``options``, are ignored)."""
        known = {f.name for f in fields(cls)}
        round_fields = {f.name for f in fields(RoundReport)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("precopy_version", None)  # a report from before versions were recorded
        values["rounds"] = [RoundReport(**{k: v for k, v in r.items() if k in round_fields})
                            for r in data.get("rounds") or [] if isinstance(r, dict)]
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
