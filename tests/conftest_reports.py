"""Synthetic recordings for the report tests (no root, no kernel, no /tmp).

Rows follow the row kinds documented in tracer/recording.py.  The story, in
intervals of 1 s:

  1-3  ksmd merges: two VMs (pids 101, 102) share KSM pages, a plain process
       (103) merges with itself; 104 registers memory that never merges
  4-5  with balloon=True: VM 101's balloon inflates, QEMU discards the pages
  6    102 unmerges 60 pages (COW breaks, seen partly as events)

With lab=True, the rows the VM lab adds: phases (record "lab") and QEMU's
balloon size per VM (record "qmp"), for 101 and for a VM KSM never saw (105).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from tracer.recording import COLUMNS, Writer

HOSTILE_VM = "<img src=x onerror=alert(1)>"
HOSTILE_COMM = "<svg onload=1>"

SETTINGS = {"run": 1, "pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0,
            "max_page_sharing": 256, "smart_scan": 1, "merge_across_nodes": 1,
            "advisor_mode": "none"}
ATTACH = [{"event": "merges", "mode": "tracepoint", "hook": "ksm:ksm_merge_with_ksm_page",
           "why": "KSM tracepoints exist (Linux 6.4+)"},
          {"event": "balloon", "mode": "kprobe", "hook": "balloon_page_enqueue",
           "why": "no balloon tracepoint"}]

# pid -> (comm, vm); vm/comm of 101 and 102 are set per recording.
MERGES = {101: [400, 300, 100], 102: [300, 300, 100], 103: [50, 0, 0]}


def _events_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    cols = {c: [r.get(c) for r in rows] for c in COLUMNS.names}
    return pa.RecordBatch.from_pydict(cols, schema=COLUMNS)


def synthetic_recording(path: Path, *, vm: str = "vm-alpha", comm: str = "qemu-beta",
                        host: str = "host-a", events: bool = False, balloon: bool = False,
                        intervals: int = 8, close: bool = True, lost: int = 0,
                        interval_s: float = 1.0, gap_at: int | None = None,
                        advisor: bool = False, lab: bool = False) -> Path:
    who = {101: ("qemu-system-x86", vm), 102: (comm, "vm-beta"), 103: ("python3", None),
           104: ("java", None)}
    meta = {"tool": "overcommit", "version": "0.1.0", "host": host, "kernel": "6.18.0-test",
            "machine": "x86_64", "started_at": "2026-01-01T00:00:00+00:00",
            "interval_s": interval_s, "pids": [], "events_streamed": events,
            "page_size": 4096, "ksm_settings": SETTINGS, "ksm_variant": "tracepoint",
            "attach": ATTACH}
    w = Writer(path, meta)
    t = 0.0
    merging = {pid: 0 for pid in who}
    shared = sharing = 0
    full_scans, pages_scanned = 100, 10_000
    discarded = 0
    cow = 0
    pfn_next = 1000
    shared_pfns: list[int] = []

    def proc_row(record, name, pid, value, t, i):
        c, v = who[pid]
        return {"t": t, "interval": i, "record": record, "name": name, "pid": pid,
                "comm": c, "vm": v, "value": value}

    def host_row(record, name, value, t, i):
        return {"t": t, "interval": i, "record": record, "name": name, "pid": 0,
                "value": value}

    def sample(rows, t, i):
        unshared = 20
        volatile = 40
        ksm = {"pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared,
               "pages_volatile": volatile, "full_scans": full_scans,
               "pages_scanned": pages_scanned, "ksm_zero_pages": 0,
               "general_profit": sharing * 4096 - 6000 * 64, "stable_node_chains": 0,
               **{k: v for k, v in SETTINGS.items() if isinstance(v, int)}}
        rows += [host_row("ksm", k, v, t, i) for k, v in ksm.items()]
        vmstat = {"cow_ksm": cow, "balloon_inflate": 0, "balloon_deflate": 0,
                  "nr_balloon_pages": 0}
        rows += [host_row("vmstat", k, v, t, i) for k, v in vmstat.items()]
        for pid in who:
            rmap = {101: 900, 102: 800, 103: 60, 104: 5000}[pid]
            stat = {"ksm_rmap_items": rmap, "ksm_zero_pages": 0,
                    "ksm_merging_pages": merging[pid],
                    "ksm_process_profit": merging[pid] * 4096 - rmap * 64,
                    "ksm_merge_any": 0, "ksm_mergeable": 1}
            rows += [proc_row("ksm_stat", k, pid, v, t, i) for k, v in stat.items()]

    rows = [proc_row("process", "running", pid, 0, 0.001, 0) for pid in who]
    sample(rows, 0.002, 0)
    rows.append(host_row("interval", "baseline", 0, 0.003, 0))
    w.write(rows)

    for i in range(1, intervals + 1):
        length = interval_s * (5 if i == gap_at else 1)
        t0, t = t, t + length
        rows, ev = [], []
        if i <= 3:
            new_here = 0
            for pid, per in MERGES.items():
                n = per[i - 1]
                if not n:
                    continue
                # One new KSM page per 50 merged pages, counted to the first pid.
                new = n // 50 if pid == 101 else 0
                rows.append(proc_row("count", "merge_with_ksm_page", pid, n - new, t, i))
                if new:
                    rows.append(proc_row("count", "new_ksm_page", pid, new, t, i))
                merging[pid] += n
                new_here += new
                if events:
                    for j in range(n):
                        if pid == 103:      # shares only with itself
                            pfn = 900 + j % 5
                        elif pid == 101 and j < new:
                            pfn = pfn_next
                            pfn_next += 1
                            shared_pfns.append(pfn)
                        else:
                            pfn = shared_pfns[j % len(shared_pfns)]
                        name = "new_ksm_page" if (pid == 101 and j < new) else \
                            "merge_with_ksm_page"
                        c, v = who[pid]
                        ev.append({"t": t0 + 0.001 * (j + 1) / n, "interval": i,
                                   "record": "event", "name": name, "pid": pid, "comm": c,
                                   "vm": v, "pfn": pfn, "err": 0})
            if i == 1:
                rows.append(proc_row("count", "merge_failed", 104, 7, t, i))
                rows.append(proc_row("process", "ksm_enter", 104, 0, t0 + 0.1, i))
            shared += new_here + 5 * (i == 1)
            sharing = sum(merging.values()) - shared
        if balloon and i in (4, 5):
            rows.append(proc_row("count", "host_discard", 101, 256 * i, t, i))
            discarded += 256 * i
            merging[101] -= 50
            rows.append(proc_row("count", "remove_rmap_item", 101, 50, t, i))
            sharing -= 50
        if i == 6:
            rows.append(proc_row("count", "remove_rmap_item", 102, 45, t, i))
            merging[102] -= 60
            sharing -= 60
            cow += 15
        full_scans += 3
        pages_scanned += 3 * 6000
        for s in range(3):
            rows.append({**host_row("scan", "full_scan", 6000, t0 + 0.3 * (s + 1), i),
                         "seq": full_scans - 2 + s, "duration_ns": 2_000_000 * (s + i)})
        if lost:
            rows.append(host_row("lost", "merge_with_ksm_page", lost * i, t, i))
        if lab:
            if i in (1, 4, 6):
                rows.append(host_row("lab", {1: "merge", 4: "inflate", 6: "deflate"}[i], 0,
                                     t0 + 0.01, i))
            ballooned = {4: 256 * 4, 5: 256 * 9}.get(i, 0)   # inflate, then deflate at 6
            for pid, vm_name, size in ((101, who[101][1], ballooned), (105, "vm-gamma", 128)):
                q = {"t": t, "interval": i, "pid": pid, "comm": "qemu-system-x86",
                     "vm": vm_name, "record": "qmp"}
                rows += [{**q, "name": "balloon_actual", "value": (64 << 20) - size * 4096},
                         {**q, "name": "balloon_pages", "value": size},
                         # `balloon` command: the guest RAM wanted, in bytes
                         {**q, "name": "balloon_target",
                          "value": (64 << 20) - (256 * 9 * 4096 if 4 <= i < 6 else 0)}]
        if advisor:   # one decision per pass, as the ksm_advisor tracepoint
            for s in range(3):
                ta = t0 + 0.3 * (s + 1)
                rows += [host_row("advisor", "pages_to_scan", 100 + 50 * (i + s), ta, i),
                         host_row("advisor", "cpu_percent", 10 + i, ta, i),
                         host_row("advisor", "scan_time_ns", 200_000_000 - i * 10**7, ta, i)]
        sample(rows, t, i)
        rows.append(host_row("interval", "end", int(length * 1e9), t, i))
        if ev:
            w.write_batch(_events_batch(ev))
        w.write(rows)
    if close:
        w.write([host_row("end", "closed", 0, t, intervals + 1)])
        w.close()
    else:
        w._file.flush()   # as after kill -9: no footer
        w._file.close()
    return path

