"""Live aggregation for `top` and `serve`: a Recorder sink that keeps no file.

The Recorder hands this sink the same rows it would write to a recording
(tracer/recording.py).  They are folded into a digest: the rows a recording
of the whole session would hold, reduced to what tracer/aggregate.py reads --
cumulative counts per (pid, kind), each process's lifecycle rows, its first
and latest ksm_merging_pages sample.  aggregate.processes() runs on that
digest after every interval, so `top`, the exporter and `summary` of a
recording made at the same time agree by construction, in constant memory.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .aggregate import processes
from .fields import EVENTS, PAGE_SIZE, RARE

# Per-process totals from aggregate.processes() that only grow; kept as
# counters (see Live._monotonic).
TOTALS = ("merged_pages", "new_ksm_pages", "zero_page_merges", "merge_failures",
          "unmerged_pages", "host_discarded_pages", "inflated_pages", "deflated_pages")

_DIGEST_COLUMNS = ["record", "name", "pid", "comm", "vm", "value"]


@dataclass
class Snapshot:
    """The state after one interval.  Treated as immutable once published:
    the exporter's HTTP thread reads it while the next one is built."""
    index: int = 0                # interval number; 0 = the baseline
    t: float = 0.0                # end of the interval, s since the start
    length_s: float = 0.0         # its length
    time: float = 0.0             # its end, Unix time
    # pid -> aggregate.processes() row (cumulative), plus "counts" {kind: n},
    # "delta" {total or kind: n in this interval} and "stat" (ksm_stat now)
    processes: dict[int, dict[str, Any]] = field(default_factory=dict)
    ksm: dict[str, int] = field(default_factory=dict)        # /sys/kernel/mm/ksm
    vmstat: dict[str, int] = field(default_factory=dict)
    scans: list[dict[str, int]] = field(default_factory=list)  # passes ended now
    last_scan: dict[str, int] | None = None
    scans_total: int = 0
    lost: dict[str, int] = field(default_factory=dict)       # cumulative, by kind
    closed: bool = False

    def rate(self, p: dict[str, Any], key: str) -> float:
        """Per second over this interval: a total (TOTALS) or an event kind."""
        return p["delta"].get(key, 0) / self.length_s if self.length_s > 0 else 0.0

    def mib_rate(self, p: dict[str, Any], key: str) -> float:
        return self.rate(p, key) * PAGE_SIZE / 2**20


