"""A memcached and its clients, for the CRIU proof and benchmark (tests/test_criu.py, benchmarks/criu_memcached.py).

:class:`Memcache` is a minimal client of memcached's text protocol (set,
get of many keys, a bulk fill with ``noreply``); :class:`Writer` is a thread
that keeps setting (and reading back) keys at a given rate through the
service address, reconnecting whenever the connection breaks, and records
every set memcached acknowledged -- what must be there after a migration.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from precopy.lab.netns import enter_in_thread

__all__ = ["Memcache", "Writer", "PORT"]

PORT = 11211


class Memcache:
    """One connection to memcached (text protocol); every error is an OSError."""

    def __init__(self, host: str, port: int = PORT, timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    @classmethod
    def connect(cls, host: str, port: int = PORT, wait_s: float = 30.0) -> Memcache:
        """A connection, retried while memcached is not listening yet (it maps its file first)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return cls(host, port)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("memcached closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("memcached closed the connection")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def set(self, key: str, value: bytes) -> None:
        self.sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(value), value))
        line = self._line()
        if line != b"STORED":
            raise OSError(f"set {key}: {line!r}")

    def fill(self, keys: int, value_size: int = 32, prefix: str = "k", chunk: int = 5000) -> None:
        """Set ``prefix0..`` (``noreply``, in chunks), then wait for memcached to have taken them all."""
        for start in range(0, keys, chunk):
            self.sock.sendall(b"".join(
                b"set %s%d 0 0 %d noreply\r\n%s\r\n" % (prefix.encode(), i, value_size, value_of(prefix, i, value_size))
                for i in range(start, min(start + chunk, keys))))
        self.sock.sendall(b"version\r\n")
        line = self._line()
        if not line.startswith(b"VERSION"):
            raise OSError(f"fill: {line!r}")

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The values memcached holds for ``keys`` (missing keys are left out)."""
        self.sock.sendall(b"get " + " ".join(keys).encode() + b"\r\n")
        out: dict[str, bytes] = {}
        while True:
            line = self._line()
            if line == b"END":
                return out
            parts = line.split()
            if parts[:1] != [b"VALUE"] or len(parts) < 4:
                raise OSError(f"get: {line!r}")
            out[parts[1].decode()] = self._exact(int(parts[3]) + 2)[:-2]


def value_of(prefix: str, i: int, size: int) -> bytes:
    """The value the fill and the writer give key ``prefix+i``: recognisable, ``size`` bytes."""
    unit = b"%s%d:" % (prefix.encode(), i)
    return (unit * (size // len(unit) + 1))[:size]


@dataclass
class Writer:
    """A client that keeps writing through ``host`` while a migration runs (a thread).

    ``netns``: the network namespace it lives in (None: this one).  Sets
    ``w<N>`` at ``rate`` per second, reading each one back every
    ``read_every`` sets; on any error it reconnects (the service moved).
    ``acked`` maps each acknowledged key to the time of its acknowledgement.
    """

    host: str
    rate: float = 500.0
    netns: str | None = None
    value_size: int = 32
    read_every: int = 4
    acked: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    reads: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, name="memcached-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        if self.netns is not None:
            enter_in_thread(self.netns)
        mc: Memcache | None = None
        n = 0
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                if mc is None:
                    mc = Memcache(self.host, timeout_s=1.0)
                key = f"w{n}"
                mc.set(key, value_of("w", n, self.value_size))
                self.acked[key] = time.monotonic()
                if n % self.read_every == 0:
                    got = mc.get_many([key])
                    if got.get(key) != value_of("w", n, self.value_size):
                        raise OSError(f"read back {key}: {got.get(key)!r}")
                    self.reads += 1
                n += 1
            except OSError:
                self.errors += 1
                if mc is not None:
                    mc.close()
                mc = None
                self._stop.wait(0.05)
                continue
            wait = t0 + n / self.rate - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
        if mc is not None:
            mc.close()
