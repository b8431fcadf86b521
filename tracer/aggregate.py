"""From a recording to numbers: shared by summary, top, the exporter and reports.

Pure pandas on the recording's rows (see tracer/recording.py); no kernel, no bcc.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from .fields import FAILED, MERGED
from .recording import SCHEMA_VERSION, Recording

SUMMARY_SCHEMA = 1


def counts_by_process(df: pd.DataFrame) -> pd.DataFrame:
    """In-kernel counts summed over the recording: one row per pid, one
    column per event kind."""
    c = df[df.record == "count"]
    if c.empty:
        return pd.DataFrame(index=pd.Index([], name="pid", dtype="int32"))
    return c.pivot_table(index="pid", columns="name", values="value", aggfunc="sum",
                         fill_value=0, observed=True)


def rates(df: pd.DataFrame, kinds: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Events per second per interval and kind (host-wide), indexed by the
    interval's end time."""
    c = df[df.record == "count"]
    if kinds:
        c = c[c.name.isin(kinds)]
    ends = df[df.record == "interval"].set_index("interval")
    per = c.pivot_table(index="interval", columns="name", values="value", aggfunc="sum",
                        fill_value=0, observed=True)
    length = ends["value"].reindex(per.index) / 1e9
    out = per.div(length, axis=0)
    out.index = ends["t"].reindex(per.index)
    return out


def _sampled(df: pd.DataFrame, record: str, which: str) -> dict[str, int]:
    """The first or last sample of each counter of a host-wide row kind."""
    s = df[df.record == record]
    if s.empty:
        return {}
    return s.groupby("name", observed=True)["value"].agg(which).astype(int).to_dict()


def _first(df: pd.DataFrame, record: str) -> dict[str, int]:
    return _sampled(df, record, "first")


def _last(df: pd.DataFrame, record: str) -> dict[str, int]:
    return _sampled(df, record, "last")


def _sum(row: pd.Series | dict, names) -> int:
    return int(sum(int(row.get(n, 0)) for n in names))


def _ksm_numbers(row, unmerged: int, seen: int) -> dict[str, int]:
    """The KSM summary fields, from event counts (a process's or the total)."""
    return {
        "merged_pages": _sum(row, MERGED),
        "new_ksm_pages": int(row.get("new_ksm_page", 0)),
        "zero_page_merges": int(row.get("merge_zero_page", 0)),
        "merge_failures": _sum(row, FAILED),
        "unmerged_pages": unmerged,
        "unmerged_pages_seen": seen,
        "unmerged_pages_derived": unmerged - seen,
    }


