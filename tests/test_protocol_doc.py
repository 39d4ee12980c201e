"""docs/PROTOCOL.md stays true to the protocol code (precopy/protocol/: limits, messages, phases)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from precopy.errors import AbortCode
from precopy.protocol import MAX_META, MAX_PAYLOAD, PROTOCOL_VERSION, Kind
from precopy.protocol import auth
from precopy.protocol.phases import TRANSITIONS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()


def test_every_transition_is_documented_and_nothing_else() -> None:
    rows = {f"| {ph.value} | {sender.value} | {kind.name} | {nxt.value} |"
            for (ph, sender, kind), nxt in TRANSITIONS.items()}
    documented = {line.strip() for line in DOC.splitlines()
                  if line.startswith("| ") and line.count("|") == 5 and "phase" not in line
                  and "---" not in line and any(k.name in line for k in Kind)}
    assert rows == documented


def test_every_kind_and_abort_code_is_documented() -> None:
    for kind in Kind:
        assert f"| {kind.name} | {int(kind)} |" in DOC, kind
    for code in AbortCode:
        assert f"{int(code)} {code.name}" in DOC, code


def test_limits_match() -> None:
    assert f"meta_len     (<= {MAX_META:,}" in DOC
    assert f"payload_len  (<= {MAX_PAYLOAD:,}" in DOC


def test_the_documented_macs_are_the_ones_computed() -> None:
    """The key handshake's MAC formulas, as docs/PROTOCOL.md writes them, give auth's MACs."""
    assert f"# The precopy wire protocol (version {PROTOCOL_VERSION})" in DOC
    key, ns, nd = b"k" * 32, bytes(range(32)), bytes(range(32, 64))
    label = f"precopy/{PROTOCOL_VERSION}".encode()
    assert f'HMAC-SHA256(key, "{label.decode()}/dest/" +\nsource_nonce + dest_nonce)' in DOC
    assert f'HMAC-SHA256(key, "{label.decode()}/source/"\n+ dest_nonce + source_nonce)' in DOC
    assert auth.dest_mac(key, ns, nd) == hmac.new(key, label + b"/dest/" + ns + nd, hashlib.sha256).digest()
    assert auth.source_mac(key, ns, nd) == hmac.new(key, label + b"/source/" + nd + ns, hashlib.sha256).digest()
