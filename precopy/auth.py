"""Pre-shared-key mutual authentication (HMAC-SHA256 challenge-response).

Each side proves it holds the key by MACing both fresh nonces with its own
role label, so a reply captured from one session or one direction is useless
in another.  Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from .errors import AuthError
from .wire import NONCE_SIZE, PROTOCOL_VERSION

__all__ = ["new_nonce", "dest_mac", "source_mac", "verify", "load_key"]

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


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file (raw bytes; surrounding whitespace stripped).

    Raises :class:`AuthError` if it cannot be read or is shorter than
    16 bytes.  Generate one with ``head -c 32 /dev/urandom | base64 > key``.
    """
    p = Path(path)
    try:
        key = p.read_bytes().strip()
    except OSError as exc:
        raise AuthError(f"cannot read auth key file {p}: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(
            f"auth key in {p} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. head -c 32 /dev/urandom | base64 > FILE)"
        )
    return key
