"""Demo guest workloads for precopy live-migration experiments.

A *guest* is a process that maps a memory region file (``/dev/shm/...`` or
any regular file whose size is a multiple of 4096) with ``MAP_SHARED`` and
modifies it while a migration agent copies it.  Three subcommands exist:

``create``
    Create (or truncate) a region file and fill it with random, half-text or
    zero content.
``dirty``
    Map an existing region and dirty pages at a given rate (or sweep over all
    pages as fast as possible) until a duration elapses, a signal arrives or a
    control ``stop`` request is received.
``det``
    A deterministic guest whose whole state is its memory plus a tiny device
    state (step counter and RNG state).  Running N steps straight gives the
    same final digest as running k steps, pausing, copying memory + device
    state elsewhere and resuming there up to N.

Both ``dirty`` and ``det`` optionally serve a *control socket* (Unix stream
socket, one JSON request per line) supporting ``pause``, ``resume``,
``stop``, ``track`` (kernel write tracking: the guest hands the agent its
userfaultfd; ``--no-tracking`` turns that off) and ``throttle`` (``{"op":
"throttle", "pct": N}``: the work loop rests N % of the time, until ``resume``,
``pct`` 0 or the end of that connection; ``--no-throttle`` refuses it, as a
guest without the op would).  A ``pause`` reply is a JSON line ``{"ok": true,
"device_state_len": N}`` followed by exactly N raw bytes of device state.

The helpers :func:`parse_size`, :func:`create_region` and
:func:`region_digest` are importable by tests and benchmarks.

Layout of the package:

``common``
    Constants (:data:`PAGE_SIZE`, ...), :class:`GuestError` and small helpers.
``region``
    Sizes, content generation, digests, :class:`MappedRegion` and ``create``.
``gate``
    :class:`WorkGate`: pause/resume/stop/throttle coordination with the work loop.
``control``
    :class:`ControlServer`, the control-socket server.
``tracking``
    :class:`WriteTrackingOffer`: the guest's side of kernel write tracking
    (docs/TRACKING.md).
``dirty``
    The ``dirty`` guest.
``det``
    The ``det`` guest.
``cli``
    Argument parsing and :func:`main` (the ``precopy-guest`` entry point).
"""

from __future__ import annotations

from .cli import build_parser, main
from .common import CHUNK_BYTES, PAGE_SIZE, GuestError
from .control import ControlHandler, ControlServer, GateController
from .det import DetState, SplitMix64, det_step, run_det
from .dirty import (
    DIRTY_CONTENTS,
    DIRTY_PATTERNS,
    DirtyDeviceState,
    PageWriter,
    dirty_device_state_blob,
    run_dirty,
)
from .gate import WorkGate
from .tracking import WriteTrackingOffer
from .region import (
    CREATE_CONTENTS,
    MappedRegion,
    create_region,
    parse_size,
    region_digest,
    run_create,
)

__all__ = [
    "CHUNK_BYTES",
    "CREATE_CONTENTS",
    "DIRTY_CONTENTS",
    "DIRTY_PATTERNS",
    "PAGE_SIZE",
    "ControlHandler",
    "ControlServer",
    "DetState",
    "DirtyDeviceState",
    "GateController",
    "GuestError",
    "MappedRegion",
    "PageWriter",
    "SplitMix64",
    "WorkGate",
    "WriteTrackingOffer",
    "build_parser",
    "create_region",
    "det_step",
    "dirty_device_state_blob",
    "main",
    "parse_size",
    "region_digest",
    "run_create",
    "run_det",
    "run_dirty",
]
