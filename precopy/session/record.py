"""The source's record of what the destination holds, page by page (DESIGN invariant 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from precopy.memory.digest import ZERO_PAGE_DIGEST

__all__ = ["PageRecord"]


@dataclass(eq=False)
class PageRecord:
    """Per page: the digest of what the destination holds, whether that is known, and whether it is zeros.

    ``sent``: the digest of the staged copy that went on the wire, or the
    destination's digest of what it received; 0 where ``known`` is False
    (pages sent straight from memory are known once the destination has
    hashed them for a scan that needed them).  ``held_zero``: the
    destination is known to hold zeros there (a zero page was the last
    thing sent, or its digest says so).  Not the same as
    ``sent == ZERO_PAGE_DIGEST`` once chunk tables go by page: ``sent``
    then holds what the region read as last (a hole read as zeros, then
    written and sent as data, still has the zero digest there).  The hole
    and zero checks of a tracker (a hole punched turns a page to zeros
    unreported) resend a page that reads as zeros where ``held_zero`` is
    False.
    """

    sent: np.ndarray
    known: np.ndarray
    held_zero: np.ndarray

    @classmethod
    def empty(cls, npages: int) -> PageRecord:
        """Nothing sent yet, nothing known."""
        return cls(np.zeros(npages, dtype=np.uint64), np.zeros(npages, dtype=bool), np.zeros(npages, dtype=bool))

    def sent_unhashed(self, idx: np.ndarray | slice, *, by_page: bool) -> None:
        """``idx`` (page numbers, or a slice for a run) went as data straight from memory:
        no record until the destination gives one.

        Never the zero page's digest (a tracker's hole check trusts a zero
        record).  ``by_page``: chunk tables go by page, and ``sent`` holds
        every page's digest as last read (the scan hashed them): kept.
        A run's slice is three stores of a range instead of three gathers
        of its page numbers (~7 % of the source's samples at 256 pages).
        """
        if not by_page:
            self.sent[idx] = 0
            self.known[idx] = False
        self.held_zero[idx] = False

    def sent_zeros(self, idx: np.ndarray) -> None:
        """``idx`` went as zero pages."""
        self.sent[idx] = ZERO_PAGE_DIGEST
        self.known[idx] = True
        self.held_zero[idx] = True

    def sent_staged(self, idx: np.ndarray, digests: np.ndarray, zero: np.ndarray) -> None:
        """``idx`` went from a staged copy with these page ``digests``; ``zero`` of them as zero pages."""
        self.sent[idx] = digests
        self.known[idx] = True
        self.held_zero[idx] = zero

    def held(self, idx: np.ndarray, digests: np.ndarray) -> None:
        """The destination hashed what it holds at ``idx``: its ``digests`` become the record."""
        self.sent[idx] = digests
        self.known[idx] = True
        self.held_zero[idx] = digests == ZERO_PAGE_DIGEST
