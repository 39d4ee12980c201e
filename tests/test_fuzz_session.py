"""Hostile input: the wire decoder and the destination session under fuzzing.

Budgets (frames per CI run) are set by ``PRECOPY_FUZZ_FRAMES`` (decoder,
default 150,000) and ``PRECOPY_FUZZ_SESSION_FRAMES`` (destination session,
default 20,000); the seed by ``PRECOPY_FUZZ_SEED`` (default: fixed, so a
failure reproduces).  Run with ``-s`` to see frames/s.

What must hold for every input: no exception other than the documented
protocol errors (precopy.errors), nothing written outside the region (the
memory directory holds a complete region equal to the batches sent, or
nothing), and bounded memory (tracemalloc) for decompression bombs, huge
declared lengths, page counts and device-state sizes.
"""

from __future__ import annotations

import asyncio
import os
import random
import tracemalloc
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import precopy.protocol.auth
from precopy.session.destination import DestinationServer, DestOptions
from precopy.errors import RemoteProtocolError
from precopy.protocol import (
    MAX_BATCH_PAGES,
    MAX_DEVICE_STATE,
    MAX_META,
    MAX_PAYLOAD,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Begin,
    Connection,
    Kind,
    Pages,
    Role,
    encode_frame,
)
from precopy.protocol.limits import HANDSHAKE_BUFFER, PREFIX

from . import fuzzkit
from .fuzzkit import KEY, check_after_session, fuzz_decoder, run_session, transcript

MiB = 1 << 20
SEED = int(os.environ.get("PRECOPY_FUZZ_SEED", "20261122"))
DECODER_FRAMES = int(os.environ.get("PRECOPY_FUZZ_FRAMES", "150000"))
SESSION_FRAMES = int(os.environ.get("PRECOPY_FUZZ_SESSION_FRAMES", "20000"))
NPAGES = 64
BEGIN = Begin(migration_id="fz", name="fz", size=NPAGES * PAGE_SIZE, chunk_pages=8)


def _join(bufs: list[Any]) -> bytes:
    return fuzzkit.join(bufs)


# --------------------------------------------------------------------------
# The decoder


def test_fuzz_decoder_mutation_loop() -> None:
    stats = fuzz_decoder(SEED, DECODER_FRAMES, BEGIN)
    print(f"\ndecoder fuzz: {stats.frames} frames in {stats.inputs} inputs, {stats.seconds:.1f} s "
          f"({stats.frames_per_s:,.0f} frames/s); {stats.events} events, {stats.pages_ok} batches "
          f"written-ready, {stats.rejected} inputs rejected; {stats.outcomes}")
    assert stats.frames >= DECODER_FRAMES
    # Not vacuous: good batches decode and reach page_payload, bad ones are seen.
    assert stats.pages_ok > stats.inputs // 20
    assert stats.rejected > stats.inputs // 20
    for kind in ("Pages", "DigestRequest", "Switchover", "DeviceState", "Commit"):
        assert stats.outcomes.get(kind, 0) > 0, kind


def test_fuzz_source_decoder_against_a_hostile_destination() -> None:
    budget = DECODER_FRAMES
    stats = fuzzkit.fuzz_source_decoder(SEED, budget, BEGIN)
    print(f"\nsource decoder fuzz: {stats.frames} frames in {stats.seconds:.1f} s "
          f"({stats.frames_per_s:,.0f} frames/s); {stats.outcomes}")
    assert stats.frames >= budget
    for kind in ("HelloAck", "AuthOk", "Ready", "DigestTable", "Committed", "Outcome", "Abort", "rejected"):
        assert stats.outcomes.get(kind, 0) > 0, kind


# --------------------------------------------------------------------------
# The destination session, in process, no sockets


@pytest.fixture
def fixed_dest_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination's nonce is fixed so a keyed transcript can be precomputed."""
    monkeypatch.setattr(precopy.protocol.auth, "new_nonce", lambda: fuzzkit.DEST_NONCE)


async def _server(shm: Path, **kw: Any) -> DestinationServer:
    kw.setdefault("populate", False)
    kw.setdefault("max_region", 4 * MiB)
    kw.setdefault("idle_timeout_s", 5.0)
    server = DestinationServer(DestOptions(memory_dir=shm / "mem", state_dir=shm / "state", port=0,
                                           auth_key=KEY, **kw))
    await server.start()
    return server


