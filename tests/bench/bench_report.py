#!/usr/bin/env python3
"""Benchmark `overcommit report` on a big recording (not a test).

Builds a synthetic recording with 10 million streamed merge events (plus
the per-interval counts, kernel counters and ksm_stat rows that go with
them, 50 VMs, 600 intervals) written with tracer.recording.Writer in
columnar batches, then runs `overcommit report` on it in a child process and
prints the time, the child's peak memory (getrusage maxrss) and the HTML size.
With --browser it also loads the report in headless Chromium and times
until every plot is drawn.

    .venv/bin/python tests/bench/bench_report.py
    .venv/bin/python tests/bench/bench_report.py --events 1000000 --browser
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tracer.recording import COLUMNS, Writer  # noqa: E402

SETTINGS = {"run": 1, "pages_to_scan": 5000, "sleep_millisecs": 20, "use_zero_pages": 0,
            "max_page_sharing": 256, "smart_scan": 1, "merge_across_nodes": 1,
            "advisor_mode": "none"}


def _batch(cols: dict, n: int) -> pa.RecordBatch:
    arrays = []
    for f in COLUMNS:
        v = cols.get(f.name)
        arrays.append(pa.nulls(n, f.type) if v is None else pa.array(v, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=COLUMNS)


def build(path: Path, n_events: int, n_vms: int, n_intervals: int, n_pages: int,
          seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    interval_s = 1.0
    pids = np.arange(1001, 1001 + n_vms, dtype=np.int32)
    vm_names = np.array([f"vm-{i:03d}" for i in range(n_vms)], dtype=object)
    comm = "qemu-system-x86"
    meta = {"tool": "overcommit", "version": "bench", "host": "bench-host",
            "kernel": "6.18.0-bench", "machine": "x86_64",
            "started_at": "2026-01-01T00:00:00+00:00", "interval_s": interval_s, "pids": [],
            "events_streamed": True, "page_size": 4096, "ksm_settings": SETTINGS,
            "ksm_variant": "tracepoint", "attach": []}
    w = Writer(path, meta)
    per = n_events // n_intervals
    # Popular KSM pages are shared by many VMs (zipf-like), as guests of one
    # image share their kernel and libraries.
    weights = 1.0 / np.arange(1, n_pages + 1) ** 0.8
    weights /= weights.sum()
    merging = np.zeros(n_vms, dtype=np.int64)
    shared = sharing = 0
    full_scans, pages_scanned = 1000, 10**7
    discard_vm = rng.choice(n_vms, size=max(1, n_vms // 5), replace=False)

    def host_rows(record, items, t, i):
        n = len(items)
        return _batch({"t": np.full(n, t), "interval": np.full(n, i, np.int32),
                       "record": [record] * n, "name": list(items),
                       "pid": np.zeros(n, np.int32), "value": list(items.values())}, n)

    def proc_rows(record, name, vals, t, i, mask=None):
        idx = np.arange(n_vms) if mask is None else np.flatnonzero(mask)
        n = len(idx)
        return _batch({"t": np.full(n, t), "interval": np.full(n, i, np.int32),
                       "record": [record] * n, "name": [name] * n, "pid": pids[idx],
                       "comm": [comm] * n, "vm": vm_names[idx], "value": vals[idx]}, n)

    def sample(t, i):
        ksm = {"pages_shared": shared, "pages_sharing": sharing, "pages_unshared": 5000,
               "pages_volatile": 20000, "full_scans": full_scans,
               "pages_scanned": pages_scanned, "ksm_zero_pages": 0,
               "general_profit": sharing * 4096 - n_vms * 50000 * 64,
               "stable_node_chains": 0, **{k: v for k, v in SETTINGS.items()
                                            if isinstance(v, int)}}
        w.write_batch(host_rows("ksm", ksm, t, i))
        w.write_batch(host_rows("vmstat", {"cow_ksm": 0, "balloon_inflate": 0,
                                           "balloon_deflate": 0}, t, i))
        for name, vals in (("ksm_rmap_items", np.full(n_vms, 50000)),
                           ("ksm_merging_pages", merging),
                           ("ksm_process_profit", merging * 4096 - 50000 * 64),
                           ("ksm_zero_pages", np.zeros(n_vms, np.int64))):
            w.write_batch(proc_rows("ksm_stat", name, np.asarray(vals, np.int64), t, i))

    w.write_batch(proc_rows("process", "running", np.zeros(n_vms, np.int64), 0.001, 0))
    sample(0.002, 0)
    w.write_batch(host_rows("interval", {"baseline": 0}, 0.003, 0))
    t = 0.0
    for i in range(1, n_intervals + 1):
        t0, t = t, t + interval_s
        n = per + (n_events - per * n_intervals if i == n_intervals else 0)
        vm = rng.integers(0, n_vms, n)
        pfn = rng.choice(n_pages, size=n, p=weights).astype(np.uint64) + 200_000
        new = rng.random(n) < 0.02
        names = np.where(new, "new_ksm_page", "merge_with_ksm_page").astype(object)
        w.write_batch(_batch({
            "t": np.sort(rng.uniform(t0, t, n)), "interval": np.full(n, i, np.int32),
            "record": np.full(n, "event", dtype=object),
            "name": names, "pid": pids[vm], "comm": pa.array([comm], pa.string()).take(
                pa.array(np.zeros(n, np.int32))),
            "vm": pa.array(vm_names, pa.string()).take(pa.array(vm)), "pfn": pfn,
            "err": np.zeros(n, np.int32)}, n))
        merged = np.bincount(vm, minlength=n_vms)
        new_by = np.bincount(vm[new], minlength=n_vms)
        merging += merged
        shared += int(new.sum())
        sharing = int(merging.sum()) - shared
        full_scans += 2
        pages_scanned += 2 * 50000 * n_vms
        nz = merged > 0
        w.write_batch(proc_rows("count", "merge_with_ksm_page", merged - new_by, t, i, nz))
        w.write_batch(proc_rows("count", "new_ksm_page", new_by, t, i, new_by > 0))
        if i % 60 == 30:      # balloons inflate every minute on a few VMs
            mask = np.zeros(n_vms, bool)
            mask[discard_vm] = True
            w.write_batch(proc_rows("count", "host_discard", np.full(n_vms, 25600), t, i, mask))
        scans = _batch({"t": np.array([t0 + 0.3, t0 + 0.8]), "interval": np.full(2, i, np.int32),
                        "record": ["scan"] * 2, "name": ["full_scan"] * 2,
                        "pid": np.zeros(2, np.int32), "value": np.full(2, 50000 * n_vms),
                        "seq": np.array([full_scans - 1, full_scans]),
                        "duration_ns": rng.integers(200_000_000, 400_000_000, 2)}, 2)
        w.write_batch(scans)
        sample(t, i)
        w.write_batch(host_rows("interval", {"end": int(interval_s * 1e9)}, t, i))
    w.write([{"t": t, "interval": n_intervals + 1, "record": "end", "name": "closed", "pid": 0,
              "value": 0}])
    w.close()


def browser_time(html: Path) -> float:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_report_browser import READY, Browser
    b = Browser(width=1400, height=1000)
    try:
        start = time.monotonic()
        b.open(html.resolve().as_uri(), READY, timeout=300)
        took = time.monotonic() - start
        errors = b.errors()
        if errors:
            print("browser errors:", *errors, sep="\n  ")
        return took
    finally:
        b.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--vms", type=int, default=50)
    ap.add_argument("--intervals", type=int, default=600)
    ap.add_argument("--pages", type=int, default=300_000, help="distinct KSM pages")
    ap.add_argument("--dir", type=Path, help="keep the recording and report here")
    ap.add_argument("--browser", action="store_true", help="also time drawing in Chromium")
    args = ap.parse_args()

    tmp = None
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        work = args.dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="overcommit-bench-")
        work = Path(tmp.name)
    rec, out = work / "bench.arrow", work / "bench.html"
    start = time.monotonic()
    build(rec, args.events, args.vms, args.intervals, args.pages)
    built = time.monotonic() - start
    print(f"recording: {args.events:,} events, {args.vms} VMs, {args.intervals} intervals, "
          f"{rec.stat().st_size / 2**20:.0f} MiB, built in {built:.1f}s")

    # The report command alone (what `overcommit report` runs), in a child
    # process so that its peak memory is measured apart from the build's.
    cmd = [sys.executable, "-c", "from reports.cli import report_command as c; "
           "c(prog_name='overcommit report')", str(rec), "-o", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    took = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024   # KiB -> MiB
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        print(f"report failed: exit {proc.returncode}")
        return 1
    from plotly.offline import get_plotlyjs
    size = out.stat().st_size
    print(f"report:    {took:.1f}s, peak RSS {peak:.0f} MiB, HTML {size / 2**20:.1f} MiB "
          f"({(size - len(get_plotlyjs())) / 2**10:.0f} KiB without plotly.js)")
    if args.browser:
        print(f"browser:   all plots drawn {browser_time(out):.1f}s after opening")
    print("rerun:     " + " ".join([os.path.relpath(sys.executable), "tests/bench/bench_report.py"]
                                   + sys.argv[1:]))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
