"""The wire protocol, with no I/O: framing, messages, the phase table, authentication, payload compression.

This package is the protocol's public face: code outside it imports the
connection, the events and the limits from here (``from precopy.protocol
import Connection, Pages, PAGE_SIZE``), never from the module that happens
to hold them, so the layout inside can change without touching a caller.

Inside: :mod:`~precopy.protocol.limits` (version, page size, frame prefix,
every limit), :mod:`~precopy.protocol.messages` (kinds, roles, events),
:mod:`~precopy.protocol.framing` (frames, payload checks),
:mod:`~precopy.protocol.codec` (events to fields and back, every field
checked), :mod:`~precopy.protocol.phases` (the phase table: which frame may
come when), :mod:`~precopy.protocol.connection` (the sans-IO
:class:`Connection` that ties them together), :mod:`~precopy.protocol.auth`
(the key handshake's MACs) and :mod:`~precopy.protocol.compress` (per-batch
lz4).
"""

from __future__ import annotations

from precopy.protocol.codec import page_digest_limit, valid_name, whole_chunks
from precopy.protocol.connection import NEED_DATA, Connection
from precopy.protocol.framing import encode_frame, page_payload, payload_nbytes
from precopy.protocol.limits import (
    MAX_BATCH_PAGES,
    MAX_DEVICE_STATE,
    MAX_META,
    MAX_PAGE_DIGEST_CHUNKS,
    MAX_PAYLOAD,
    MAX_REGION,
    MAX_REQUIREMENTS,
    MAX_STREAMS,
    PAGE_SIZE,
    PROTOCOL_VERSION,
)
from precopy.protocol.messages import (
    Abort,
    Auth,
    AuthOk,
    Begin,
    Commit,
    Committed,
    DeviceState,
    DigestRequest,
    DigestTable,
    Event,
    Hello,
    HelloAck,
    Join,
    Joined,
    Kind,
    Outcome,
    Pages,
    Query,
    Queued,
    Ready,
    Role,
    Switchover,
    Sync,
)
from precopy.protocol.messages import POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP, POSTCOPY_LANE_CAP, Complete, Missing, Postcopy, Request, Resume
from precopy.protocol.phases import Phase

__all__ = [
    "MAX_BATCH_PAGES",
    "MAX_DEVICE_STATE",
    "MAX_META",
    "MAX_PAGE_DIGEST_CHUNKS",
    "MAX_PAYLOAD",
    "MAX_REGION",
    "MAX_REQUIREMENTS",
    "MAX_STREAMS",
    "NEED_DATA",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "Abort",
    "Auth",
    "AuthOk",
    "Begin",
    "Commit",
    "Committed",
    "Connection",
    "DeviceState",
    "DigestRequest",
    "DigestTable",
    "Event",
    "Hello",
    "HelloAck",
    "Join",
    "Joined",
    "Kind",
    "Outcome",
    "Pages",
    "Phase",
    "Query",
    "Queued",
    "Ready",
    "Role",
    "Switchover",
    "Sync",
    "encode_frame",
    "page_digest_limit",
    "page_payload",
    "payload_nbytes",
    "valid_name",
    "whole_chunks",
    "POSTCOPY_CAP",
    "POSTCOPY_IMMEDIATE_CAP",
    "POSTCOPY_LANE_CAP",
    "Complete",
    "Missing",
    "Postcopy",
    "Request",
    "Resume",
]
