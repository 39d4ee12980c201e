"""Coverage-guided fuzzing of the wire decoder with atheris (libFuzzer).

Run directly (``python tests/atheris_wire.py -runs=100000``) or through
``tests/test_fuzz_session.py::test_atheris_decoder``.  Each input is split by
its first byte into a phase choice and a byte stream: the stream goes to a
DEST connection in the handshake (unauthenticated) or copying phase, then
EOF.  Only RemoteProtocolError may escape; decoded batches must lie inside
the region and inflate to exactly their declared size.  The seed corpus is
valid frames, so libFuzzer starts from real traffic.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["precopy"]):
    from precopy.protocol import PAGE_SIZE, Begin, Connection, Role

from tests import fuzzkit  # noqa: E402

BEGIN = Begin(migration_id="fz", name="fz", size=64 * PAGE_SIZE, chunk_pages=8)
STATS = fuzzkit.Stats()
_COPYING = fuzzkit.copying_dest(BEGIN)
_SNAPSHOT = (_COPYING.phase, _COPYING.begin, tuple(_COPYING._expected_tables))


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        dst = Connection(Role.DEST)  # unauthenticated: handshake phase
    else:
        dst = fuzzkit._reset(_COPYING, _SNAPSHOT)
    fuzzkit.feed_decoder(dst, body, (mode >> 1) * 37 % (len(body) + 1), BEGIN.npages, STATS)
    STATS.frames += 1


def write_seeds(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(20):
        frames = fuzzkit.transcript(rng, BEGIN, key=None)
        (corpus / f"copy{i}").write_bytes(b"\x00" + b"".join(frames[3:6]))
        (corpus / f"hs{i}").write_bytes(b"\x01" + b"".join(frames[:3]))


if __name__ == "__main__":
    args = sys.argv[1:]
    corpus = [a for a in args if not a.startswith("-")]
    if corpus and not any(Path(c).exists() and any(Path(c).iterdir()) for c in corpus
                          if Path(c).exists()):
        write_seeds(Path(corpus[0]))
    atheris.Setup([sys.argv[0], *args], one_input)
    atheris.Fuzz()
