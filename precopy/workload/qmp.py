"""A small QMP client on asyncio (QEMU Machine Protocol).

QMP is JSON objects, one per line, over a Unix stream socket.  QEMU greets
with ``{"QMP": {...}}``; the client answers ``qmp_capabilities`` and may
then ``execute`` commands.  Replies carry the request's ``id``; events
(``{"event": ...}``) may arrive at any time, before or between replies, and
are kept in :attr:`QMPClient.events`.

Every wait has a timeout.  A socket that cannot be reached, a peer that
closes, a line that is not a JSON object, or an ``error`` reply raise
:class:`QMPError` with the command and what QEMU said.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
from pathlib import Path
from typing import Any

from precopy.errors import GuestControlError

__all__ = ["QMPClient", "QMPError"]

#: A QMP line longer than this is refused (replies we use are small).
MAX_LINE = 1 << 20


class QMPError(GuestControlError):
    """QMP failed: unreachable, closed, malformed, timed out, or an error reply."""


class QMPClient:
    """One QMP connection; commands run one at a time."""

    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self.greeting: dict[str, Any] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def connect(self, *, wait_s: float = 0.0) -> None:
        """Connect, read the greeting, negotiate capabilities.

        ``wait_s`` > 0 retries while the socket does not exist yet or refuses
        (a QEMU that is still starting).  Raises :class:`QMPError`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.path), limit=MAX_LINE), self.timeout_s
                )
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() >= deadline:
                    raise QMPError(f"cannot connect to QMP socket {self.path}: {exc.strerror} "
                                   "(is QEMU running with -qmp unix:PATH,server=on,wait=off?)") from exc
                await asyncio.sleep(0.01)
            except (OSError, asyncio.TimeoutError) as exc:
                raise QMPError(f"cannot connect to QMP socket {self.path}: {exc or 'timed out'}") from exc
        greeting = await self._read_message("the greeting")
        if "QMP" not in greeting:
            await self.close()
            raise QMPError(f"{self.path} is not a QMP socket: it greeted with {str(greeting)[:200]}")
        self.greeting = greeting
        await self.execute("qmp_capabilities")

    async def _read_message(self, what: str) -> dict[str, Any]:
        assert self._reader is not None
        try:
            line = await asyncio.wait_for(self._reader.readline(), self.timeout_s)
        except asyncio.TimeoutError:
            raise QMPError(f"QEMU ({self.path}) sent nothing for {self.timeout_s} s while we waited "
                           f"for {what}") from None
        except ValueError as exc:  # a line longer than MAX_LINE
            raise QMPError(f"QEMU ({self.path}) sent an over-long line while we waited for {what}") from exc
        except OSError as exc:
            raise QMPError(f"QMP socket {self.path} failed while we waited for {what}: {exc}") from exc
        if not line:
            raise QMPError(f"QEMU closed its QMP socket {self.path} while we waited for {what} "
                           "(did QEMU exit? see its stderr)")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPError(f"QEMU ({self.path}) sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QMPError(f"QEMU ({self.path}) sent a JSON {type(msg).__name__}, not an object")
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; return its ``return`` value.

        Raises :class:`QMPError` on an ``error`` reply (with QEMU's class and
        description), on timeout, or when the connection fails.
        """
        if self._writer is None:
            raise QMPError(f"QMP {command!r}: not connected to {self.path}")
        async with self._lock:
            self._next_id += 1
            cid = f"precopy-{self._next_id}"
            req: dict[str, Any] = {"execute": command, "id": cid}
            if arguments:
                req["arguments"] = arguments
            try:
                self._writer.write(json.dumps(req).encode() + b"\n")
                await asyncio.wait_for(self._writer.drain(), self.timeout_s)
            except (OSError, asyncio.TimeoutError) as exc:
                raise QMPError(f"QMP {command!r}: cannot write to {self.path}: {exc or 'timed out'}") from exc
            while True:
                msg = await self._read_message(f"the answer to {command!r}")
                if "event" in msg:
                    self.events.append(msg)
                    continue
                if msg.get("id") != cid:
                    raise QMPError(f"QMP {command!r}: QEMU answered another request: {str(msg)[:200]}")
                if "error" in msg:
                    err = msg["error"] if isinstance(msg["error"], dict) else {}
                    raise QMPError(f"QEMU refused {command!r}: {err.get('class', '?')}: "
                                   f"{err.get('desc', msg['error'])}")
                if "return" not in msg:
                    raise QMPError(f"QMP {command!r}: reply without 'return': {str(msg)[:200]}")
                return msg["return"]

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass  # QEMU may already have exited (after "quit")
            self._writer = self._reader = None
