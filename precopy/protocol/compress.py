"""Per-batch lz4 for page batches, chosen by measurement.

lz4 compresses page data at ~0.6-0.8 GB/s per core here: slower than
loopback, faster than a 1 Gbit/s link.  So whether it pays depends on the
link and on the data, and the only honest way to choose is to measure both
ways on live batches.  Pure code: the session reports timings, this decides.
"""

from __future__ import annotations

import lz4.block

__all__ = ["AdaptiveCompressor"]


class AdaptiveCompressor:
    """Per-batch lz4: never, always, or whichever moves pages faster here.

    ``auto`` measures both ways on live batches (raw page bytes per second
    of compress+send time): a probe of raw batches, then of compressed
    ones, then it keeps the faster mode and re-probes the other now and
    then.  lz4 (~0.6-0.8 GB/s on page data) wins on a 1 Gbit/s link and
    loses on loopback; incompressible data is never worth it.
    """

    PROBE = 16
    REPROBE_EVERY = 256

    def __init__(self, mode: str) -> None:
        if mode not in ("off", "lz4", "auto"):
            raise ValueError(f"compression mode must be off, lz4 or auto, not {mode!r}")
        self.mode = mode
        self.raw = 0
        self.wire = 0
        self._rate: dict[bool, float] = {}
        self._acc: dict[bool, list[float]] = {False: [0.0, 0.0], True: [0.0, 0.0]}
        self._plan: list[bool] = [False] * self.PROBE + [True] * self.PROBE
        self._batches = 0

    def want(self) -> bool:
        """Should the next batch be compressed?"""
        if self.mode != "auto":
            return self.mode == "lz4"
        if self._plan:
            return self._plan[0]
        self._batches += 1
        if self._batches % self.REPROBE_EVERY == 0:
            best = self._best()
            self._plan = [not best] * self.PROBE
            return not best
        return self._best()

    def _best(self) -> bool:
        return self._rate.get(True, 0.0) > self._rate.get(False, 0.0)

    def record(self, compressed: bool, raw_bytes: int, seconds: float) -> None:
        """Account one batch sent (``compressed``: whether lz4 was tried)."""
        if self.mode != "auto":
            return
        acc = self._acc[compressed]
        acc[0] += raw_bytes
        acc[1] += seconds
        if self._plan and self._plan[0] == compressed:
            self._plan.pop(0)
            if not self._plan or self._plan[0] != compressed:
                # End of a probe: turn what was measured into a rate.
                if acc[1] > 0:
                    self._rate[compressed] = acc[0] / acc[1]
                self._acc[compressed] = [0.0, 0.0]
        elif acc[1] > 0.05:
            rate = acc[0] / acc[1]
            old = self._rate.get(compressed)
            self._rate[compressed] = rate if old is None else 0.5 * (old + rate)
            self._acc[compressed] = [0.0, 0.0]

    def compress(self, data: memoryview) -> bytes | None:
        """lz4 block of ``data``, or None when it does not shrink by 10 %."""
        out: bytes = lz4.block.compress(data, store_size=False)
        self.raw += len(data)
        if len(out) >= 0.9 * len(data):
            self.wire += len(data)
            return None
        self.wire += len(out)
        return out

    @property
    def active(self) -> bool:
        """Whether batches are being compressed now (for the downtime estimate)."""
        return self.mode == "lz4" or (self.mode == "auto" and not self._plan and self._best())

    @property
    def ratio(self) -> float:
        """Wire bytes per raw byte over the batches lz4 was tried on."""
        return self.wire / self.raw if self.raw else 1.0
