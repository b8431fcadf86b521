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


def kind_value(name: str) -> int:
    return {v: k for k, v in kinds().items()}[name]


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


def describe(name: str) -> Field:
    return EVENTS.get(name) or SUMMARY[name]
