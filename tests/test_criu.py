"""Any process with CRIU (issue 26): the image container, the preflight, and memcached moved between two hosts.

The pure parts run everywhere.  The proof needs root, memcached and CRIU >= 4.2
(`make criu`; .ci/run installs both) and skips naming what is missing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import msgpack
import pytest

from precopy.errors import GuestControlError, PrecopyError
from precopy.session.preflight import check_destination
from precopy.workload.base import process_state
from precopy.workload.criu import parse_version, process_facts
from precopy.workload.criu_images import MAGIC, pack_images, unpack_images

ROOT = os.geteuid() == 0


def _images(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    d.mkdir()
    (d / "core-1.img").write_bytes(b"core" * 100)
    (d / "pages-1.img").write_bytes(os.urandom(10000))
    (d / "dump.log").write_text("not an image")
    return d


def _pack(tmp_path: Path) -> bytes:
    return pack_images(_images(tmp_path), region="/dev/shm/x.cache", size=1 << 20, mode=0o700, pid=42,
                       criu="4.2.1")


def test_images_round_trip(tmp_path: Path) -> None:
    blob = _pack(tmp_path)
    out = tmp_path / "out"
    got = unpack_images(blob, out)
    assert (got.region, got.size, got.mode, got.pid, got.criu) == ("/dev/shm/x.cache", 1 << 20, 0o700, 42, "4.2.1")
    assert sorted(p.name for p in out.iterdir()) == ["core-1.img", "pages-1.img"]  # the log stays behind
    assert (out / "pages-1.img").read_bytes() == (tmp_path / "img" / "pages-1.img").read_bytes()


def test_images_packed_into_a_buffer_made_ahead(tmp_path: Path) -> None:
    """pack_images(into=prefaulted(n)): the same blob, in that buffer cut to size; a buffer too small is left."""
    from precopy.workload.criu_images import prefaulted

    want = _pack(tmp_path)
    args = dict(region="/dev/shm/x.cache", size=1 << 20, mode=0o700, pid=42, criu="4.2.1")
    big = prefaulted(len(want) + 3 * 4096 + 5)
    assert len(big) == len(want) + 3 * 4096 + 5 and not any(big)
    got = pack_images(tmp_path / "img", into=big, **args)  # type: ignore[arg-type]
    assert got is big and got == want
    small = prefaulted(len(want) - 1)
    got = pack_images(tmp_path / "img", into=small, **args)  # type: ignore[arg-type]
    assert got is not small and got == want and len(small) == len(want) - 1


def _with_header(blob: bytes, **change: object) -> bytes:
    hlen = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    h = msgpack.unpackb(blob[start:start + hlen])
    h.update(change)
    new = msgpack.packb(h)
    return MAGIC + len(new).to_bytes(4, "little") + new + blob[start + hlen:]


@pytest.mark.parametrize("mangle, says", [
    (lambda b: b"XX" + b[2:], "magic"),
    (lambda b: b[:-1], "add up"),
    (lambda b: b + b"\0", "add up"),
    (lambda b: _with_header(b, files=[["../etc/passwd", 400], ["pages-1.img", 10000]]), "bad file"),
    (lambda b: _with_header(b, files=[["core-1.img", 400], ["core-1.img", 10000]]), "twice"),
    (lambda b: _with_header(b, region="relative/path"), "bad field"),
    (lambda b: _with_header(b, size=-1), "bad field"),
    (lambda b: _with_header(b, v=2), "version"),
    (lambda b: MAGIC + (1 << 30).to_bytes(4, "little") + b[len(MAGIC) + 4:], "too long"),
])
def test_bad_image_sets_write_nothing(tmp_path: Path, mangle, says: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    with pytest.raises(GuestControlError, match=says):
        unpack_images(mangle(_pack(tmp_path)), out)
    assert not out.exists() or not any(out.iterdir())


def test_images_over_the_limit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GuestControlError, match="over the device-state limit"):
        pack_images(_images(tmp_path), region="/dev/shm/x", size=4096, mode=0o600, pid=1, criu="4.2", limit=1000)


def test_rpc_request_encodes_what_criu_reads() -> None:
    """criu_rpc: a criu_req by hand (images/rpc.proto field numbers), read back field by field."""
    from precopy.workload.criu_rpc import DUMP, RESTORE, _fields, encode_request

    assert encode_request(RESTORE, images_dir="/i", log_file="r.log", leave_stopped=False, tcp_close=False) == (
        b"\x08\x02"  # type = RESTORE
        b"\x12\x19"  # opts, 25 bytes:
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # images_dir_fd = -1 (ten bytes)
        b"\xa2\x04\x02/i"  # images_dir (68)
        b"\x48\x02"  # log_level = 2
        b"\x52\x05r.log")  # log_file
    req = _fields(encode_request(DUMP, images_dir="/proc/1/root/dev/shm/d", log_file="dump.log", pid=300))
    assert req[1] == [DUMP]
    opts = _fields(bytes(req[2][0]))  # type: ignore[arg-type]
    assert opts[1] == [2**64 - 1] and opts[68] == [b"/proc/1/root/dev/shm/d"] and opts[10] == [b"dump.log"]
    assert opts[2] == [300] and opts[69] == [1] and opts[52] == [1] and opts[9] == [2]


def test_rpc_answers_are_read_and_checked() -> None:
    """criu_rpc: criu_resp's type, success, the restored pid (int32, -1 too), CRIU's errno and first error."""
    from precopy.workload.criu_rpc import RESTORE, _field, decode_response

    ok = _field(1, RESTORE) + _field(2, True) + _field(4, _field(1, 4242)) + _field(9, "Error: rlimit")
    answer = decode_response(ok)
    assert (answer.kind, answer.success, answer.pid, answer.error) == (RESTORE, True, 4242, "Error: rlimit")
    failed = decode_response(_field(1, RESTORE) + _field(2, False) + _field(4, _field(1, -1)) + _field(7, 56))
    assert (failed.success, failed.pid, failed.errno) == (False, -1, 56)
    for bad in (b"", _field(1, RESTORE), b"\x08", _field(1, 2) + b"\x12\x09ab", b"\x0b\x01"):
        with pytest.raises(GuestControlError, match="malformed"):
            decode_response(bad)


def test_a_criu_worker_that_cannot_start_says_so() -> None:
    from precopy.workload.criu_rpc import CriuWorker

    with pytest.raises(GuestControlError, match="cannot start 'criu swrk'"):
        CriuWorker.start("/nonexistent/criu")


def test_parse_version() -> None:
    assert parse_version("Version: 4.2.1\nGitID: v4.2.1") == (4, 2, 1)
    assert parse_version("Version: 3.17") == (3, 17)
    assert parse_version("criu: command not found") is None


def test_preflight_names_the_criu_requirement(tmp_path: Path) -> None:
    requires = {"criu": ["/var/lib/precopy/criu/criu", "4.2.1"]}
    with pytest.raises(PrecopyError, match="start precopy-dest with --criu"):
        check_destination(size=4096, page_size=4096, memory_dir=tmp_path, requires=requires)

    def same(values):  # type: ignore[no-untyped-def]
        if list(values) != requires["criu"]:
            raise PrecopyError("different CRIU")
        return "criu ok"

    passed = check_destination(size=4096, page_size=4096, memory_dir=tmp_path, requires=requires,
                               extra={"criu": same})
    assert "criu ok" in passed
    with pytest.raises(PrecopyError, match="different CRIU"):
        check_destination(size=4096, page_size=4096, memory_dir=tmp_path,
                          requires={"criu": ["/usr/sbin/criu", "4.2.1"]}, extra={"criu": same})


def test_process_facts_see_a_shared_mapping(tmp_path: Path) -> None:
    import mmap

    region = tmp_path / "r"
    region.write_bytes(b"\0" * 8192)
    with open(region, "r+b") as f, mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED) as m:
        m[0] = 1
        facts = process_facts(os.getpid(), region)
        assert facts.region_mapped_shared
        assert facts.pid_in_ns == os.getpid() or facts.pid_in_ns > 0
    assert not process_facts(os.getpid(), region).region_mapped_shared
    with pytest.raises(GuestControlError):
        process_facts(os.getpid(), tmp_path / "missing")


# -- the proof: memcached between two hosts ------------------------------------------------

def _reason() -> str | None:
    if not ROOT:
        return "needs root (network namespaces, CRIU)"
    from precopy.lab.criu_pair import unavailable

    return unavailable()


needs_lab = pytest.mark.skipif(_reason() is not None, reason=f"CRIU proof: {_reason()}")
KEYS = 100_000


def _in_ns(ns: str, fn):  # type: ignore[no-untyped-def]
    """Run ``fn()`` in a thread inside network namespace ``ns``; return its result (or raise its error)."""
    from precopy.lab.netns import enter_in_thread

    box: dict[str, object] = {}

    def go() -> None:
        try:
            enter_in_thread(ns)
            box["v"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
            box["e"] = exc

    t = threading.Thread(target=go)
    t.start()
    t.join(300)
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    return box["v"]


def _read_all(keys: list[str]) -> dict[str, bytes]:
    from precopy.lab.criu_pair import VIP
    from precopy.lab.memcached import Memcache

    mc = Memcache.connect(VIP)
    try:
        got: dict[str, bytes] = {}
        for i in range(0, len(keys), 2000):
            got.update(mc.get_many(keys[i:i + 2000]))
        return got
    finally:
        mc.close()


def _fill() -> None:
    from precopy.lab.criu_pair import VIP
    from precopy.lab.memcached import Memcache

    mc = Memcache.connect(VIP)
    mc.fill(KEYS)
    mc.close()


@needs_lab
def test_memcached_moves_with_its_keys_and_clients_write_on() -> None:
    """100,000 keys and a client writing all along: every acknowledged key reads back on the destination."""
    from precopy.lab.criu_pair import VIP, CriuPair
    from precopy.lab.memcached import Writer, value_of

    with CriuPair(f"criu{os.getpid() % 100000}") as pair:
        _in_ns(pair.hosts.src_ns, _fill)
        writer = Writer(VIP, rate=300, netns=pair.hosts.src_ns).start()
        try:
            rc, rep, err = pair.migrate("--on-commit", "kill", "--downtime-ms", "500")
            assert rc == 0, err[-3000:] + pair.dest_log()[-2000:]
            before = dict(writer.acked)  # acknowledged by the source: the service address is still there
            pair.move_address()
            for _ in range(600):  # the client reconnects and writes on at the destination
                if len(writer.acked) >= len(before) + 50:
                    break
                threading.Event().wait(0.05)
        finally:
            writer.stop()
        assert rep["outcome"] == "committed"
        assert rep["device_state_bytes"] > 0
        phases = rep["phases_ms"]
        for step in ("criu_dump", "device_state", "dest_criu_restore"):
            assert step in phases, phases
        steps = list(phases)  # in the order they ran: the verification ran beside the dump, before the images
        assert steps.index("final_pages") < steps.index("verify") < steps.index("device_state_wait"), steps
        assert len(writer.acked) >= len(before) + 50, (len(before), len(writer.acked), writer.errors)
        assert pair.restored_pids(), "no memcached runs in the destination's namespace"
        assert process_state(pair.restored_pids()[0]) != "T"

        fill_keys = [f"k{i}" for i in range(KEYS)]
        got = _in_ns(pair.hosts.dst_ns, lambda: _read_all(fill_keys + list(writer.acked)))
        wrong = [k for k in fill_keys if got.get(k) != value_of("k", int(k[1:]), 32)]
        assert not wrong, f"{len(wrong)} filled keys missing or wrong on the destination, e.g. {wrong[:5]}"
        lost = [k for k in writer.acked if got.get(k) != value_of("w", int(k[1:]), 32)]
        assert not lost, f"{len(lost)} acknowledged writes missing on the destination, e.g. {lost[:5]}"


@needs_lab
def test_a_failed_restore_is_not_committed_and_the_source_resumes() -> None:
    """The destination's port is taken: CRIU cannot restore the listening socket, the source keeps memcached."""
    import socket

    from precopy.lab.criu_pair import CriuPair
    from precopy.lab.memcached import PORT, value_of

    with CriuPair(f"criv{os.getpid() % 100000}") as pair:
        _in_ns(pair.hosts.src_ns, lambda: _fill())
        squatter = _in_ns(pair.hosts.dst_ns, lambda: socket.create_server(("0.0.0.0", PORT)))
        try:
            rc, rep, err = pair.migrate("--downtime-ms", "500")
        finally:
            squatter.close()
        assert rc == 3, err[-3000:]
        assert "criu restore failed" in err, err[-3000:]
        assert rep["outcome"] == "aborted"
        assert pair.pid is not None and process_state(pair.pid) != "T", "the source memcached was not resumed"
        assert not pair.restored_pids(), "a restored process was left on the destination"
        assert pair.dest_pid is not None  # the images' file written ahead of the commit went with it
        state = Path(f"/proc/{pair.dest_pid}/root/dev/shm/precopy-in")
        assert state.is_dir() and not [p.name for p in state.iterdir() if p.name.endswith(".tmp")]
        got = _in_ns(pair.hosts.src_ns, lambda: _read_all([f"k{i}" for i in range(0, KEYS, 97)]))
        assert all(got.get(f"k{i}") == value_of("k", i, 32) for i in range(0, KEYS, 97))


