"""CRIU started ahead: ``criu swrk`` and its RPC, so a dump or a restore does not pay CRIU's start.

``criu dump`` run at the pause starts a program first: ``nsenter``, the
wrapper's shell, the loader and CRIU's libraries, then CRIU's exit -- ~9 ms
of a ~30 ms dump here, and as much on the restore, both inside the
downtime.  :class:`CriuWorker` starts ``criu swrk FD`` (CRIU's service
worker, the way libcriu drives it) before it is needed; at the pause one
request on the socket pair (a ``criu_req`` protobuf) makes it dump or
restore at once, and its answer (``criu_resp``) says how it went.  The
worker serves that one request and exits.

The messages are encoded here by hand (CRIU's ``images/rpc.proto``; the
few fields used are stable, numbered since CRIU 1.x, ``leave_stopped``
since 3.15): no protobuf library is needed.  Pure functions
(:func:`encode_request`, :func:`decode_response`) are tested without CRIU.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import threading
from dataclasses import dataclass

from precopy.errors import GuestControlError

__all__ = ["CriuWorker", "encode_request", "decode_response", "RpcAnswer", "DUMP", "RESTORE"]

_log = logging.getLogger(__name__)

#: ``criu_req_type``
DUMP, RESTORE = 1, 2
#: ``criu_opts`` field numbers (rpc.proto)
_IMAGES_DIR_FD, _PID, _LOG_LEVEL, _LOG_FILE, _TCP_CLOSE, _IMAGES_DIR, _LEAVE_STOPPED = 1, 2, 9, 10, 52, 68, 69
#: A response is a few hundred bytes; CRIU's first error message is in it.
_MAX_RESPONSE = 1 << 16


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64: ten bytes, two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: int | bool | str | bytes) -> bytes:
    if isinstance(value, (bool, int)):
        return _varint(num << 3) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def encode_request(kind: int, *, images_dir: str, log_file: str, log_level: int = 2, pid: int | None = None,
                   leave_stopped: bool = True, tcp_close: bool = True) -> bytes:
    """A ``criu_req`` of ``kind`` (:data:`DUMP`, :data:`RESTORE`): images in ``images_dir`` (a path as CRIU sees it)."""
    opts = [_field(_IMAGES_DIR_FD, -1), _field(_IMAGES_DIR, images_dir), _field(_LOG_LEVEL, log_level),
            _field(_LOG_FILE, log_file)]
    if pid is not None:
        opts.append(_field(_PID, pid))
    if leave_stopped:
        opts.append(_field(_LEAVE_STOPPED, True))
    if tcp_close:
        opts.append(_field(_TCP_CLOSE, True))
    return _field(1, kind) + _field(2, b"".join(opts))


def _fields(data: bytes) -> dict[int, list[int | bytes]]:
    """One protobuf message's fields (varints and length-delimited; fixed ones skipped)."""
    out: dict[int, list[int | bytes]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(data):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            out.setdefault(num, []).append(varint())
        elif wire == 2:
            n = varint()
            if i + n > len(data):
                raise ValueError("truncated field")
            out.setdefault(num, []).append(data[i:i + n])
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire} unknown")
    return out


def _int32(v: int) -> int:
    """A varint read back as the int32 it encodes (negative ones take ten bytes)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


@dataclass(frozen=True)
class RpcAnswer:
    """A ``criu_resp``: what was asked, whether it worked, the restored pid, CRIU's error."""

    kind: int
    success: bool
    pid: int | None = None
    errno: int = 0
    error: str = ""


def decode_response(data: bytes) -> RpcAnswer:
    """Parse a ``criu_resp``; raises :class:`GuestControlError` for a malformed one."""
    try:
        f = _fields(data)
        kind, success = int(f[1][0]), bool(f[2][0])
        pid = None
        if 4 in f:  # criu_restore_resp {pid = 1}
            pid = _int32(int(_fields(bytes(f[4][0]))[1][0]))
        errno = _int32(int(f.get(7, [0])[0]))
        error = bytes(f.get(9, [b""])[0]).decode(errors="replace")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise GuestControlError(f"CRIU's RPC answer is malformed ({exc})") from exc
    return RpcAnswer(kind=kind, success=success, pid=pid, errno=errno, error=error)


class CriuWorker:
    """One ``criu swrk`` started ahead, for one dump or one restore (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.used = False

    @classmethod
    def start(cls, criu_path: str, prefix: list[str] | None = None) -> CriuWorker:
        """Start ``[prefix...] CRIU swrk FD`` (no event loop needed); raises :class:`GuestControlError`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen([*(prefix or []), criu_path, "swrk", str(theirs.fileno())],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise GuestControlError(f"cannot start 'criu swrk': {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(proc, ours)

    @property
    def alive(self) -> bool:
        """Not used yet and still running (else the caller runs CRIU the usual way)."""
        return not self.used and self.proc.poll() is None

    async def request(self, message: bytes, *, timeout_s: float) -> RpcAnswer:
        """Send one request and wait for its answer; raises :class:`GuestControlError`.

        A timeout is reported, but CRIU is never killed (a dump cut short
        would leave its parasite in the process).
        """
        if self.used:
            raise GuestControlError("this CRIU worker has served its request already")
        self.used = True
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.sock, message)
            data = await asyncio.wait_for(loop.sock_recv(self.sock, _MAX_RESPONSE), timeout_s)
        except asyncio.TimeoutError:
            raise GuestControlError(f"CRIU (swrk, pid {self.proc.pid}) still works after {timeout_s:.0f} s "
                                    "(left running)") from None
        except OSError as exc:
            raise GuestControlError(f"CRIU (swrk, pid {self.proc.pid}) is gone: {exc}") from exc
        finally:
            self._let_go()
        if not data:
            raise GuestControlError(f"CRIU (swrk, pid {self.proc.pid}) ended without an answer "
                                    f"(exit {self.proc.poll()})")
        return decode_response(data)

    def _let_go(self) -> None:
        """Close our end (the worker then exits) and reap it in a thread, off the downtime."""
        self.sock.close()
        threading.Thread(target=self.proc.wait, name=f"criu-swrk-{self.proc.pid}", daemon=True).start()

    def close(self) -> None:
        """Not used after all: let it go (it exits when our end closes)."""
        if not self.used:
            self.used = True
            self._let_go()
