"""The adaptive compression choice, driven without a network."""

from __future__ import annotations

import os

import lz4.block
import pytest

from precopy.protocol.compress import AdaptiveCompressor

MiB = 1 << 20


def _drive(c: AdaptiveCompressor, raw_rate: float, lz4_rate: float, batches: int) -> list[bool]:
    """Feed ``batches`` batch timings at the given page-byte rates; return the choices."""
    choices = []
    for _ in range(batches):
        tried = c.want()
        choices.append(tried)
        c.record(tried, MiB, MiB / (lz4_rate if tried else raw_rate))
    return choices


def test_off_and_lz4_are_fixed() -> None:
    assert not any(_drive(AdaptiveCompressor("off"), 1e9, 5e9, 50))
    assert all(_drive(AdaptiveCompressor("lz4"), 5e9, 1e9, 50))


def test_auto_probes_both_then_keeps_the_faster() -> None:
    slow_link = AdaptiveCompressor("auto")
    choices = _drive(slow_link, raw_rate=110e6, lz4_rate=160e6, batches=200)
    probe = AdaptiveCompressor.PROBE
    assert choices[:probe] == [False] * probe and choices[probe:2 * probe] == [True] * probe
    assert all(choices[2 * probe:200])  # lz4 moves pages faster on this link
    fast_link = AdaptiveCompressor("auto")
    choices = _drive(fast_link, raw_rate=3e9, lz4_rate=0.7e9, batches=200)
    assert not any(choices[2 * probe:200])


def test_auto_reprobes_and_follows_a_change() -> None:
    c = AdaptiveCompressor("auto")
    _drive(c, raw_rate=3e9, lz4_rate=0.7e9, batches=100)
    assert not c.want()
    # The link gets slow (e.g. a shaped network): after a re-probe lz4 wins.
    choices = _drive(c, raw_rate=50e6, lz4_rate=120e6, batches=3 * AdaptiveCompressor.REPROBE_EVERY)
    tail = choices[-AdaptiveCompressor.REPROBE_EVERY:]
    # lz4 everywhere but the one re-probe of the raw path per period.
    assert tail.count(False) <= AdaptiveCompressor.PROBE


def test_compress_returns_none_for_incompressible_and_tracks_ratio() -> None:
    c = AdaptiveCompressor("lz4")
    assert c.compress(memoryview(os.urandom(MiB))) is None
    text = (b"the quick brown fox jumps over the lazy dog " * 30000)[:MiB]
    out = c.compress(memoryview(text))
    assert out is not None and len(out) < MiB // 10
    assert lz4.block.decompress(out, uncompressed_size=MiB) == text
    assert 0.5 < c.ratio < 0.6  # one incompressible MiB, one nearly free


def test_bad_mode() -> None:
    with pytest.raises(ValueError):
        AdaptiveCompressor("zstd")
