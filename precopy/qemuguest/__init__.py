"""The QEMU test guest: a multiboot kernel that fills and dirties its RAM.

``build(out)`` compiles ``guest.c``/``boot.S`` with the system gcc and ld
(32-bit, freestanding) into a multiboot ELF for ``qemu-system-x86_64
-kernel``; ``python -m precopy.qemuguest OUT`` does the same from a shell.
See guest.c for what the guest does and prints on its serial port.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["build", "SOURCE_DIR", "VER_BASE", "DATA_BASE", "expected_page"]

SOURCE_DIR = Path(__file__).resolve().parent
#: Physical addresses (= offsets in the RAM file) of the guest's tables.
VER_BASE = 0x400000
DATA_BASE = 0x800000

CFLAGS = ["-m32", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-mno-sse", "-mno-sse2", "-mno-mmx", "-mno-80387", "-fno-builtin",
          "-fno-tree-loop-distribute-patterns", "-fno-asynchronous-unwind-tables", "-Wall"]


class BuildError(RuntimeError):
    """The toolchain is missing or the guest did not compile."""


def build(out: Path) -> Path:
    """Compile the guest into ``out`` (an ELF file); return ``out``.

    Raises :class:`BuildError` naming the missing tool or the compiler's message.
    """
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found: install gcc and binutils (apt-get install gcc binutils)")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="precopy-qemuguest-") as tmp:
        steps = [
            ["gcc", *CFLAGS, "-c", str(SOURCE_DIR / "guest.c"), "-o", f"{tmp}/guest.o"],
            ["gcc", "-m32", "-c", str(SOURCE_DIR / "boot.S"), "-o", f"{tmp}/boot.o"],
            ["ld", "-m", "elf_i386", "-T", str(SOURCE_DIR / "link.ld"), "-nostdlib", "-z", "noexecstack",
             "--no-warn-rwx-segments", "-o", str(out), f"{tmp}/boot.o", f"{tmp}/guest.o"],
        ]
        for cmd in steps:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise BuildError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()}")
    return out


def expected_page(page: int, version: int) -> bytes:
    """The bytes the guest writes into data page ``page`` at ``version``."""
    import numpy as np

    h = ((page * 2654435761) ^ (version * 40503 + 0x9E3779B9)) & 0xFFFFFFFF
    words = np.uint32(h) ^ (np.arange(1024, dtype=np.uint64) * 0x01000193 & 0xFFFFFFFF).astype(np.uint32)
    return words.astype("<u4").tobytes()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m precopy.qemuguest OUT.elf", file=sys.stderr)
        return 2
    try:
        print(build(Path(args[0])))
    except BuildError as exc:
        print(f"precopy.qemuguest: {exc}", file=sys.stderr)
        return 1
    return 0
