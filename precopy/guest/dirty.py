"""The ``dirty`` guest: a rate-limited or sweeping page writer."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import xxhash

from .common import PAGE_SIZE, GuestError, seeded_rng, write_file_atomic
from .control import GateController, control_server
from .gate import WorkGate, install_stop_signals
from .region import MappedRegion, text_pool
from .postcopy import postcopy_offer
from .tracking import WriteTrackingOffer

__all__ = [
    "DIRTY_CONTENTS",
    "DIRTY_PATTERNS",
    "DirtyDeviceState",
    "PageWriter",
    "dirty_device_state_blob",
    "run_dirty",
]

DIRTY_CONTENTS = ("random", "half-text")
"""Data kinds accepted by ``dirty --content``."""

DIRTY_PATTERNS = ("random", "sweep")
"""Write patterns accepted by ``dirty --pattern``."""

_BATCH_INTERVAL_S = 0.005
"""Pacing period of the ``dirty --pattern random`` loop."""

_MAX_CATCH_UP_S = 0.01
"""Longest stretch of missed time the paced loop makes up for in one batch.

Two pacing periods: enough to ride out scheduling jitter, short enough that
most of a stop from outside (a SIGSTOP) is lost, as it is for a workload whose
writes follow its CPU time.  With 50 ms, a throttle resting under 50 ms at a
time (up to ~80 %) was made up in full and did not slow the guest at all.  The
throttle op's own rests (:attr:`WorkGate.rested_s`) are never made up: with
them counted, a 10 ms cap still made up 5 ms of each, so a 20-33 % throttle
did not slow the guest and 50 % slowed it by 25 %."""

_MAX_BATCH_PAGES = 65536
_MIN_WRITE_BYTES = 8
_MAX_WRITE_BYTES = 64
_SWEEP_CHUNK_PAGES = 1024
_IDLE_SLEEP_S = 0.1


def _flat_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Return the concatenation of ``range(s, s + l)`` for each start/length pair."""
    ends = np.cumsum(lengths)
    offsets = np.repeat(starts - (ends - lengths), lengths)
    return offsets + np.arange(int(ends[-1]) if len(ends) else 0)


class PageWriter:
    """Writes 8..64 bytes at a random offset inside chosen pages (vectorised)."""

    def __init__(
        self,
        memory: np.ndarray,
        seed: int,
        content: str,
        hot_fraction: float,
        hot_weight: float,
    ) -> None:
        self._memory = memory
        self._pages = len(memory) // PAGE_SIZE
        self._hot_pages = max(1, min(self._pages, round(self._pages * hot_fraction)))
        self._hot_weight = hot_weight if self._hot_pages < self._pages else 0.0
        self._rng = seeded_rng(seed, 0xD1127)
        self._text = text_pool(seed) if content == "half-text" else None

    def choose_pages(self, count: int) -> np.ndarray:
        """Pick ``count`` page indices: hot set with probability W, else uniform."""
        rng = self._rng
        uniform = rng.integers(0, self._pages, count)
        if self._hot_weight <= 0.0:
            return uniform
        hot = rng.integers(0, self._hot_pages, count)
        return np.where(rng.random(count) < self._hot_weight, hot, uniform)

    def write(self, count: int) -> None:
        """Write ``count`` small pieces of data into randomly chosen pages."""
        rng = self._rng
        pages = self.choose_pages(count)
        lengths = rng.integers(_MIN_WRITE_BYTES, _MAX_WRITE_BYTES + 1, count)
        offsets = rng.integers(0, PAGE_SIZE - lengths + 1)
        targets = _flat_indices(pages * PAGE_SIZE + offsets, lengths)
        self._memory[targets] = self._data(lengths, len(targets))

    def _data(self, lengths: np.ndarray, total: int) -> np.ndarray:
        """Return ``total`` bytes of random or text-like data for the writes."""
        if self._text is None:
            return self._rng.integers(0, 256, total, dtype=np.uint8)
        sources = self._rng.integers(0, len(self._text) - _MAX_WRITE_BYTES, len(lengths))
        data: np.ndarray = self._text[_flat_indices(sources, lengths)]
        return data


class DirtyDeviceState:
    """Deterministic device-state blobs for the ``dirty`` guest.

    Each transition into the paused state bumps a counter and derives a new
    blob of ``size`` bytes from the seed and that counter; a pause request
    while already paused returns the same blob.  If ``out_path`` is set the
    exact blob is written there at each pause.
    """

    def __init__(self, size: int, seed: int, out_path: str | None) -> None:
        self._size = size
        self._seed = seed
        self._out_path = out_path
        self._pauses = 0
        self._blob: bytes | None = None

    def snapshot(self, newly_paused: bool) -> bytes:
        """Return the blob for the current pause (new one if newly paused)."""
        if newly_paused or self._blob is None:
            self._pauses += 1
            self._blob = dirty_device_state_blob(self._seed, self._pauses, self._size)
            if self._out_path:
                try:
                    write_file_atomic(self._out_path, self._blob)
                except OSError as exc:
                    raise GuestError(
                        f"cannot write --device-state-out {self._out_path}: {exc}"
                    ) from exc
        return self._blob


