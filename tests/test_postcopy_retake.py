"""What a restarted destination daemon takes a running post-copy back from
(precopy/session/postcopy_state.py, postcopy_retake.py); end to end: tests/test_postcopy_matrix.py
(the kill-dest cells)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from precopy.errors import PrecopyError
from precopy.session.postcopy_retake import guest_userfaultfd
from precopy.session.postcopy_state import load_need, need_path, persist_need


@pytest.mark.parametrize("minor", [True, False])
def test_the_page_mask_outlives_the_daemon_that_kept_it(tmp_path: Path, minor: bool) -> None:
    need = np.zeros(1000, dtype=bool)
    need[[0, 7, 999]] = True
    path = need_path(tmp_path, "m1")
    kept = persist_need(need, minor, path)
    kept[7] = False  # placed: in the file at once (a shared mapping), no flush
    del kept  # the "daemon" dies
    again, was_minor = load_need(path, 1000)
    assert was_minor is minor and np.flatnonzero(again).tolist() == [0, 999]
    again[0] = False
    assert np.flatnonzero(load_need(path, 1000)[0]).tolist() == [999]


def test_a_mask_of_another_size_or_kind_is_refused(tmp_path: Path) -> None:
    path = need_path(tmp_path, "m2")
    persist_need(np.ones(10, dtype=bool), True, path)
    with pytest.raises(ValueError, match="not a post-copy page mask"):
        load_need(path, 11)
    path.write_bytes(b"x" + bytes(10))
    with pytest.raises(ValueError):
        load_need(path, 10)
    with pytest.raises(OSError):
        load_need(need_path(tmp_path, "none"), 10)


def test_a_process_without_the_region_s_userfaultfd_is_not_taken(tmp_path: Path) -> None:
    # This process has no userfaultfd at all: nothing is the guest's.
    try:
        with pytest.raises(PrecopyError, match="none of guest"):
            guest_userfaultfd(os.getpid(), 0x10000, 4096, True)
    except OSError as exc:  # pidfd_open unavailable (old kernel): the retake asks the guest instead
        pytest.skip(f"pidfd_open: {exc}")