def _begin(n: int, rng: random.Random) -> Begin:
    npages = rng.choice([1, 7, 64, 65])
    return Begin(migration_id=f"fz{n}", name=f"r{n % 7}", size=npages * PAGE_SIZE,
                 chunk_pages=rng.choice([1, 8, 64]))


async def _fuzz_sessions(shm: Path, seed: int, budget: int) -> fuzzkit.SessionStats:
    rng = random.Random(seed)
    server = await _server(shm)
    stats = fuzzkit.SessionStats()
    corpus: list[bytes] = []
    for i in range(30):
        corpus.extend(transcript(rng, _begin(10_000 + i, rng), key=KEY))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        n = 0
        while stats.frames < budget:
            n += 1
            frames = transcript(rng, _begin(n, rng), key=KEY)
            r = rng.random()
            if r < 0.1:
                pass  # a valid migration (keeps the commit path covered)
            elif r < 0.25:
                # Hostile before authentication: any handshake frame may be mutated.
                frames = fuzzkit.mutate_sequence(rng, frames, corpus)
            else:
                frames = fuzzkit.mutate_sequence(rng, frames, corpus, keep_prefix=3)
            # Reads of odd sizes split frames anywhere; byte-at-a-time is rare (slow).
            sizes = [1, 7] if rng.random() < 0.03 else [12, 100, 4096, 65536, 1 << 20]
            pieces = [rng.choice(sizes) for _ in range(3)]
            outcome, chan = await run_session(server, frames, pieces)
            check_after_session(server, outcome, chan, "")
            stats.sessions += 1
            stats.frames += len(frames)
            if outcome == "committed":
                stats.committed += 1
            else:
                stats.rejected += 1
                stats.errors[outcome] = stats.errors.get(outcome, 0) + 1
    finally:
        stats.seconds = loop.time() - t0
        await server.close()
    return stats


async def test_fuzz_destination_sessions(shm: Path, fixed_dest_nonce: None) -> None:
    stats = await _fuzz_sessions(shm, SEED, SESSION_FRAMES)
    print(f"\nsession fuzz: {stats.frames} frames in {stats.sessions} sessions, {stats.seconds:.1f} s "
          f"({stats.frames_per_s:,.0f} frames/s); {stats.committed} committed; {stats.errors}")
    assert stats.frames >= SESSION_FRAMES
    assert stats.committed >= stats.sessions // 20  # the valid path is exercised, and verified
    assert stats.rejected >= stats.sessions // 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.randoms(use_true_random=False), st.lists(st.integers(1, 70000), min_size=1, max_size=3))
def test_fuzz_destination_sessions_hypothesis(shm: Path, fixed_dest_nonce: None, rnd: random.Random,
                                              pieces: list[int]) -> None:
    """Hypothesis drives the same mutators (its choices shrink on a failure)."""

    async def go() -> None:
        server = await _server(shm)
        try:
            n = rnd.randrange(1 << 30)
            frames = transcript(rnd, _begin(n, rnd), key=KEY)
            frames = fuzzkit.mutate_sequence(rnd, frames, frames, keep_prefix=rnd.choice([0, 3]))
            outcome, chan = await run_session(server, frames, pieces)
            check_after_session(server, outcome, chan, "")
        finally:
            await server.close()

    asyncio.run(go())


