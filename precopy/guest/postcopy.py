"""The guest's side of post-copy: offer the destination agent a userfaultfd for missing pages.

A guest resumed on the destination of a post-copy migration starts with
some of its region's pages still on the source: they are holes of the
region file, and the agent fills them in as they arrive or as the guest
touches them.  For that it needs a userfaultfd of the guest's address
space.  A cooperative guest started with ``--postcopy``:

1. maps the region and starts *held*: its work loop waits at its first
   checkpoint, touching no page;
2. answers ``{"op": "postcopy"}`` on its control socket by creating a
   userfaultfd (``UFFDIO_API`` with no feature) and sending a copy with
   ``SCM_RIGHTS`` on the reply line ``{"ok": true, "start": ADDR,
   "length": N, "page_size": 4096}``; it **keeps its own copy open** for
   as long as it runs: should the agent die mid-way, a touch of a missing
   page then waits (for an agent to take the fd again and fill it) instead
   of reading zeros;
3. runs on ``{"op": "resume"}``, which the agent sends once it has
   registered the range (MISSING mode): from then on a touch of a missing
   page waits until the agent places it.

docs/TRACKING.md ("Post-copy") describes the same for a guest in any language.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
from typing import Any

from precopy.memory.uffd import TrackingUnavailable, create_userfaultfd, uffd_api

from .common import PAGE_SIZE, GuestError
from .gate import WorkGate

__all__ = ["PostcopyOffer", "postcopy_offer"]


class PostcopyOffer:
    """The userfaultfd a post-copy destination agent fills this guest's missing pages through."""

    def __init__(self, mm: mmap.mmap) -> None:
        anchor = ctypes.c_char.from_buffer(mm)
        self.start = ctypes.addressof(anchor)
        del anchor  # keep no buffer export: the mapping must stay closable
        self.length = len(mm)
        self.fd = -1  # ours, kept open while the guest runs

    def __call__(self) -> tuple[dict[str, Any], int]:
        """The reply fields and a copy of the userfaultfd (the caller sends it and closes the copy).

        The same userfaultfd each time: an agent that takes over from one
        that died gets the fd its predecessor registered.  Raises
        :class:`GuestError` with the kernel's reason when it cannot be had.
        """
        if self.fd < 0:
            try:
                fd = create_userfaultfd()
            except TrackingUnavailable as exc:
                raise GuestError(str(exc)) from None
            try:
                uffd_api(fd, 0)
            except TrackingUnavailable as exc:
                os.close(fd)
                raise GuestError(str(exc)) from None
            self.fd = fd
        return {"start": self.start, "length": self.length, "page_size": PAGE_SIZE}, os.dup(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def postcopy_offer(args: argparse.Namespace, mm: mmap.mmap, gate: WorkGate) -> PostcopyOffer | None:
    """With ``--postcopy``: the offer, and the work loop held until the agent resumes it."""
    if not getattr(args, "postcopy", False):
        return None
    if not args.control:
        raise GuestError("--postcopy needs --control: the agent takes the userfaultfd over that socket")
    gate.hold()
    return PostcopyOffer(mm)
