"""Tests for the demo guest (``precopy.guest``), run as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash

from precopy.guest import PAGE_SIZE, create_region, parse_size, region_digest

from .conftest import wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

Spawn = Callable[..., subprocess.Popen[bytes]]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _guest_env() -> dict[str, str]:
    """Environment that makes ``python -m precopy.guest`` importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
    )
    return env


def _guest_cmd(*args: object) -> list[str]:
    """Command line running the guest module with ``args``."""
    return [sys.executable, "-m", "precopy.guest", *map(str, args)]


def run_guest(*args: object, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run the guest to completion and return the finished process."""
    return subprocess.run(
        _guest_cmd(*args),
        cwd=REPO_ROOT,
        env=_guest_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start guests in the background; kill any still running at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def _spawn(*args: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            _guest_cmd(*args),
            cwd=REPO_ROOT,
            env=_guest_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    """Read exactly ``count`` bytes from ``sock``."""
    chunks = bytearray()
    while len(chunks) < count:
        data = sock.recv(count - len(chunks))
        if not data:
            raise ConnectionError(f"connection closed after {len(chunks)} of {count} bytes")
        chunks += data
    return bytes(chunks)


class Control:
    """Minimal client for the guest control socket."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"guest exited with {proc.returncode} before its control socket "
                    f"appeared: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        sock.settimeout(timeout)
        self.sock = sock
        self._buffer = bytearray()

    def send_raw(self, line: bytes) -> dict[str, Any]:
        """Send raw bytes (should end with a newline) and read one reply line."""
        self.sock.sendall(line)
        return self.read_reply()

    def read_reply(self) -> dict[str, Any]:
        """Read one JSON reply line (keeping any following bytes buffered)."""
        while b"\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("guest closed the control connection")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    def _read_blob(self, count: int) -> bytes:
        """Read ``count`` raw bytes following a reply line."""
        take = bytes(self._buffer[:count])
        del self._buffer[:count]
        return take + _recv_exact(self.sock, count - len(take))

    def request(self, op: str) -> dict[str, Any]:
        """Send ``{"op": op}`` and return the reply."""
        return self.send_raw(json.dumps({"op": op}).encode() + b"\n")

    def pause(self) -> bytes:
        """Pause the guest and return its device-state blob."""
        reply = self.request("pause")
        assert reply["ok"] is True, reply
        return self._read_blob(reply["device_state_len"])

    def close(self) -> None:
        """Disconnect."""
        self.sock.close()


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """Wait for ``proc`` and return (returncode, stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _read_pages(path: Path) -> np.ndarray:
    """Return the region file as a (pages, 4096) uint8 array."""
    return np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE_SIZE)


@pytest.fixture
def region(tmp_path: Path) -> Path:
    """A 4 MiB random region file."""
    path = tmp_path / "guest.mem"
    create_region(path, 4 * MiB, "random", seed=11)
    return path


# ---------------------------------------------------------------------------
# Sizes, create and digests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("4K", 4096),
        ("64k", 65536),
        ("256M", 256 * MiB),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("8KB", 8192),
        ("0", 0),
    ],
)
def test_parse_size_accepts_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-4K", "1.5M", "12x", "M", "4 K B"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_create_cli_sizes_and_contents(tmp_path: Path) -> None:
    for content in ("random", "half-text", "zero"):
        path = tmp_path / f"{content}.mem"
        result = run_guest("create", "--memory", path, "--size", "1M", "--content", content)
        assert result.returncode == 0, result.stderr
        assert path.stat().st_size == MiB
    assert not np.fromfile(tmp_path / "zero.mem", dtype=np.uint8).any()
    random_data = (tmp_path / "random.mem").read_bytes()
    assert len(zlib.compress(random_data, 1)) > 0.99 * len(random_data)
    pages = _read_pages(tmp_path / "half-text.mem")
    text_half, random_half = pages[:, : PAGE_SIZE // 2], pages[:, PAGE_SIZE // 2 :]
    assert ((text_half >= 32) & (text_half < 127)).all()
    assert len(zlib.compress(random_half.tobytes(), 1)) > 0.99 * random_half.size


def test_create_truncates_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "r.mem"
    path.write_bytes(b"\xff" * (3 * PAGE_SIZE))
    result = run_guest("create", "--memory", path, "--size", "8K", "--content", "zero")
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == bytes(2 * PAGE_SIZE)


def test_create_is_seeded(tmp_path: Path) -> None:
    for content in ("random", "half-text"):
        create_region(tmp_path / "a", 64 * PAGE_SIZE, content, seed=5)
        create_region(tmp_path / "b", 64 * PAGE_SIZE, content, seed=5)
        create_region(tmp_path / "c", 64 * PAGE_SIZE, content, seed=6)
        assert region_digest(tmp_path / "a") == region_digest(tmp_path / "b")
        assert region_digest(tmp_path / "a") != region_digest(tmp_path / "c")


def test_half_text_lz4_ratio(tmp_path: Path) -> None:
    lz4_block = pytest.importorskip("lz4.block")
    path = tmp_path / "t.mem"
    create_region(path, 2 * MiB, "half-text", seed=2)
    pages = _read_pages(path)
    compressed = sum(len(lz4_block.compress(page.tobytes(), store_size=False)) for page in pages)
    assert 0.6 < compressed / pages.size < 0.8


def test_create_rejects_unaligned_size(tmp_path: Path) -> None:
    result = run_guest("create", "--memory", tmp_path / "x", "--size", "5000")
    assert result.returncode != 0
    assert "multiple of 4096" in result.stderr
    with pytest.raises(ValueError, match="multiple of 4096"):
        create_region(tmp_path / "y", 0, "zero", 0)


def test_region_digest_matches_one_shot_hash(region: Path) -> None:
    assert region_digest(region) == xxhash.xxh3_128_hexdigest(region.read_bytes())


def test_dirty_requires_existing_region(tmp_path: Path) -> None:
    result = run_guest("dirty", "--memory", tmp_path / "missing", "--duration", "1")
    assert result.returncode == 1
    assert "precopy-guest create" in result.stderr


# ---------------------------------------------------------------------------
# dirty
# ---------------------------------------------------------------------------


def test_dirty_rate_and_hot_set(region: Path, tmp_path: Path) -> None:
    before = _read_pages(region)
    stats = tmp_path / "stats.json"
    result = run_guest(
        "dirty", "--memory", region, "--rate", 2000, "--duration", 1.0, "--stats-out", stats
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(stats.read_text())
    # The guest paces itself: never faster than asked (it catches up at most 50 ms of missed
    # writes). How many it wrote depends on the CPU it got -- a loaded 2-core machine may
    # starve it -- so the hot set is checked against what it did write.
    assert data["seconds"] > 0.9
    written = data["pages_written"]
    assert 0 < written and written / data["seconds"] < 3000
    changed = (_read_pages(region) != before).any(axis=1)
    hot = len(changed) // 10
    hot_changed, cold_changed = int(changed[:hot].sum()), int(changed[hot:].sum())
    assert cold_changed <= 0.2 * written + 20  # ~10 % of the writes go elsewhere, uniformly
    assert hot_changed >= min(hot, 0.3 * written)  # ~90 % into the hot tenth
    if written >= 1000:  # as paced on a machine with room: ~1,800 writes into ~102 hot pages
        assert changed[:hot].all() and cold_changed > 50


def test_dirty_uniform_half_text_writes(region: Path, tmp_path: Path) -> None:
    before = _read_pages(region)
    stats = tmp_path / "stats.json"
    result = run_guest(
        "dirty", "--memory", region, "--rate", 1000, "--duration", 0.5,
        "--hot-fraction", 1, "--content", "half-text", "--stats-out", stats,
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(stats.read_text())["pages_written"]
    after = _read_pages(region)
    changed = (after != before).any(axis=1)
    assert 0 < changed.sum() <= written
    assert changed[len(changed) // 2 :].sum() > 0.3 * changed.sum()
    differing = after[after != before]
    assert ((differing >= 32) & (differing < 127)).mean() > 0.9


def test_dirty_sweep_increments_first_bytes(tmp_path: Path) -> None:
    path = tmp_path / "sweep.mem"
    create_region(path, MiB, "random", seed=4)
    before = _read_pages(path)
    stats = tmp_path / "stats.json"
    result = run_guest(
        "dirty", "--memory", path, "--pattern", "sweep", "--duration", 0.3, "--stats-out", stats
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(stats.read_text())["pages_written"]
    after = _read_pages(path)
    pages = len(before)
    assert written > 10 * pages
    laps, partial = divmod(written, pages)
    expected_delta = ((laps + (np.arange(pages) < partial)) % 256).astype(np.uint8)
    assert np.array_equal(after[:, 0] - before[:, 0], expected_delta)  # uint8 wraps
    assert np.array_equal(after[:, 1:], before[:, 1:])


def test_dirty_sweep_at_a_rate_goes_in_order_and_wraps(tmp_path: Path) -> None:
    path = tmp_path / "sweep.mem"
    create_region(path, MiB, "random", seed=5)
    before = _read_pages(path)
    stats = tmp_path / "stats.json"
    result = run_guest("dirty", "--memory", path, "--pattern", "sweep", "--sweep-rate", 2000,
                       "--duration", 0.5, "--stats-out", stats)
    assert result.returncode == 0, result.stderr
    written = json.loads(stats.read_text())["pages_written"]
    pages = len(before)
    assert 0 < written < 10 * pages  # paced: far from the full-speed sweep's laps
    laps, partial = divmod(written, pages)
    expected_delta = ((laps + (np.arange(pages) < partial)) % 256).astype(np.uint8)
    after = _read_pages(path)
    assert np.array_equal(after[:, 0] - before[:, 0], expected_delta)
    assert np.array_equal(after[:, 1:], before[:, 1:])


def test_dirty_idle_writes_nothing(region: Path, tmp_path: Path) -> None:
    digest = region_digest(region)
    stats = tmp_path / "stats.json"
    result = run_guest(
        "dirty", "--memory", region, "--rate", 0, "--duration", 0.3, "--stats-out", stats
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(stats.read_text())["pages_written"] == 0
    assert region_digest(region) == digest


# ---------------------------------------------------------------------------
# Control socket
# ---------------------------------------------------------------------------


def test_pause_stops_writes_and_resume_restarts(
    region: Path, tmp_path: Path, spawn: Spawn
) -> None:
    sock_path = tmp_path / "ctl.sock"
    proc = spawn("dirty", "--memory", region, "--rate", 20000, "--control", sock_path)
    control = Control(sock_path, proc)
    start_digest = region_digest(region)
    # Writes are waited for, not slept on: a guest starved of CPU may not
    # have written in any fixed time.  Stillness while paused is slept on
    # (a fixed sleep can only miss a write there, never invent one).
    wait_for(lambda: region_digest(region) != start_digest, timeout=30, what="the guest's first writes")
    assert control.pause() == b""
    paused_digest = region_digest(region)
    assert paused_digest != start_digest
    time.sleep(0.2)
    assert region_digest(region) == paused_digest
    assert control.request("resume") == {"ok": True}
    wait_for(lambda: region_digest(region) != paused_digest, timeout=30, what="writes after the resume")
    assert control.request("stop") == {"ok": True}
    returncode, _, err = _wait_exit(proc)
    assert returncode == 0, err
    assert not sock_path.exists()


def test_sweep_pauses_too(tmp_path: Path, spawn: Spawn) -> None:
    path = tmp_path / "sweep.mem"
    create_region(path, MiB, "zero", seed=0)
    sock_path = tmp_path / "ctl.sock"
    proc = spawn("dirty", "--memory", path, "--pattern", "sweep", "--control", sock_path)
    control = Control(sock_path, proc)
    control.pause()
    digest = region_digest(path)
    time.sleep(0.2)
    assert region_digest(path) == digest
    control.request("resume")
    wait_for(lambda: region_digest(path) != digest, timeout=30, what="writes after the resume")
    control.request("stop")
    assert _wait_exit(proc)[0] == 0


def test_device_state_blob_matches_out_file(region: Path, tmp_path: Path, spawn: Spawn) -> None:
    sock_path = tmp_path / "ctl.sock"
    out = tmp_path / "device.bin"
    proc = spawn(
        "dirty", "--memory", region, "--rate", 1000, "--control", sock_path,
        "--device-state-size", 100_000, "--device-state-out", out, "--seed", 9,
    )
    control = Control(sock_path, proc)
    first = control.pause()
    assert len(first) == 100_000
    assert any(first)
    assert out.read_bytes() == first
    assert control.pause() == first  # pausing again while paused: same blob
    assert control.request("resume") == {"ok": True}
    assert control.request("resume") == {"ok": True}  # resume while running is fine
    second = control.pause()
    assert len(second) == 100_000 and second != first
    assert out.read_bytes() == second
    control.request("stop")
    assert _wait_exit(proc)[0] == 0


def test_bad_requests_get_error_replies(region: Path, tmp_path: Path, spawn: Spawn) -> None:
    sock_path = tmp_path / "ctl.sock"
    proc = spawn("dirty", "--memory", region, "--rate", 0, "--control", sock_path)
    control = Control(sock_path, proc)
    for line in (b"{not json\n", b"[1, 2]\n", b'{"op": "explode"}\n', b'{"no_op": 1}\n'):
        reply = control.send_raw(line)
        assert reply["ok"] is False and reply["error"], reply
    # Several requests in one packet, then the connection is still usable.
    control.sock.sendall(b'{"op": "resume"}\n{"op": "resume"}\n')
    assert control.read_reply() == {"ok": True}
    assert control.read_reply() == {"ok": True}
    control.close()
    # A second client connects after the first one left.
    again = Control(sock_path, proc)
    assert again.request("resume") == {"ok": True}
    assert again.request("stop") == {"ok": True}
    returncode, _, err = _wait_exit(proc)
    assert returncode == 0, err
    assert not sock_path.exists()


def test_sigterm_exits_cleanly_with_stats(region: Path, tmp_path: Path, spawn: Spawn) -> None:
    sock_path = tmp_path / "ctl.sock"
    stats = tmp_path / "stats.json"
    proc = spawn(
        "dirty", "--memory", region, "--rate", 5000, "--control", sock_path, "--stats-out", stats
    )
    control = Control(sock_path, proc)
    control.pause()  # a paused guest must still honour SIGTERM
    control.close()
    proc.send_signal(signal.SIGTERM)
    returncode, _, err = _wait_exit(proc)
    assert returncode == 0, err
    assert json.loads(stats.read_text())["pages_written"] >= 0
    assert not sock_path.exists()


def test_stale_socket_file_is_replaced(region: Path, tmp_path: Path, spawn: Spawn) -> None:
    sock_path = tmp_path / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()
    proc = spawn("dirty", "--memory", region, "--rate", 0, "--control", sock_path)
    control = Control(sock_path, proc)
    assert control.request("stop") == {"ok": True}
    assert _wait_exit(proc)[0] == 0


def _cpu_seconds(pid: int, window: float) -> float:
    """How much CPU ``pid`` wanted during the next ``window`` seconds: the time its threads ran plus
    the time they waited on a run queue for a CPU (``/proc/PID/task/*/schedstat``), in seconds.

    A loop that rests wants little; one that is only starved on a busy machine still wants the
    whole window, so comparing the two holds whatever else runs (CPU time alone would not).
    """
    def wanted() -> int:
        total = 0
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                run_ns, wait_ns, _ = stat.read_text().split()
            except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
                continue
            total += int(run_ns) + int(wait_ns)
        return total

    start = wanted()
    time.sleep(window)
    return (wanted() - start) / 1e9


def _throttle(control: Control, pct: object) -> dict[str, Any]:
    return control.send_raw(json.dumps({"op": "throttle", "pct": pct}).encode() + b"\n")


def test_throttle_op_makes_the_work_loop_rest(tmp_path: Path, spawn: Spawn) -> None:
    """At 90 % the sweep (which otherwise uses a whole CPU) rests 90 ms in every 100:
    its CPU time falls well below the unthrottled figure measured in the same run;
    resume ends the throttle."""
    path = tmp_path / "sweep.mem"
    create_region(path, 4 * MiB, "zero", seed=0)
    sock_path = tmp_path / "ctl.sock"
    proc = spawn("dirty", "--memory", path, "--pattern", "sweep", "--control", sock_path)
    control = Control(sock_path, proc)
    full = _cpu_seconds(proc.pid, 1.0)
    assert _throttle(control, 90) == {"ok": True}
    slow = _cpu_seconds(proc.pid, 1.0)
    # Resting, not stopped: it writes again within the duty cycle -- or, on a
    # machine busy enough to starve it, whenever it next gets a CPU.
    digest = region_digest(path)
    deadline = time.monotonic() + 30
    while region_digest(path) == digest:
        assert time.monotonic() < deadline, "the throttled sweep never wrote again: stopped, not resting"
        time.sleep(0.02)
    assert control.request("resume") == {"ok": True}
    again = _cpu_seconds(proc.pid, 1.0)
    assert slow < 0.5 * full and slow < 0.5 * again, (full, slow, again)
    # A pause while throttled stops the loop at once; resume runs it unthrottled.
    assert _throttle(control, 95) == {"ok": True}
    control.pause()
    digest = region_digest(path)
    time.sleep(0.2)
    assert region_digest(path) == digest
    assert control.request("resume") == {"ok": True}
    assert _cpu_seconds(proc.pid, 1.0) > 2 * slow
    control.request("stop")
    assert _wait_exit(proc)[0] == 0


def test_throttle_ends_when_its_connection_closes(tmp_path: Path, spawn: Spawn) -> None:
    """An agent that dies (its connection closes) never leaves the guest throttled."""
    path = tmp_path / "sweep.mem"
    create_region(path, 4 * MiB, "zero", seed=0)
    sock_path = tmp_path / "ctl.sock"
    proc = spawn("dirty", "--memory", path, "--pattern", "sweep", "--control", sock_path)
    control = Control(sock_path, proc)
    assert _throttle(control, 95) == {"ok": True}
    slow = _cpu_seconds(proc.pid, 1.0)
    control.close()
    again = Control(sock_path, proc)  # served once the first connection is gone
    fast = _cpu_seconds(proc.pid, 1.0)
    assert fast > 2 * slow, (slow, fast)
    assert again.request("stop") == {"ok": True}
    assert _wait_exit(proc)[0] == 0


def test_bad_throttle_requests_get_error_replies(region: Path, tmp_path: Path, spawn: Spawn) -> None:
    sock_path = tmp_path / "ctl.sock"
    proc = spawn("dirty", "--memory", region, "--rate", 0, "--control", sock_path)
    control = Control(sock_path, proc)
    for pct in (100, -5, "50", True, None, [50]):
        reply = _throttle(control, pct)
        assert reply["ok"] is False and "throttle" in reply["error"], (pct, reply)
    assert _throttle(control, 0) == {"ok": True}
    assert _throttle(control, 99) == {"ok": True}
    assert _throttle(control, 12.5) == {"ok": True}
    assert control.request("stop") == {"ok": True}
    assert _wait_exit(proc)[0] == 0


# ---------------------------------------------------------------------------
# det
# ---------------------------------------------------------------------------


def _det_result(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """Parse the JSON line a finished det guest printed."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_det_is_deterministic_and_seeded(tmp_path: Path) -> None:
    create_region(tmp_path / "base.mem", MiB, "random", seed=3)
    digests = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = tmp_path / f"{name}.mem"
        shutil.copyfile(tmp_path / "base.mem", path)
        out = tmp_path / f"{name}.json"
        result = _det_result(
            run_guest("det", "--memory", path, "--steps", 2000, "--seed", seed, "--digest-out", out)
        )
        assert result["steps"] == 2000
        assert json.loads(out.read_text()) == result
        assert region_digest(path) == result["digest"]
        digests.append(result["digest"])
    assert digests[0] == digests[1] != digests[2]
    assert digests[0] != region_digest(tmp_path / "base.mem")


def test_det_empty_device_state_means_fresh_start(tmp_path: Path) -> None:
    create_region(tmp_path / "a.mem", MiB, "random", seed=3)
    shutil.copyfile(tmp_path / "a.mem", tmp_path / "b.mem")
    (tmp_path / "empty.bin").write_bytes(b"")
    plain = _det_result(run_guest("det", "--memory", tmp_path / "a.mem", "--steps", 500))
    loaded = _det_result(
        run_guest(
            "det", "--memory", tmp_path / "b.mem", "--steps", 500,
            "--device-state", tmp_path / "empty.bin",
        )
    )
    assert plain == loaded


def test_det_migration_matches_straight_run(tmp_path: Path, spawn: Spawn) -> None:
    steps = 3000
    create_region(tmp_path / "base.mem", MiB, "random", seed=3)
    straight = tmp_path / "straight.mem"
    source = tmp_path / "source.mem"
    shutil.copyfile(tmp_path / "base.mem", straight)
    shutil.copyfile(tmp_path / "base.mem", source)
    expected = _det_result(run_guest("det", "--memory", straight, "--steps", steps))["digest"]

    # Run on the source, pause mid-way, copy memory + device state while paused.
    sock_path = tmp_path / "ctl.sock"
    proc = spawn(
        "det", "--memory", source, "--steps", steps, "--control", sock_path,
        "--step-sleep-us", 300,
    )
    control = Control(sock_path, proc)
    for _ in range(50):  # until it has taken some steps (slow on a loaded machine)
        time.sleep(0.05)
        blob = control.pause()
        state = msgpack.unpackb(blob)
        if state["step"] > 0:
            break
        control.request("resume")
    assert 0 < state["step"] < steps, state
    assert set(state) == {"step", "rng", "seed"} and state["seed"] == 1
    clean, corrupt = tmp_path / "dest.mem", tmp_path / "corrupt.mem"
    shutil.copyfile(source, clean)
    shutil.copyfile(source, corrupt)
    assert control.request("stop") == {"ok": True}
    returncode, out, _ = _wait_exit(proc)
    assert returncode == 0 and out == b""  # stopped early: no digest printed

    device_state = tmp_path / "device.bin"
    device_state.write_bytes(blob)
    resumed = _det_result(
        run_guest("det", "--memory", clean, "--steps", steps, "--device-state", device_state)
    )
    assert resumed == {"steps": steps, "digest": expected}

    # A single stale/corrupted page in the copy changes the final answer.
    pages = np.fromfile(corrupt, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    pages[17] ^= 0xFF
    pages.tofile(corrupt)
    damaged = _det_result(
        run_guest("det", "--memory", corrupt, "--steps", steps, "--device-state", device_state)
    )
    assert damaged["digest"] != expected


def test_det_rejects_state_beyond_steps(tmp_path: Path) -> None:
    create_region(tmp_path / "a.mem", MiB, "zero", seed=0)
    blob = tmp_path / "state.bin"
    blob.write_bytes(msgpack.packb({"step": 10, "rng": 5, "seed": 1}))
    result = run_guest("det", "--memory", tmp_path / "a.mem", "--steps", 5, "--device-state", blob)
    assert result.returncode == 1
    assert "--steps" in result.stderr
    blob.write_bytes(b"\xc1garbage")
    result = run_guest("det", "--memory", tmp_path / "a.mem", "--steps", 5, "--device-state", blob)
    assert result.returncode == 1
    assert "msgpack" in result.stderr


def test_a_paced_loop_does_not_make_up_the_throttles_rests(monkeypatch: pytest.MonkeyPatch) -> None:
    """A throttle of f slows the paced writer to 1 - f of its rate: the time the work loop rested is
    never credited (only jitter up to the catch-up cap is).  A fake clock: 1,000 pages/s, batches
    every 5 ms, the gate resting 5 ms (50 %) after every batch, for 1 s of the clock."""
    from precopy.guest import dirty

    clock = {"t": 0.0}
    monkeypatch.setattr(dirty.time, "monotonic", lambda: clock["t"])

    class Gate:
        rested_s = 0.0
        batches = 0

        def checkpoint(self) -> bool:
            if self.batches:
                clock["t"] += 0.005  # the throttle's rest
                self.rested_s += 0.005
            self.batches += 1
            return True

        def sleep(self, seconds: float) -> None:
            clock["t"] += seconds

    class Writer:
        pages = 0

        def write(self, count: int) -> None:
            self.pages += count

    writer = Writer()
    written = dirty._paced_loop(writer, 1000.0, Gate(), deadline=1.0)  # type: ignore[arg-type]
    assert written == writer.pages
    assert 490 <= written <= 510, written  # 1,000 pages/s, resting half the time: ~500, not ~1,000


def test_a_throttled_loop_rests_in_proportion_to_the_work_it_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that took 40 ms (a long one, or a starved one on a busy machine) owes a 40 ms rest at
    50 %, not THROTTLE_RUN_S's 10: the loop works half the time whatever its batches take; right
    after a rest none is owed.  A fake clock that the gate's waits advance."""
    from precopy.guest import gate as gate_mod

    clock = {"t": 100.0}
    monkeypatch.setattr(gate_mod.time, "monotonic", lambda: clock["t"])

    class Cond:  # the gate's condition: a wait is the clock moving on
        def __enter__(self) -> "Cond":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def wait(self, timeout: float) -> None:
            clock["t"] += timeout

        def notify_all(self) -> None:
            pass

    gate = gate_mod.WorkGate()
    gate._cond = Cond()  # type: ignore[assignment]
    gate.set_throttle(0.5)
    clock["t"] += 0.040  # a 40 ms batch
    assert gate.checkpoint()
    assert gate.rested_s == pytest.approx(0.040)
    assert gate.checkpoint()  # right after a rest: no work done, no rest owed
    assert gate.rested_s == pytest.approx(0.040)
    clock["t"] += 0.004  # under THROTTLE_RUN_S of work: no rest yet
    assert gate.checkpoint() and gate.rested_s == pytest.approx(0.040)
