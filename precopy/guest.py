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
socket, one JSON request per line) supporting ``pause``, ``resume`` and
``stop``.  A ``pause`` reply is a JSON line ``{"ok": true,
"device_state_len": N}`` followed by exactly N raw bytes of device state.

The helpers :func:`parse_size`, :func:`create_region` and
:func:`region_digest` are importable by tests and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import msgpack
import numpy as np
import xxhash

PAGE_SIZE = 4096
"""Granularity of the memory region (bytes)."""

CHUNK_BYTES = 64 * 1024 * 1024
"""Chunk size used when filling or hashing a region."""

CREATE_CONTENTS = ("random", "half-text", "zero")
DIRTY_CONTENTS = ("random", "half-text")
DIRTY_PATTERNS = ("random", "sweep")

_U64_MASK = (1 << 64) - 1
_POLL_S = 0.05
"""Upper bound on how long blocking waits go without re-checking stop flags."""

_PAUSE_TIMEOUT_S = 30.0
_SEND_TIMEOUT_S = 30.0
_MAX_REQUEST_BYTES = 64 * 1024
_MAX_UNIX_PATH_BYTES = 107

_BATCH_INTERVAL_S = 0.005
"""Pacing period of the ``dirty --pattern random`` loop."""

_MAX_CATCH_UP_S = 0.05
"""Longest stretch of missed time the paced loop makes up for in one batch."""

_MAX_BATCH_PAGES = 65536
_MIN_WRITE_BYTES = 8
_MAX_WRITE_BYTES = 64
_SWEEP_CHUNK_PAGES = 1024
_IDLE_SLEEP_S = 0.1

_TEXT_POOL_BYTES = 256 * 1024
_TEXT_VARIATION = 0.1
"""Fraction of words replaced in the text pool; 0.1 gives lz4 ratio ~0.7."""

_PARAGRAPH = (
    "Live migration moves a running workload from one machine to another while "
    "it keeps serving requests. The source copies memory pages in rounds, and "
    "pages that the guest writes again are sent once more, until the remaining "
    "set is small enough to stop the guest briefly, send the last pages "
    "together with the device state, and resume it on the destination "
    "machine. Good engineering keeps the pause short and the network busy, so "
    "the people who use the service never notice that their program changed "
    "its home."
)
_EXTRA_WORDS = (
    "time page data memory network system process value number state copy "
    "round rate fast slow small large first last next other every many most "
    "some only never always"
)


class GuestError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


# ---------------------------------------------------------------------------
# Sizes, content generation and digests
# ---------------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*(\d+)\s*(?:([KMGT])(?:I?B)?|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a byte count such as ``4096``, ``64K``, ``256M``, ``1G`` or ``2GiB``.

    Suffixes K/M/G/T are binary (KiB/MiB/GiB/TiB); a trailing ``B`` or
    ``iB`` is accepted.  Alignment is not checked here.

    Raises:
        ValueError: if ``text`` is not a non-negative size.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use a non-negative integer with an optional "
            "K/M/G/T suffix (binary units), e.g. 4096, 64K, 256M or 1G"
        )
    unit = (match.group(2) or "").upper()
    return int(match.group(1)) * _SIZE_UNITS[unit]


def _check_region_size(size: int) -> None:
    """Raise ``ValueError`` unless ``size`` is a positive multiple of the page size."""
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(
            f"region size {size} is not a positive multiple of {PAGE_SIZE} bytes; "
            f"pick a size such as {max(1, -(-size // PAGE_SIZE)) * PAGE_SIZE}"
        )


def _rng(*seeds: int) -> np.random.Generator:
    """Return a numpy generator seeded from one or more (possibly negative) ints."""
    return np.random.default_rng([seed & _U64_MASK for seed in seeds])


