"""QMP handling without QEMU: a fake QMP server (tests/data/fake_qemu.py, or a
thread) that answers, stays silent, goes mute, closes or talks nonsense.

What matters to a user: a guest that never answers gives one clear line
within the timeout, never a hang, and every guest is stopped all the same.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tracer.lab import Lab, LabGuest, Settings
from tracer.qemu import stop_all
from tracer.qmp import QMP, QMPCommandError, QMPError, QMPTimeout

FAKE = Path(__file__).parent / "data" / "fake_qemu.py"


@pytest.fixture
def fake_qemu(tmp_path):
    """Factory: fake_qemu("ok"|"silent"|"mute", ignore_sigterm) -> (Popen, socket
    path); every one killed by its pid at teardown."""
    started: list[subprocess.Popen] = []

    def start(mode: str, ignore_sigterm: bool = False, name: str = "g"):
        path = tmp_path / f"{name}.qmp"
        argv = [sys.executable, str(FAKE), str(path), mode]
        if ignore_sigterm:
            argv.append("--ignore-sigterm")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "listening"
        return proc, path

    yield start
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()


def _thread_server(path: Path, handler) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        try:
            handler(conn)
        finally:
            conn.close()
            srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _guest(tmp_path: Path, name: str, proc: subprocess.Popen) -> LabGuest:
    g = LabGuest(name, 256, "tcg", tmp_path)
    g.proc = proc
    g.state = "ready"
    return g


def test_negotiates_and_runs_commands(fake_qemu):
    _, path = fake_qemu("ok")
    with QMP(path, timeout=5) as q:
        assert q.version == {"micro": 0, "minor": 2, "major": 7}
        assert q.execute("query-balloon") == {"actual": 256 << 20}
        assert q.execute("balloon", {"value": 192 << 20}) == {}
        assert q.execute("query-balloon") == {"actual": 192 << 20}
        events = q.poll_events()
        assert [e["event"] for e in events] == ["BALLOON_CHANGE"]
        assert events[0]["data"] == {"actual": 192 << 20}
        assert q.poll_events() == []


def test_error_answer_names_the_command(fake_qemu):
    _, path = fake_qemu("ok")
    with QMP(path, timeout=5) as q:
        with pytest.raises(QMPCommandError) as e:
            q.execute("no-such-command")
        assert e.value.cls == "CommandNotFound"
        assert "QMP no-such-command: CommandNotFound" in str(e.value)
        # the session goes on after an error
        assert q.execute("query-balloon") == {"actual": 256 << 20}


def test_no_greeting_is_a_clear_timeout(fake_qemu):
    _, path = fake_qemu("silent")
    t = time.monotonic()
    with pytest.raises(QMPTimeout) as e:
        QMP(path, timeout=0.5, name="lab-1")
    assert time.monotonic() - t < 3
    assert str(e.value) == (f"lab-1: QEMU did not answer the greeting within 0.5s "
                            f"(QMP socket {path}: QEMU hung or stopped?)")


def test_command_never_answered_is_a_clear_timeout(fake_qemu):
    _, path = fake_qemu("mute")
    with QMP(path, timeout=5, name="lab-2") as q:   # negotiation still works
        t = time.monotonic()
        with pytest.raises(QMPTimeout, match=r"^lab-2: QEMU did not answer query-balloon "
                                             r"within 0.3s"):
            q.execute("query-balloon", timeout=0.3)
        assert time.monotonic() - t < 2


def test_socket_that_never_appears(tmp_path):
    t = time.monotonic()
    with pytest.raises(QMPTimeout, match="cannot connect to QMP socket .* within 0.3s"):
        QMP(tmp_path / "none.qmp", timeout=0.3)
    assert time.monotonic() - t < 2


def test_qemu_closing_the_connection(tmp_path):
    path = tmp_path / "c.qmp"

    def handler(conn):
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        conn.recv(4096)   # qmp_capabilities: hang up instead of answering
    _thread_server(path, handler)
    with pytest.raises(QMPError, match="closed the QMP connection .* qmp_capabilities"):
        QMP(path, timeout=5)


def test_not_qmp(tmp_path):
    path = tmp_path / "n.qmp"
    _thread_server(path, lambda conn: conn.sendall(b"SSH-2.0-OpenSSH\r\n"))
    with pytest.raises(QMPError, match="not QMP"):
        QMP(path, timeout=5)


def test_late_answer_to_an_abandoned_command_is_skipped(tmp_path):
    """An answer that arrives after its command timed out is not taken for
    the next command's."""
    path = tmp_path / "l.qmp"
    go = threading.Event()

    def handler(conn):
        f = conn.makefile("rb")
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        f.readline()
        conn.sendall(b'{"return": {}, "id": 1}\r\n')
        f.readline()              # id 2: answered late
        go.wait(5)
        f.readline()              # id 3
        conn.sendall(b'{"return": "late", "id": 2}\r\n{"return": "right", "id": 3}\r\n')
        time.sleep(0.5)
    _thread_server(path, handler)
    q = QMP(path, timeout=5)
    with pytest.raises(QMPTimeout):
        q.execute("first", timeout=0.2)
    go.set()
    assert q.execute("second") == "right"
    q.close()