def dirty_device_state_blob(seed: int, pause_count: int, size: int) -> bytes:
    """Return the ``dirty`` guest's device-state blob for a given pause number.

    The content is pseudo-random, derived from xxh3 of the seed and pause
    counter, and never all zero (for ``size > 0``).
    """
    if size <= 0:
        return b""
    key = xxhash.xxh3_64_intdigest(f"precopy-guest:{seed}:{pause_count}".encode())
    blob = bytearray(seeded_rng(key).bytes(size))
    blob[0] |= 0x01
    return bytes(blob)


def _expired(deadline: float | None) -> bool:
    """Return whether ``deadline`` (a monotonic time, or None) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def _sweep_loop(memory: np.ndarray, gate: WorkGate, deadline: float | None) -> int:
    """Increment every page's first byte, forever, as fast as possible."""
    first_bytes = memory[::PAGE_SIZE]
    pages = len(first_bytes)
    position = 0
    written = 0
    while gate.checkpoint() and not _expired(deadline):
        end = min(position + _SWEEP_CHUNK_PAGES, pages)
        first_bytes[position:end] += 1
        written += end - position
        position = 0 if end == pages else end
    return written


class SweepWriter:
    """Increments the first byte of the next ``count`` pages, in order, wrapping around."""

    def __init__(self, memory: np.ndarray) -> None:
        self._first = memory[::PAGE_SIZE]
        self._pos = 0

    def write(self, count: int) -> None:
        pages = len(self._first)
        while count > 0:
            end = min(self._pos + count, pages)
            self._first[self._pos:end] += 1
            count -= end - self._pos
            self._pos = 0 if end == pages else end


def _paced_loop(
    writer: PageWriter | SweepWriter, rate: float, gate: WorkGate, deadline: float | None
) -> int:
    """Write about ``rate`` pages per second in batches every few milliseconds."""
    written = 0
    credit = 0.0
    last = time.monotonic()
    rested = gate.rested_s
    while gate.checkpoint():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        rest, rested = gate.rested_s - rested, gate.rested_s  # the throttle's rest since the last batch
        credit = min(credit + rate * min(max(0.0, now - last - rest), _MAX_CATCH_UP_S), _MAX_BATCH_PAGES)
        last = now
        count = int(credit)
        if count:
            writer.write(count)
            credit -= count
            written += count
        pause_for = _BATCH_INTERVAL_S - (time.monotonic() - now)
        if deadline is not None:
            pause_for = min(pause_for, deadline - time.monotonic())
        if pause_for > 0:
            gate.sleep(pause_for)
    return written


def _idle_loop(gate: WorkGate, deadline: float | None) -> int:
    """Do nothing (but answer pauses) until stopped or the deadline passes."""
    while gate.checkpoint() and not _expired(deadline):
        remaining = _IDLE_SLEEP_S if deadline is None else deadline - time.monotonic()
        gate.sleep(max(0.0, min(_IDLE_SLEEP_S, remaining)))
    return 0


def run_dirty(args: argparse.Namespace) -> int:
    """Run the ``dirty`` subcommand; return the exit status."""
    gate = WorkGate()
    device = DirtyDeviceState(args.device_state_size, args.seed, args.device_state_out)
    install_stop_signals(gate)
    started = time.monotonic()
    deadline = None if args.duration is None else started + args.duration
    written = 0
    with MappedRegion(args.memory) as region:
        memory = region.bytes_array()
        offer = None if args.no_tracking else WriteTrackingOffer(region.mm)
        missing = postcopy_offer(args, region.mm, gate)
        controller = GateController(gate, device.snapshot, offer, throttling=not args.no_throttle,
                                    postcopy=missing)
        with control_server(args.control, controller):
            if args.pattern == "sweep" and args.sweep_rate:
                written = _paced_loop(SweepWriter(memory), args.sweep_rate, gate, deadline)
            elif args.pattern == "sweep":
                written = _sweep_loop(memory, gate, deadline)
            elif args.rate == 0:
                written = _idle_loop(gate, deadline)
            else:
                writer = PageWriter(
                    memory, args.seed, args.content, args.hot_fraction, args.hot_weight
                )
                written = _paced_loop(writer, args.rate, gate, deadline)
                del writer
            gate.finish()
        del memory
    if args.stats_out:
        stats = {"pages_written": written, "seconds": round(time.monotonic() - started, 6)}
        write_file_atomic(args.stats_out, json.dumps(stats).encode() + b"\n")
    return 0
