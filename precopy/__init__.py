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

from precopy._version import __version__ as __version__
from precopy.session.destination import DestinationServer, DestOptions
from precopy.errors import (
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
from precopy.memory.region import GuestMemory
from precopy.session.report import MigrationReport, RoundReport
from precopy.session.options import Progress, SourceOptions
from precopy.session.source import migrate
from precopy.net.tls import client_context, server_context
from precopy.workload.base import Workload
from precopy.workload.control import GuestControl
from precopy.workload.signals import SignalWorkload

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