def test_hung_guest_is_killed(tmp_path, fake_qemu):
    """QEMU answers neither QMP nor SIGTERM: stop() ends it with SIGKILL."""
    proc, path = fake_qemu("mute", ignore_sigterm=True, name="lab-1")
    g = _guest(tmp_path, "lab-1", proc)
    g.qmp = QMP(path, timeout=0.5, name="lab-1")
    with pytest.raises(QMPTimeout):
        g.qmp.execute("query-balloon")
    t = time.monotonic()
    assert g.stop(quit_timeout=0.5, term_timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - t < 5
    assert not Path(f"/proc/{proc.pid}").exists()


def test_one_guest_never_answers_clear_error_and_all_guests_stopped(tmp_path, fake_qemu):
    """The lab's balloon phase with one healthy guest and one that never
    answers: the error names the guest and the command, within the timeout,
    and both guests are stopped (the healthy one by QMP quit, the hung one by
    signals)."""
    ok, ok_path = fake_qemu("ok", name="lab-1")
    hung, hung_path = fake_qemu("mute", ignore_sigterm=True, name="lab-2")
    guests = [_guest(tmp_path, "lab-1", ok), _guest(tmp_path, "lab-2", hung)]
    guests[0].qmp = QMP(ok_path, timeout=5, name="lab-1")
    guests[1].qmp = QMP(hung_path, timeout=0.5, name="lab-2")

    class Rec:   # the recorder's side of a tick, without BPF
        def __init__(self):
            self.rows = []

        def add_rows(self, rows):
            self.rows += rows

        def step(self, deadline, stop):
            time.sleep(max(0.0, deadline - time.monotonic()))

    class Stop:
        set = False

    lab = Lab(Settings(interval=0.2).resolve(), Rec(), Stop(), guests, None, "qemu", "tcg",
              lambda text: None)
    t = time.monotonic()
    try:
        with pytest.raises(QMPTimeout) as e:
            lab.balloon(192, "inflate")
        assert time.monotonic() - t < 3
        assert str(e.value).startswith("lab-2: QEMU did not answer balloon within 0.5s")
    finally:
        t = time.monotonic()
        stop_all(guests, quit_timeout=0.5, term_timeout=0.5)
    assert time.monotonic() - t < 5
    assert ok.returncode == 0                    # quit through QMP
    assert hung.returncode == -signal.SIGKILL    # SIGTERM ignored
    assert all(g.state == "stopped" for g in guests)


def test_guest_stats_rows(tmp_path, fake_qemu):
    """guest-stats become rows per QEMU pid; unreported ((u64)-1) are left out."""
    proc, path = fake_qemu("ok", name="lab-1")
    g = _guest(tmp_path, "lab-1", proc)
    g.qmp = QMP(path, timeout=5, name="lab-1")
    lab = Lab(Settings().resolve(), None, None, [g], None, "qemu", "tcg", lambda t: None)
    rows = lab.sample()
    by = {(r["record"], r["name"]): r for r in rows}
    assert by["qmp", "balloon_actual"]["value"] == 256 << 20
    assert by["qmp", "balloon_pages"]["value"] == 0
    assert by["guest_stats", "free_memory"]["value"] == 1 << 27
    assert ("guest_stats", "swap_in") not in by
    assert {(r["pid"], r["vm"]) for r in rows} == {(proc.pid, "lab-1")}
    stop_all([g])
    assert proc.returncode == 0
