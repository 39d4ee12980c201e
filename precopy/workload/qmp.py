"""precopy's QMP connection: QEMU's own ``qemu.qmp`` library, with timeouts and precopy's errors.

``qemu.qmp`` (PyPI ``qemu.qmp``, QEMU's asyncio QMP library) speaks the
protocol: the greeting, ``qmp_capabilities``, request ids, events.  What is
ours is what precopy needs around it: every wait has a timeout; a socket
that cannot be reached (retried while a QEMU starts), a peer that closes or
sends what is not QMP, and an ``error`` reply raise :class:`QMPError` (a
:class:`~precopy.errors.GuestControlError`) that names the socket, the
command, what QEMU said and what to do.

Every failure reaches the caller as one :class:`QMPError`, so the library's
own log lines (an ERROR line per refused connect while a QEMU starts, for
one) are muted unless the ``qemu.qmp`` logger's level was set by whoever
configured logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from qemu import qmp
from qemu.qmp.error import ProtocolError

from precopy.errors import GuestControlError

__all__ = ["Events", "QemuMonitor", "QMPError"]

_log = logging.getLogger(__name__)
if logging.getLogger("qemu.qmp").level == logging.NOTSET:
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

#: A QMP line longer than this is refused (replies we use are small).
MAX_LINE = 1 << 20


class QMPError(GuestControlError):
    """QMP failed: unreachable, closed, malformed, timed out, or an error reply."""


class QemuMonitor:
    """One QMP connection (a ``qemu.qmp.QMPClient``) to the socket at ``path``."""

    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.greeting: dict[str, Any] = {}
        self._client: qmp.QMPClient | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self, *, wait_s: float = 0.0) -> None:
        """Connect, read the greeting, negotiate capabilities.

        ``wait_s`` > 0 retries while the socket does not exist yet or refuses
        (a QEMU that is still starting).  Raises :class:`QMPError`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        client = qmp.QMPClient(readbuflen=MAX_LINE)
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await client.connect(str(self.path))
                break
            except TimeoutError:
                raise QMPError(f"QEMU ({self.path}) did not greet and negotiate within {self.timeout_s} s "
                               "(QEMU serves one client per -qmp socket: is another one connected?)") from None
            except qmp.ConnectError as exc:
                cause = exc.exc
                if isinstance(cause, (FileNotFoundError, ConnectionRefusedError)):
                    if loop.time() < deadline:
                        await asyncio.sleep(0.01)
                        continue
                    raise QMPError(f"cannot connect to QMP socket {self.path}: {cause.strerror} "
                                   "(is QEMU running with -qmp unix:PATH,server=on,wait=off?)") from exc
                if isinstance(cause, qmp.qmp_client.GreetingError):
                    raise QMPError(f"{self.path} is not a QMP socket: its greeting was not QMP's "
                                   f"({_cause(cause)})") from exc
                if isinstance(cause, qmp.qmp_client.NegotiationError):
                    raise QMPError(f"QEMU ({self.path}) refused qmp_capabilities: {_cause(cause)}") from exc
                raise QMPError(_lost(self.path, cause, "the greeting")) from exc
        greeting = client.greeting
        self.greeting = dict(greeting._asdict()) if greeting is not None else {}
        self._client = client

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; return its ``return`` value.

        Raises :class:`QMPError` on an ``error`` reply (with QEMU's class and
        description), on timeout, or when the connection fails.
        """
        client = self._client
        if client is None:
            raise QMPError(f"QMP {command!r}: not connected to {self.path}")
        try:
            async with asyncio.timeout(self.timeout_s):
                return await client.execute(command, arguments)
        except TimeoutError:
            raise QMPError(f"QEMU ({self.path}) sent nothing for {self.timeout_s} s while we waited for "
                           f"the answer to {command!r}") from None
        except qmp.ExecuteError as exc:
            raise QMPError(f"QEMU refused {command!r}: {exc.error_class}: {exc.error.error.desc}") from exc
        except qmp.qmp_client.BadReplyError as exc:
            raise QMPError(f"QMP {command!r}: QEMU's reply has neither 'return' nor a well-formed "
                           f"'error': {str(exc.msg)[:200]}") from exc
        except (qmp.ExecInterruptedError, qmp.StateError) as exc:
            # The connection ended under us: disconnect() says why.
            cause: BaseException = exc
            try:
                await self.close(quiet=False)
            except Exception as dc:  # noqa: BLE001 -- the reader's or writer's error, reported below
                cause = dc
            raise QMPError(_lost(self.path, cause, f"the answer to {command!r}")) from exc

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[Events]:
        """QEMU's events named ``names`` that arrive inside the block."""
        if self._client is None:
            raise QMPError(f"QMP events {names}: not connected to {self.path}")
        with self._client.listener(names) as listener:
            yield Events(listener)

    async def close(self, *, quiet: bool = True) -> None:
        """Disconnect.  ``quiet``: an error that ended the connection (QEMU
        quit, for one) is logged at debug level, not raised."""
        client, self._client = self._client, None
        if client is None or client.runstate == qmp.Runstate.IDLE:
            return
        try:
            await client.disconnect()
        except (EOFError, OSError, ValueError, qmp.QMPError) as exc:
            if not quiet:
                raise
            _log.debug("QMP %s: the connection had ended: %s", self.path, _cause(exc))


class Events:
    """The events a :meth:`QemuMonitor.listen` block hears."""

    def __init__(self, listener: qmp.EventListener) -> None:
        self._listener = listener

    async def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next event, or None if none came within ``timeout_s`` (a
        connection that ended brings none: ask QEMU to find out)."""
        try:
            async with asyncio.timeout(timeout_s):
                return dict(await self._listener.get())
        except TimeoutError:
            return None


def _cause(exc: BaseException) -> str:
    """The innermost reason of a ``qemu.qmp`` error, on one line."""
    while isinstance(exc, qmp.QMPError) and isinstance(getattr(exc, "exc", None), BaseException):
        exc = exc.exc  # type: ignore[attr-defined]
    if isinstance(exc, qmp.message.DeserializationError):
        return f"a line that is not JSON: {exc.raw[:200]!r}"
    if isinstance(exc, qmp.message.UnexpectedTypeError):
        return f"a JSON {type(exc.value).__name__}, not an object: {json.dumps(exc.value)[:200]}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _lost(path: Path, exc: BaseException, what: str) -> str:
    if isinstance(exc, EOFError):
        return f"QEMU closed its QMP socket {path} while we waited for {what} (did QEMU exit? see its stderr)"
    if isinstance(exc, ProtocolError):
        return f"QEMU ({path}) sent what is not QMP while we waited for {what}: {_cause(exc)}"
    if isinstance(exc, ValueError):  # the StreamReader's line limit
        return f"QEMU ({path}) sent a line longer than {MAX_LINE} bytes while we waited for {what}"
    return f"the QMP connection to {path} failed while we waited for {what}: {_cause(exc)}"
