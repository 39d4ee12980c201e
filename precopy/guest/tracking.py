"""The guest's side of kernel write tracking: offer a userfaultfd to the agent.

A cooperative guest answers ``{"op": "track"}`` on its control socket by
creating a userfaultfd for its own address space, doing the ``UFFDIO_API``
handshake with the async write-protect features, and sending the fd with
``SCM_RIGHTS`` along with the reply line ``{"ok": true, "start": ADDR,
"length": N, "page_size": 4096}`` (ADDR: where it maps the region).  It then
closes its own copy: tracking ends when the agent closes its copy.  The
agent does the rest (register, write-protect, scan).  docs/TRACKING.md
describes the same sequence for a guest in any language.

:class:`WriteTrackingOffer` is that, for a Python guest holding the region
as an ``mmap``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

from precopy.memory.uffd import TrackingUnavailable, create_userfaultfd, uffd_api
from .common import PAGE_SIZE, GuestError

__all__ = ["WriteTrackingOffer"]


class WriteTrackingOffer:
    """Offers the agent write tracking of one shared mapping of the region."""

    def __init__(self, mm: mmap.mmap) -> None:
        anchor = ctypes.c_char.from_buffer(mm)
        self.start = ctypes.addressof(anchor)
        del anchor  # keep no buffer export: the mapping must stay closable
        self.length = len(mm)

    def __call__(self) -> tuple[dict[str, Any], int]:
        """Create and set up a userfaultfd; returns the reply fields and the fd.

        The caller sends the fd with the reply and closes it.  Raises
        :class:`GuestError` with the kernel's reason when it cannot be done
        (old kernel, seccomp, no permission): the agent then uses digests.
        """
        try:
            fd = create_userfaultfd()
        except TrackingUnavailable as exc:
            raise GuestError(str(exc)) from None
        try:
            uffd_api(fd)
        except TrackingUnavailable as exc:
            os.close(fd)
            raise GuestError(str(exc)) from None
        return {"start": self.start, "length": self.length, "page_size": PAGE_SIZE}, fd
