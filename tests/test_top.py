"""`overcommit top` against a recording made at the same time.

Two `top 1 3` run beside `overcommit record` over the same workload: the
text one (stdout a pipe: plain blocks, no escape codes) and a `-j` one, whose
per-interval counts are exact.  The workload is started once all three are
attached and KSM is switched on only then, so every merge of it falls in the
window all of them see.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from conftest import KSM_FAST, OVERCOMMIT, wait_stable
from tracer import counters, serve, top
from tracer.aggregate import summarize
from tracer.live import Live
from tracer.recording import read

PAGES = 1009            # prime, with 7 distinct contents: all of them merge
BLOCK = re.compile(r"^(\d\d:\d\d:\d\d)  (\d+\.\d+)s  loadavg: ")


class Top:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([OVERCOMMIT, "top", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def attached(self) -> Top:
        line = self.proc.stderr.readline()      # the banner, once attached
        if not line.startswith("Tracing"):
            self.stop()
            raise RuntimeError(f"top did not start: {line}{self.proc.stderr.read()}")
        return self

    def wait(self, timeout=30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def tops():
    started: list[Top] = []

    def start(*args):
        t = Top(*args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()


def replay(path) -> Live:
    """A recording's rows into the live sink, one write per interval, as
    the Recorder hands them."""
    live = Live(read(path).meta)
    rows = read(path).table.to_pylist()
    for i in sorted({r["interval"] for r in rows}):
        live.write([r for r in rows if r["interval"] == i and r["record"] != "event"])
    return live


def parse_blocks(out: str) -> list[dict]:
    """Text output -> [{"length": s, "rows": {pid: {column: value}}}]."""
    blocks, in_table = [], False
    for line in out.splitlines():
        m = BLOCK.match(line)
        if m:
            blocks.append({"length": float(m.group(2)), "rows": {}})
            in_table = False
        elif line == top.header():
            in_table = True
        elif in_table and line.strip():
            cells = line.split()
            # PID COMM VM... : COMM and VM may be blank; the numbers are the last five
            nums = [float(c) for c in cells[-5:]]
            blocks[-1]["rows"][int(cells[0])] = dict(zip(top.COLUMNS[3:], nums))
    return blocks


@pytest.mark.root
def test_top_matches_the_recording(tmp_path, ksm_off, workloads, recorder, tops):
    rec = recorder(tmp_path / "r.arrow", "-i", "0.5")
    # both compile at once, so that their 3 s windows overlap
    text, as_json = tops("1", "3"), tops("-j", "1", "3")
    text.attached(), as_json.attached()
    w = workloads("--pages", str(PAGES), "--distinct", "7", "--hold", "120")
    with counters.ksm_settings(KSM_FAST):
        merged = wait_stable(w.merging_pages, settle=1.0, timeout=20)
        code_text, out, err = text.wait()
        code_json, out_json, err_json = as_json.wait()
        assert rec.stop() == 0
    assert merged == PAGES
    assert (code_text, code_json) == (0, 0), err + err_json
    assert "Traceback" not in err + err_json

    # The recording: every page of the workload merged, none unmerged.
    summary = {p["pid"]: p for p in summarize(read(rec.path))["processes"]}
    p = summary[w.pid]
    assert (p["merged_pages"], p["unmerged_pages"]) == (PAGES, 0)
    # The live sink, fed the recording's rows interval by interval, says
    # what the summary says, for every process.
    live = replay(rec.path)
    for pid, q in summary.items():
        mine = live.latest.processes[pid]
        for key in ("merged_pages", "new_ksm_pages", "merge_failures",
                    "ksm_merging_pages_end", "host_discarded_pages"):
            assert mine[key] == q[key], (pid, key)
    assert live.latest.processes[w.pid]["unmerged_pages"] == 0

    # top -j: three intervals whose exact counts add up to the recording's.
    lines = out_json.splitlines()
    assert len(lines) == 3
    objs = [json.loads(line) for line in lines]
    mine = [[q for q in o["processes"] if q["pid"] == w.pid] for o in objs]
    assert sum(q["merged_pages"] for rows in mine for q in rows) == p["merged_pages"]
    assert sum(q["unmerged_pages"] for rows in mine for q in rows) == 0
    assert mine[-1][0]["merging"] == PAGES == p["ksm_merging_pages_end"]
    for o, rows in zip(objs, mine):
        for q in rows:    # a rate is the interval's count over its length
            assert q["merges"] == pytest.approx(q["merged_pages"] / o["interval_s"])

    # The text output: plain blocks, under 80 columns, the same rates.
    assert "\x1b" not in out and "\r" not in out
    assert all(len(line) < 80 for line in out.splitlines())
    blocks = parse_blocks(out)
    assert len(blocks) == 3
    for b in blocks:
        assert 0.9 < b["length"] < 1.2
    seen = [b["rows"][w.pid] for b in blocks if w.pid in b["rows"]]
    # rates are printed to 0.1 and lengths to 0.01 s: within a few pages
    assert sum(r["merges"] * b["length"] for b in blocks
               for r in [b["rows"].get(w.pid)] if r) == pytest.approx(PAGES, abs=8)
    assert seen[-1]["merging"] == PAGES
    assert all(r["unmerges"] == 0 for r in seen)


@pytest.mark.root
def test_top_ctrl_c_exits_cleanly(tops):
    t = tops("1").attached()
    t.proc.stdout.readline()          # the first block has begun
    t.proc.send_signal(signal.SIGINT)
    code, out, err = t.wait()
    assert code == 0
    assert "Traceback" not in err


def _snapshot(*processes, length=1.0, ksm=None):
    live = Live({})
    rows = serve.synthetic_rows()
    live.write(rows[0])
    live.write(rows[1])
    snap = live.latest
    snap.processes = {p["pid"]: p for p in processes}
    snap.length_s = length
    if ksm:
        snap.ksm = ksm
    return snap


def _proc(pid, comm, merged=0, merging=0, discarded=0, vm=None):
    return {"pid": pid, "comm": comm, "vm": vm, "ksm_merging_pages_end": merging,
            "delta": {"merged_pages": merged, "host_discarded_pages": discarded}}


def test_sorting_and_idle_processes():
    snap = _snapshot(_proc(11, "a", merged=5), _proc(12, "b", merged=50),
                     _proc(13, "c", discarded=2560, vm="guest1"), _proc(14, "idle"))
    assert [r["pid"] for r in top.rows(snap)] == [12, 11, 13]
    assert [r["pid"] for r in top.rows(snap, "discard")][0] == 13
    assert [r["pid"] for r in top.rows(snap, "comm")] == [11, 12, 13]
    assert top.rows(snap, "discard")[0]["discard"] == pytest.approx(10.0)   # MiB/s


def test_text_stays_under_80_columns_with_large_numbers():
    big = 10**7
    ksm = {"pages_shared": big, "pages_sharing": 10 * big, "pages_unshared": big,
           "pages_volatile": big, "general_profit": -(10**12), "run": 1, "full_scans": big}
    snap = _snapshot(_proc(4194304, "qemu-system-x86_64", merged=big, merging=big,
                           discarded=big, vm="a-very-long-vm-name"), ksm=ksm)
    text = top.render_text(snap)
    assert max(len(line) for line in text.splitlines()) < 80
    assert top.header() in text


def test_help_has_examples_and_column_meanings():
    from click.testing import CliRunner
    from tracer.cli import main
    out = CliRunner().invoke(main, ["top", "--help"]).output
    assert "Examples:" in out and "overcommit top 5 10" in out
    assert "MERGE/s" in out and "ksm_merging_pages" in out
