"""Corruption, black holes, slow links and partial state, through the fault proxy."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from precopy.protocol import Kind
from precopy.protocol.limits import PREFIX_SIZE

from .conftest import Procs, start_dest
from .faultproxy import S2C, Fault, FaultProxy
from .test_faults import Setup, dport, fault_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# -- corruption --------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["off", "lz4"])
def test_flipped_page_byte_is_detected_and_never_lands(procs: Procs, shm, compress: str) -> None:  # type: ignore[no-untyped-def]
    """A byte of a checked page batch flipped in flight (a batch of dirty pages with
    its checksum, or a compressed full-copy batch with its chunk digests or lz4):
    the check catches it before the bytes are written; the migration rolls back and
    nothing is left on the destination."""
    # Scattered dirty pages go as checked batches; 20,000 pages/s in 16 MiB dirties
    # most chunks in a round, and those go whole, straight from memory.
    s = Setup(procs, shm, rate=1000 if compress == "off" else 20000)
    checked = (lambda m: "h" in m and len(m["i"]) >= 8) if compress == "off" else (lambda m: m.get("c") == 1 or "cd" in m)
    fault = Fault(action="flip", kind=Kind.PAGES, where=checked, in_payload=True, offset=1234)
    rc, rep, log = s.migrate_through(fault, "--compress", compress)
    assert fault.fired.is_set()
    assert rc == 3, s.diag()
    assert "corrupt" in rep["error"] or "lz4" in rep["error"] or "checksum" in rep["error"], s.diag()  # type: ignore[index]
    s.assert_runs_on_source()
    s.assert_no_partial()
    assert "checksum mismatch" in s.dest.log_text() or "lz4" in s.dest.log_text()


def test_flipped_byte_of_a_page_sent_straight_from_memory_is_repaired(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """A full-copy batch sent straight from the workload's memory carries no
    checksum (the source never saw the bytes the kernel copied): a byte flipped in
    it lands in the partial region, and the next scan finds the chunk different,
    asks the destination what it holds there and resends the page.  What commits
    equals the paused source."""
    s = Setup(procs, shm)
    fault = Fault(action="flip", kind=Kind.PAGES, where=lambda m: "h" not in m and "cd" not in m, nth=4,
                  in_payload=True, offset=1234)
    rc, rep, log = s.migrate_through(fault)
    assert fault.fired.is_set()
    assert rc == 0, s.diag()
    s.assert_runs_on_destination()


def test_flipped_meta_byte_is_a_protocol_error(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """A flipped byte in a PAGES header (here the key of the page list): a clear
    protocol error, the migration rolls back."""
    s = Setup(procs, shm)
    fault = Fault(action="flip", kind=Kind.PAGES, nth=2, offset=2)
    rc, rep, log = s.migrate_through(fault)
    assert fault.fired.is_set()
    assert rc == 3, s.diag()
    assert "PAGES" in rep["error"], s.diag()  # type: ignore[index]
    s.assert_runs_on_source()
    s.assert_no_partial()


def test_flipped_device_state_is_refused_at_commit(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """The device state is checked against COMMIT's checksum: a corrupted blob is never committed."""
    s = Setup(procs, shm, "control")
    fault = Fault(action="flip", kind=Kind.DEVICE_STATE, in_payload=True, offset=4000)
    rc, rep, log = s.migrate_through(fault)
    assert fault.fired.is_set()
    assert rc == 3, s.diag()
    assert "checksum" in rep["error"], s.diag()  # type: ignore[index]
    s.assert_runs_on_source()
    s.assert_no_partial()
    assert not (s.dest.memory_dir / "vm.mem.device-state").exists()


def _misplace(frame: bytearray, meta_len: int) -> None:
    """Change a batch's last page number into another valid, increasing one."""
    meta = msgpack.unpackb(bytes(frame[PREFIX_SIZE:PREFIX_SIZE + meta_len]), raw=False)
    idx = np.frombuffer(meta["i"], dtype="<u4").copy()
    idx[-1] = 4095  # the region's last page: still < npages and increasing
    meta["i"] = idx.tobytes()
    packed = msgpack.packb(meta, use_bin_type=True)
    assert len(packed) == meta_len
    frame[PREFIX_SIZE:PREFIX_SIZE + meta_len] = packed


