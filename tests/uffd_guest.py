"""A test guest for kernel write tracking: adversarial write patterns.

``python -m tests.uffd_guest --memory M --control S --pattern P`` maps the
region, serves the control socket (pause/resume/stop/track, offering its
userfaultfd with :class:`precopy.guest.tracking.WriteTrackingOffer`) and
writes until stopped:

* ``sweep``  — every page's first byte, round and round, at full speed;
* ``random`` — 8..64 random bytes into random pages, in batches of 64;
* ``abab``   — a page flips A -> B -> A (the same bytes back) and others
  change for good;
* ``punch``  — holes punched into data pages (``fallocate(PUNCH_HOLE)``),
  some written again afterwards, plus random writes.

``--user UID`` drops root first; ``--seccomp-deny-uffd`` installs a seccomp filter that fails userfaultfd(2)
with ENOSYS before anything else, as a sandboxed guest would see it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import struct
import time

import numpy as np

from precopy.guest.control import ControlServer, GateController
from precopy.guest.gate import WorkGate, install_stop_signals
from precopy.guest.region import MappedRegion
from precopy.guest.tracking import WriteTrackingOffer

PAGE = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def deny_userfaultfd() -> None:
    """seccomp: userfaultfd(2) fails with ENOSYS (x86-64 only)."""
    nr_uffd, audit_arch_x86_64, enosys = 323, 0xC000003E, 38
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    prog = [
        (ld_w_abs, 0, 0, 4),  # arch
        (jeq_k, 1, 0, audit_arch_x86_64),
        (ret_k, 0, 0, 0x7FFF0000),  # another arch: allow (the test only runs on x86-64)
        (ld_w_abs, 0, 0, 0),  # syscall nr
        (jeq_k, 0, 1, nr_uffd),
        (ret_k, 0, 0, 0x00050000 | enosys),  # SECCOMP_RET_ERRNO
        (ret_k, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def run(args: argparse.Namespace) -> None:
    # Everything that imports does so before a --user drop: the checkout (and
    # its venv) may sit in a folder that user cannot enter, such as a mode-0700
    # mktemp -d or /root, and then any later import fails.
    rng = np.random.default_rng(args.seed)  # numpy.random loads on first use
    if args.user is not None:
        import secrets  # noqa: F401  (imported lazily by what follows)

        os.setgroups([])
        os.setresgid(args.user, args.user, args.user)
        os.setresuid(args.user, args.user, args.user)
    if args.seccomp_deny_uffd:
        deny_userfaultfd()
    gate = WorkGate()
    install_stop_signals(gate)
    with MappedRegion(args.memory) as region:
        mem = region.bytes_array()
        pages = mem.reshape(-1, PAGE)
        n = len(pages)
        offer = None if args.no_tracking else WriteTrackingOffer(region.mm)
        fd = os.open(args.memory, os.O_RDWR)
        server = ControlServer(args.control, GateController(gate, lambda _new: b"uffd-guest", offer))
        with server:
            pos = 0
            while gate.checkpoint():
                if args.pattern == "sweep":
                    end = min(pos + 256, n)
                    pages[pos:end, 0] += 1
                    pos = 0 if end == n else end
                    continue
                if args.pattern in ("random", "punch", "abab"):
                    idx = rng.integers(0, n, 64)
                    off = int(rng.integers(0, PAGE - 64))
                    pages[idx, off:off + 64] = rng.integers(0, 256, (64, 64), dtype=np.uint8)
                if args.pattern == "abab":
                    for p in rng.integers(0, n, 16).tolist():
                        a = pages[p].copy()
                        pages[p] = rng.integers(0, 256, PAGE, dtype=np.uint8)
                        time.sleep(0.0002)
                        pages[p] = a
                if args.pattern == "punch":
                    for p in rng.integers(0, n, 8).tolist():
                        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, p * PAGE, PAGE):
                            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")
                        if rng.random() < 0.3:
                            pages[p, :8] = 7
                gate.sleep(args.sleep)
            gate.finish()
        os.close(fd)
        del mem, pages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--pattern", choices=["sweep", "random", "abab", "punch"], default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.001)
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--seccomp-deny-uffd", action="store_true")
    ap.add_argument("--user", type=int, help="drop to this uid/gid first")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
