"""The field registry: every event kind and summary field, described once.

Event kinds are declared in bpf/overcommit.h (`enum oc_kind`) and read from
there, so C and Python cannot drift.  The CLI columns, the recording, the
summary, the exporter's metric help and the report's axis labels all take
names, units and descriptions from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PAGE_SIZE = 4096


@dataclass(frozen=True)
class Field:
    name: str
    unit: str
    description: str
    width: int = 10
    header: str = ""        # column header in `top`, when not NAME upper-cased


@lru_cache(maxsize=1)
def kinds() -> dict[int, str]:
    """enum oc_kind as {value: name}, e.g. {1: "merge_with_ksm_page"}."""
    text = (BPF_DIR / "overcommit.h").read_text()
    body = re.search(r"enum oc_kind\s*{(.*?)};", text, re.S).group(1)
    out = {}
    for name, value in re.findall(r"\bOC_([A-Z0-9_]+)\s*=\s*(\d+)", body):
        if name not in ("NONE", "KIND_MAX"):
            out[int(value)] = name.lower()
    return out


# Event kinds, as counted in the kernel and stored in the recording.
EVENTS = {f.name: f for f in [
    Field("merge_with_ksm_page", "pages",
          "pages merged into an existing KSM page (one frame freed each)"),
    Field("new_ksm_page", "pages",
          "pages turned into a new KSM page (their partner merged into them)"),
    Field("new_ksm_page_broken", "pages",
          "pages turned into a KSM page whose partner then failed (undone)"),
    Field("merge_failed", "pages", "merge attempts that failed"),
    Field("merge_zero_page", "pages", "pages replaced by the zero page (use_zero_pages)"),
    Field("merge_zero_page_failed", "pages", "zero-page merge attempts that failed"),
    Field("remove_rmap_item", "pages", "sharers seen leaving a stale KSM page"),
    Field("remove_ksm_page", "pages", "KSM pages (stable nodes) removed"),
    Field("break_ksm", "calls", "break_ksm() calls (COW unsharing by madvise/prctl)"),
    Field("ksm_enter", "events", "mm registered with KSM"),
    Field("ksm_exit", "events", "mm left KSM"),
    Field("full_scan", "passes", "full passes of ksmd over all registered memory"),
    Field("ksm_advisor", "events", "decisions of the KSM advisor"),
    Field("balloon_inflate", "pages", "guest pages taken into the balloon"),
    Field("balloon_deflate", "pages", "guest pages given back from the balloon"),
    Field("host_discard", "pages", "guest RAM pages the VMM discarded (balloon inflation)"),
    Field("host_willneed", "pages", "guest RAM pages the VMM asked back (balloon deflation)"),
]}

# Summary fields (DESIGN.md "summary --json"), per process and in total.
SUMMARY = {f.name: f for f in [
    Field("merged_pages", "pages",
          "pages that became KSM-mapped (merge_with_ksm_page + new_ksm_page)", 9),
    Field("new_ksm_pages", "pages", "of those, pages that became the shared frame", 9),
    Field("zero_page_merges", "pages", "pages merged with the zero page", 9),
    Field("merge_failures", "pages", "merge attempts that failed", 9),
    Field("unmerged_pages", "pages",
          "pages that stopped being KSM-mapped (events + derived from counters)", 9),
    Field("unmerged_pages_seen", "pages", "part of unmerged_pages seen as events", 9),
    Field("unmerged_pages_derived", "pages",
          "part of unmerged_pages derived from ksm_merging_pages", 9),
    Field("ksm_merging_pages_start", "pages", "/proc/PID/ksm_merging_pages at start", 9),
    Field("ksm_merging_pages_end", "pages", "/proc/PID/ksm_merging_pages at end", 9),
    Field("host_discarded_pages", "pages", "guest RAM discarded by the VMM", 9),
    Field("inflated_pages", "pages", "balloon inflation", 9),
    Field("deflated_pages", "pages", "balloon deflation", 9),
]}

# Which event kinds make up which summary counts.
MERGED = ("merge_with_ksm_page", "new_ksm_page")
FAILED = ("merge_failed", "merge_zero_page_failed", "new_ksm_page_broken")

# Kinds the kernel side streams one by one (oc_rare() in bpf/overcommit.h)
# instead of counting per process: they never appear in "count" rows.
RARE = ("ksm_enter", "ksm_exit", "full_scan", "ksm_advisor")

# The kernel's own counters as the recording samples them ("ksm", "vmstat"
# and "ksm_stat" rows); words from Documentation/admin-guide/mm/ksm.rst.
KSM_SYSFS = {f.name: f for f in [
    Field("pages_shared", "pages", "KSM pages in use (shared frames)"),
    Field("pages_sharing", "pages", "sites sharing the KSM pages: how many pages are saved"),
    Field("pages_unshared", "pages", "unique pages repeatedly checked for merging"),
    Field("pages_volatile", "pages", "pages changing too fast to be placed in a tree"),
    Field("pages_scanned", "pages", "pages scanned by ksmd since KSM started"),
    Field("pages_skipped", "pages", "pages smart_scan skipped since KSM started"),
    Field("full_scans", "passes", "full passes of ksmd over all mergeable areas"),
    Field("general_profit", "bytes",
          "bytes KSM saves, less the cost of its rmap_items (negative while it does not pay)"),
    Field("ksm_zero_pages", "pages", "empty pages merged with the kernel zero page"),
    Field("stable_node_chains", "nodes", "KSM pages that hit the max_page_sharing limit"),
    Field("stable_node_dups", "nodes", "duplicated KSM pages (chained stable nodes)"),
    Field("ksmd_cpu_ns", "ns", "CPU time ksmd has run (its schedstat), since boot"),
    Field("run", "setting", "0: ksmd stopped, 1: running, 2: stopped and all unmerged"),
    Field("pages_to_scan", "setting", "pages ksmd scans before it sleeps"),
    Field("sleep_millisecs", "setting", "milliseconds ksmd sleeps between batches"),
    Field("max_page_sharing", "setting", "sharers allowed per KSM page"),
    Field("merge_across_nodes", "setting", "1: merge pages of different NUMA nodes"),
    Field("use_zero_pages", "setting", "1: merge empty pages with the zero page"),
    Field("smart_scan", "setting", "1: skip pages that did not merge recently"),
    Field("stable_node_chains_prune_millisecs", "setting",
          "milliseconds between prunes of stale stable node chains"),
    Field("advisor_max_cpu", "setting", "advisor: ksmd CPU percent at most"),
    Field("advisor_min_pages_to_scan", "setting", "advisor: pages_to_scan at least"),
    Field("advisor_max_pages_to_scan", "setting", "advisor: pages_to_scan at most"),
    Field("advisor_target_scan_time", "setting", "advisor: seconds a full pass should take"),
]}
VMSTAT = {f.name: f for f in [
    Field("cow_ksm", "pages", "copy-on-write breaks of KSM pages (unmerges no tracepoint sees)"),
    Field("ksm_swpin_copy", "pages", "KSM pages copied when swapped in"),
    Field("balloon_inflate", "pages", "pages this kernel gave to a balloon (as a guest)"),
    Field("balloon_deflate", "pages", "pages this kernel took back from a balloon (as a guest)"),
    Field("balloon_migrate", "pages", "balloon pages migrated by compaction"),
    Field("nr_balloon_pages", "pages", "pages in this kernel's balloon now"),
]}
KSM_STAT = {f.name: f for f in [
    Field("ksm_merging_pages", "pages", "pages of the process that are KSM-mapped now"),
    Field("ksm_rmap_items", "items", "rmap_items of the process (KSM's per-page metadata)"),
    Field("ksm_zero_pages", "pages", "pages of the process merged with the zero page"),
    Field("ksm_process_profit", "bytes",
          "bytes KSM saves for the process, less the cost of its rmap_items"),
    Field("ksm_merge_any", "flag", "1: all of the process is mergeable (PR_SET_MEMORY_MERGE)"),
    Field("ksm_mergeable", "flag", "1: the process has mergeable memory"),
]}

# Live views: the columns of `overcommit top` and the exporter's own metrics.
LIVE = {f.name: f for f in [
    Field("pid", "", "process ID (of the VMM, for a VM)", 7, "PID"),
    Field("comm", "", "process name", 11, "COMM"),
    Field("vm", "", "VM name (VMM processes only)", 10, "VM"),
    Field("merges", "pages/s", "pages that became KSM-mapped, per second (merged_pages)",
          8, "MERGE/s"),
    Field("unmerges", "pages/s",
          "pages that stopped being KSM-mapped, per second (unmerged_pages)", 8, "UNMRG/s"),
    Field("merging", "pages", "pages KSM-mapped now (ksm_merging_pages)", 8, "MERGING"),
    Field("inflate", "MiB/s", "guest memory taken into the balloon (balloon_inflate)",
          10, "INFL MiB/s"),
    Field("discard", "MiB/s", "guest RAM the VMM discarded (host_discard)", 10, "DISC MiB/s"),
    Field("scan_duration", "seconds",
          "duration of a full pass of ksmd (ksm_start_scan to ksm_stop_scan)"),
    Field("scan_seq", "", "sequence number of ksmd's latest full pass"),
    Field("scan_rmap_entries", "items", "rmap entries of ksmd's latest full pass"),
    Field("lost_events", "events", "events lost in the kernel (ring buffer or counts map full)"),
    Field("intervals", "intervals", "intervals traced since the tracer started"),
    Field("last_interval", "seconds", "end of the latest interval traced (Unix time)"),
    Field("tracer", "", "the tracer: version, kernel and attach mode per concern"),
]}


def describe(name: str) -> Field:
    """The field of an event kind or a summary field."""
    return EVENTS.get(name) or SUMMARY[name]
