"""Pre-shared-key mutual authentication (HMAC-SHA256 challenge-response).

Each side proves it holds the key by MACing both fresh nonces with its own
role label, so a reply captured from one session or one direction is useless
in another.  Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from precopy.errors import AuthError
from precopy.protocol.limits import NONCE_SIZE, PROTOCOL_VERSION

__all__ = ["new_nonce", "dest_mac", "source_mac", "verify", "load_key", "check_private_file"]

MIN_KEY_BYTES = 16


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def _mac(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    msg = b"precopy/%d/" % PROTOCOL_VERSION + label + b"/" + first + second
    return hmac.new(key, msg, hashlib.sha256).digest()


def dest_mac(key: bytes, source_nonce: bytes, dest_nonce: bytes) -> bytes:
    """What the destination sends to prove it holds ``key``."""
    return _mac(key, b"dest", source_nonce, dest_nonce)


def source_mac(key: bytes, source_nonce: bytes, dest_nonce: bytes) -> bytes:
    """What the source sends to prove it holds ``key``."""
    return _mac(key, b"source", dest_nonce, source_nonce)


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that other users may read or write.

    Raises :class:`AuthError` naming the mode and the fix when the file is
    readable or writable by its group or by others (like ssh with a private
    key).  A file that cannot be examined is left to the read that follows.
    """
    try:
        st = path.stat()
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        raise AuthError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users could read or "
            f"change it. Make it private to its owner: chmod 600 {path}"
        )


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file (raw bytes; surrounding whitespace stripped).

    Raises :class:`AuthError` if it cannot be read, is readable or writable
    by the group or others (mode must be 0600 or stricter), or is shorter
    than 16 bytes.  Generate one with
    ``(umask 077; head -c 32 /dev/urandom | base64 > key)``.
    """
    p = Path(path)
    check_private_file(p, "auth key file")
    try:
        key = p.read_bytes().strip()
    except OSError as exc:
        raise AuthError(f"cannot read auth key file {p}: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(
            f"auth key in {p} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. (umask 077; head -c 32 /dev/urandom | base64 > FILE))"
        )
    return key
