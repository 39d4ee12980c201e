"""The predictive throttle: from the last round's rates, the throttle that makes the rounds converge.

QEMU's auto-converge (the ``step`` ramp, :class:`precopy.policy.switchover.SwitchoverPolicy`)
adds 10 % every two rounds that do not converge; a workload that needs 60 %
goes through 20, 30, 40 and 50 first, and every round on the way re-sends a
dirty set that does not shrink (1 GiB at 200,000 pages/s, uffd-wp: 16-23
rounds, 2.9-3.5x the region on the wire).  The ``predict`` ramp instead
projects the next rounds from what the last one measured, and jumps to the
lowest throttle that brings the dirty set to the switchover's size within a
few rounds (as VMware's SDPS slows the vCPU in proportion to the gap):

* a round that sends ``N`` pages takes ``N x per_page_s + overhead_s``
  (``per_page_s``: sending, plus a tracker's scan, which grows with the pages
  it rehashes; ``overhead_s``: the rest of the last scan-to-scan interval --
  the destination settling, the decision, a digest scan of the whole region);
* meanwhile the workload writes ``write_pps x (1 - throttle)`` pages a
  second, uniformly: ``npages x (1 - exp(-writes / npages))`` distinct ones
  (a dirty set near the whole region says the rate is at least that high);
* the write rate unthrottled is what the last interval measured, divided by
  the share of time the throttle in effect then let the workload run.  A
  workload the throttle slows less than that (one that makes up for its rests)
  shows it in the next round, which asks for more: the throttle only rises.

Pure: nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RoundFit", "needed_throttle", "predicted_throttle", "project"]

#: A dirty set at least this share of the region is taken as saturated:
#: the write rate is then at least what it would take to dirty this much.
_SATURATED = 0.995


@dataclass(frozen=True, slots=True)
class RoundFit:
    """What the last live round measured, to project the next ones.

    ``pages_sent``: what it sent; ``interval_s``: from its scan to the scan
    now; ``scan_s``: its scan's wall time; ``scan_per_page``: the scan grows
    with the pages found (kernel write tracking; digests hash the whole
    region whatever is dirty); ``send_pps``: pages a second while sending
    live; ``dirtied``: distinct pages dirtied over ``interval_s`` (the scan
    now); ``npages``: the region's pages; ``throttle_pct``: the throttle in
    effect over the interval.  ``fixed_s``: a round's time besides its
    pages when known otherwise (see :meth:`after_full_copy`).
    """

    pages_sent: int
    interval_s: float
    scan_s: float
    scan_per_page: bool
    send_pps: float
    dirtied: int
    npages: int
    throttle_pct: int
    fixed_s: float | None = None

    @classmethod
    def after_full_copy(cls, *, copy_s: float, scan_s: float, send_pps: float, dirtied: int,
                        npages: int) -> RoundFit:
        """The rates of the full copy, as kernel write tracking saw it.

        Armed before the copy, the tracker reports every page written since,
        whether the copy read it before or after: ``dirtied`` pages over
        ``copy_s`` (from the copy's start to the scan now) say the write rate
        as a round's would.  The scan now (``scan_s``, of those pages) says
        its cost per page; the time a round spends besides its pages is not
        known yet (the copy had no scan, no settling): taken as none, which
        errs toward less throttle -- the next round measures it.
        """
        return cls(pages_sent=max(dirtied, 1), interval_s=copy_s, scan_s=scan_s, scan_per_page=True,
                   send_pps=send_pps, dirtied=dirtied, npages=npages, throttle_pct=0, fixed_s=0.0)

    def usable(self) -> bool:
        """Whether the measurements can be projected from (positive, finite, a region)."""
        return (self.pages_sent > 0 and self.npages > 0 and self.dirtied >= 0
                and math.isfinite(self.interval_s) and self.interval_s > 0
                and math.isfinite(self.send_pps) and self.send_pps > 0
                and math.isfinite(self.scan_s) and self.scan_s >= 0 and 0 <= self.throttle_pct < 100)

    @property
    def per_page_s(self) -> float:
        """A page's share of a round: its sending, and its share of a tracker's scan."""
        scan = self.scan_s / self.pages_sent if self.scan_per_page else 0.0
        return 1.0 / self.send_pps + scan

    @property
    def overhead_s(self) -> float:
        """A round's time besides its pages (at least 0)."""
        if self.fixed_s is not None:
            return max(0.0, self.fixed_s)
        return max(0.0, self.interval_s - self.pages_sent * self.per_page_s)

    @property
    def write_pps(self) -> float:
        """The workload's writes a second, unthrottled, that dirty ``dirtied`` distinct pages uniformly."""
        share = min(self.dirtied / self.npages, _SATURATED)
        writes = -self.npages * math.log1p(-share)
        return writes / self.interval_s / (1.0 - self.throttle_pct / 100)


def project(fit: RoundFit, pages: int, throttle_pct: int, rounds: int) -> float:
    """The dirty set ``rounds`` rounds from now, starting with ``pages`` to send, at ``throttle_pct``."""
    rate = fit.write_pps * (1.0 - throttle_pct / 100)
    n = float(pages)
    for _ in range(rounds):
        n = fit.npages * -math.expm1(-rate * (n * fit.per_page_s + fit.overhead_s) / fit.npages)
    return n


def needed_throttle(fit: RoundFit, pages: int, target_pages: float, rounds: int,
                    low_pct: int, high_pct: int) -> int | None:
    """The lowest throttle in ``low_pct..high_pct`` whose rounds bring ``pages`` to at most
    ``target_pages`` within ``rounds``; ``None`` when not even ``high_pct`` does."""
    if project(fit, pages, high_pct, rounds) > target_pages:
        return None
    lo, hi = low_pct, high_pct  # the projection falls as the throttle rises: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if project(fit, pages, mid, rounds) <= target_pages:
            hi = mid
        else:
            lo = mid + 1
    return lo


def predicted_throttle(fit: RoundFit, *, pages: int, expected_s: float, floor_s: float, target_s: float,
                       current_pct: int, max_pct: int, soon: float, rounds: int) -> tuple[int, str]:
    """The throttle from now on, and a note for the decision's reason ("" when unchanged).

    ``pages``: the dirty set a switchover now would send, expected to pause
    ``expected_s`` (``floor_s`` of it with nothing to send); the switchover
    waits for ``target_s``.  Unchanged when the floor alone is over the
    target (no throttle helps) or when at ``current_pct`` the projection
    reaches the target within ``soon`` rounds; else the lowest throttle that
    reaches it within ``rounds`` (at most ``max_pct``, never below
    ``current_pct``).
    """
    if pages <= 0 or target_s <= floor_s or expected_s <= floor_s:
        return current_pct, ""
    target_pages = pages * (target_s - floor_s) / (expected_s - floor_s)
    if project(fit, pages, current_pct, max(1, math.floor(soon))) <= target_pages:
        return current_pct, ""
    rounds = max(1, min(rounds, math.floor(soon)))
    need = needed_throttle(fit, pages, target_pages, rounds, max(current_pct, 1), max_pct)
    new = max_pct if need is None else need
    if new <= current_pct:
        return current_pct, ""
    plateau = project(fit, pages, current_pct, 50)
    return new, (f"; not converging: {pages} pages now, ~{plateau:.0f} in rounds to come at "
                 f"{current_pct} % (the workload writing ~{fit.write_pps * (1 - current_pct / 100):.0f} "
                 f"pages/s, {fit.send_pps:.0f} sent a second), ~{target_pages:.0f} fit the budget: "
                 f"throttling the workload to {new} %"
                 + (f" (at most {max_pct} %: projected to reach them in {rounds} rounds only above it)"
                    if need is None else f" to reach them in {rounds} rounds"))
