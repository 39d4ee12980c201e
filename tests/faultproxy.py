"""A fault-injecting TCP proxy for tests (asyncpg ``_testbase/fuzzer.py`` style).

It sits between ``precopy-source`` and ``precopy-dest``, forwards whole
frames (it parses the 12-byte prefix of :mod:`precopy.protocol.framing`, and the
msgpack meta when a trigger needs a field), and when a :class:`Fault`'s
trigger matches it acts:

* ``cut``    forward ``keep`` bytes of the trigger frame (a cut mid-frame),
             then close both sides;
* ``reset``  as ``cut``, but both sides get a TCP reset (RST), as from a
             peer that crashed with unread data or a firewall;
* ``stall``  stop forwarding in both directions, keep both sockets open
             (a black hole: no FIN, no RST);
* ``hold``   like ``stall``, but only after calling ``callback`` (used to
             SIGKILL a process at an exact point of the protocol);
* ``kill``   call ``callback`` (e.g. SIGKILL a process) instead of
             forwarding the frame, then keep pumping (the dead peer's close
             reaches the other side as it would without a proxy);
* ``call``   forward the frame, then call ``callback`` (the fault happens
             right after the frame was delivered);
* ``flip``   xor one byte of the frame (``offset`` counted from the start of
             the meta, or of the payload with ``in_payload``) and forward;
* ``mutate`` ``mutate(frame, meta_len)`` edits the frame in place (a
             corruption crafted to pass the framing checks), then forward;
* ``delay``  call ``callback`` if any, sleep ``seconds``, then forward
             (frames behind it wait too: a peer waiting for an answer is
             held in this phase while, e.g., a signal lands).

With ``after=True`` the trigger frame is forwarded first and the action
follows it (``cut`` closes, ``stall``/``hold`` black-hole, ``kill`` calls
``callback``, right after the frame was delivered).

A proxy-wide ``rate_bps`` slows every byte down; a proxy without faults
forwards bytes as they come, not frames (a slow link holds 64 KiB, not a
4 MiB frame).  Faults apply to the
connection number ``conn`` (0 = the first the proxy accepted; None: any); later
connections (e.g. the source's outcome query) pass through untouched unless
a fault names them.  ``upstream`` may be changed while running (a restarted
destination on a new port).  With ``netns`` the proxy's thread enters that
network namespace first: it listens on that "host"'s loopback and connects
upstream from there (the soak's migrations between two namespaces).

The proxy runs its own event loop in a daemon thread, so synchronous tests
that drive real processes can use it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from precopy.protocol import Kind
from precopy.protocol.limits import PREFIX, PREFIX_SIZE

__all__ = ["Fault", "FaultProxy", "C2S", "S2C"]

C2S = "c2s"  # source -> destination
S2C = "s2c"  # destination -> source


@dataclass
class Fault:
    action: str  # cut | reset | stall | hold | kill | call | flip | mutate | delay
    kind: Kind | None = None  # trigger on this frame kind ...
    meta: dict[str, Any] | None = None  # ... whose meta has these values
    where: Callable[[dict[str, Any]], bool] | None = None  # ... and for whose meta this holds
    nth: int = 1  # ... the nth such frame
    after_bytes: int | None = None  # or: once this many bytes went this way
    direction: str = C2S
    conn: int | None = 0  # None: any connection
    keep: int = 0  # cut: bytes of the trigger frame still forwarded
    offset: int = 0  # flip
    in_payload: bool = False  # flip
    seconds: float = 0.0  # delay
    xor: int = 0x5A  # flip
    callback: Callable[[], None] | None = None  # hold / kill / call
    mutate: Callable[[bytearray, int], None] | None = None
    after: bool = False  # cut | stall | hold | kill: forward the trigger frame first, then act
    fired: threading.Event = field(default_factory=threading.Event)
    seen: int = 0

    def matches(self, conn: int, direction: str, kind: int, meta: bytes, forwarded: int) -> bool:
        if self.fired.is_set() or (self.conn is not None and conn != self.conn) or direction != self.direction:
            return False
        if self.after_bytes is not None:
            return forwarded >= self.after_bytes
        if self.kind is None or kind != self.kind:
            return False
        if self.meta or self.where:
            try:
                decoded = msgpack.unpackb(meta, raw=False)
            except Exception:  # a corrupted meta cannot match; the peer will say why
                return False
            if not isinstance(decoded, dict) or any(decoded.get(k) != v for k, v in (self.meta or {}).items()):
                return False
            if self.where is not None and not self.where(decoded):
                return False
        self.seen += 1
        return self.seen >= self.nth


class _Link:
    """One proxied connection: two pumps."""

    def __init__(self, proxy: FaultProxy, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy, self.number = proxy, number
        self.client = (reader, writer)
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.stalled = asyncio.Event()
        self.done = asyncio.Event()
        self.reset = False  # close with RST (SO_LINGER 0), not FIN

    async def run(self) -> None:
        try:
            self.upstream = await asyncio.open_connection(*self.proxy.upstream)
        except OSError:
            self.client[1].close()
            return
        pumps = [asyncio.create_task(self._pump(self.client[0], self.upstream[1], C2S)),
                 asyncio.create_task(self._pump(self.upstream[0], self.client[1], S2C))]
        await self.done.wait()
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if not self.stalled.is_set():
            self.close()

    def close(self) -> None:
        for w in (self.client[1], self.upstream[1] if self.upstream else None):
            if w is None or w.transport.is_closing():
                continue
            if self.reset:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
            else:
                w.close()

    async def _write(self, w: asyncio.StreamWriter, data: bytes) -> None:
        rate = self.proxy.rate_bps
        for i in range(0, len(data), 65536):
            piece = data[i:i + 65536]
            w.write(piece)
            await w.drain()
            if rate:
                await asyncio.sleep(len(piece) / rate)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str) -> None:
        if not self.proxy.faults:
            await self._stream(r, w)
            return
        forwarded = 0
        try:
            while True:
                head = b""
                try:
                    head = await r.readexactly(PREFIX_SIZE)
                    _, kind, _, meta_len, payload_len = PREFIX.unpack(head)
                    body = await r.readexactly(meta_len + payload_len)
                except asyncio.IncompleteReadError as exc:
                    # The peer closed (possibly mid-frame): pass on what came -- the
                    # prefix too, when it was in -- then the close.
                    await self._write(w, head + exc.partial)
                    break
                except struct.error:
                    break
                frame = bytearray(head + body)
                meta = bytes(body[:meta_len])
                for fault in self.proxy.faults:
                    if fault.matches(self.number, direction, kind, meta, forwarded + len(frame)):
                        frame = await self._act(fault, frame, w, meta_len)
                        if frame is None:
                            return
                if self.stalled.is_set():
                    await asyncio.Event().wait()  # a black hole both ways
                await self._write(w, bytes(frame))
                forwarded += len(frame)
        except (OSError, asyncio.IncompleteReadError):
            pass
        if not self.stalled.is_set():
            self.done.set()

    async def _stream(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """A proxy without faults is a pipe: bytes go on as they come, at most 64 KiB held.

        Holding whole frames, as the fault triggers need, made a slow link a 4 MiB buffer
        that took a frame at once then dripped it out: the source measured bursts of a
        rate ~10x the real one, and a 16 MiB sweep over 3 MB/s expected 511 ms for a
        pause that took 5.8 s (and committed where the test needed it to iterate).
        """
        try:
            while data := await r.read(65536):
                await self._write(w, data)
        except OSError:
            pass
        self.done.set()

    async def _act(self, fault: Fault, frame: bytearray, w: asyncio.StreamWriter,
                   meta_len: int) -> bytearray | None:
        fault.fired.set()
        self.proxy.log.append((self.number, fault.action, int(frame[2])))
        if fault.after and fault.action in ("cut", "reset", "stall", "hold", "kill"):
            await self._write(w, bytes(frame))
            frame = bytearray()
        if fault.action in ("cut", "reset"):
            if fault.keep:
                await self._write(w, bytes(frame[:fault.keep]))
            self.reset = fault.action == "reset"
            self.done.set()
            return None
        if fault.action in ("stall", "hold"):
            self.stalled.set()
            if fault.callback is not None:
                await asyncio.get_running_loop().run_in_executor(None, fault.callback)
            await asyncio.Event().wait()  # forever: the test tears the proxy down
        if fault.action == "kill":
            assert fault.callback is not None
            await asyncio.get_running_loop().run_in_executor(None, fault.callback)
            return bytearray()
        if fault.action == "call":
            assert fault.callback is not None
            await self._write(w, bytes(frame))
            await asyncio.get_running_loop().run_in_executor(None, fault.callback)
            return bytearray()
        if fault.action == "flip":
            pos = PREFIX_SIZE + fault.offset + (meta_len if fault.in_payload else 0)
            frame[min(pos, len(frame) - 1)] ^= fault.xor
            return frame
        if fault.action == "mutate":
            assert fault.mutate is not None
            fault.mutate(frame, meta_len)
            return frame
        if fault.action == "delay":
            if fault.callback is not None:
                await asyncio.get_running_loop().run_in_executor(None, fault.callback)
            await asyncio.sleep(fault.seconds)
            return frame
        raise ValueError(f"unknown fault action {fault.action!r}")


class FaultProxy:
    """``with FaultProxy(("127.0.0.1", port), [Fault(...)]) as p: ... p.addr``."""

    def __init__(self, upstream: tuple[str, int], faults: list[Fault] | None = None,
                 rate_bps: float = 0.0, netns: str | None = None) -> None:
        self.upstream = upstream
        self.faults = list(faults or [])
        self.rate_bps = rate_bps
        self.log: list[tuple[int, str, int]] = []
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._links: list[_Link] = []
        self._server: asyncio.AbstractServer | None = None
        self._netns = netns
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)

    def _run(self) -> None:
        if self._netns is not None:
            from precopy.lab.netns import enter_in_thread

            try:
                enter_in_thread(self._netns)
            except OSError as exc:
                self._netns_error: OSError | None = exc  # _start raises it; the loop still runs for teardown
        self._loop.run_forever()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        error = getattr(self, "_netns_error", None)
        if error is not None:
            raise error
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rate_bps:
            # A slow link holds little: with the kernel's autotuned receive
            # buffer (MiBs) the source saw its bytes taken at once and
            # measured a rate several times the real one (a 16 MiB sweep over
            # 5 MB/s "converged" on 25 MB/s and paused 4-7 s). Accepted
            # sockets inherit this; at most a frame more waits in the proxy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._accept, sock=sock)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in self._links:
            link.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(self, self.connections, reader, writer)
        self.connections += 1
        self._links.append(link)
        try:
            await link.run()
        except asyncio.CancelledError:
            # Teardown: end normally, or asyncio.start_server's done-callback
            # logs the cancellation as an error (Python 3.11).
            link.close()