def _text_pool(seed: int, nbytes: int = _TEXT_POOL_BYTES) -> np.ndarray:
    """Return ``nbytes`` of English-like text as a uint8 array.

    The text repeats a fixed paragraph, replacing about 10 % of the words
    (and capitalising a few) using ``seed``, so it compresses well but not
    trivially.
    """
    words = _PARAGRAPH.split()
    vocabulary = words + _EXTRA_WORDS.split()
    rng = _rng(seed, 0x7E47)
    count = nbytes // 4 + 1  # average word + space is well above 4 bytes
    base = np.arange(count) % len(words)
    replaced = rng.random(count) < _TEXT_VARIATION
    choice = np.where(replaced, rng.integers(0, len(vocabulary), count), base)
    capitalised = rng.random(count) < _TEXT_VARIATION / 4
    text = " ".join(
        vocabulary[index].capitalize() if cap else vocabulary[index]
        for index, cap in zip(choice.tolist(), capitalised.tolist())
    )
    data = text.encode("ascii")[:nbytes]
    return np.frombuffer(data, dtype=np.uint8)


def _random_chunks(size: int, seed: int) -> Iterator[bytes]:
    """Yield ``size`` bytes of incompressible data in chunks of at most 64 MiB."""
    rng = _rng(seed)
    remaining = size
    while remaining:
        length = min(remaining, CHUNK_BYTES)
        yield rng.bytes(length)
        remaining -= length


def _half_text_chunks(size: int, seed: int) -> Iterator[np.ndarray]:
    """Yield pages whose first half is text and second half random bytes."""
    rng = _rng(seed)
    half = PAGE_SIZE // 2
    pool = _text_pool(seed)
    windows = np.lib.stride_tricks.sliding_window_view(pool, half)
    pages_per_chunk = CHUNK_BYTES // PAGE_SIZE
    remaining = size // PAGE_SIZE
    while remaining:
        count = min(remaining, pages_per_chunk)
        chunk = np.empty((count, PAGE_SIZE), dtype=np.uint8)
        chunk[:, :half] = windows[rng.integers(0, len(windows), count)]
        chunk[:, half:] = np.frombuffer(rng.bytes(count * half), dtype=np.uint8).reshape(
            count, half
        )
        yield chunk
        remaining -= count


def create_region(
    path: str | os.PathLike[str], size: int, content: str = "random", seed: int = 0
) -> None:
    """Create (or truncate) a region file of ``size`` bytes and fill it.

    Args:
        path: file to create, e.g. ``/dev/shm/guest.mem``.
        size: positive multiple of 4096.
        content: ``random`` (incompressible), ``half-text`` (each page half
            English-like text, half random; lz4 ratio about 0.7) or ``zero``.
        seed: seed for the content; the same seed gives the same bytes.

    Raises:
        ValueError: for a bad size or content kind.
        OSError: if the file cannot be written.
    """
    _check_region_size(size)
    if content not in CREATE_CONTENTS:
        raise ValueError(
            f"unknown content {content!r}; choose one of {', '.join(CREATE_CONTENTS)}"
        )
    with open(path, "wb") as handle:
        if content == "zero":
            handle.truncate(size)
            return
        chunks = _random_chunks(size, seed) if content == "random" else _half_text_chunks(size, seed)
        for chunk in chunks:
            handle.write(chunk)


