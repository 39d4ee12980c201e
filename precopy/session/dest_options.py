"""The settings of a destination daemon (:class:`DestOptions`, ``precopy-dest --help``)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from precopy.policy.admission import default_max_active
from precopy.protocol import MAX_DEVICE_STATE, MAX_REGION, MAX_STREAMS
from precopy.workload.base import DestWorkload

__all__ = ["DestOptions"]


@dataclass
class DestOptions:
    """Settings of a destination daemon.  See ``precopy-dest --help``."""

    memory_dir: Path
    #: Journal and device-state files (default: memory_dir).  Needed when
    #: memory_dir is hugetlbfs, which holds mappable files only.
    state_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7070
    auth_key: bytes | None = None
    #: TLS for every connection (precopy.net.tls.server_context); None: plain TCP.
    tls_context: ssl.SSLContext | None = None
    on_resume: str | None = None
    keep_partial: bool = False
    max_device_state: int = MAX_DEVICE_STATE
    handshake_timeout_s: float = 10.0
    #: Largest region a source may migrate in (bytes); larger BEGINs are refused.
    max_region: int = MAX_REGION
    #: Migrations accepted at once, moving bytes or queued; one more is
    #: refused with ABORT busy.
    max_migrations: int = 8
    #: Migrations moving bytes at once; the others accepted wait in a FIFO
    #: queue (QUEUED on the wire).  None: one per two CPUs (default_max_active).
    max_active: int | None = None
    #: Connections still in the handshake at once; more are closed unread.
    max_connections: int = 64
    idle_timeout_s: float = 120.0
    #: Connections one migration may use for its pages (the source asks for
    #: --streams; READY takes at most this many).  1: one connection each.
    max_streams: int = 8
    populate: bool = True
    #: Receive into a region file already under the migration's name (a
    #: repeat migration, a pre-provisioned host) when it has the right size
    #: and no process maps or holds it: no first touch of fresh memory and,
    #: on tmpfs, no second copy's worth of space.
    reuse_regions: bool = True
    #: Post-copy: how long the guest the on-resume hook starts may take to offer
    #: its userfaultfd (op "postcopy" on PRECOPY_POSTCOPY_CONTROL) before the
    #: migration is aborted (the source then resumes its workload).
    postcopy_guest_timeout_s: float = 60.0
    #: Post-copy: how long a broken page stream waits for the source to come
    #: back (RESUME) before the migration is declared broken (docs/FAILURES.md).
    postcopy_resume_timeout_s: float = 600.0
    #: Post-copy: run the on-resume hook when a migration that may end in
    #: post-copy begins, its guest held (and resumed after a pre-copy commit
    #: too, stopped when the migration ends without one), instead of at the
    #: switchover: the guest's start leaves the downtime.  The guest must then
    #: read its device state when resumed (docs/TRACKING.md).
    postcopy_guest_early: bool = False
    #: Started when a migration begins, resumed after its commit (before
    #: COMMITTED), discarded when it ends without one (e.g. a QEMU VM).
    workload: DestWorkload | None = None

    def __post_init__(self) -> None:
        self.memory_dir = Path(self.memory_dir)
        self.state_dir = Path(self.state_dir) if self.state_dir is not None else self.memory_dir
        if self.max_active is None:
            self.max_active = default_max_active()
        if not 1 <= self.max_streams <= MAX_STREAMS:
            raise ValueError(f"max_streams must be 1..{MAX_STREAMS}, not {self.max_streams}")
        if self.max_active < 1:
            raise ValueError(f"max_active must be at least 1, not {self.max_active}")
