"""The guardian process on its own: what it does when its agent's pipe ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from precopy.session.guardian import ARMED, COMMIT, Guardian

from .conftest import proc_state, wait_for


@pytest.fixture
def sleeper() -> Any:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield p
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.kill()
        p.wait()


def spec(pid: int, port: int = 9) -> dict[str, Any]:
    return {"workload": {"kind": "pid", "pid": pid}, "on_commit": "keep-stopped",
            "outcome": {"host": "127.0.0.1", "port": port, "migration_id": "m-g", "key": None,
                        "retries": 1, "connect_timeout": 1, "io_timeout": 1}}


def die(g: Guardian) -> int:
    """What the agent's death looks like to the guardian: the pipe ends without 'done'."""
    g._pipe.close()
    return g.proc.wait(30)


def test_agent_death_while_armed_resumes(sleeper: Any) -> None:
    g = Guardian(spec(sleeper.pid))
    g.declare(ARMED)
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_for(lambda: proc_state(sleeper.pid) == "T", what="SIGSTOP")
    assert die(g) == 0
    wait_for(lambda: proc_state(sleeper.pid) != "T", what="the guardian's SIGCONT")


def test_the_first_stage_loads_the_guardian_only_when_the_pipe_ends_without_done(sleeper: Any) -> None:
    """precopy.session.guardian_boot: on 'done' it exits at once, the guardian never loaded (a path
    that does not exist is never read); a pipe that ends otherwise is the guardian's to settle."""
    import json

    import precopy.session.guardian as guardian

    boot = Path(guardian.__file__).with_name("guardian_boot.py")
    lines = json.dumps(spec(sleeper.pid)) + "\narmed\n"
    done = subprocess.run([sys.executable, "-S", str(boot), "/nonexistent/precopy/session/guardian.py"],
                          input=(lines + "done\n").encode(), capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stderr
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_for(lambda: proc_state(sleeper.pid) == "T", what="SIGSTOP")
    died = subprocess.run([sys.executable, "-S", str(boot), str(Path(guardian.__file__).resolve())],
                          input=lines.encode(), capture_output=True, timeout=60)
    assert died.returncode == 0, died.stderr
    wait_for(lambda: proc_state(sleeper.pid) != "T", what="the guardian's SIGCONT")


def test_agent_death_after_commit_without_an_answer_leaves_it_paused(sleeper: Any, tmp_path: Path) -> None:
    g = Guardian(spec(sleeper.pid, port=9))  # nobody answers there
    g.declare(ARMED)
    os.kill(sleeper.pid, signal.SIGSTOP)
    g.declare(COMMIT)
    assert die(g) == 4  # in doubt
    time.sleep(0.2)
    assert proc_state(sleeper.pid) == "T"


def test_normal_exit_leaves_the_workload_alone(sleeper: Any) -> None:
    """The agent settled the workload itself (e.g. in doubt, exit 4): 'done' means hands off."""
    g = Guardian(spec(sleeper.pid))
    g.declare(ARMED)
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_for(lambda: proc_state(sleeper.pid) == "T", what="SIGSTOP")
    g.close()
    assert g.proc.returncode == 0
    time.sleep(0.2)
    assert proc_state(sleeper.pid) == "T"


def test_guardian_ignores_the_terminal_interrupt(sleeper: Any) -> None:
    """A Ctrl-C for the agent must not take the guardian with it."""
    g = Guardian(spec(sleeper.pid))
    g.declare(ARMED)
    time.sleep(0.5)  # let it install its handlers
    os.kill(g.proc.pid, signal.SIGINT)
    time.sleep(0.2)
    assert g.proc.poll() is None
    os.kill(sleeper.pid, signal.SIGSTOP)
    assert die(g) == 0
    wait_for(lambda: proc_state(sleeper.pid) != "T", what="the guardian's SIGCONT")


@pytest.mark.parametrize("with_tls", [True, False], ids=["tls", "no-tls-files"])
async def test_guardian_asks_a_tls_destination(sleeper: Any, tmp_path: Path, dest_dir: Path,
                                               with_tls: bool) -> None:
    """After COMMIT, the guardian's question goes over the agent's TLS (and key):
    'committed' leaves the source copy paused.  Without the TLS files it cannot
    ask, and leaves the workload paused (in doubt) rather than guess."""
    import asyncio

    from precopy.session.journal import Journal, MigrationRecord
    from precopy.net.tls import server_context

    from .test_engine import serve
    from .tlscerts import make_pki

    pki = make_pki(tmp_path / "pki")
    key = b"k" * 32
    dest_dir.mkdir(parents=True)
    Journal(dest_dir).write(MigrationRecord("m-g", "vm.mem", 4096, "peer", outcome="committed",
                                             memory=str(dest_dir / "vm.mem")))
    sctx = server_context(pki.server_cert, pki.server_key, pki.ca)
    async with serve(dest_dir, tls_context=sctx, auth_key=key) as server:
        sp = spec(sleeper.pid, server.port)
        sp["outcome"].update(key=key.hex(), host="localhost", tls={
            "ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)} if with_tls else None)
        g = Guardian(sp)
        g.declare(ARMED)
        os.kill(sleeper.pid, signal.SIGSTOP)
        g.declare(COMMIT)
        rc = await asyncio.to_thread(die, g)
    assert rc == (0 if with_tls else 4)
    time.sleep(0.2)
    assert proc_state(sleeper.pid) == "T"


class FakeQMP:
    """A QMP monitor on a Unix socket that answers from a table (one client)."""

    def __init__(self, path: Path, answers: dict[str, Any], greet: bool = True) -> None:
        import socket
        import threading

        self.seen: list[str] = []
        self.answers, self.greet = answers, greet
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import json

        conn, _ = self.sock.accept()
        with conn, conn.makefile("rwb") as f:
            if not self.greet:  # like QEMU while another client holds the monitor
                f.read()
                return
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                req = json.loads(line)
                self.seen.append(req["execute"])
                # An event may come before any reply.
                f.write(b'{"event": "STOP", "timestamp": {"seconds": 0, "microseconds": 0}}\n')
                answer = self.answers.get(req["execute"], {})
                reply = {"error": answer["error"]} if "error" in answer else {"return": answer}
                f.write(json.dumps({**reply, "id": req["id"]}).encode() + b"\n")
                f.flush()

    def close(self) -> None:
        self.sock.close()


def test_qmp_settle_skips_events_and_reports_a_refused_cont(tmp_path: Path) -> None:
    from precopy.session.guardian import ResumeError, _resume

    fake = FakeQMP(tmp_path / "q.sock", {"query-migrate": {"status": "completed"},
                                         "cont": {"error": {"class": "GenericError", "desc": "no"}}})
    workload = {"kind": "qmp", "path": str(tmp_path / "q.sock"), "timeout": 2, "was_running": True,
                "restore": [["migrate-set-parameters", {"max-bandwidth": 1}]]}
    try:
        with pytest.raises(ResumeError, match="QEMU refused 'cont': GenericError: no"):
            _resume(workload)
    finally:
        fake.close()
    assert fake.seen == ["qmp_capabilities", "query-migrate", "cont"]


def test_qmp_settle_waits_for_the_greeting_with_a_timeout(tmp_path: Path) -> None:
    """A monitor that never greets (another client holds it): a bounded wait, a clear error."""
    from precopy.session.guardian import ResumeError, _resume

    fake = FakeQMP(tmp_path / "q.sock", {}, greet=False)
    try:
        with pytest.raises(ResumeError, match="another one connected"):
            _resume({"kind": "qmp", "path": str(tmp_path / "q.sock"), "timeout": 0.5, "restore": []})
    finally:
        fake.close()


@pytest.mark.parametrize("state", ["idle", "commit"], ids=["idle", "commit-in-doubt"])
def test_qmp_vm_left_as_it_is_gets_its_settings_back(tmp_path: Path, state: str) -> None:
    """Idle (the VM runs, or is already the destination's) and in doubt (paused): no cont,
    no quit; only the migration settings the agent changed are put back."""
    from precopy.session.guardian import _on_agent_death

    fake = FakeQMP(tmp_path / "q.sock", {"query-migrate": {"status": "completed"}})
    sp = spec(0)
    sp["workload"] = {"kind": "qmp", "path": str(tmp_path / "q.sock"), "timeout": 2, "was_running": True,
                      "restore": [["migrate-set-capabilities", {"capabilities": []}],
                                  ["migrate-set-parameters", {"max-bandwidth": 1}]]}
    try:
        assert _on_agent_death(state, sp) == (0 if state == "idle" else 4)
    finally:
        fake.close()
    fake.thread.join(5)
    assert fake.seen == ["qmp_capabilities", "query-migrate", "migrate-set-capabilities",
                         "migrate-set-parameters"]


def test_qmp_on_commit_kill_quits_the_vm(tmp_path: Path) -> None:
    """Committed under --on-commit kill: QMP quit, nothing restored on a VM that is gone."""
    from precopy.session.guardian import _resume

    fake = FakeQMP(tmp_path / "q.sock", {})
    try:
        _resume({"kind": "qmp", "path": str(tmp_path / "q.sock"), "timeout": 2,
                 "restore": [["migrate-set-parameters", {"max-bandwidth": 1}]]}, "stop")
    finally:
        fake.close()
    fake.thread.join(5)
    assert fake.seen == ["qmp_capabilities", "quit"]
