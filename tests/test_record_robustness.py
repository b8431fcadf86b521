"""A recording survives Ctrl-C, SIGTERM and kill -9; bad input is one line."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import OVERCOMMIT
from tracer.recording import read

pytestmark = pytest.mark.root


def _run(*args, **kw):
    return subprocess.run([OVERCOMMIT, *args], capture_output=True, text=True, **kw)


def _one_line_error(r, code=1):
    assert r.returncode == code, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("overcommit: "), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signals(tmp_path, recorder, sig):
    rec = recorder(tmp_path / "r.arrow", "-i", "0.3")
    time.sleep(1.5)
    code = rec.stop(sig)
    r = read(rec.path)
    df = r.frame()
    intervals = df[df.record == "interval"]
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert not r.closed and "not closed" in r.notes[0]
        # at most the interval being written is lost
        assert len(intervals) >= 3
    else:
        assert code == 0
        assert r.closed and (df.record == "end").any()
        assert len(intervals) >= 4
    s = json.loads(_run("summary", "--json", str(rec.path)).stdout)
    assert s["closed_cleanly"] == (sig != signal.SIGKILL)
    assert s["intervals"] == len(intervals)


def test_killed_and_truncated_recording_still_summarizes(tmp_path, recorder):
    rec = recorder(tmp_path / "r.arrow", "-i", "0.2")
    time.sleep(1.2)
    rec.stop(signal.SIGKILL)
    data = rec.path.read_bytes()
    rec.path.write_bytes(data[:-100])
    r = _run("summary", str(rec.path))
    assert r.returncode == 0 and "not closed" in r.stdout


@pytest.mark.parametrize("content", [b"", b"ARROW1\0\0garbage", b"not a recording at all"])
def test_corrupt_file_is_one_line(tmp_path, content):
    p = tmp_path / "bad.arrow"
    p.write_bytes(content)
    _one_line_error(_run("summary", str(p)))


def test_missing_file_is_one_line(tmp_path):
    _one_line_error(_run("summary", str(tmp_path / "missing.arrow")))


def test_missing_pid_is_one_line(tmp_path):
    r = _run("record", "-d", "1", "-o", str(tmp_path / "r.arrow"), "-p", "999999999")
    _one_line_error(r)
    assert "no such process" in r.stderr
    assert not (tmp_path / "r.arrow").exists()


@contextlib.contextmanager
def _searchable_by_others(path: Path):
    """Let user nobody reach the project (a CI clone may sit in a 0700
    directory): add o+x to the directories on the way, then restore them."""
    changed = []
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((d, stat.S_IMODE(mode)))
    try:
        yield
    finally:
        for d, mode in changed:
            os.chmod(d, mode)


def test_not_root_is_one_line(tmp_path):
    os.chmod(tmp_path, 0o777)
    with _searchable_by_others(Path(OVERCOMMIT).resolve().parent.parent), \
            _searchable_by_others(tmp_path):
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            OVERCOMMIT, "record", "-d", "1", "-o", str(tmp_path / "r.arrow")],
                           capture_output=True, text=True)
    _one_line_error(r)
    assert "needs root" in r.stderr


def test_output_in_missing_directory_is_one_line(tmp_path):
    _one_line_error(_run("record", "-d", "1", "-o", str(tmp_path / "no" / "r.arrow")))