def _digest_chunks(chunks: Iterator[Any]) -> str:
    """Return the xxh3_128 hex digest of the concatenation of ``chunks``."""
    hasher = xxhash.xxh3_128()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _file_chunks(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """Yield the contents of ``path`` in chunks of at most 64 MiB."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = memoryview(bytearray(max(PAGE_SIZE, min(size, CHUNK_BYTES))))
        while count := handle.readinto(buffer):
            yield buffer[:count]


def region_digest(path: str | os.PathLike[str]) -> str:
    """Return the xxh3_128 hex digest of the whole file at ``path`` (chunked)."""
    return _digest_chunks(_file_chunks(path))


def _buffer_digest(buffer: mmap.mmap) -> str:
    """Return the xxh3_128 hex digest of a mapped region (chunked)."""
    with memoryview(buffer) as view:
        return _digest_chunks(
            view[start : start + CHUNK_BYTES] for start in range(0, len(view), CHUNK_BYTES)
        )


# ---------------------------------------------------------------------------
# Memory mapping
# ---------------------------------------------------------------------------


class MappedRegion:
    """A region file mapped ``MAP_SHARED`` read/write, with a numpy view."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Map ``path``; raise :class:`GuestError` if it is missing or misaligned."""
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            raise GuestError(
                f"memory region file {self.path} does not exist; create it first, e.g. "
                f"`precopy-guest create --memory {self.path} --size 64M`"
            ) from None
        except OSError as exc:
            raise GuestError(f"cannot open memory region file {self.path}: {exc}") from exc
        try:
            self.size = os.fstat(fd).st_size
            if self.size <= 0 or self.size % PAGE_SIZE:
                raise GuestError(
                    f"memory region file {self.path} has size {self.size}, which is not a "
                    f"positive multiple of {PAGE_SIZE}; recreate it with `precopy-guest create`"
                )
            self.mm = mmap.mmap(
                fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        self.pages = self.size // PAGE_SIZE
        self.array: np.ndarray | None = np.frombuffer(self.mm, dtype=np.uint8)

    def bytes_array(self) -> np.ndarray:
        """Return the writable uint8 numpy view of the whole region."""
        if self.array is None:
            raise GuestError(f"memory region {self.path} is already closed")
        return self.array

    def close(self) -> None:
        """Drop the numpy view and unmap the region."""
        self.array = None
        try:
            self.mm.close()
        except BufferError:
            # A numpy view is still alive somewhere; the OS unmaps at exit.
            pass

    def __enter__(self) -> MappedRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Work gate: pause/resume/stop coordination with the main loop
# ---------------------------------------------------------------------------


class WorkGate:
    """Coordinates the main work loop with control requests and signals.

    The main loop calls :meth:`checkpoint` between batches/steps (never in the
    middle of a memory write) and :meth:`sleep` for pacing.  The control
    thread calls :meth:`pause`, :meth:`resume` and :meth:`request_stop`.
    Signal handlers call :meth:`request_stop_from_signal`, which takes no lock;
    every blocking wait polls at least every 50 ms so it notices that flag.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pause_wanted = False
        self._parked = False
        self._finished = False
        self.stop_requested = False

    # -- main-loop side -----------------------------------------------------

    def checkpoint(self) -> bool:
        """Block while a pause is requested; return ``False`` if the loop must stop."""
        if not self._pause_wanted:
            return not self.stop_requested
        with self._cond:
            while self._pause_wanted and not self.stop_requested:
                if not self._parked:
                    self._parked = True
                    self._cond.notify_all()
                self._cond.wait(_POLL_S)
            self._parked = False
            return not self.stop_requested

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early if a pause or stop is requested."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not (self._pause_wanted or self.stop_requested):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(min(remaining, _POLL_S))

    def finish(self) -> None:
        """Declare that the main loop will not write guest memory any more."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    # -- control side ---------------------------------------------------------

    def pause(self, timeout: float = _PAUSE_TIMEOUT_S) -> bool:
        """Request a pause and wait until the main loop is blocked.

        Returns:
            ``True`` if this call paused a running guest, ``False`` if it was
            already paused (or finished).

        Raises:
            GuestError: if the guest is stopping or does not reach a pause
                point within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            newly_paused = not self._pause_wanted
            self._pause_wanted = True
            self._cond.notify_all()
            while not (self._parked or self._finished or self.stop_requested):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if newly_paused:
                        self._pause_wanted = False
                    raise GuestError(
                        f"guest did not reach a pause point within {timeout:.0f} s; "
                        "it may be overloaded, retry the pause"
                    )
                self._cond.wait(min(remaining, _POLL_S))
            if self.stop_requested:
                raise GuestError("guest is stopping; it cannot be paused any more")
            return newly_paused and not self._finished

    def resume(self) -> None:
        """Let the main loop continue (no-op if it is running)."""
        with self._cond:
            self._pause_wanted = False
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Ask the main loop to exit and wake it up."""
        with self._cond:
            self.stop_requested = True
            self._cond.notify_all()

    def request_stop_from_signal(self) -> None:
        """Ask the main loop to exit; safe inside a signal handler (no locks)."""
        self.stop_requested = True


def _install_stop_signals(gate: WorkGate) -> None:
    """Make SIGTERM and SIGINT stop the main loop cleanly (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def _handler(signum: int, frame: FrameType | None) -> None:
        gate.request_stop_from_signal()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handler)


# ---------------------------------------------------------------------------
# Control socket
# ---------------------------------------------------------------------------


class ControlHandler(Protocol):
    """What the control server asks of a guest."""

    def pause(self) -> bytes:
        """Pause the guest and return its device-state blob."""

    def resume(self) -> None:
        """Resume the guest."""

    def stop(self) -> None:
        """Make the guest exit."""


class GateController:
    """A :class:`ControlHandler` built from a gate and a device-state provider.

    ``device_state(newly_paused)`` is called while the main loop is blocked
    and returns the blob to send back.
    """

    def __init__(self, gate: WorkGate, device_state: Callable[[bool], bytes]) -> None:
        self._gate = gate
        self._device_state = device_state

    def pause(self) -> bytes:
        """Pause the main loop, then snapshot the device state."""
        return self._device_state(self._gate.pause())

    def resume(self) -> None:
        """Resume the main loop."""
        self._gate.resume()

    def stop(self) -> None:
        """Stop the main loop."""
        self._gate.request_stop()


def _json_line(obj: dict[str, Any]) -> bytes:
    """Encode a reply as one JSON line."""
    return json.dumps(obj).encode() + b"\n"


def _error_reply(message: str) -> tuple[dict[str, Any], bytes, bool]:
    """Build an error reply tuple for :meth:`ControlServer._dispatch`."""
    return {"ok": False, "error": message}, b"", False


def _prepare_socket_path(path: str) -> None:
    """Remove a stale socket at ``path``; refuse to clobber anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise GuestError(
            f"control path {path} exists and is not a socket; remove it or choose "
            "another --control path"
        )
    os.unlink(path)


class ControlServer:
    """Unix stream socket server for guest control requests.

    Connections are served one after another by a background thread; each
    connection may carry several newline-terminated JSON requests.  The
    socket file appears (atomically, via rename) only once it is accepting
    connections, and it is removed by :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], handler: ControlHandler) -> None:
        self.path = os.fspath(path)
        self._handler = handler
        self._closing = threading.Event()
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind, listen and start serving in a daemon thread."""
        _prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind_and_listen(sock)
        except OSError as exc:
            sock.close()
            raise GuestError(
                f"cannot listen on control socket {self.path}: {exc}; use a short, "
                "writable path such as /tmp/guest.sock"
            ) from exc
        self._inode = os.stat(self.path).st_ino
        sock.settimeout(_POLL_S)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._serve, name="precopy-guest-control", daemon=True
        )
        self._thread.start()

    def _bind_and_listen(self, sock: socket.socket) -> None:
        """Bind to a temporary name, listen, then rename onto the real path."""
        directory, name = os.path.split(self.path)
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        if len(os.fsencode(temporary)) > _MAX_UNIX_PATH_BYTES:
            sock.bind(self.path)
            sock.listen(8)
            return
        sock.bind(temporary)
        try:
            sock.listen(8)
            os.replace(temporary, self.path)
        except OSError:
            os.unlink(temporary)
            raise

    def close(self) -> None:
        """Stop serving and remove the socket file (idempotent)."""
        self._closing.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        """Unlink the socket file if it is still the one this server created."""
        if self._inode is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _serve(self) -> None:
        """Accept connections one at a time until closed."""
        assert self._sock is not None
        listener = self._sock
        while not self._closing.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            with conn:
                try:
                    self._serve_connection(conn)
                except OSError:
                    pass  # client vanished; wait for the next one

    def _serve_connection(self, conn: socket.socket) -> None:
        """Read newline-terminated requests from ``conn`` and answer each."""
        conn.settimeout(_POLL_S)
        buffer = bytearray()
        while not self._closing.is_set():
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > _MAX_REQUEST_BYTES:
                    self._send(conn, *_error_reply("request line too long")[:2])
                    return
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                buffer += data
                continue
            line = bytes(buffer[:newline]).strip()
            del buffer[: newline + 1]
            if not line:
                continue
            reply, payload, stop_after = self._dispatch(line)
            self._send(conn, reply, payload)
            if stop_after:
                self._handler.stop()
                return

    def _send(self, conn: socket.socket, reply: dict[str, Any], payload: bytes) -> None:
        """Send a JSON reply line followed by ``payload``."""
        conn.settimeout(_SEND_TIMEOUT_S)
        conn.sendall(_json_line(reply))
        if payload:
            conn.sendall(payload)
        conn.settimeout(_POLL_S)

    def _dispatch(self, line: bytes) -> tuple[dict[str, Any], bytes, bool]:
        """Handle one request line; return (reply, payload, stop_after_reply)."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error_reply(
                f"bad JSON request ({exc}); send one JSON object per line, "
                'e.g. {"op": "pause"}'
            )
        if not isinstance(request, dict):
            return _error_reply('request must be a JSON object such as {"op": "pause"}')
        op = request.get("op")
        if op == "pause":
            try:
                blob = self._handler.pause()
            except GuestError as exc:
                return _error_reply(str(exc))
            return {"ok": True, "device_state_len": len(blob)}, blob, False
        if op == "resume":
            self._handler.resume()
            return {"ok": True}, b"", False
        if op == "stop":
            return {"ok": True}, b"", True
        return _error_reply(f"unknown op {op!r}; expected one of: pause, resume, stop")


class _NullServer:
    """Stand-in used when no ``--control`` socket is requested."""

    def __enter__(self) -> _NullServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def _control_server(path: str | None, handler: ControlHandler) -> ControlServer | _NullServer:
    """Return a control server for ``path`` or a no-op stand-in."""
    return ControlServer(path, handler) if path else _NullServer()


def _write_file_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)


# ---------------------------------------------------------------------------
# dirty: rate-limited or sweeping page writer
# ---------------------------------------------------------------------------


def _flat_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Return the concatenation of ``range(s, s + l)`` for each start/length pair."""
    ends = np.cumsum(lengths)
    offsets = np.repeat(starts - (ends - lengths), lengths)
    return offsets + np.arange(int(ends[-1]) if len(ends) else 0)


class PageWriter:
    """Writes 8..64 bytes at a random offset inside chosen pages (vectorised)."""

    def __init__(
        self,
        memory: np.ndarray,
        seed: int,
        content: str,
        hot_fraction: float,
        hot_weight: float,
    ) -> None:
        self._memory = memory
        self._pages = len(memory) // PAGE_SIZE
        self._hot_pages = max(1, min(self._pages, round(self._pages * hot_fraction)))
        self._hot_weight = hot_weight if self._hot_pages < self._pages else 0.0
        self._rng = _rng(seed, 0xD1127)
        self._text = _text_pool(seed) if content == "half-text" else None

    def choose_pages(self, count: int) -> np.ndarray:
        """Pick ``count`` page indices: hot set with probability W, else uniform."""
        rng = self._rng
        uniform = rng.integers(0, self._pages, count)
        if self._hot_weight <= 0.0:
            return uniform
        hot = rng.integers(0, self._hot_pages, count)
        return np.where(rng.random(count) < self._hot_weight, hot, uniform)

    def write(self, count: int) -> None:
        """Write ``count`` small pieces of data into randomly chosen pages."""
        rng = self._rng
        pages = self.choose_pages(count)
        lengths = rng.integers(_MIN_WRITE_BYTES, _MAX_WRITE_BYTES + 1, count)
        offsets = rng.integers(0, PAGE_SIZE - lengths + 1)
        targets = _flat_indices(pages * PAGE_SIZE + offsets, lengths)
        self._memory[targets] = self._data(lengths, len(targets))

    def _data(self, lengths: np.ndarray, total: int) -> np.ndarray:
        """Return ``total`` bytes of random or text-like data for the writes."""
        if self._text is None:
            return self._rng.integers(0, 256, total, dtype=np.uint8)
        sources = self._rng.integers(0, len(self._text) - _MAX_WRITE_BYTES, len(lengths))
        return self._text[_flat_indices(sources, lengths)]


class DirtyDeviceState:
    """Deterministic device-state blobs for the ``dirty`` guest.

    Each transition into the paused state bumps a counter and derives a new
    blob of ``size`` bytes from the seed and that counter; a pause request
    while already paused returns the same blob.  If ``out_path`` is set the
    exact blob is written there at each pause.
    """

    def __init__(self, size: int, seed: int, out_path: str | None) -> None:
        self._size = size
        self._seed = seed
        self._out_path = out_path
        self._pauses = 0
        self._blob: bytes | None = None

    def snapshot(self, newly_paused: bool) -> bytes:
        """Return the blob for the current pause (new one if newly paused)."""
        if newly_paused or self._blob is None:
            self._pauses += 1
            self._blob = dirty_device_state_blob(self._seed, self._pauses, self._size)
            if self._out_path:
                try:
                    _write_file_atomic(self._out_path, self._blob)
                except OSError as exc:
                    raise GuestError(
                        f"cannot write --device-state-out {self._out_path}: {exc}"
                    ) from exc
        return self._blob


def dirty_device_state_blob(seed: int, pause_count: int, size: int) -> bytes:
    """Return the ``dirty`` guest's device-state blob for a given pause number.

    The content is pseudo-random, derived from xxh3 of the seed and pause
    counter, and never all zero (for ``size > 0``).
    """
    if size <= 0:
        return b""
    key = xxhash.xxh3_64_intdigest(f"precopy-guest:{seed}:{pause_count}".encode())
    blob = bytearray(_rng(key).bytes(size))
    blob[0] |= 0x01
    return bytes(blob)


def _expired(deadline: float | None) -> bool:
    """Return whether ``deadline`` (a monotonic time, or None) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def _sweep_loop(memory: np.ndarray, gate: WorkGate, deadline: float | None) -> int:
    """Increment every page's first byte, forever, as fast as possible."""
    first_bytes = memory[::PAGE_SIZE]
    pages = len(first_bytes)
    position = 0
    written = 0
    while gate.checkpoint() and not _expired(deadline):
        end = min(position + _SWEEP_CHUNK_PAGES, pages)
        first_bytes[position:end] += 1
        written += end - position
        position = 0 if end == pages else end
    return written


def _paced_loop(
    writer: PageWriter, rate: float, gate: WorkGate, deadline: float | None
) -> int:
    """Write about ``rate`` pages per second in batches every few milliseconds."""
    written = 0
    credit = 0.0
    last = time.monotonic()
    while gate.checkpoint():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        credit = min(credit + rate * min(now - last, _MAX_CATCH_UP_S), _MAX_BATCH_PAGES)
        last = now
        count = int(credit)
        if count:
            writer.write(count)
            credit -= count
            written += count
        pause_for = _BATCH_INTERVAL_S - (time.monotonic() - now)
        if deadline is not None:
            pause_for = min(pause_for, deadline - time.monotonic())
        if pause_for > 0:
            gate.sleep(pause_for)
    return written


def _idle_loop(gate: WorkGate, deadline: float | None) -> int:
    """Do nothing (but answer pauses) until stopped or the deadline passes."""
    while gate.checkpoint() and not _expired(deadline):
        remaining = _IDLE_SLEEP_S if deadline is None else deadline - time.monotonic()
        gate.sleep(max(0.0, min(_IDLE_SLEEP_S, remaining)))
    return 0


def run_dirty(args: argparse.Namespace) -> int:
    """Run the ``dirty`` subcommand; return the exit status."""
    gate = WorkGate()
    device = DirtyDeviceState(args.device_state_size, args.seed, args.device_state_out)
    _install_stop_signals(gate)
    started = time.monotonic()
    deadline = None if args.duration is None else started + args.duration
    written = 0
    with MappedRegion(args.memory) as region:
        memory = region.bytes_array()
        with _control_server(args.control, GateController(gate, device.snapshot)):
            if args.pattern == "sweep":
                written = _sweep_loop(memory, gate, deadline)
            elif args.rate == 0:
                written = _idle_loop(gate, deadline)
            else:
                writer = PageWriter(
                    memory, args.seed, args.content, args.hot_fraction, args.hot_weight
                )
                written = _paced_loop(writer, args.rate, gate, deadline)
                del writer
            gate.finish()
        del memory
    if args.stats_out:
        stats = {"pages_written": written, "seconds": round(time.monotonic() - started, 6)}
        _write_file_atomic(args.stats_out, json.dumps(stats).encode() + b"\n")
    return 0


# ---------------------------------------------------------------------------
# det: deterministic guest
# ---------------------------------------------------------------------------


class SplitMix64:
    """Tiny deterministic 64-bit RNG whose whole state is one int."""

    _GAMMA = 0x9E3779B97F4A7C15

    def __init__(self, state: int) -> None:
        self.state = state & _U64_MASK

    def next(self) -> int:
        """Advance the state and return the next 64-bit output."""
        self.state = (self.state + self._GAMMA) & _U64_MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64_MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64_MASK
        return z ^ (z >> 31)


@dataclass
class DetState:
    """Device state of the deterministic guest."""

    step: int
    rng: SplitMix64
    seed: int

    @classmethod
    def fresh(cls, seed: int) -> DetState:
        """Return the state at step 0 for ``seed``."""
        return cls(step=0, rng=SplitMix64(seed), seed=seed)

    def to_blob(self) -> bytes:
        """Serialise as msgpack ``{"step", "rng", "seed"}``."""
        return msgpack.packb(
            {"step": self.step, "rng": self.rng.state, "seed": self.seed & _U64_MASK}
        )

    @classmethod
    def from_blob(cls, blob: bytes, source: str) -> DetState:
        """Parse a blob produced by :meth:`to_blob` (``source`` names it in errors)."""
        try:
            data = msgpack.unpackb(blob)
        except (ValueError, msgpack.UnpackException) as exc:
            raise GuestError(
                f"device state {source} is not valid msgpack ({exc}); pass the exact "
                "bytes returned by a det guest's pause reply"
            ) from exc
        if not isinstance(data, dict):
            raise GuestError(f"device state {source} must be a msgpack map with step and rng")
        step, rng_state = data.get("step"), data.get("rng")
        if not isinstance(step, int) or step < 0 or not isinstance(rng_state, int):
            raise GuestError(
                f"device state {source} lacks a non-negative integer 'step' and an "
                "integer 'rng'; pass the blob from a det guest's pause reply"
            )
        seed = data.get("seed", 0)
        return cls(step=step, rng=SplitMix64(rng_state), seed=seed if isinstance(seed, int) else 0)


def _load_det_state(path: str | None, seed: int) -> DetState:
    """Load the starting device state from ``path`` or start fresh from ``seed``."""
    if not path:
        return DetState.fresh(seed)
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise GuestError(
            f"cannot read --device-state {path}: {exc}; pass the file holding the "
            "pause blob, or omit the option to start at step 0"
        ) from exc
    return DetState.from_blob(blob, path) if blob else DetState.fresh(seed)


def det_step(memory: mmap.mmap, pages: int, state: DetState) -> None:
    """Perform one deterministic step on ``memory`` and advance ``state``."""
    rng = state.rng
    target = rng.next() % pages
    source = rng.next() % pages
    offset = (rng.next() % (PAGE_SIZE // 8)) * 8
    start = source * PAGE_SIZE
    value = xxhash.xxh3_64_intdigest(memory[start : start + PAGE_SIZE]) ^ state.step
    struct.pack_into("<Q", memory, target * PAGE_SIZE + offset, value & _U64_MASK)
    state.step += 1


def _run_det_steps(
    region: MappedRegion, state: DetState, steps: int, gate: WorkGate, sleep_s: float
) -> bool:
    """Run steps until ``state.step == steps``; return ``False`` if stopped early."""
    memory, pages = region.mm, region.pages
    while state.step < steps:
        if not gate.checkpoint():
            return False
        det_step(memory, pages, state)
        if sleep_s > 0:
            gate.sleep(sleep_s)
    return True


def run_det(args: argparse.Namespace) -> int:
    """Run the ``det`` subcommand; return the exit status."""
    state = _load_det_state(args.device_state, args.seed)
    if state.step > args.steps:
        raise GuestError(
            f"device state is already at step {state.step}, beyond --steps {args.steps}; "
            "pass a larger --steps"
        )
    gate = WorkGate()
    _install_stop_signals(gate)
    controller = GateController(gate, lambda _newly: state.to_blob())
    with MappedRegion(args.memory) as region:
        with _control_server(args.control, controller):
            completed = _run_det_steps(region, state, args.steps, gate, args.step_sleep_us / 1e6)
            gate.finish()
            if not completed:
                print(
                    f"precopy-guest det: stopped at step {state.step} of {args.steps}",
                    file=sys.stderr,
                )
                return 0
            digest = _buffer_digest(region.mm)
    result = json.dumps({"steps": args.steps, "digest": digest})
    if args.digest_out:
        _write_file_atomic(args.digest_out, result.encode() + b"\n")
    print(result, flush=True)
    return 0


# ---------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------


def run_create(args: argparse.Namespace) -> int:
    """Run the ``create`` subcommand; return the exit status."""
    try:
        create_region(args.memory, args.size, args.content, args.seed)
    except ValueError as exc:
        raise GuestError(str(exc)) from exc
    except OSError as exc:
        raise GuestError(
            f"cannot create memory region file {args.memory}: {exc}; check the "
            "directory exists and has enough free space"
        ) from exc
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _size_arg(text: str) -> int:
    """argparse type for sizes with K/M/G suffixes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _non_negative_float(text: str) -> float:
    """argparse type for a float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type for a float > 0."""
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _unit_fraction(text: str) -> float:
    """argparse type for a float in [0, 1]."""
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type for an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_create_parser(subparsers: Any) -> None:
    """Register the ``create`` subcommand."""
    parser = subparsers.add_parser("create", help="create and fill a memory region file")
    parser.add_argument("--memory", required=True, help="region file to create or truncate")
    parser.add_argument(
        "--size", required=True, type=_size_arg, help="size, multiple of 4096 (e.g. 256M, 1G)"
    )
    parser.add_argument("--content", choices=CREATE_CONTENTS, default="random")
    parser.add_argument("--seed", type=int, default=0, help="content seed (default 0)")
    parser.set_defaults(func=run_create)


def _add_dirty_parser(subparsers: Any) -> None:
    """Register the ``dirty`` subcommand."""
    parser = subparsers.add_parser("dirty", help="map a region and keep dirtying pages")
    parser.add_argument("--memory", required=True, help="existing region file")
    parser.add_argument(
        "--rate", type=_non_negative_float, default=1000.0,
        help="page writes per second (0 = idle; default 1000)",
    )
    parser.add_argument(
        "--pattern", choices=DIRTY_PATTERNS, default="random",
        help="random paced writes, or sweep: increment every page's first byte at full speed",
    )
    parser.add_argument(
        "--hot-fraction", type=_unit_fraction, default=0.1,
        help="fraction of pages (from the start) forming the hot set (default 0.1)",
    )
    parser.add_argument(
        "--hot-weight", type=_unit_fraction, default=0.9,
        help="probability a write goes to the hot set (default 0.9)",
    )
    parser.add_argument("--content", choices=DIRTY_CONTENTS, default="random")
    parser.add_argument("--control", help="Unix socket path for pause/resume/stop")
    parser.add_argument(
        "--duration", type=_positive_float, default=None,
        help="seconds to run (default: until stopped)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device-state-size", type=_size_arg, default=0,
        help="bytes of device state returned by each pause (default 0)",
    )
    parser.add_argument("--device-state-out", help="also write each pause's blob here")
    parser.add_argument("--stats-out", help='write {"pages_written", "seconds"} JSON here on exit')
    parser.set_defaults(func=run_dirty)


def _add_det_parser(subparsers: Any) -> None:
    """Register the ``det`` subcommand."""
    parser = subparsers.add_parser("det", help="deterministic guest with a digest at the end")
    parser.add_argument("--memory", required=True, help="existing region file")
    parser.add_argument("--steps", required=True, type=_non_negative_int, help="total steps")
    parser.add_argument(
        "--device-state", help="msgpack blob from a pause reply to resume from (empty = fresh)"
    )
    parser.add_argument("--control", help="Unix socket path for pause/resume/stop")
    parser.add_argument("--seed", type=int, default=1, help="RNG seed for a fresh start")
    parser.add_argument(
        "--step-sleep-us", type=_non_negative_float, default=0.0,
        help="microseconds to sleep between steps (default 0)",
    )
    parser.add_argument("--digest-out", help='also write {"steps", "digest"} JSON here')
    parser.set_defaults(func=run_det)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``precopy-guest`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="precopy-guest",
        description="Demo guest workloads that map and modify a shared memory region.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_create_parser(subparsers)
    _add_dirty_parser(subparsers)
    _add_det_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``precopy-guest``; return the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GuestError as exc:
        print(f"precopy-guest {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"precopy-guest {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
