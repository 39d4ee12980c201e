"""The destination's post-copy page placement: which pages are still missing, faults, ``UFFDIO_COPY``.

A :class:`PagePlacer` holds the resumed guest's userfaultfd and the set of
pages it still lacks.  Fault addresses the kernel reports become pages to
request from the source (:meth:`PagePlacer.faulted`); pages that arrive are
placed (:meth:`PagePlacer.place`) only while still missing, so a page
arrives once and a page the guest wrote is never overwritten:

* in MINOR mode (``minor=True``, :mod:`precopy.memory.uffd_missing`) the
  guest maps no page of the region until this side maps it: a missing
  page is written into the file (``pwrite``, over its stale bytes) and
  then mapped (``UFFDIO_CONTINUE``); a fault on a page that is not missing
  is answered here at once (mapped, or a hole filled with zeros), and
  :meth:`PagePlacer.map_held` maps those pages in the background so that
  the guest stops faulting on them;
* in MISSING mode the missing pages are holes of the file (punched) and
  are placed with ``UFFDIO_COPY``, which installs a page only where the
  file holds none; a fault on a page that is not missing is a hole the
  source sent as zeros (or never wrote): it is filled with zeros here.

If the guest exits before every page is placed, the rest go into the
region file (MISSING: where it still has holes).

No I/O with the source and no event loop here: the session
(:mod:`precopy.session.postcopy_dest`) feeds it.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import numpy as np

from precopy.memory.uffd_missing import continue_pages, copy_pages, data_runs, page_runs
from precopy.protocol import MAX_BATCH_PAGES, PAGE_SIZE

__all__ = ["PagePlacer", "latency_stats"]

_log = logging.getLogger(__name__)
_ZERO = np.zeros(MAX_BATCH_PAGES * PAGE_SIZE, dtype=np.uint8)
#: Bytes a ``pwrite`` places at most while a lane's child places beside (see ``_pwrite``).
PWRITE_BESIDE_LANE = int(os.environ.get("PRECOPY_LANE_PWRITE_KIB", "2048")) * 1024


def latency_stats(seconds: list[float], prefix: str = "fault") -> dict[str, float]:
    """p50, p99 and max of fault latencies, in microseconds, as ``PREFIX_p50_us`` ... (empty: none)."""
    if not seconds:
        return {}
    a = np.asarray(seconds) * 1e6
    return {f"{prefix}_p50_us": float(np.percentile(a, 50)), f"{prefix}_p99_us": float(np.percentile(a, 99)),
            f"{prefix}_max_us": float(a.max())}


class PagePlacer:
    """Places the missing pages of one post-copy migration into its resumed guest.

    ``uffd``: the guest's userfaultfd (registered in MISSING mode over
    ``start``..``start + npages`` pages); ``missing``: the pages the
    destination does not hold (punched out of ``region_fd``'s file), as
    indices or as a per-page mask.
    """

    def __init__(self, uffd: int, start: int, npages: int, missing: np.ndarray, region_fd: int, *,
                 minor: bool = False) -> None:
        self.uffd = uffd
        self.minor = minor
        self._held: list[tuple[int, int]] | None = None  # MINOR: runs of held pages not mapped yet
        self.start = start
        self.npages = npages
        self.region_fd = region_fd
        if missing.dtype == bool and len(missing) == npages:  # a per-page mask
            self.need = missing.copy()
        else:
            self.need = np.zeros(npages, dtype=bool)
            self.need[missing] = True
        self.left = int(self.need.sum())
        self.requested = np.zeros(npages, dtype=bool)
        self._fault_t: dict[int, float] = {}
        self.latencies: list[float] = []
        #: Of those, faults whose page came in the source's answer to their REQUEST (a frame of
        #: nothing but pages faulted on): remote, not sent yet when the guest touched them.  The
        #: others' pages were in flight already (pushed), the fault waiting for their frame.
        self.remote_latencies: list[float] = []
        self.inflight_latencies: list[float] = []
        self._reply = False  # the frame being placed answers REQUESTs (see remote_latencies)
        self._placed_t = np.zeros(npages)  # when each page was placed (0: not by this placer)
        self.faults = 0  # faults on missing pages (remote)
        self.zero_faults = 0  # faults on pages not missing (held, or holes that are zeros): served here
        self.duplicates = 0  # pages that came although placed already (never written twice)
        self.present = 0  # pages UFFDIO_COPY found present (EEXIST: not overwritten)
        self.pushed = 0  # pages placed before the guest asked for them
        self.guest_gone = False  # the guest exited: pages go into the file's holes
        self.claim_lock: Any = None  # share_claims: placing beside another process
        self.taken = np.zeros(0, dtype=bool)

    def faulted(self, addresses: list[int], now: float, since: float | None = None) -> list[int]:
        """Take the guest's fault addresses; returns the pages to request (missing, not asked yet).

        ``since``: when the userfaultfd was last seen empty -- the faults came after it; their
        latency counts from then (an upper bound: the kernel gives no time of a fault), else from
        ``now``.  A fault on a page that is not missing is filled with zeros here.
        """
        ask = []
        for addr in addresses:
            page = (addr - self.start) // PAGE_SIZE
            if not 0 <= page < self.npages:
                _log.warning("post-copy: a fault at %#x, outside the region: ignored", addr)
                continue
            if self.need[page]:
                if not self.requested[page]:
                    self.requested[page] = True
                    self.faults += 1
                    self._fault_t[page] = now if since is None else since
                    ask.append(page)
            elif since is not None and self._placed_t[page] > since:
                # Placed (and the guest woken) after the fault came, before it was read: a fault
                # on a page in flight, served by its frame.
                self.faults += 1
                late = float(self._placed_t[page]) - since
                self.latencies.append(late)
                self.inflight_latencies.append(late)
            else:
                self.zero_faults += self._local(page)
        return ask

    def _local(self, page: int) -> int:
        """A fault on a page that is not missing: 1 when this call resolved it."""
        if self.minor:
            # Held: map the file's page (EEXIST: mapped since the fault was read;
            # EFAULT: a hole, filled with zeros below).
            try:
                mapped, _ = continue_pages(self.uffd, self.start + page * PAGE_SIZE, 1)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
                return 0
            if mapped:
                return 1
        # A hole that holds zeros (sent as such, or never written); or
        # a page placed since the fault was read (EEXIST: nothing done).
        placed, _ = self._copy(page, _ZERO.ctypes.data, 1)
        return placed

    def place(self, indices: np.ndarray, data: memoryview | None, zeros: np.ndarray) -> int:
        """Place a batch: ``indices`` with ``data`` (their raw bytes, in order), ``zeros`` as zero pages.

        Pages not missing any more are skipped (counted in ``duplicates``).
        Returns the pages placed.  Raises :class:`OSError` when the kernel
        refuses for another reason than a present page.
        """
        placed = self._place(indices, data, zeros)
        if self.claim_lock is not None:
            self.recount()  # another process places pages too (share_claims)
        return placed

    def _place(self, indices: np.ndarray, data: memoryview | None, zeros: np.ndarray) -> int:
        placed = 0
        self._reply = self._answers(indices, zeros)
        if self.minor:
            if len(indices):
                assert data is not None
                idx = np.asarray(indices)
                first, n = int(idx[0]), len(idx)
                if int(idx[-1]) - first == n - 1 and not self.guest_gone and self._claim_run(first, n):
                    placed += self._write_run(first, n, memoryview(data).cast("B"))  # (strictly increasing)
                else:
                    placed += self._write_map(idx, memoryview(data).cast("B"))
            if len(zeros):
                placed += self._write_map(np.asarray(zeros), None)
            return placed
        if len(indices):
            assert data is not None
            src = np.frombuffer(data, dtype=np.uint8)
            placed += self._place_runs(np.asarray(indices), src.ctypes.data, src)
        if len(zeros):
            placed += self._place_runs(np.asarray(zeros), _ZERO.ctypes.data, None)
        return placed

    def _answers(self, indices: np.ndarray, zeros: np.ndarray) -> bool:
        """Whether a frame answers REQUESTs: every page of it faulted on and still missing (a push
        holds pages in order, most never faulted on; a last small push of only faulted pages would
        count too -- rare, and then those pages were not sent before their faults either)."""
        if not self._fault_t:  # nothing faulted on waits: a push (the common case, kept cheap)
            return False
        pages = np.concatenate((np.asarray(indices), np.asarray(zeros))).astype(np.int64)
        return bool(pages.size) and bool(self.requested[pages].all() and self.need[pages].all())

    def waiting(self) -> bool:
        """Whether the guest waits on a page faulted on and not placed yet."""
        return bool(self._fault_t)

    def awaited(self, indices: np.ndarray, zeros: np.ndarray) -> bool:
        """Whether a frame holds a page the guest waits on."""
        pages = np.concatenate((np.asarray(indices), np.asarray(zeros))).astype(np.int64)
        return bool(pages.size) and bool((self.requested[pages] & self.need[pages]).any())

    def _wanted(self, pages: np.ndarray) -> np.ndarray:
        """The offsets into ``pages`` of those still missing (claimed: this placer places them);
        the others count as duplicates."""
        if self.claim_lock is None:
            wanted = self.need[pages]
        else:
            with self.claim_lock:
                wanted = self.need[pages] & ~self.taken[pages]
                self.taken[pages[wanted]] = True
        self.duplicates += int((~wanted).sum())
        return np.flatnonzero(wanted)

    def _claim_run(self, first: int, n: int) -> bool:
        """Whether every page of ``first`` .. ``first + n - 1`` is missing; then claimed (see
        :meth:`share_claims`) -- else nothing is."""
        if self.claim_lock is None:
            return bool(self.need[first:first + n].all())
        with self.claim_lock:
            ok = bool(self.need[first:first + n].all()) and not self.taken[first:first + n].any()
            if ok:
                self.taken[first:first + n] = True
        return ok

    def share_claims(self, lock: Any, taken: np.ndarray) -> None:
        """Place beside another process (the fault lane's child) on the same ``need`` mask: a page
        is claimed -- marked in ``taken``, shared too, under ``lock``, taken by both -- before it is
        written, and the placer that claimed it alone places it; the lock is held for the claim
        only, not for the writes (a lane's answer does not wait behind a push's placement).  A
        claim outlives no placement but that of a process that died: the survivor clears
        ``taken`` (:meth:`drop_claims`) when the other is gone."""
        self.claim_lock, self.taken = lock, taken

    def drop_claims(self) -> None:
        """The other placer is gone (see :meth:`share_claims`): its claims with it."""
        if self.claim_lock is not None:
            with self.claim_lock:
                self.taken[:] = False

    def _place_runs(self, pages: np.ndarray, base: int, keep: np.ndarray | None) -> int:
        """Place each run of ``pages`` that is still needed; ``base`` + i pages is page i's bytes
        (for zeros, ``base`` is a zero buffer and every page reads from its start)."""
        offsets = self._wanted(pages)
        if not offsets.size:
            return 0
        now = time.monotonic()
        placed = 0
        for first_off, count in page_runs(offsets):
            first = int(pages[first_off])
            if first + count - 1 != int(pages[first_off + count - 1]):
                # Consecutive in the batch, not in the region: one by one.
                for k in range(count):
                    placed += self._place_one(int(pages[first_off + k]), base, first_off + k, keep, now)
                continue
            src = base + (first_off * PAGE_SIZE if keep is not None else 0)
            n = count if keep is not None else min(count, MAX_BATCH_PAGES)
            done = 0
            while done < count:
                step = min(n, count - done)
                got, _ = self._copy(first + done, src + (done * PAGE_SIZE if keep is not None else 0), step)
                placed += got
                done += step
            self._mark(np.arange(first, first + count), now)
        return placed

    def _write_map(self, pages: np.ndarray, src: memoryview | None) -> int:
        """MINOR: write each still-missing page into the file, then map it for the guest.

        ``src``: the pages' bytes in order (None: zero pages).  Consecutive pages go in one
        ``pwrite`` and one ``UFFDIO_CONTINUE``.  No one maps a missing page before this maps it,
        so nothing the guest wrote is written over.
        """
        offs = self._wanted(pages)
        if not offs.size:
            return 0
        now = time.monotonic()
        sel = pages[offs].astype(np.int64)
        breaks = (np.flatnonzero((np.diff(offs) != 1) | (np.diff(sel) != 1)) + 1).tolist()
        for lo, hi in zip([0, *breaks], [*breaks, len(offs)]):
            first, n = int(sel[lo]), hi - lo
            if src is not None:
                at = int(offs[lo]) * PAGE_SIZE
                self._pwrite(src[at:at + n * PAGE_SIZE], first * PAGE_SIZE)
            else:
                for k in range(0, n, MAX_BATCH_PAGES):
                    m = min(MAX_BATCH_PAGES, n - k)
                    self._pwrite(_ZERO.data[:m * PAGE_SIZE], (first + k) * PAGE_SIZE)
            # Placed (in the file) before the guest can see it: a daemon that takes over after this
            # one died never writes it again (precopy.session.postcopy_state).
            self.need[first:first + n] = False
            self._continue(first, n)
        self._mark(sel, now)
        return len(sel)

    def _continue(self, first: int, n: int) -> None:
        """Map pages ``first`` .. ``first + n - 1`` (in the file already) into the guest, waking
        whoever waits on them (``UFFDIO_CONTINUE``); a guest that exited leaves them in the file."""
        if self.guest_gone:
            return
        try:
            _, skipped = continue_pages(self.uffd, self.start + first * PAGE_SIZE, n)
            self.present += len(skipped)
        except OSError as exc:
            self._guest_exited(exc)

    def _guest_exited(self, exc: OSError) -> None:
        """An ioctl on the guest's userfaultfd failed: ESRCH, the guest exited (the pages still
        missing go into the region file from now on); anything else is raised."""
        if exc.errno != errno.ESRCH:
            raise exc
        _log.warning("post-copy: the guest exited with %d pages still missing: they go into the "
                     "region file", self.left)
        self.guest_gone = True

    def _write_run(self, first: int, n: int, src: memoryview) -> int:
        """MINOR, a push's usual frame: ``n`` pages from ``first``, every one still missing --
        :meth:`_write_map` with one ``pwrite``, one ``UFFDIO_CONTINUE`` and slices for the marks
        (~75 us of numpy and Python a frame less: a third of the destination's own work in the
        push, benchmarks/RESULTS.md, pcpush)."""
        now = time.monotonic()
        self._pwrite(src, first * PAGE_SIZE)
        self.need[first:first + n] = False  # in the file before the guest can see it (see _write_map)
        self._continue(first, n)
        self._placed_t[first:first + n] = now
        self.left -= n
        asked = np.flatnonzero(self.requested[first:first + n]) + first
        self.pushed += n - len(asked)
        for p in asked.tolist():
            t = self._fault_t.pop(p, None)
            if t is not None:
                self.latencies.append(now - t)
                (self.remote_latencies if self._reply else self.inflight_latencies).append(now - t)
        return n

    def _pwrite(self, buf: memoryview, off: int) -> None:
        # Beside the fault lane's child (share_claims), a push's 2 MiB goes in pieces: a write into
        # a tmpfs file holds the file's lock, and the child's write of an answer waits for it.
        most = len(buf) if self.claim_lock is None else PWRITE_BESIDE_LANE
        while len(buf):
            n = os.pwrite(self.region_fd, buf[:most], off)
            buf, off = buf[n:], off + n

    def map_held(self, most: int) -> int:
        """MINOR: map up to ``most`` more of the pages the file holds and the guest may use now (not
        missing), so that the guest does not fault on them; returns the pages looked at (0: none left)."""
        if not self.minor or self.guest_gone:
            return 0
        if self._held is None:
            held = np.zeros(self.npages, dtype=bool)
            for first, count in data_runs(self.region_fd, self.npages * PAGE_SIZE):
                held[first:first + count] = True
            held &= ~self.need
            self._held = page_runs(np.flatnonzero(held))[::-1]  # popped from the end: ascending
        done = 0
        while self._held and done < most:
            first, count = self._held.pop()
            n = min(count, most - done)
            if n < count:
                self._held.append((first + n, count - n))
            try:
                continue_pages(self.uffd, self.start + first * PAGE_SIZE, n)  # EEXIST: faulted in already
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
                self.guest_gone = True
                return 0
            done += n
        return done

    def _place_one(self, page: int, base: int, off: int, keep: np.ndarray | None, now: float) -> int:
        got, _ = self._copy(page, base + (off * PAGE_SIZE if keep is not None else 0), 1)
        self._mark(np.array([page]), now)
        return got

    def _mark(self, pages: np.ndarray, now: float) -> None:
        self.need[pages] = False
        self._placed_t[pages] = now
        self.left -= len(pages)
        asked = pages[self.requested[pages]]
        self.pushed += len(pages) - len(asked)
        for p in asked.tolist():
            t = self._fault_t.pop(p, None)
            if t is not None:
                self.latencies.append(now - t)
                (self.remote_latencies if self._reply else self.inflight_latencies).append(now - t)

    def recount(self) -> None:
        """``left`` from the mask, when another process places pages too (the fault lane's child,
        :mod:`precopy.session.postcopy_lane_child`); faults on pages it placed (in flight, then)
        get their latency from the shared placement time."""
        self.left = int(np.count_nonzero(self.need))
        if self._fault_t:
            for p in [p for p in self._fault_t if not self.need[p]]:
                t = self._fault_t.pop(p)
                late = max(float(self._placed_t[p]) - t, 0.0)
                self.latencies.append(late)
                self.inflight_latencies.append(late)

    def merge(self, got: dict[str, Any]) -> None:
        """Add what the lane's child counted (:func:`~precopy.session.postcopy_lane_child.placer_stats`);
        its faults still waiting are this placer's to ask for again."""
        for name in ("faults", "zero_faults", "duplicates", "present", "pushed"):
            setattr(self, name, getattr(self, name) + int(got.get(name, 0)))
        self.latencies += [float(x) for x in got.get("latencies", ())]
        self.remote_latencies += [float(x) for x in got.get("remote", ())]
        self.inflight_latencies += [float(x) for x in got.get("inflight", ())]
        for page, t in got.get("outstanding", ()):
            if 0 <= int(page) < self.npages:
                self.requested[int(page)] = True
                self._fault_t[int(page)] = float(t)
        self.recount()  # (those placed by the session's push meanwhile: in flight)

    def outstanding(self) -> np.ndarray:
        """Pages the guest faulted on that have not arrived (uint32): to ask again on a new link."""
        return np.array(sorted(p for p in self._fault_t if self.need[p]), dtype=np.uint32)

    def _copy(self, page: int, src: int, n: int) -> tuple[int, int]:
        """``UFFDIO_COPY`` of ``n`` pages at ``page``; into the file's holes once the guest is gone."""
        if not self.guest_gone:
            try:
                placed, present = copy_pages(self.uffd, self.start + page * PAGE_SIZE, src, n)
                self.present += len(present)
                return placed, len(present)
            except OSError as exc:
                self._guest_exited(exc)
        return self._write_holes(page, src, n), 0

    def _write_holes(self, page: int, src: int, n: int) -> int:
        """Write pages into the region file where it has holes (nothing the guest wrote is touched)."""
        import ctypes

        written = 0
        for k in range(n):
            off = (page + k) * PAGE_SIZE
            try:
                data_at = os.lseek(self.region_fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data from here on: a hole
                    raise
                data_at = -1
            if data_at == off:
                continue  # present: the guest's (or placed) -- never overwritten
            os.pwrite(self.region_fd, ctypes.string_at(src + k * PAGE_SIZE, PAGE_SIZE), off)
            written += 1
        return written

    def stats(self) -> dict[str, float]:
        """What COMPLETE tells the source (its report's ``postcopy`` section)."""
        remote = len(self.remote_latencies)
        return {"faults": self.faults, "zero_faults": self.zero_faults, "duplicates": self.duplicates,
                "present": self.present, "remote_faults": remote, **latency_stats(self.latencies),
                **latency_stats(self.remote_latencies, "remote"), **latency_stats(self.inflight_latencies, "inflight")}