def test_page_number_corrupted_within_limits_is_repaired(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """The worst corruption: a page number of a batch of scattered (dirty) pages,
    whose checksum covers the bytes but not the page numbers, changed into
    another valid, increasing one, so the frame passes every check and a page
    lands in the wrong place.  The chunk comparison finds it and resends; the
    committed region equals the source."""
    s = Setup(procs, shm)
    fault = Fault(action="mutate", kind=Kind.PAGES, where=lambda m: "cd" not in m and len(m["i"]) >= 8,
                  mutate=_misplace)
    rc, rep, log = s.migrate_through(fault)
    assert fault.fired.is_set()
    assert rc == 0, s.diag()
    s.assert_runs_on_destination()


def test_page_number_of_a_whole_chunk_batch_corrupted_is_refused(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """A compressed full-copy batch is whole chunks, checked by their digests: a page number
    changed in it no longer describes whole chunks and is refused before a byte
    is written; the migration rolls back and the guest keeps running."""
    s = Setup(procs, shm)
    fault = Fault(action="mutate", kind=Kind.PAGES, where=lambda m: "cd" in m, nth=3, mutate=_misplace)
    rc, rep, log = s.migrate_through(fault, "--compress", "lz4")  # a compressed full copy is staged, with chunk digests
    assert fault.fired.is_set()
    assert rc == 3, s.diag()
    assert "whole chunks" in rep["error"], s.diag()  # type: ignore[index]
    s.assert_runs_on_source()
    s.assert_no_partial()


def test_corrupted_digest_table_only_causes_a_resend(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """A flipped byte in the destination's final digest table: the source resends that
    chunk and verifies again; the commit still holds exactly the source memory."""
    s = Setup(procs, shm)
    fault = Fault(action="flip", kind=Kind.DIGEST_TABLE, direction=S2C, nth=2, in_payload=True, offset=9)
    rc, rep, log = s.migrate_through(fault)
    assert fault.fired.is_set()
    assert rc == 0, s.diag()
    s.assert_runs_on_destination()


# -- black holes, slow links ---------------------------------------------------------


@pytest.mark.parametrize("phase", ["first-copy", "verify", "commit-sent"])
def test_stalled_link_times_out_and_rolls_back(procs: Procs, shm, phase: str) -> None:  # type: ignore[no-untyped-def]
    """No FIN, no RST, no data: the source gives up after --io-timeout.  A stall after
    COMMIT is asked about on a new connection, which stops the destination's migration
    for good, so 'not committed' is definite."""
    s = Setup(procs, shm, dest_args=("--idle-timeout", "3"))
    fault = fault_at(phase, action="stall")
    with FaultProxy(("127.0.0.1", dport(s.dest)), [fault]) as proxy:
        s.start_source(proxy.addr, "--io-timeout", "2")
        rc, rep, log = s.finish()
        assert fault.fired.is_set()
        assert rc == 3, s.diag()
        if phase == "commit-sent":
            assert "not committed" in rep["error"], s.diag()  # type: ignore[index]
        else:  # a send that cannot proceed, or an answer that does not come
            assert "2 s" in rep["error"], s.diag()  # type: ignore[index]
        s.assert_runs_on_source()
        s.assert_no_partial()  # the destination's idle timeout (or the query) ended it


def test_slow_and_delayed_link_still_commits(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    s = Setup(procs, shm)
    fault = fault_at("paused", action="delay", seconds=0.5)
    with FaultProxy(("127.0.0.1", dport(s.dest)), [fault], rate_bps=40e6) as proxy:
        s.start_source(proxy.addr, "--downtime-ms", "5000")
        rc, rep, log = s.finish()
    assert rc == 0, s.diag()
    assert rep["downtime_ms"] >= 500  # type: ignore[index]
    s.assert_runs_on_destination()


# -- partial state -------------------------------------------------------------------


def test_keep_partial_keeps_it_under_its_partial_name_only(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """--keep-partial: a failed migration's file stays as .NAME.ID.partial (also across a
    restart), never under NAME; a later migration of the same region commits normally."""
    s = Setup(procs, shm, dest_args=("--keep-partial",))
    fault = fault_at("iterative", action="cut")
    rc, rep, log = s.migrate_through(fault, "--migration-id", "m-kept")
    assert rc == 3, s.diag()
    kept = s.dest.memory_dir / ".vm.mem.m-kept.partial"
    from .conftest import wait_for

    wait_for(lambda: s.journal("m-kept") is not None and s.journal("m-kept")["outcome"] == "aborted",
             what="the destination to record the abort")
    assert kept.exists()
    assert not (s.dest.memory_dir / "vm.mem").exists()
    s.dest.proc.kill()
    s.dest.proc.wait()
    s.dest = start_dest(procs, shm, "--keep-partial")
    assert kept.exists() and "keeping partial region" in s.dest.log_text()
    s.start_source(s.dest.addr, "--migration-id", "m-next")
    rc, rep, log = s.finish()
    assert rc == 0, s.diag()
    s.assert_runs_on_destination()
    # Without the flag, the next start removes it.
    s.dest.proc.kill()
    s.dest.proc.wait()
    s.dest = start_dest(procs, shm)
    assert not kept.exists()
