"""Tests of pre-shared-key authentication (``precopy.protocol.auth``)."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from precopy.protocol import auth
from precopy.errors import AbortCode, AuthError
from precopy.protocol import PROTOCOL_VERSION
from precopy.protocol.limits import NONCE_SIZE

KEY = b"0123456789abcdef0123456789abcdef"
NS = bytes(range(32))          # source nonce
ND = bytes(range(200, 232))    # destination nonce


def test_new_nonce_is_fresh_and_sized() -> None:
    a, b = auth.new_nonce(), auth.new_nonce()
    assert len(a) == len(b) == NONCE_SIZE
    assert a != b


def test_macs_are_hmac_sha256_with_role_labels() -> None:
    """Pin the construction: both implementations must agree on the wire."""
    prefix = b"precopy/%d/" % PROTOCOL_VERSION
    assert auth.dest_mac(KEY, NS, ND) == hmac.new(KEY, prefix + b"dest/" + NS + ND, hashlib.sha256).digest()
    assert auth.source_mac(KEY, NS, ND) == hmac.new(KEY, prefix + b"source/" + ND + NS, hashlib.sha256).digest()


def test_macs_are_deterministic_and_32_bytes() -> None:
    assert auth.dest_mac(KEY, NS, ND) == auth.dest_mac(KEY, NS, ND)
    assert len(auth.dest_mac(KEY, NS, ND)) == len(auth.source_mac(KEY, NS, ND)) == 32


def test_macs_differ_by_role() -> None:
    assert auth.dest_mac(KEY, NS, ND) != auth.source_mac(KEY, NS, ND)
    # A reflected reply (the dest's proof replayed as the source's, even with
    # the nonces swapped to match the other side's ordering) does not verify.
    assert auth.dest_mac(KEY, ND, NS) != auth.source_mac(KEY, NS, ND)
    assert auth.source_mac(KEY, ND, NS) != auth.dest_mac(KEY, NS, ND)


def test_macs_differ_by_nonce_order() -> None:
    assert auth.dest_mac(KEY, NS, ND) != auth.dest_mac(KEY, ND, NS)
    assert auth.source_mac(KEY, NS, ND) != auth.source_mac(KEY, ND, NS)


def test_macs_differ_by_nonce_and_key() -> None:
    other = bytes(32)
    assert auth.dest_mac(KEY, NS, ND) != auth.dest_mac(KEY, other, ND)
    assert auth.dest_mac(KEY, NS, ND) != auth.dest_mac(KEY, NS, other)
    assert auth.dest_mac(KEY, NS, ND) != auth.dest_mac(KEY[::-1], NS, ND)


def test_verify() -> None:
    good = auth.source_mac(KEY, NS, ND)
    assert auth.verify(good, bytes(good))
    flipped = bytearray(good)
    flipped[-1] ^= 1
    assert not auth.verify(good, bytes(flipped))
    assert not auth.verify(good, good[:-1])
    assert not auth.verify(good, b"")
    assert not auth.verify(good, auth.source_mac(b"x" * 32, NS, ND))
    assert not auth.verify(good, auth.dest_mac(KEY, NS, ND))


def test_load_key_strips_whitespace(tmp_path: Path) -> None:
    p = tmp_path / "key"
    p.write_bytes(b"  " + KEY + b"\n")
    p.chmod(0o600)
    assert auth.load_key(p) == KEY
    assert auth.load_key(str(p)) == KEY


def test_load_key_accepts_exactly_16_bytes(tmp_path: Path) -> None:
    p = tmp_path / "key"
    p.write_bytes(b"k" * 16 + b"\n")
    p.chmod(0o600)
    assert auth.load_key(p) == b"k" * 16


@pytest.mark.parametrize("content", [b"", b"\n", b"k" * 15, b"k" * 15 + b"\n\n   ", b"   short   \n"])
def test_load_key_rejects_short_keys(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "key"
    p.write_bytes(content)
    p.chmod(0o600)
    with pytest.raises(AuthError, match="at least 16") as info:
        auth.load_key(p)
    assert info.value.code is AbortCode.AUTH
    assert str(p) in str(info.value)


def test_load_key_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope"
    with pytest.raises(AuthError, match="cannot read") as info:
        auth.load_key(p)
    assert info.value.code is AbortCode.AUTH
    assert str(p) in str(info.value)


def test_load_key_directory(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="cannot read"):
        auth.load_key(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_key_unreadable(tmp_path: Path) -> None:
    p = tmp_path / "key"
    p.write_bytes(KEY)
    p.chmod(0o600)
    p.chmod(0)
    with pytest.raises(AuthError, match="cannot read"):
        auth.load_key(p)
