"""The guest control socket: a Unix stream server speaking JSON lines.

Requests are ``{"op": "pause"}``, ``{"op": "resume"}`` and ``{"op": "stop"}``,
one per line.  A ``pause`` reply is a JSON line ``{"ok": true,
"device_state_len": N}`` followed by exactly N raw bytes of device state.

``{"op": "track"}`` offers kernel write tracking: the reply line
``{"ok": true, "start": ADDR, "length": N, "page_size": 4096}`` carries the
guest's userfaultfd as ``SCM_RIGHTS`` (see :mod:`precopy.guest.tracking` and
docs/TRACKING.md); a guest that does not offer it answers ``{"ok": false}``.

``{"op": "postcopy"}`` offers the destination agent of a post-copy
migration the guest's userfaultfd for its missing pages, with the same
reply line and ``SCM_RIGHTS`` (see :mod:`precopy.guest.postcopy`).

``{"op": "throttle", "pct": N}`` (optional for a guest) makes the work loop
rest N % of the time (0 ends it) -> ``{"ok": true}``.  A throttle ends with
``resume``, and when the connection that set it closes: an agent that dies
never leaves the guest throttled.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol

_Offer = Callable[[], "tuple[dict[str, Any], int]"]

from .common import POLL_S, GuestError
from .gate import WorkGate

__all__ = ["ControlHandler", "ControlServer", "GateController", "control_server"]

_SEND_TIMEOUT_S = 30.0
_MAX_REQUEST_BYTES = 64 * 1024
_MAX_UNIX_PATH_BYTES = 107


class ControlHandler(Protocol):
    """What the control server asks of a guest."""

    def pause(self) -> bytes:
        """Pause the guest and return its device-state blob."""

    def resume(self) -> None:
        """Resume the guest."""

    def stop(self) -> None:
        """Make the guest exit."""

    # Optional: ``track()`` (see GateController.track) and
    # ``throttle(fraction)``, raising GuestError for a bad fraction.


class GateController:
    """A :class:`ControlHandler` built from a gate and a device-state provider.

    ``device_state(newly_paused)`` is called while the main loop is blocked
    and returns the blob to send back.
    """

    def __init__(self, gate: WorkGate, device_state: Callable[[bool], bytes],
                 tracking: _Offer | None = None, throttling: bool = True,
                 postcopy: _Offer | None = None) -> None:
        self._gate = gate
        self._device_state = device_state
        self._tracking = tracking
        self._throttling = throttling
        self._postcopy = postcopy

    def postcopy(self) -> tuple[dict[str, Any], int]:
        """Offer post-copy's userfaultfd: reply fields and a copy of the fd (see :mod:`.postcopy`)."""
        if self._postcopy is None:
            raise GuestError("this guest was not started for post-copy (--postcopy)")
        return self._postcopy()

    def track(self) -> tuple[dict[str, Any], int]:
        """Offer write tracking: reply fields and a userfaultfd (see :mod:`.tracking`)."""
        if self._tracking is None:
            raise GuestError("this guest does not offer write tracking (started with --no-tracking)")
        return self._tracking()

    def pause(self) -> bytes:
        """Pause the main loop, then snapshot the device state."""
        return self._device_state(self._gate.pause())

    def resume(self) -> None:
        """Resume the main loop, at full speed (a throttle ends too)."""
        self._gate.set_throttle(0.0)
        self._gate.resume()

    def throttle(self, fraction: float) -> None:
        """Rest ``fraction`` of the time (0: not at all); GuestError if out of range,
        or if this guest does not offer the op (``--no-throttle``)."""
        if not self._throttling:
            raise GuestError("this guest does not offer the throttle op (started with --no-throttle)")
        self._gate.set_throttle(fraction)

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
        self._throttled = False  # the connection being served set a throttle

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
        sock.settimeout(POLL_S)
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
        """Serve one connection; a throttle it set ends with it."""
        self._throttled = False
        try:
            self._serve_requests(conn)
        finally:
            if self._throttled:
                self._handler.throttle(0.0)  # type: ignore[attr-defined]

    def _serve_requests(self, conn: socket.socket) -> None:
        """Read newline-terminated requests from ``conn`` and answer each."""
        conn.settimeout(POLL_S)
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
            if _op_of(line) in ("track", "postcopy"):
                self._send_fd(conn, str(_op_of(line)))
                continue
            reply, payload, stop_after = self._dispatch(line)
            self._send(conn, reply, payload)
            if stop_after:
                self._handler.stop()
                return

    def _send_fd(self, conn: socket.socket, op: str) -> None:
        """Answer ``track`` or ``postcopy``: the reply line with a userfaultfd attached (SCM_RIGHTS)."""
        what = "write tracking" if op == "track" else "post-copy"
        offer = getattr(self._handler, op, None)
        if offer is None:
            self._send(conn, *_error_reply(f"this guest does not offer {what}")[:2])
            return
        try:
            fields, fd = offer()
        except GuestError as exc:
            self._send(conn, *_error_reply(f"{what} unavailable: {exc}")[:2])
            return
        try:
            conn.settimeout(_SEND_TIMEOUT_S)
            data = _json_line({"ok": True, **fields})
            sent = socket.send_fds(conn, [data], [fd])
            if sent < len(data):
                conn.sendall(data[sent:])
            conn.settimeout(POLL_S)
        finally:
            os.close(fd)  # tracking ends when the agent closes its copy; a post-copy guest keeps one

    def _send(self, conn: socket.socket, reply: dict[str, Any], payload: bytes) -> None:
        """Send a JSON reply line followed by ``payload``."""
        conn.settimeout(_SEND_TIMEOUT_S)
        conn.sendall(_json_line(reply))
        if payload:
            conn.sendall(payload)
        conn.settimeout(POLL_S)

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
        if op == "throttle":
            return self._throttle(request.get("pct"))
        return _error_reply(f"unknown op {op!r}; expected one of: pause, resume, stop, track, throttle, postcopy")

    def _throttle(self, pct: object) -> tuple[dict[str, Any], bytes, bool]:
        throttle = getattr(self._handler, "throttle", None)
        if throttle is None:
            return _error_reply("this guest cannot be throttled")
        if isinstance(pct, bool) or not isinstance(pct, (int, float)):
            return _error_reply(f'throttle needs "pct": a number 0..99, not {pct!r}')
        try:
            throttle(pct / 100)
        except GuestError as exc:
            return _error_reply(str(exc))
        self._throttled = pct > 0
        return {"ok": True}, b"", False


def _op_of(line: bytes) -> object:
    """The ``op`` of a request line, or None if it is not a JSON object."""
    try:
        request = json.loads(line)
    except ValueError:
        return None
    return request.get("op") if isinstance(request, dict) else None


class _NullServer:
    """Stand-in used when no ``--control`` socket is requested."""

    def __enter__(self) -> _NullServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def control_server(path: str | None, handler: ControlHandler) -> ControlServer | _NullServer:
    """Return a control server for ``path`` or a no-op stand-in."""
    return ControlServer(path, handler) if path else _NullServer()