async def test_session_harness_commits_valid_transcripts(shm: Path, fixed_dest_nonce: None) -> None:
    """Guard against a vacuous fuzz: unmutated transcripts commit byte-exact;
    a wrong key, a page outside the region and a bad checksum are rejected."""
    rng = random.Random(1)
    server = await _server(shm)
    try:
        for n in range(5):
            outcome, chan = await run_session(server, transcript(rng, _begin(n, rng), key=KEY), [65536])
            assert outcome == "committed"
            check_after_session(server, outcome, chan, "")
        frames = transcript(rng, _begin(99, rng), key=b"another-key-0123456789abcdef")
        outcome, chan = await run_session(server, frames, [4096])
        assert outcome == "rejected: AuthError"
        check_after_session(server, outcome, chan, "")
        b = Begin(migration_id="out", name="out", size=4 * PAGE_SIZE, chunk_pages=1)
        frames = transcript(rng, b, key=KEY)[:3]
        page = bytes(PAGE_SIZE)
        for idx, checksum in (([4], xxhash.xxh3_64_intdigest(page)), ([3], 1)):
            bad = _join(encode_frame(Kind.PAGES, {"i": np.asarray(idx, "<u4").tobytes(), "z": b"", "c": 0,
                                                  "h": checksum}, page))
            outcome, chan = await run_session(server, [*frames, bad], [100])
            assert outcome == "rejected: RemoteProtocolError", outcome
            check_after_session(server, outcome, chan, "")
            frames = transcript(rng, Begin(migration_id=f"out{idx[0]}", name="out", size=4 * PAGE_SIZE,
                                           chunk_pages=1), key=KEY)[:3]
    finally:
        await server.close()


# --------------------------------------------------------------------------
# Bounded memory


def _peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _pages_frame(indices: list[int], payload: bytes, checksum: int, compressed: int = 1) -> bytes:
    meta = {"i": np.asarray(indices, "<u4").tobytes(), "z": b"", "c": compressed, "h": checksum}
    return _join(encode_frame(Kind.PAGES, meta, payload))


def test_lz4_bomb_inflates_no_further_than_the_batch_declares() -> None:
    """A 1-page batch whose lz4 block inflates to 4 MiB: refused, ~4 KiB allocated."""
    bomb_raw = bytes(MAX_PAYLOAD)
    bomb = lz4.block.compress(bomb_raw, store_size=False)  # ~16 KiB on the wire
    assert len(bomb) < 20_000
    dst = fuzzkit.copying_dest(BEGIN)
    dst.receive_data(_pages_frame([1], bomb, xxhash.xxh3_64_intdigest(bomb_raw)))
    ev = dst.next_event()
    assert isinstance(ev, Pages)

    def inflate() -> None:
        with pytest.raises(RemoteProtocolError, match="does not inflate"):
            fuzzkit.page_payload(ev)

    assert _peak(inflate) < 256 * 1024
    # Also with a size prefix that lies (store_size=True claims 4 MiB).
    lying = lz4.block.compress(bomb_raw, store_size=True)
    dst = fuzzkit.copying_dest(BEGIN)
    dst.receive_data(_pages_frame([2], lying, 0))
    ev = dst.next_event()
    assert isinstance(ev, Pages)

    def inflate2() -> None:
        with pytest.raises(RemoteProtocolError):
            fuzzkit.page_payload(ev)

    assert _peak(inflate2) < 256 * 1024


def test_declared_lengths_and_counts_never_allocate_beyond_the_limits() -> None:
    big = Begin(migration_id="b", name="b", size=1 << 30, chunk_pages=64)

    def hostile() -> None:
        # 64 KiB header naming 16384 pages (over MAX_BATCH_PAGES): refused.
        dst = fuzzkit.copying_dest(big)
        meta = {"i": np.arange(16000, dtype="<u4").tobytes(), "z": b"", "c": 0, "h": 0}
        dst.receive_data(_join(encode_frame(Kind.PAGES, meta, b"")))
        with pytest.raises(RemoteProtocolError, match=f"exceeds {MAX_BATCH_PAGES}"):
            dst.next_event()
        # Lengths far past the limits: refused from the 12-byte prefix.
        for meta_len, payload_len in ((MAX_META + 1, 0), (0, MAX_PAYLOAD + 1), (2**32 - 1, 2**32 - 1)):
            dst = fuzzkit.copying_dest(big)
            dst.receive_data(PREFIX.pack(b"PC", int(Kind.PAGES), 0, meta_len, payload_len))
            with pytest.raises(RemoteProtocolError, match="exceeds"):
                dst.next_event()

    # Two connections' receive buffers (~8 MiB each) plus the 64 KiB header.
    assert _peak(hostile) < 2 * (MAX_PAYLOAD + MAX_META) * 2 + 4 * MiB