def _rss_kib(pid: int, path: Path) -> int:
    """The Rss of ``pid``'s mapping of ``path`` (from /proc/PID/smaps)."""
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"process {pid} does not map {path}")


@pytest.mark.skipif(not ROOT or os.uname().machine != "x86_64", reason="ptrace of another process: root, x86-64")
def test_a_userfaultfd_made_inside_a_process_tracks_its_writes(tmp_path: Path) -> None:
    """inject.take_userfaultfd: the process keeps no new fd, runs on, and its writes are reported.

    With ``release`` it first drops its page-table entries of the region
    (what CRIU's smaps read would walk): the data stays in the file.
    """
    import subprocess
    import sys
    import time

    from precopy.memory.uffd import PagemapScanner, register_wp, uffd_api, unregister, writeprotect
    from precopy.workload.criu_source import _mapping_of
    from precopy.workload.inject import take_userfaultfd

    region = Path("/dev/shm") / f"precopy-criu-inject-{os.getpid()}"
    region.write_bytes(b"".join(bytes([p + 1]) * 4096 for p in range(64)))  # page p holds p + 1
    original = region.read_bytes()
    code = ("import mmap, os, sys, time\n"
            "f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)\n"
            "sum(m[p * 4096] for p in range(64))\n"  # every page mapped
            "print('ready', flush=True); i = 0\n"
            "while True:\n"
            "    line = sys.stdin.readline()\n"  # blocks in read(): the injection interrupts it
            "    if not line: break\n"
            "    p = int(line); m[p * 4096 + 1] = 255; i += 1; print(i, m[p * 4096], flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(region)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.1)  # in its read()
        fds_before = sorted(os.listdir(f"/proc/{proc.pid}/fd"))
        start, length = _mapping_of(proc.pid, region)
        assert _rss_kib(proc.pid, region) == 256
        fd = take_userfaultfd(proc.pid, release=(start, length))
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
            assert sorted(os.listdir(f"/proc/{proc.pid}/fd")) == fds_before
            assert _rss_kib(proc.pid, region) == 0  # released: nothing left for smaps to walk
            uffd_api(fd)
            register_wp(fd, start, length)
            writeprotect(fd, start, length)
            scanner = PagemapScanner(proc.pid, start, length)
            scanner.scan()
            for page in (3, 17, 40):
                proc.stdin.write(f"{page}\n")
                proc.stdin.flush()
                # it ran on, out of the interrupted read(), and sees the file's data
                assert proc.stdout.readline().split()[1] == str(original[page * 4096])
            assert sorted(int(p) for p in scanner.scan()) == [3, 17, 40]
            assert _rss_kib(proc.pid, region) == 12  # only what it touched since
            scanner.close()
            unregister(fd, start, length)
        finally:
            os.close(fd)
        assert proc.poll() is None
        want = bytearray(original)
        for page in (3, 17, 40):
            want[page * 4096 + 1] = 255
        assert region.read_bytes() == bytes(want)
    finally:
        proc.kill()
        proc.wait()
        region.unlink(missing_ok=True)


class _FakeCriu:
    """A CriuTool stand-in: no CRIU needed."""

    path = "/opt/criu/criu"
    version = (4, 2, 1)
    version_text = "4.2.1"

    def check(self, prefix: list[str] | None = None) -> str:
        return "criu check: Looks good"


def test_the_restore_uses_the_criu_started_ahead_else_runs_the_command(tmp_path: Path) -> None:
    """criu_dest: a live worker gets the RPC request (its answer's pid); a dead or missing one, ``criu restore``."""
    import asyncio
    import shlex
    import stat
    import sys

    from precopy.workload.criu_dest import CriuDestination, _Restored
    from precopy.workload.criu_rpc import RESTORE, CriuWorker, RpcAnswer, _fields

    class Tool(_FakeCriu):
        def __init__(self) -> None:
            self.calls: list[str] = []

        async def request(self, worker: CriuWorker, message: bytes, *, timeout_s: float, log: Path
                          ) -> tuple[float, RpcAnswer]:
            assert _fields(message)[1] == [RESTORE]
            worker.close()
            self.calls.append("rpc")
            return 0.001, RpcAnswer(kind=RESTORE, success=True, pid=4321)

        async def run(self, args: list[str], *, timeout_s: float, log: Path | None = None,
                      prefix: list[str] | None = None) -> float:
            self.calls.append(args[0])
            Path(args[args.index("--pidfile") + 1]).write_text("1234\n")
            return 0.001

    waits = tmp_path / "fake-criu"  # "criu swrk FD" that waits for a request (and ends when we let go)
    # (A shell script: a shebang cannot hold the path of a checkout with spaces in it.)
    waits.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                     "'import os, sys; os.read(int(sys.argv[2]), 1 << 16)' \"$@\"\n")
    waits.chmod(waits.stat().st_mode | stat.S_IXUSR)
    tool = Tool()
    dest = CriuDestination(tool, work_dir=tmp_path)  # type: ignore[arg-type]

    async def restore(worker: CriuWorker | None) -> int:
        r = _Restored(images=tmp_path, final=tmp_path / "final", worker=worker)
        return await dest._run_restore(r)

    alive = CriuWorker.start(str(waits))
    assert asyncio.run(restore(alive)) == 4321 and tool.calls == ["rpc"]
    dead = CriuWorker.start("/bin/true")
    dead.proc.wait()
    assert asyncio.run(restore(dead)) == 1234 and tool.calls == ["rpc", "restore"]
    assert asyncio.run(restore(None)) == 1234 and tool.calls == ["rpc", "restore", "restore"]
    dead.close()
    assert alive.proc.wait(timeout=30) == 0  # let go: our end closed, it ended


