"""The source's post-copy push order (precopy.session.postcopy_stream.PageStream._next): pure, no
sockets -- requested pages first, the push going on from just after them, wrapping around to what
it jumped over, every page once."""

from __future__ import annotations

import numpy as np

from precopy.session.postcopy_stream import PUSH_PAGES, PageStream, StreamStats


def stream(need: np.ndarray) -> PageStream:
    return PageStream(None, need, StreamStats())  # type: ignore[arg-type]  # _next never reads memory


def drain(s: PageStream) -> list[tuple[list[int], bool]]:
    out = []
    while (batch := s._next()) is not None:
        idx, asked = batch
        s.need[idx] = False  # as _send does
        out.append((idx.tolist(), asked))
    return out


def test_the_push_goes_on_after_a_requested_page_and_wraps_around() -> None:
    npages = 3 * PUSH_PAGES
    s = stream(np.ones(npages, dtype=bool))
    first, asked = s._next()  # type: ignore[misc]
    assert first.tolist() == list(range(PUSH_PAGES)) and not asked
    s.need[first] = False
    s._asked.append(np.array([2 * PUSH_PAGES + 5, 3], dtype=np.uint32))  # 3: sent already
    idx, asked = s._next()  # type: ignore[misc]
    assert asked and idx.tolist() == [2 * PUSH_PAGES + 5]
    s.need[idx] = False
    rest = drain(s)
    sent = [p for batch, _ in rest for p in batch]
    # From just after the requested page to the end, then what was jumped over.
    assert sent[:5] == list(range(2 * PUSH_PAGES + 6, 2 * PUSH_PAGES + 11))
    assert sorted(sent) == sorted(set(range(PUSH_PAGES, npages)) - {2 * PUSH_PAGES + 5})
    assert len(sent) == len(set(sent)) and not s.need.any() and s._next() is None


def test_the_push_skips_pages_not_wanted_and_ends() -> None:
    need = np.zeros(50_000, dtype=bool)
    need[[7, 9000, 20_000, 49_999]] = True
    s = stream(need)
    assert drain(s) == [([7, 9000, 20_000, 49_999], False)]
    s.restart(np.zeros(50_000, dtype=bool))
    assert s._next() is None