def test_unauthenticated_peer_gets_a_small_buffer_and_no_large_body() -> None:
    def pre_auth() -> list[Connection]:
        conns = []
        for kind, payload_len in ((Kind.PAGES, MAX_PAYLOAD), (Kind.HELLO, MAX_PAYLOAD),
                                  (Kind.DEVICE_STATE, 1), (Kind.BEGIN, 0)):
            c = Connection(Role.DEST)
            c.receive_data(PREFIX.pack(b"PC", int(kind), 0, 100, payload_len))
            with pytest.raises(RemoteProtocolError):
                c.next_event()
            assert len(c.get_buffer(1)) <= HANDSHAKE_BUFFER
            conns.append(c)
        # A legal HELLO that is still arriving keeps the small buffer too.
        c = Connection(Role.DEST)
        hello = _join(encode_frame(Kind.HELLO, {"version": PROTOCOL_VERSION, "nonce": bytes(32)}))
        c.receive_data(hello[:20])
        c.next_event()
        assert len(c.get_buffer(1)) <= HANDSHAKE_BUFFER
        conns.append(c)
        return conns

    # Five pre-auth connections cost well under one authenticated buffer.
    assert _peak(pre_auth) < 5 * HANDSHAKE_BUFFER + 512 * 1024


async def test_device_state_sizes_are_bounded(shm: Path, fixed_dest_nonce: None) -> None:
    """A declared 256 MiB device state costs only what arrives; over the
    destination's limit it is refused at the first piece."""
    rng = random.Random(5)
    server = await _server(shm, max_device_state=1 * MiB)
    try:
        b = Begin(migration_id="dev1", name="dev", size=8 * PAGE_SIZE, chunk_pages=1)
        head = transcript(rng, b, key=KEY)[:3]
        switch = _join(encode_frame(Kind.SWITCHOVER, {}))
        piece = _join(encode_frame(Kind.DEVICE_STATE, {"o": 0, "t": MAX_DEVICE_STATE}, b"x" * 10))
        outcome, chan = await run_session(server, [*head, switch, piece], [1 << 20])
        assert outcome == "rejected: RemoteProtocolError"
        assert "exceeds this destination's limit" in chan.error
        check_after_session(server, outcome, chan, "")

        # Under the limit: pieces that run past their total, disagree on it,
        # or a commit before all of it arrived are all refused.
        b = Begin(migration_id="dev2", name="dev", size=8 * PAGE_SIZE, chunk_pages=1)
        head = transcript(rng, b, key=KEY)[:3]
        cases = [
            [_join(encode_frame(Kind.DEVICE_STATE, {"o": 0, "t": 4}, b"12345"))],
            [_join(encode_frame(Kind.DEVICE_STATE, {"o": 0, "t": 10}, b"12345")),
             _join(encode_frame(Kind.DEVICE_STATE, {"o": 5, "t": 11}, b"12345"))],
            [_join(encode_frame(Kind.DEVICE_STATE, {"o": 0, "t": 10}, b"12345")),
             _join(encode_frame(Kind.COMMIT, {"migration_id": "dev2", "checksum": 0}))],
        ]
        for k, tail in enumerate(cases):
            head = transcript(rng, Begin(migration_id=f"dev2x{k}", name="dev", size=8 * PAGE_SIZE,
                                         chunk_pages=1), key=KEY)[:3]
            outcome, chan = await run_session(server, [*head, switch, *tail], [1 << 20])
            assert outcome == "rejected: RemoteProtocolError", (k, outcome)
            check_after_session(server, outcome, chan, "")

        # Memory: a session that declares the wire maximum but sends 10 bytes
        # at a time stays small (the limit is raised for this part).
        server.opts.max_device_state = MAX_DEVICE_STATE
        head = transcript(rng, Begin(migration_id="dev3", name="dev", size=8 * PAGE_SIZE, chunk_pages=1),
                          key=KEY)[:3]
        pieces = [_join(encode_frame(Kind.DEVICE_STATE, {"o": 10 * i, "t": MAX_DEVICE_STATE}, b"y" * 10))
                  for i in range(50)]
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            outcome, chan = await run_session(server, [*head, switch, *pieces], [1 << 20])
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert outcome == "rejected: LinkError"  # the stream ended before a commit
        check_after_session(server, outcome, chan, "")
        assert peak < 24 * MiB, peak  # receive buffer (~8 MiB) and bookkeeping, not 256 MiB
    finally:
        await server.close()