class Live:
    """The sink: write(rows) once per interval (Recorder._flush), the latest
    state in `.latest`.  Processes gone for `keep_gone_s` are forgotten so a
    long-running exporter does not grow with every short-lived process."""

    def __init__(self, meta: dict[str, Any], keep_gone_s: float = 300.0):
        self.meta = meta
        self.keep_gone_s = keep_gone_s
        self.counts: dict[tuple[int, str], int] = {}
        self.life: dict[int, set[str]] = {}
        self.merging: dict[int, list[int]] = {}          # pid -> [first, latest]
        self.stat: dict[int, dict[str, int]] = {}
        self.who: dict[int, tuple[str | None, str | None]] = {}
        self.gone_at: dict[int, float] = {}
        self.scans_total = 0
        self.last_scan: dict[str, int] | None = None
        self.lost: dict[str, int] = {}
        self.latest = Snapshot()
        self._prev_t: float | None = None
        self._prev_totals: dict[int, dict[str, int]] = {}

    # -- the sink interface (tracer.record.Recorder) --------------------------

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if any(r["record"] == "end" for r in rows):
            self.latest = dataclasses.replace(self.latest, closed=True)
            return
        self._fold(rows)

    def write_batch(self, batch) -> None:
        """Streamed events: the in-kernel counts already say everything live
        views show, so `top` and `serve` do not stream (and this ignores)."""

    def close(self) -> None:
        pass

    # -- folding -------------------------------------------------------------

    def _fold(self, rows: list[dict[str, Any]]) -> None:
        ksm, vmstat, scans = {}, {}, []
        stat_now: dict[int, dict[str, int]] = {}
        end_t = index = None
        for r in rows:
            rec, name, pid = r["record"], r["name"], r.get("pid") or 0
            if r.get("comm") is not None:
                self.who[pid] = (r["comm"], r.get("vm"))
            if rec == "count":
                self.counts[pid, name] = self.counts.get((pid, name), 0) + r["value"]
            elif rec == "process":
                self.life.setdefault(pid, set()).add(name)
                if name in ("gone", "ksm_exit"):
                    self.gone_at.setdefault(pid, r["t"])
                elif name in ("ksm_enter", "appeared"):   # back (after an exec)
                    self.gone_at.pop(pid, None)
            elif rec == "ksm_stat":
                stat_now.setdefault(pid, {})[name] = r["value"]
            elif rec == "ksm":
                ksm[name] = r["value"]
            elif rec == "vmstat":
                vmstat[name] = r["value"]
            elif rec == "scan":
                scans.append({"seq": r.get("seq"), "duration_ns": r.get("duration_ns"),
                              "rmap_entries": r["value"]})
            elif rec == "lost":
                self.lost[name] = r["value"]       # cumulative already
            elif rec == "interval":
                end_t, index = r["t"], r["interval"]
        for pid, stat in stat_now.items():
            self.stat[pid] = stat
            if "ksm_merging_pages" in stat:
                m = self.merging.setdefault(pid, [stat["ksm_merging_pages"]] * 2)
                m[1] = stat["ksm_merging_pages"]
        if scans:
            self.scans_total += len(scans)
            self.last_scan = scans[-1]
        if end_t is None:          # not an interval (nothing else is written)
            return
        self._forget(end_t)
        length = end_t - self._prev_t if self._prev_t is not None else 0.0
        self._prev_t = end_t
        self.latest = Snapshot(
            index=index, t=end_t, length_s=length, time=time.time(),
            processes=self._processes(), ksm=ksm, vmstat=vmstat, scans=scans,
            last_scan=self.last_scan, scans_total=self.scans_total, lost=dict(self.lost))

    def digest(self) -> pd.DataFrame:
        """The session so far as recording rows, as few as aggregate needs."""
        rows = []
        for (pid, kind), n in self.counts.items():
            rows.append(("count", kind, pid, n))
        for pid, names in self.life.items():
            rows += [("process", name, pid, 0) for name in sorted(names)]
        for pid, (first, latest) in self.merging.items():
            rows += [("ksm_stat", "ksm_merging_pages", pid, first),
                     ("ksm_stat", "ksm_merging_pages", pid, latest)]
        df = pd.DataFrame(
            [(rec, name, pid, *self.who.get(pid, (None, None)), value)
             for rec, name, pid, value in rows], columns=_DIGEST_COLUMNS)
        return df.astype({"pid": "int64", "value": "int64"})

    def _processes(self) -> dict[int, dict[str, Any]]:
        out = {}
        by_pid: dict[int, dict[str, int]] = {}
        for (pid, kind), n in self.counts.items():
            by_pid.setdefault(pid, {})[kind] = n
        for p in processes(self.digest()):
            pid = p["pid"]
            prev = self._prev_totals.get(pid, {})
            self._monotonic(p, prev)
            counts = by_pid.get(pid, {})
            p["counts"] = counts
            p["stat"] = self.stat.get(pid, {}) if pid not in self.gone_at else {}
            p["delta"] = {**{k: p[k] - prev.get(k, 0) for k in TOTALS},
                          **{k: n - prev.get(k, 0) for k, n in counts.items()}}
            self._prev_totals[pid] = {**{k: p[k] for k in TOTALS}, **counts}
            out[pid] = p
        # Host-wide counts (pid 0: stable nodes whose owner is gone) have no
        # process row in aggregate; the exporter still shows them by kind.
        if 0 in by_pid:
            prev = self._prev_totals.get(0, {})
            counts = by_pid[0]
            out[0] = {"pid": 0, "comm": "-", "vm": None, **{k: 0 for k in TOTALS},
                      "ksm_merging_pages_end": 0, "counts": counts, "stat": {},
                      "delta": {k: n - prev.get(k, 0) for k, n in counts.items()}}
            self._prev_totals[0] = dict(counts)
        return out

    @staticmethod
    def _monotonic(p: dict[str, Any], prev: dict[str, int]) -> None:
        """unmerged_pages is derived (merged - change of ksm_merging_pages).
        The counts map is read a moment before ksm_stat, so a merge in between
        shows in ksm_merging_pages one interval before it is counted and the
        derived value dips by it, then recovers.  Held at its highest value,
        it stays a counter, and once quiet it equals the recording's."""
        floor = prev.get("unmerged_pages", 0)
        if p["unmerged_pages"] < floor:
            p["unmerged_pages"] = floor
            p["unmerged_pages_derived"] = p["unmerged_pages"] - p["unmerged_pages_seen"]

    def _forget(self, now: float) -> None:
        for pid, since in list(self.gone_at.items()):
            if now - since < self.keep_gone_s:
                continue
            for key in [k for k in self.counts if k[0] == pid]:
                del self.counts[key]
            for d in (self.life, self.merging, self.stat, self.who, self.gone_at,
                      self._prev_totals):
                d.pop(pid, None)


def counted_kinds() -> list[str]:
    """Event kinds counted per process in the kernel (the others are rare
    events, streamed one by one: ksm_enter, full_scan, ...)."""
    return [k for k in EVENTS if k not in RARE]
