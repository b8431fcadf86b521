"""Aggregation on a hand-made recording whose every number is known."""
from __future__ import annotations

import pytest

from tracer.aggregate import rates, summarize
from tracer.recording import Writer, read
from tracer.summary import render


def _row(t, i, record, name, value, pid=0, comm=None, vm=None, **kw):
    return {"t": t, "interval": i, "record": record, "name": name, "pid": pid,
            "comm": comm, "vm": vm, "value": value, **kw}


@pytest.fixture
def rec(tmp_path):
    """
    pid 100 (qemu, VM "a"): running at the start with 50 merging pages;
      merges 30 (3 new KSM pages), 4 seen unmerges; ends with 70 merging.
      So unmerged = 30 - (70 - 50) = 10: 4 seen, 6 derived.
    pid 200: enters during the recording, merges 11, exits.
    """
    path = tmp_path / "r.arrow"
    w = Writer(path, {"host": "h", "kernel": "6.18", "attach": [
        {"event": "merges", "mode": "tracepoint", "hook": "x", "why": "y"}]})
    qemu = dict(pid=100, comm="qemu-system-x86", vm="a")
    w.write([
        _row(0.0, 0, "process", "running", 0, **qemu),
        _row(0.0, 0, "ksm_stat", "ksm_merging_pages", 50, **qemu),
        _row(0.0, 0, "ksm", "pages_shared", 10), _row(0.0, 0, "ksm", "pages_sharing", 40),
        _row(0.0, 0, "ksm", "full_scans", 5),
        _row(0.0, 0, "vmstat", "cow_ksm", 100),
        _row(0.0, 0, "interval", "baseline", 0),
    ])
    w.write([
        _row(0.5, 1, "process", "ksm_enter", 0, pid=200, comm="work"),
        _row(1.0, 1, "count", "new_ksm_page", 3, **qemu),
        _row(1.0, 1, "count", "merge_with_ksm_page", 27, **qemu),
        _row(1.0, 1, "count", "merge_with_ksm_page", 11, pid=200, comm="work"),
        _row(1.0, 1, "count", "merge_failed", 2, **qemu),
        _row(0.7, 1, "scan", "full_scan", 1000, seq=6, duration_ns=200_000_000),
        _row(1.0, 1, "ksm_stat", "ksm_merging_pages", 80, **qemu),
        _row(1.0, 1, "interval", "end", 1_000_000_000),
    ])
    w.write([
        _row(1.5, 2, "process", "ksm_exit", 0, pid=200, comm="work"),
        _row(2.0, 2, "count", "remove_rmap_item", 4, **qemu),
        _row(2.0, 2, "count", "host_discard", 256, **qemu),
        _row(2.0, 2, "process", "gone", 0, pid=200, comm="work"),
        _row(2.0, 2, "ksm_stat", "ksm_merging_pages", 70, **qemu),
        _row(2.0, 2, "ksm", "pages_shared", 12), _row(2.0, 2, "ksm", "pages_sharing", 58),
        _row(2.0, 2, "ksm", "full_scans", 6),
        _row(2.0, 2, "vmstat", "cow_ksm", 106),
        _row(2.0, 2, "interval", "end", 1_000_000_000),
    ])
    w.close()
    return read(path)


def test_per_process(rec):
    s = summarize(rec)
    p = {p["pid"]: p for p in s["processes"]}
    q = p[100]
    assert (q["comm"], q["vm"]) == ("qemu-system-x86", "a")
    assert q["merged_pages"] == 30 and q["new_ksm_pages"] == 3
    assert q["merge_failures"] == 2
    assert q["ksm_merging_pages_start"] == 50 and q["ksm_merging_pages_end"] == 70
    assert q["unmerged_pages"] == 10
    assert (q["unmerged_pages_seen"], q["unmerged_pages_derived"]) == (4, 6)
    assert q["host_discarded_pages"] == 256
    w = p[200]
    assert w["exited"] and w["merged_pages"] == 11 and w["unmerged_pages"] == 11


def test_totals_and_crosscheck(rec):
    s = summarize(rec)
    k, x = s["ksm"], s["crosscheck"]
    assert k["merged_pages"] == 41 and k["unmerged_pages"] == 21
    assert k["full_scans"] == 1 and k["scan_duration_s_mean"] == pytest.approx(0.2)
    assert (k["pages_shared_end"], k["pages_sharing_end"]) == (12, 58)
    assert x["merged_minus_unmerged"] == 20 == x["pages_shared_plus_sharing_change"]
    assert x["pages_of_no_process_start"] == 0 == x["pages_of_no_process_end"]
    assert x["full_scans_counter_change"] == 1
    assert x["cow_ksm_change"] == 6
    assert s["balloon"]["host_discarded_pages"] == 256
    assert s["duration_s"] == 2.0 and s["closed_cleanly"]


def test_rates_per_second(rec):
    r = rates(rec.frame(), ("merge_with_ksm_page",))
    assert r["merge_with_ksm_page"].tolist() == [38.0]


def test_terminal_summary_renders(rec):
    text = render(summarize(rec))
    assert "qemu-system-x86" in text and "(exited)" in text
    assert "4 seen as events, 17 derived" in text


def test_balloon_from_vmstat_when_nothing_can_hook_it(tmp_path):
    """A guest whose kernel cannot hook the balloon core: /proc/vmstat speaks."""
    from pathlib import Path

    from tracer.counters import read_vmstat
    start = read_vmstat(Path(__file__).parent / "data" / "guest-balloon")
    path = tmp_path / "g.arrow"
    w = Writer(path, {"attach": [{"event": "balloon", "mode": "counters", "hook": "-",
                                  "why": "-"}]})
    w.write([_row(0.0, 0, "vmstat", k, v) for k, v in start.items()]
            + [_row(0.0, 0, "interval", "baseline", 0)])
    later = dict(start, balloon_inflate=start["balloon_inflate"] + 4096,
                 balloon_deflate=start["balloon_deflate"] + 1024)
    w.write([_row(1.0, 1, "vmstat", k, v) for k, v in later.items()]
            + [_row(1.0, 1, "interval", "end", 10**9)])
    w.close()
    s = summarize(read(path))
    assert s["balloon"]["inflated_pages"] == 4096
    assert s["balloon"]["deflated_pages"] == 1024
    assert s["attach"]["balloon"] == "counters"
