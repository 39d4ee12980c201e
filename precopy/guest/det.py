"""The ``det`` guest: deterministic steps whose final digest is reproducible.

The whole state is the memory region plus a tiny device state (step counter
and RNG state).  Running N steps straight gives the same final digest as
running k steps, pausing, copying memory + device state elsewhere and
resuming there up to N.
"""

from __future__ import annotations

import argparse
import json
import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import msgpack
import xxhash

from .common import PAGE_SIZE, U64_MASK, GuestError, write_file_atomic
from .control import GateController, control_server
from .gate import WorkGate, install_stop_signals
from .region import MappedRegion, buffer_digest
from .postcopy import postcopy_offer
from .tracking import WriteTrackingOffer

__all__ = ["DetState", "SplitMix64", "det_step", "run_det"]


class SplitMix64:
    """Tiny deterministic 64-bit RNG whose whole state is one int."""

    _GAMMA = 0x9E3779B97F4A7C15

    def __init__(self, state: int) -> None:
        self.state = state & U64_MASK

    def next(self) -> int:
        """Advance the state and return the next 64-bit output."""
        self.state = (self.state + self._GAMMA) & U64_MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64_MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64_MASK
        return z ^ (z >> 31)


@dataclass
class DetState:
    """Device state of the deterministic guest."""

    step: int
    rng: SplitMix64
    seed: int

    @classmethod
    def fresh(cls, seed: int) -> DetState:
        """Return the state at step 0 for ``seed``."""
        return cls(step=0, rng=SplitMix64(seed), seed=seed)

    def to_blob(self) -> bytes:
        """Serialise as msgpack ``{"step", "rng", "seed"}``."""
        blob: bytes = msgpack.packb(
            {"step": self.step, "rng": self.rng.state, "seed": self.seed & U64_MASK}
        )
        return blob

    @classmethod
    def from_blob(cls, blob: bytes, source: str) -> DetState:
        """Parse a blob produced by :meth:`to_blob` (``source`` names it in errors)."""
        try:
            data = msgpack.unpackb(blob)
        except (ValueError, msgpack.UnpackException) as exc:
            raise GuestError(
                f"device state {source} is not valid msgpack ({exc}); pass the exact "
                "bytes returned by a det guest's pause reply"
            ) from exc
        if not isinstance(data, dict):
            raise GuestError(f"device state {source} must be a msgpack map with step and rng")
        step, rng_state = data.get("step"), data.get("rng")
        if not isinstance(step, int) or step < 0 or not isinstance(rng_state, int):
            raise GuestError(
                f"device state {source} lacks a non-negative integer 'step' and an "
                "integer 'rng'; pass the blob from a det guest's pause reply"
            )
        seed = data.get("seed", 0)
        return cls(step=step, rng=SplitMix64(rng_state), seed=seed if isinstance(seed, int) else 0)


def _load_det_state(path: str | None, seed: int) -> DetState:
    """Load the starting device state from ``path`` or start fresh from ``seed``."""
    if not path:
        return DetState.fresh(seed)
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise GuestError(
            f"cannot read --device-state {path}: {exc}; pass the file holding the "
            "pause blob, or omit the option to start at step 0"
        ) from exc
    return DetState.from_blob(blob, path) if blob else DetState.fresh(seed)


def det_step(memory: mmap.mmap, pages: int, state: DetState) -> None:
    """Perform one deterministic step on ``memory`` and advance ``state``."""
    rng = state.rng
    target = rng.next() % pages
    source = rng.next() % pages
    offset = (rng.next() % (PAGE_SIZE // 8)) * 8
    start = source * PAGE_SIZE
    value = xxhash.xxh3_64_intdigest(memory[start : start + PAGE_SIZE]) ^ state.step
    struct.pack_into("<Q", memory, target * PAGE_SIZE + offset, value & U64_MASK)
    state.step += 1


def _run_det_steps(
    region: MappedRegion, state: DetState, steps: int, gate: WorkGate, sleep_s: float
) -> bool:
    """Run steps until ``state.step == steps``; return ``False`` if stopped early."""
    memory, pages = region.mm, region.pages
    while state.step < steps:
        if not gate.checkpoint():
            return False
        det_step(memory, pages, state)
        if sleep_s > 0:
            gate.sleep(sleep_s)
    return True


def run_det(args: argparse.Namespace) -> int:
    """Run the ``det`` subcommand; return the exit status."""
    # A post-copy guest may be started before its device state exists
    # (precopy-dest --postcopy-guest-early): it reads it when resumed.
    state = DetState.fresh(args.seed) if args.postcopy else _load_det_state(args.device_state, args.seed)
    if state.step > args.steps:
        raise GuestError(
            f"device state is already at step {state.step}, beyond --steps {args.steps}; "
            "pass a larger --steps"
        )
    gate = WorkGate()
    install_stop_signals(gate)
    with MappedRegion(args.memory) as region:
        offer = None if args.no_tracking else WriteTrackingOffer(region.mm)
        missing = postcopy_offer(args, region.mm, gate)
        controller = GateController(gate, lambda _newly: state.to_blob(), offer,
                                    throttling=not args.no_throttle, postcopy=missing)
        with control_server(args.control, controller):
            if args.postcopy and gate.checkpoint():  # held until resumed: the device state is there now
                state = _load_det_state(args.device_state, args.seed)
                if state.step > args.steps:
                    raise GuestError(f"device state is already at step {state.step}, beyond --steps {args.steps}")
            completed = _run_det_steps(region, state, args.steps, gate, args.step_sleep_us / 1e6)
            gate.finish()
            if not completed:
                print(
                    f"precopy-guest det: stopped at step {state.step} of {args.steps}",
                    file=sys.stderr,
                )
                return 0
            digest = buffer_digest(region.mm)
    result = json.dumps({"steps": args.steps, "digest": digest})
    if args.digest_out:
        write_file_atomic(args.digest_out, result.encode() + b"\n")
    print(result, flush=True)
    return 0
