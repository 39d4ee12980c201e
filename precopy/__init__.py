"""precopy: live pre-copy migration of a running workload's shared memory.

The engine, importable without the CLI::

    import asyncio, precopy
    report = asyncio.run(precopy.migrate(
        precopy.SourceOptions(host="10.0.0.2", port=7070, memory="/dev/shm/guest"),
        precopy.SignalWorkload(pid),
    ))

and on the other machine a :class:`DestinationServer`.  TLS: pass
``tls_context=client_context(...)`` / ``server_context(...)`` in the options
(docs/SECURITY.md).  See README.md.
"""

from __future__ import annotations

from .destination import DestinationServer, DestOptions
from .errors import (
    AbortCode,
    AuthError,
    GuestControlError,
    LocalProtocolError,
    MigrationAborted,
    MigrationInDoubt,
    PrecopyError,
    ProtocolError,
    RegionError,
    RemoteProtocolError,
)
from .memory import GuestMemory
from .report import MigrationReport, RoundReport
from .source import Progress, SourceOptions, migrate
from .tls import client_context, server_context
from .workload import GuestControl, SignalWorkload, Workload

__version__ = "0.1.0"

__all__ = [
    "AbortCode",
    "AuthError",
    "DestOptions",
    "DestinationServer",
    "GuestControl",
    "GuestControlError",
    "GuestMemory",
    "LocalProtocolError",
    "MigrationAborted",
    "MigrationInDoubt",
    "MigrationReport",
    "PrecopyError",
    "Progress",
    "ProtocolError",
    "RegionError",
    "RemoteProtocolError",
    "RoundReport",
    "SignalWorkload",
    "SourceOptions",
    "Workload",
    "client_context",
    "migrate",
    "server_context",
]
