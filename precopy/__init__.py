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

import importlib
from typing import TYPE_CHECKING, Any

from precopy._version import __version__ as __version__
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

if TYPE_CHECKING:
    from precopy.memory.region import GuestMemory
    from precopy.net.tls import client_context, server_context
    from precopy.session.destination import DestinationServer, DestOptions
    from precopy.session.options import Progress, SourceOptions
    from precopy.session.report import MigrationReport, RoundReport
    from precopy.session.source import migrate
    from precopy.workload.base import Workload
    from precopy.workload.control import GuestControl
    from precopy.workload.signals import SignalWorkload

#: The public names besides the errors, imported on first use (PEP 562): a daemon that
#: needs only its own side does not pay ~0.1-0.2 s at each start for the other's modules.
_LAZY = {
    "DestinationServer": "precopy.session.destination",
    "DestOptions": "precopy.session.destination",
    "GuestMemory": "precopy.memory.region",
    "MigrationReport": "precopy.session.report",
    "RoundReport": "precopy.session.report",
    "Progress": "precopy.session.options",
    "SourceOptions": "precopy.session.options",
    "migrate": "precopy.session.source",
    "client_context": "precopy.net.tls",
    "server_context": "precopy.net.tls",
    "Workload": "precopy.workload.base",
    "GuestControl": "precopy.workload.control",
    "SignalWorkload": "precopy.workload.signals",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'precopy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
