"""The bytes on the wire, pinned: one frame of every kind (and of each field variant) as it goes out.

The expected bytes were made by the protocol module before issue 19 split it
(``precopy/protocol/wire.py`` at b649119): a refactoring that changes one
byte of a frame fails here, whatever the round-trip tests say.  Each entry
is the frame's prefix and msgpack header in hex, and the SHA-256 of its
payload ("" for none).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from precopy.protocol import (
    Abort,
    Auth,
    AuthOk,
    Begin,
    Commit,
    Committed,
    Complete,
    DeviceState,
    DigestRequest,
    DigestTable,
    Event,
    Hello,
    HelloAck,
    Join,
    Joined,
    Missing,
    Outcome,
    Pages,
    Postcopy,
    Query,
    Queued,
    Ready,
    Request,
    Resume,
    Switchover,
    Sync,
    encode_frame,
)
from precopy.protocol.codec import encode_event


def u32(*a: int) -> np.ndarray:
    return np.array(a, dtype=np.uint32)


EVENTS: dict[str, Event] = {
    "HELLO": Hello(3, bytes(range(32))),
    "HELLO_ACK": HelloAck(3, bytes(range(32, 64)), b"m" * 32),
    "AUTH": Auth(mac=b"a" * 32),
    "AUTH_OK": AuthOk(),
    "BEGIN": Begin(migration_id="mig-1", name="guest", size=64 * 4096, chunk_pages=8),
    "BEGIN_WAIT": Begin(migration_id="mig-1", name="guest", size=64 * 4096, chunk_pages=8, dry_run=True,
                        requires={"cpu_flags": ("avx2", "sse4_2")}, wait=True),
    "READY": Ready(existing=True),
    "QUEUED": Queued(position=2, active=1, limit=4),
    "PAGES": Pages(indices=u32(1, 7), zeros=u32(3), payload=bytes(range(256)) * 32, checksum=12345678901234567890),
    "PAGES_UNCHECKED": Pages(indices=u32(9), zeros=u32(), payload=b"\x01" * 4096, checksum=None),
    "PAGES_CHUNKS": Pages(indices=np.arange(8, 16, dtype=np.uint32), zeros=u32(), payload=b"\x02" * 8 * 4096,
                          checksum=0, chunk_digests=np.array([0xDEADBEEF], dtype=np.uint64)),
    "DIGEST_REQUEST": DigestRequest(seq=5, final=True, pages_of=u32(0, 3)),
    "DIGEST_REQUEST_BP": DigestRequest(seq=6, by_page=True),
    "DIGEST_TABLE": DigestTable(seq=5, digests=np.arange(8, dtype=np.uint64) * 0x0101010101010101, others=3),
    "SWITCHOVER": Switchover(),
    "DEVICE_STATE": DeviceState(offset=0, total=10, data=b"devicestat"),
    "COMMIT": Commit(migration_id="mig-1", checksum=2**64 - 1),
    "COMMITTED": Committed(migration_id="mig-1", resumed=True, timings={"qemu_load": 12.5}),
    "QUERY": Query(migration_id="mig-1"),
    "OUTCOME": Outcome(migration_id="mig-1", committed=False, known=True),
    "ABORT": Abort(code=8, reason="did not converge"),
    # Issue 21 (streams): new optional fields and kinds; the frames above are unchanged.
    "BEGIN_STREAMS": Begin(migration_id="mig-1", name="guest", size=64 * 4096, chunk_pages=8, streams=4),
    "READY_STREAMS": Ready(streams=3),
    "JOIN": Join(migration_id="mig-1", stream=2, size=64 * 4096, chunk_pages=8),
    "JOINED": Joined(),
    "SYNC": Sync(counts=(7, 0, 300)),
    # Post-copy (issue 22): new kinds and HELLO's optional caps, pinned as they were first sent.
    "HELLO_CAPS": Hello(3, bytes(range(32)), caps=("postcopy",)),
    "HELLO_ACK_CAPS": HelloAck(3, bytes(range(32, 64)), b"m" * 32, caps=("postcopy",)),
    "MISSING": Missing(offset=0, total=8, data=bytes([0x81, 0, 0, 0, 0, 0, 0, 0x80])),
    "POSTCOPY": Postcopy(migration_id="mig-1", checksum=2**64 - 1),
    "REQUEST": Request(indices=u32(3, 9)),
    "COMPLETE": Complete(migration_id="mig-1", pages=12),
    "RESUME": Resume(begin=Begin(migration_id="mig-1", name="guest", size=64 * 4096, chunk_pages=8)),
    # The fault lane's lean frames, negotiated (lat22b): JOIN and JOINED ``fast``; JOINED above unchanged.
    "JOIN_LANE_FAST": Join(migration_id="mig-1", stream=0, size=64 * 4096, chunk_pages=8, lane=True, fast=True),
    "JOINED_FAST": Joined(fast=True),
}

#: name -> (prefix and header in hex, SHA-256 of the payload or "").
GOLDEN: dict[str, tuple[str, str]] = {
    "HELLO": (
        "50430100320000000000000082a776657273696f6e03a56e6f6e6365c42000010203040506070809"
        "0a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "",
    ),
    "HELLO_ACK": (
        "50430200580000000000000083a776657273696f6e03a56e6f6e6365c42020212223242526272829"
        "2a2b2c2d2e2f303132333435363738393a3b3c3d3e3fa36d6163c4206d6d6d6d6d6d6d6d6d6d6d6d"
        "6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d",
        "",
    ),
    "AUTH": (
        "50430300270000000000000081a36d6163c420616161616161616161616161616161616161616161"
        "6161616161616161616161",
        "",
    ),
    "AUTH_OK": (
        "50430400010000000000000080",
        "",
    ),
    "BEGIN": (
        "50430500560000000000000087ac6d6967726174696f6e5f6964a56d69672d31a46e616d65a56775"
        "657374a473697a65ce00040000a9706167655f73697a65cd1000ab6368756e6b5f706167657308a7"
        "6472795f72756ec2a8726571756972657380",
        "",
    ),
    "BEGIN_WAIT": (
        "50430500730000000000000088ac6d6967726174696f6e5f6964a56d69672d31a46e616d65a56775"
        "657374a473697a65ce00040000a9706167655f73697a65cd1000ab6368756e6b5f706167657308a7"
        "6472795f72756ec3a8726571756972657381a96370755f666c61677392a461767832a6737365345f"
        "32a477616974c3",
        "",
    ),
    "READY": (
        "504306000b0000000000000081a86578697374696e67c3",
        "",
    ),
    "BEGIN_STREAMS": (
        "504305005f0000000000000088ac6d6967726174696f6e5f6964a56d69672d31a46e616d65a56775657374a473697a65"
        "ce00040000a9706167655f73697a65cd1000ab6368756e6b5f706167657308a76472795f72756ec2a872657175697265"
        "7380a773747265616d7304",
        "",
    ),
    "READY_STREAMS": (
        "50430600140000000000000082a86578697374696e67c2a773747265616d7303",
        "",
    ),
    "JOIN": (
        "50431200330000000000000084ac6d6967726174696f6e5f6964a56d69672d31a673747265616d02a473697a65ce0004"
        "0000ab6368756e6b5f706167657308",
        "",
    ),
    "JOINED": ("50431300010000000000000080", ""),
    "SYNC": ("50431400090000000000000081a16e930700cd012c", ""),
    "QUEUED": (
        "504311001a0000000000000083a8706f736974696f6e02a661637469766501a56c696d697404",
        "",
    ),
    "PAGES": (
        "50430700230000000020000084a169c4080100000007000000a17ac40403000000a16300a168cfab"
        "54a98ceb1f0ad2",
        "dc404a613fedaeb54034514bc6505f56b933caa5250299ba7d094377a51caa46",
    ),
    "PAGES_UNCHECKED": (
        "50430700100000000010000083a169c40409000000a17ac400a16300",
        "3431383721510cf1c211de027cf958c183e16db5fabb6b230eb284c85e196aa9",
    ),
    "PAGES_CHUNKS": (
        "504307003c0000000080000085a169c42008000000090000000a0000000b0000000c0000000d0000"
        "000e0000000f000000a17ac400a16300a16800a26364c408efbeadde00000000",
        "62cf8692ad10b68267c76eea240b82b5c74ac85a73885f361f95dd5fd4717018",
    ),
    "DIGEST_REQUEST": (
        "50430800190000000000000083a373657105a566696e616cc3a170c4080000000003000000",
        "",
    ),
    "DIGEST_REQUEST_BP": (
        "50430800110000000000000083a373657106a566696e616cc2a26270c3",
        "",
    ),
    "DIGEST_TABLE": (
        "50430900070000004000000082a17305a16f03",
        "8c979abb04568b162d94adbe559af67ce5d3e6c2c2e3af97e525ba5484663763",
    ),
    "SWITCHOVER": (
        "50430a00010000000000000080",
        "",
    ),
    "DEVICE_STATE": (
        "50430b00070000000a00000082a16f00a1740a",
        "f9ee7097311114c66129e855e741dc950534d7242531b0e04921c92f76c1aa32",
    ),
    "COMMIT": (
        "50430c00260000000000000082ac6d6967726174696f6e5f6964a56d69672d31a8636865636b7375"
        "6dcfffffffffffffffff",
        "",
    ),
    "COMMITTED": (
        "50430d00390000000000000083ac6d6967726174696f6e5f6964a56d69672d31a7726573756d6564"
        "c3a774696d696e677381a971656d755f6c6f6164cb4029000000000000",
        "",
    ),
    "QUERY": (
        "50430e00140000000000000081ac6d6967726174696f6e5f6964a56d69672d31",
        "",
    ),
    "OUTCOME": (
        "50430f00260000000000000083ac6d6967726174696f6e5f6964a56d69672d31a9636f6d6d697474"
        "6564c2a56b6e6f776ec3",
        "",
    ),
    "ABORT": (
        "504310001f0000000000000082a4636f646508a6726561736f6eb0646964206e6f7420636f6e7665"
        "726765",
        "",
    ),
    "HELLO_CAPS": (
        "50430100410000000000000083a776657273696f6e03a56e6f6e6365c42000010203040506070809"
        "0a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa46361707391a8706f7374636f7079",
        "",
    ),
    "HELLO_ACK_CAPS": (
        "50430200670000000000000084a776657273696f6e03a56e6f6e6365c42020212223242526272829"
        "2a2b2c2d2e2f303132333435363738393a3b3c3d3e3fa36d6163c4206d6d6d6d6d6d6d6d6d6d6d6d"
        "6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6da46361707391a8706f7374636f7079",
        "",
    ),
    "MISSING": (
        "50431500070000000800000082a16f00a17408",
        "84961d14a797dc8ce78ba6eeeb860352c71433908e0ea80649af006106f84581",
    ),
    "POSTCOPY": (
        "50431600260000000000000082ac6d6967726174696f6e5f6964a56d69672d31a8636865636b7375"
        "6dcfffffffffffffffff",
        "",
    ),
    "REQUEST": (
        "504317000d0000000000000081a169c4080300000009000000",
        "",
    ),
    "COMPLETE": (
        "504318001b0000000000000082ac6d6967726174696f6e5f6964a56d69672d31a570616765730c",
        "",
    ),
    "JOIN_LANE_FAST": (
        "504312003f0000000000000086ac6d6967726174696f6e5f6964a56d69672d31a673747265616d00a473697a65ce0004"
        "0000ab6368756e6b5f706167657308a46c616e65c3a466617374c3",
        "",
    ),
    "JOINED_FAST": ("50431300070000000000000081a466617374c3", ""),
    "RESUME": (
        "50431900430000000000000085ac6d6967726174696f6e5f6964a56d69672d31a46e616d65a56775"
        "657374a473697a65ce00040000a9706167655f73697a65cd1000ab6368756e6b5f706167657308",
        "",
    ),
}


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_a_frame_is_the_same_bytes_as_before_the_split(name: str) -> None:
    bufs = encode_frame(*encode_event(EVENTS[name]))
    head, payload = bytes(bufs[0]), b"".join(bytes(b) for b in bufs[1:])
    want_head, want_payload = GOLDEN[name]
    assert head.hex() == want_head
    assert (hashlib.sha256(payload).hexdigest() if payload else "") == want_payload


def test_every_event_class_is_pinned() -> None:
    assert {type(ev) for ev in EVENTS.values()} == set(Event.__args__)  # type: ignore[attr-defined]
    assert set(GOLDEN) == set(EVENTS)


def test_the_lane_s_lean_frames_are_pinned() -> None:
    """LANE_REQUEST and LANE_PAGES (precopy.protocol.lane_frames): no msgpack, fixed layouts."""
    from precopy.protocol import lane_frames as lf

    out = bytearray(lf.REQUEST_BUF_SIZE)
    n = lf.pack_request([3, 9], out)
    assert bytes(out[:n]).hex() == "50431a0000000000080000000300000009000000"
    head, bufs = bytearray(lf.PAGES_HEAD_SIZE), []  # type: ignore[var-annotated]
    n = lf.pack_pages([2, 7], [memoryview(bytes(4096)), memoryview(bytes([5]) * 4096)], head, bufs)
    frame = b"".join(bytes(b) for b in bufs)
    assert n == len(frame) == 12 + 2 * 16 + 4096
    # prefix (kind 27, payload 4128), page 2 zero (flag 1, digest 0), page 7 (digest), its bytes
    assert frame[:44].hex() == ("50431b000000000020100000" "0200000001000000" "0000000000000000"
                                "0700000000000000" "5f02168006ec61a9")
    assert hashlib.sha256(frame).hexdigest() == "3a7cd263333a39930b054463e677f000b6642cd6664a9ba17c9302a0fbc22e72"
