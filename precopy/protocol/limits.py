"""The protocol's numbers: version, page size, the frame prefix, and every limit a peer is held to.

Frame layout (little endian)::

    magic "PC" | kind u8 | flags u8 | meta_len u32 | payload_len u32 | meta | payload

docs/PROTOCOL.md states these limits; tests/test_protocol_doc.py checks it.
"""

from __future__ import annotations

import struct
from typing import Final

PROTOCOL_VERSION: Final = 3
PAGE_SIZE: Final = 4096
MAGIC: Final = b"PC"
PREFIX = struct.Struct("<2sBBII")
PREFIX_SIZE: Final = PREFIX.size  # 12

#: Largest msgpack header a peer may declare.  Batches carry their page
#: numbers here (4 bytes a page), digest tables travel in the payload.
MAX_META: Final = 64 * 1024
#: Largest payload of one frame: a batch of MAX_BATCH_PAGES raw pages.
MAX_BATCH_PAGES: Final = 1024
MAX_PAYLOAD: Final = MAX_BATCH_PAGES * PAGE_SIZE
#: Largest region a migration may declare (1 TiB) and smallest chunk.
MAX_REGION: Final = 1 << 40
#: Largest device-state blob carried to the destination (256 MiB).
MAX_DEVICE_STATE: Final = 256 * 1024 * 1024
#: At most this many guest requirements in one BEGIN.
MAX_REQUIREMENTS: Final = 16
MAX_NAME: Final = 128
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
#: Longest precopy version HELLO and HELLO_ACK may announce (``software``).
MAX_SOFTWARE: Final = 64
#: Most migrations a QUEUED frame may count (positions, active, limit).
MAX_QUEUE: Final = 1 << 16
#: Most capabilities a HELLO or HELLO_ACK may name (``caps``), each at most 32 characters.
MAX_CAPS: Final = 16
#: Most pages one post-copy REQUEST may name.
MAX_REQUEST_PAGES: Final = 1024
#: Most resume steps a COMMITTED frame's ``timings`` may name.
MAX_TIMINGS: Final = 16
#: Most connections one migration may use (BEGIN/READY ``streams``).
MAX_STREAMS: Final = 64
#: Chunks one DIGEST_REQUEST may ask page digests of (their numbers fill at
#: most 32 KiB of the header; the answer is also bounded by MAX_PAYLOAD).
MAX_PAGE_DIGEST_CHUNKS: Final = 8192

#: Receive buffer of a connection still in the handshake: room for two of
#: the largest headers, not the ~8 MiB a copying connection uses, so idle
#: or hostile unauthenticated peers cost little memory.
HANDSHAKE_BUFFER: Final = 2 * (PREFIX_SIZE + MAX_META)