async def test_region_over_the_destination_limit_is_refused_before_allocating(
        shm: Path, fixed_dest_nonce: None) -> None:
    server = await _server(shm, max_region=1 * MiB)
    try:
        rng = random.Random(3)
        b = Begin(migration_id="huge", name="huge", size=1 << 40, chunk_pages=4096)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            outcome, chan = await run_session(server, transcript(rng, b, key=KEY)[:3], [1 << 20])
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert outcome == "rejected: RegionError"
        assert "--max-region" in chan.error
        check_after_session(server, outcome, chan, "")
        assert peak < 2 * MiB, peak
    finally:
        await server.close()



# --------------------------------------------------------------------------
# Coverage-guided (atheris), when it is installed


ATHERIS_RUNS = int(os.environ.get("PRECOPY_FUZZ_ATHERIS_RUNS", "60000"))


def test_atheris_decoder(tmp_path: Path) -> None:
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (optional: pip install atheris; it needs a "
                    "prebuilt wheel or clang)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    script = Path(__file__).with_name("atheris_wire.py")
    r = subprocess.run([sys.executable, str(script), f"-runs={ATHERIS_RUNS}", f"-seed={SEED}",
                        "-max_len=70000", "-rss_limit_mb=1024", str(corpus)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    tail = (r.stdout + r.stderr)[-3000:]
    print("\n" + "\n".join(line for line in tail.splitlines() if "DONE" in line or "Done" in line))
    assert r.returncode == 0, tail
    assert f"Done {ATHERIS_RUNS} runs" in r.stderr, tail


# --------------------------------------------------------------------------
# Hostile names and ids (found by reading what the fuzzers cannot judge)


async def test_query_ids_that_are_paths_are_refused(shm: Path, fixed_dest_nonce: None) -> None:
    """A QUERY id names a journal file: "../x" must not probe files outside it."""
    secret = shm / "elsewhere.json"
    secret.write_text('{"outcome": "committed"}')
    server = await _server(shm)
    try:
        head = transcript(random.Random(0), Begin(migration_id="q", name="q", size=PAGE_SIZE), key=KEY)[:2]
        rel = os.path.relpath(secret.with_suffix(""), server.journal.dir)  # type: ignore[union-attr]
        assert rel == "../../../elsewhere"  # short enough for the 64-character limit
        for mid in (rel, "../x", "a/b", ".hidden"):
            frame = _join(encode_frame(Kind.QUERY, {"migration_id": mid}))
            outcome, chan = await run_session(server, [*head, frame], [1 << 16])
            assert outcome == "rejected: RemoteProtocolError", (mid, outcome)
            assert "not a plain token" in chan.error
        # A plain id still gets its answer.
        frame = _join(encode_frame(Kind.QUERY, {"migration_id": "never-seen"}))
        outcome, chan = await run_session(server, [*head, frame], [1 << 16])
        assert outcome == "query"
    finally:
        await server.close()


async def test_region_named_like_a_device_state_file_is_refused(shm: Path, fixed_dest_nonce: None) -> None:
    """Region "vm.device-state" would overwrite region "vm"'s device state."""
    server = await _server(shm)
    try:
        rng = random.Random(4)
        outcome, chan = await run_session(
            server, transcript(rng, Begin(migration_id="d1", name="vm", size=4 * PAGE_SIZE, chunk_pages=1),
                               key=KEY), [1 << 16])
        assert outcome == "committed"
        blob = (server.opts.state_dir / "vm.device-state").read_bytes()  # type: ignore[operator]
        outcome2, chan2 = await run_session(
            server, transcript(rng, Begin(migration_id="d2", name="vm.device-state", size=4 * PAGE_SIZE,
                                          chunk_pages=1), key=KEY), [1 << 16])
        assert outcome2 == "rejected: RegionError" and "use another --name" in chan2.error
        assert (server.opts.state_dir / "vm.device-state").read_bytes() == blob  # type: ignore[operator]
        check_after_session(server, outcome, chan, "")
    finally:
        await server.close()