def processes(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per process: events, and unmerges made exact with the kernel's own
    ksm_merging_pages (KSM notices most COW breaks only on ksmd's next visit,
    in remove_rmap_item_from_tree(), which has no tracepoint)."""
    counts = counts_by_process(df)
    stat = df[(df.record == "ksm_stat") & (df.name == "ksm_merging_pages")]
    life = df[df.record == "process"]
    pids = sorted(set(counts.index) | set(stat.pid) | set(life.pid))
    who = (df[df.pid.isin(pids) & df.comm.notna()].groupby("pid", observed=True)
           [["comm", "vm"]].last())
    # One pass over the rows, not one filter per process (live views call
    # this every interval, with hundreds of processes).
    events_of: dict[int, set[str]] = {}
    for pid, name in zip(life.pid, life.name):
        events_of.setdefault(pid, set()).add(name)
    stat_of: dict[int, list[int]] = {}
    for pid, value in zip(stat.pid, stat.value):
        stat_of.setdefault(pid, []).append(int(value))
    out = []
    for pid in pids:
        if pid == 0:
            continue
        row = counts.loc[pid] if pid in counts.index else {}
        events = events_of.get(pid, set())
        s = stat_of.get(pid, [])
        # There at the start: ksm_merging_pages then is the baseline.  Came
        # later (ksm_enter, appeared): it started from 0.
        start = s[0] if "running" in events and s else 0
        gone = "gone" in events or ("ksm_exit" in events and "ksm_enter" not in events)
        end = 0 if gone or not s else s[-1]
        merged = _sum(row, MERGED)
        seen = int(row.get("remove_rmap_item", 0))
        # Without a ksm_stat sample or a ksm_enter (a process gone before the
        # start, whose stale KSM pages ksmd cleans up now) only events speak.
        derivable = bool(s) or "ksm_enter" in events
        unmerged = merged - (end - start) if derivable else seen
        comm = who.comm.get(pid) if pid in who.index else None
        vm = who.vm.get(pid) if pid in who.index else None
        out.append({
            "pid": int(pid), "comm": comm, "vm": vm if isinstance(vm, str) else None,
            **_ksm_numbers(row, unmerged, seen),
            "ksm_merging_pages_start": start,
            "ksm_merging_pages_end": end,
            "exited": gone,
            "host_discarded_pages": int(row.get("host_discard", 0)),
            "inflated_pages": int(row.get("balloon_inflate", 0)),
            "deflated_pages": int(row.get("balloon_deflate", 0)),
        })
    return out


def summarize(rec: Recording) -> dict[str, Any]:
    df = rec.frame()
    meta = rec.meta
    ends = df[df.record == "interval"]
    duration = float(ends.t.max()) if len(ends) else 0.0
    lost = _last(df, "lost")
    procs = processes(df)
    totals = counts_by_process(df).sum()
    ksm_first, ksm_last = _first(df, "ksm"), _last(df, "ksm")
    vm_first, vm_last = _first(df, "vmstat"), _last(df, "vmstat")
    scans = df[df.record == "scan"]

    def delta(first, last, key):
        return last.get(key, 0) - first.get(key, 0) if key in last else None

    merged = _sum(totals, MERGED)
    unmerged = sum(p["unmerged_pages"] for p in procs)
    seen = int(totals.get("remove_rmap_item", 0))
    shared_delta = None
    if "pages_shared" in ksm_last:
        shared_delta = (ksm_last["pages_shared"] + ksm_last["pages_sharing"]
                        - ksm_first["pages_shared"] - ksm_first["pages_sharing"])
    per_process_net = sum(p["ksm_merging_pages_end"] - p["ksm_merging_pages_start"]
                          for p in procs)
    # KSM pages no known process accounts for: left by processes that exited
    # before the recording, until ksmd cleans their stable nodes up.
    orphans = {}
    if shared_delta is not None:
        for which, ksm, key in (("start", ksm_first, "ksm_merging_pages_start"),
                                ("end", ksm_last, "ksm_merging_pages_end")):
            orphans[which] = (ksm["pages_shared"] + ksm["pages_sharing"]
                              - sum(p[key] for p in procs))
    inflated = int(totals.get("balloon_inflate", 0))
    deflated = int(totals.get("balloon_deflate", 0))
    return {
        "schema": SUMMARY_SCHEMA,
        "recording_schema": meta.get("schema", SCHEMA_VERSION),
        "host": meta.get("host"), "kernel": meta.get("kernel"),
        "started_at": meta.get("started_at"),
        "duration_s": round(duration, 3),
        "intervals": int(len(ends)),
        "closed_cleanly": rec.closed,
        "notes": list(rec.notes),
        "lost_events": int(sum(lost.values())),
        "lost_by_kind": lost,
        "attach": {a["event"]: a["mode"] for a in meta.get("attach", [])},
        "ksm": {
            **_ksm_numbers(totals, unmerged, seen),
            "ksm_pages_removed": int(totals.get("remove_ksm_page", 0)),
            "full_scans": int(len(scans)) if len(scans) else delta(ksm_first, ksm_last, "full_scans") or 0,
            "scan_duration_s_mean": (round(float(scans.duration_ns.mean()) / 1e9, 4)
                                     if scans.duration_ns.notna().any() else None),
            "pages_shared_end": ksm_last.get("pages_shared"),
            "pages_sharing_end": ksm_last.get("pages_sharing"),
            "pages_unshared_end": ksm_last.get("pages_unshared"),
            "pages_volatile_end": ksm_last.get("pages_volatile"),
            "ksm_zero_pages_end": ksm_last.get("ksm_zero_pages"),
            "general_profit_end": ksm_last.get("general_profit"),
        },
        "balloon": {
            "inflated_pages": inflated if inflated else delta(vm_first, vm_last, "balloon_inflate") or 0,
            "deflated_pages": deflated if deflated else delta(vm_first, vm_last, "balloon_deflate") or 0,
            "host_discarded_pages": int(totals.get("host_discard", 0)),
            "host_willneed_pages": int(totals.get("host_willneed", 0)),
        },
        "processes": procs,
        "crosscheck": {
            "merged_minus_unmerged": merged - unmerged,
            "per_process_ksm_merging_pages_change": per_process_net,
            "pages_shared_plus_sharing_change": shared_delta,
            "pages_of_no_process_start": orphans.get("start"),
            "pages_of_no_process_end": orphans.get("end"),
            "unmerges_seen_of_gone_processes": int(counts_by_process(df).get(
                "remove_rmap_item", pd.Series(dtype=int)).get(0, 0)),
            "full_scans_traced": int(len(scans)),
            "full_scans_counter_change": delta(ksm_first, ksm_last, "full_scans"),
            "cow_ksm_change": delta(vm_first, vm_last, "cow_ksm"),
            "unmerged_pages_seen": seen,
            "unmerged_pages_derived": unmerged - seen,
            "balloon_inflate_vmstat_change": delta(vm_first, vm_last, "balloon_inflate"),
            "balloon_deflate_vmstat_change": delta(vm_first, vm_last, "balloon_deflate"),
        },
    }
