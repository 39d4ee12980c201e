"""What a destination daemon keeps of a running post-copy for the daemon that may follow it.

The per-page "still missing" mask of a post-copy
(:attr:`~precopy.session.postcopy_pages.PagePlacer.need`) lives in a file,
``STATE_DIR/.precopy/postcopy/ID.need`` (one mode byte: ``m`` MINOR +
MISSING, ``M`` MISSING; then a byte per page), mapped shared: every change
is in the file at once, so a daemon killed at any point leaves the mask as
it was (no fsync: a machine that goes down takes the guest with it).  A
page is marked placed only once its bytes are where the guest will read
them, and (MINOR) before it is mapped for the guest: a restarted daemon
(:mod:`precopy.session.postcopy_retake`) asks again for exactly the pages
still marked, and never writes over one the guest could have written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["need_path", "persist_need", "load_need", "mapped_from"]

_MODES = {b"m": True, b"M": False}


def need_path(state_dir: Path, migration_id: str) -> Path:
    return state_dir / ".precopy" / "postcopy" / f"{migration_id}.need"


def persist_need(need: np.ndarray, minor: bool, path: Path) -> np.ndarray:
    """Write ``need`` to ``path`` and return it mapped from there (changes go to the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(b"m" if minor else b"M")
        f.write(need.astype(bool).tobytes())
    os.replace(tmp, path)
    return _plain(np.memmap(path, dtype=bool, mode="r+", offset=1, shape=need.shape))


def _plain(mapped: np.memmap) -> np.ndarray:
    """The mask as a plain array over the mapping (its ``base``: :func:`mapped_from` finds the file):
    numpy's memmap subclass costs microseconds of Python at every operation, and the fault lane
    does a few for each fault (benchmarks/RESULTS.md, lat22)."""
    return mapped.view(np.ndarray)


def mapped_from(need: np.ndarray) -> str | None:
    """The file a mask from :func:`persist_need` / :func:`load_need` is mapped from (None: a mask
    of its own)."""
    for arr in (need, need.base):
        if isinstance(arr, np.memmap) and arr.filename:
            return str(arr.filename)
    return None


def load_need(path: Path, npages: int) -> tuple[np.ndarray, bool]:
    """The mask a dead daemon left (mapped, to go on changing it) and whether it ran MINOR.

    Raises :class:`OSError` / :class:`ValueError` when the file is missing or not one of ours.
    """
    with open(path, "rb") as f:
        mode = f.read(1)
    if mode not in _MODES or path.stat().st_size != npages + 1:
        raise ValueError(f"{path} is not a post-copy page mask of {npages} pages")
    return _plain(np.memmap(path, dtype=bool, mode="r+", offset=1, shape=(npages,))), _MODES[mode]
