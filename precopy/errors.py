"""The one exception tree of precopy.

Every error precopy raises on purpose is a :class:`PrecopyError`.  Protocol
errors say who misbehaved: :class:`LocalProtocolError` (we tried to send
something the protocol does not allow here: a bug in the caller) or
:class:`RemoteProtocolError` (the peer sent garbage).  Each carries the
:class:`AbortCode` that goes on the wire when the migration is torn down.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "AbortCode",
    "PrecopyError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "AuthError",
    "RegionError",
    "GuestControlError",
    "MigrationAborted",
    "MigrationInDoubt",
]


class AbortCode(IntEnum):
    """Why a migration was torn down; sent in ABORT frames."""

    PROTOCOL = 1
    AUTH = 2
    VERSION = 3
    BUSY = 4
    REGION = 5
    INTERNAL = 6
    CANCELLED = 7
    NOT_CONVERGED = 8
    VERIFY_FAILED = 9
    GUEST = 10
    TIMEOUT = 11
    LINK = 12


class PrecopyError(Exception):
    """Root of every error precopy raises deliberately."""

    code: AbortCode = AbortCode.INTERNAL

    def __init__(self, message: str, code: AbortCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ProtocolError(PrecopyError):
    """The conversation broke the protocol."""

    code = AbortCode.PROTOCOL


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug here)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of place."""


class AuthError(PrecopyError):
    """Authentication failed: wrong or missing pre-shared key."""

    code = AbortCode.AUTH


class RegionError(PrecopyError):
    """A memory region could not be opened, created or used."""

    code = AbortCode.REGION


class GuestControlError(PrecopyError):
    """The workload could not be paused, resumed or stopped as asked."""

    code = AbortCode.GUEST


class MigrationAborted(PrecopyError):
    """The migration was rolled back: the workload still runs on the source."""


class MigrationInDoubt(PrecopyError):
    """The outcome is unknown: the workload was left paused on the source."""
