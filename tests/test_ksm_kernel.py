"""KSM on the real kernel: the recording against the kernel's own accounting.

Every number asserted here is also read from the kernel (/proc/PID/ksm_stat,
/sys/kernel/mm/ksm) by the test itself, not taken from the recording.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import KSM_FAST, OVERCOMMIT, wait_stable
from tracer import counters
from tracer.aggregate import summarize
from tracer.recording import read

pytestmark = pytest.mark.root


def _by_pid(summary):
    return {p["pid"]: p for p in summary["processes"]}


def test_three_workloads_match_ksm_merging_pages(tmp_path, ksm_off, workloads, recorder):
    """Prime page counts, different duplication, one process unmerging."""
    before = counters.read_ksm()
    rec = recorder(tmp_path / "r.arrow", "-i", "0.5")
    a = workloads("--pages", "1009", "--distinct", "7", "--hold", "300")
    b = workloads("--pages", "2003", "--distinct", "1", "--seed", "3", "--hold", "300")
    c = workloads("--pages", "1511", "--distinct", "5", "--seed", "5", "--hold", "300",
                  "--unmerge-after", "6")
    ws = (a, b, c)
    with counters.ksm_settings(KSM_FAST):
        merged = wait_stable(lambda: [w.merging_pages() for w in ws], settle=2.0)
        # c rewrites its pages 6 s after start: wait for ksmd to notice
        while time.monotonic() and c.proc.poll() is None and c.merging_pages() == merged[2]:
            time.sleep(0.25)
        final = wait_stable(lambda: [w.merging_pages() for w in ws], settle=2.0)
    # ksmd stopped (run=0): passes and counters quiet, so the recording's
    # last interval and the kernel agree to the page and to the pass.
    time.sleep(1.0)
    assert rec.stop() == 0
    after = counters.read_ksm()

    s = summarize(read(rec.path))
    procs = _by_pid(s)
    # Every page of a and b has at least one twin: all become KSM-mapped.
    assert merged[:2] == [1009, 2003]
    assert merged[2] == 1511
    for w, end in zip(ws, final):
        p = procs[w.pid]
        # started after the recording: the kernel's count went from 0 to `end`
        assert p["ksm_merging_pages_start"] == 0
        assert p["ksm_merging_pages_end"] == end
        assert p["merged_pages"] - p["unmerged_pages"] == end
    # The processes that never unmerged: the events alone are exact.
    for w, pages in ((a, 1009), (b, 2003)):
        assert procs[w.pid]["merged_pages"] == pages
        assert procs[w.pid]["unmerged_pages"] == 0
    # 7 contents of 1009 pages: 7 KSM pages; 2003 copies of one content need
    # ceil(2003 / max_page_sharing) KSM pages (stable node chains).
    mps = counters.read_ksm_settings()["max_page_sharing"]
    assert procs[a.pid]["new_ksm_pages"] == 7
    assert procs[b.pid]["new_ksm_pages"] == -(-2003 // mps)
    # The rewriting process unmerged everything it had merged.
    assert procs[c.pid]["merged_pages"] == 1511
    assert procs[c.pid]["unmerged_pages"] == 1511 - final[2] > 0
    # Host-wide, the totals agree with pages_shared + pages_sharing (KSM
    # pages left by processes gone before the recording aside: none in CI).
    host = (after["pages_shared"] + after["pages_sharing"]
            - before["pages_shared"] - before["pages_sharing"])
    x = s["crosscheck"]
    assert x["pages_shared_plus_sharing_change"] == host
    assert (s["ksm"]["merged_pages"] - s["ksm"]["unmerged_pages"]
            - x["pages_of_no_process_start"] + x["pages_of_no_process_end"]) == host
    assert s["lost_events"] == 0
    # ksmd's passes: one scan row per full_scans increment.
    assert s["crosscheck"]["full_scans_traced"] == s["crosscheck"]["full_scans_counter_change"]


def test_workload_started_before_recording_is_attributed(tmp_path, ksm_off, workloads,
                                                         recorder):
    """Registered with KSM before tracing: found through mm->owner, not ksm_enter."""
    w = workloads("--pages", "509", "--distinct", "2", "--hold", "300")
    time.sleep(0.5)
    rec = recorder(tmp_path / "r.arrow", "-i", "0.5")
    with counters.ksm_settings(KSM_FAST):
        end = wait_stable(w.merging_pages, settle=1.5)
        time.sleep(0.6)
        assert rec.stop() == 0
    assert end == 509
    df = read(rec.path).frame()
    assert not ((df.record == "process") & (df.name == "ksm_enter") & (df.pid == w.pid)).any()
    p = _by_pid(summarize(read(rec.path)))[w.pid]
    assert p["comm"] == "overcommit"
    assert p["merged_pages"] == 509
    assert p["ksm_merging_pages_start"] == 0 and p["ksm_merging_pages_end"] == 509


def test_pid_filter_counts_only_that_process(tmp_path, ksm_off, workloads, recorder):
    a = workloads("--pages", "307", "--distinct", "1", "--hold", "300")
    b = workloads("--pages", "311", "--distinct", "1", "--seed", "9", "--hold", "300")
    rec = recorder(tmp_path / "r.arrow", "-i", "0.5", "-p", str(a.pid), "--events")
    with counters.ksm_settings(KSM_FAST):
        wait_stable(lambda: (a.merging_pages(), b.merging_pages()), settle=1.5)
        time.sleep(0.6)
        assert rec.stop() == 0
    df = read(rec.path).frame()
    counted = set(df[df.record.isin(["count", "event"])].pid)
    assert counted == {a.pid}
    assert _by_pid(summarize(read(rec.path)))[a.pid]["merged_pages"] == 307


def test_streamed_events_match_counts(real_recording):
    """--events: every counted event was delivered, and none lost."""
    rec = read(real_recording)
    df = rec.frame()
    ev = df[df.record == "event"].groupby(["pid", "name"], observed=True).size()
    cnt = df[df.record == "count"].groupby(["pid", "name"], observed=True)["value"].sum()
    cnt = cnt[cnt > 0]
    assert summarize(rec)["lost_events"] == 0
    assert ev.to_dict() == cnt.to_dict()


def test_summary_json_has_the_contract_keys(real_recording):
    out = subprocess.run([OVERCOMMIT, "summary", "--json", str(real_recording)],
                         capture_output=True, text=True, check=True).stdout
    s = json.loads(out)
    for key in ("schema", "duration_s", "lost_events", "ksm", "balloon", "processes",
                "crosscheck"):
        assert key in s
    for key in ("merged_pages", "new_ksm_pages", "zero_page_merges", "merge_failures",
                "unmerged_pages", "full_scans", "pages_shared_end", "pages_sharing_end"):
        assert key in s["ksm"]
    for key in ("inflated_pages", "deflated_pages", "host_discarded_pages"):
        assert key in s["balloon"]
    for p in s["processes"]:
        for key in ("pid", "comm", "vm", "merged_pages", "unmerged_pages",
                    "ksm_merging_pages_end", "host_discarded_pages"):
            assert key in p
    assert sum(p["merged_pages"] for p in s["processes"]) == s["ksm"]["merged_pages"] > 0