def test_the_destination_wants_the_same_criu_at_the_same_path() -> None:
    from precopy.workload.criu_dest import CriuDestination

    dest = CriuDestination(_FakeCriu())  # type: ignore[arg-type]
    check = dest.requirement_checks()["criu"]
    assert "4.2.1" in check(["/opt/criu/criu", "4.2.1"])
    for other in (["/usr/sbin/criu", "4.2.1"], ["/opt/criu/criu", "4.3"]):
        with pytest.raises(PrecopyError, match="install the same CRIU at the same path"):
            check(other)
    with pytest.raises(PrecopyError, match="path and a version"):
        check(["/opt/criu/criu"])


def test_the_source_refuses_a_process_criu_could_not_restore(tmp_path: Path) -> None:
    """Not a PID-namespace init: the preflight says to start it with precopy-guest run."""
    import subprocess
    import sys

    from precopy.workload.criu_source import CriuWorkload

    region = tmp_path / "r"
    region.write_bytes(b"\0" * 4096)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wl = CriuWorkload(proc.pid, region, _FakeCriu())  # type: ignore[arg-type]
        with pytest.raises(GuestControlError, match="precopy-guest run"):
            wl.preflight()
        assert wl.requirements() == {"criu": ["/opt/criu/criu", "4.2.1"]}
    finally:
        proc.kill()
        proc.wait()


def test_no_usable_criu_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from precopy.workload.criu import find_criu

    monkeypatch.setenv("PRECOPY_CRIU", "/bin/false")
    with pytest.raises(GuestControlError, match="make criu"):
        find_criu()
    with pytest.raises(GuestControlError, match="make criu"):
        find_criu("/nonexistent/criu")


def test_precopy_source_criu_needs_pid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from precopy_agents.source_main import main

    region = tmp_path / "r"
    region.write_bytes(b"\0" * 4096)
    sock = tmp_path / "guest.sock"
    assert main(["--to", "127.0.0.1:1", "--memory", str(region), "--guest-control", str(sock), "--criu"]) == 2
    assert "--criu needs --pid" in capsys.readouterr().err
