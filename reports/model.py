"""What a report shows, computed from recordings: a pure transform.

``from_recordings(paths) -> ReportModel``.  No plotting and no HTML here
(figures.py, html.py), no kernel access: recordings are read with
tracer.recording and aggregated with tracer.aggregate, so a recording made on
a server is reported on a laptop.

Names (comm, VM) are kept raw here; whoever renders them escapes them.

Every plotted series is at most MAX_POINTS long: intervals are binned
(counts summed, lengths summed, so rates and totals stay exact), scan passes
are binned in time (mean and max), streamed events are reduced to per-page
counts before the sharing matrix is built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tracer import __version__, aggregate
from tracer.fields import PAGE_SIZE
from tracer.recording import Recording, read

MAX_POINTS = 2000        # per plotted series; longer series are binned
MAX_ENTITIES = 15        # VMs/processes with their own trace and color
MAX_MATRIX = 30          # rows/columns of the sharing matrix
RMAP_RATIO_LIMIT = 64    # Documentation/admin-guide/mm/ksm.rst: beyond ~64
                         # ksm_rmap_items per ksm_merging_page KSM does not pay
RMAP_MIN_ITEMS = 64      # below this a process is too small to judge
GAP_FACTOR = 2.0         # an interval this many times longer than -i is a gap
VOLATILE_SHARE = 0.5     # pages_volatile above this share "dominates"
LARGE_BYTES = 64 << 20   # progress lines for recordings at least this big

Progress = Callable[[str], None]

# Colors: one per VM/process, the same in every plot and table of a host.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2",
           "#edc948", "#ff9da7", "#9c755f", "#17becf", "#bcbd22", "#8c564b",
           "#d62728", "#2ca02c", "#9467bd"]
OTHERS_COLOR = "#a0a4aa"
UNATTRIBUTED_COLOR = "#5f6368"


def _quiet(_: str) -> None:
    pass


# -- data the report shows ---------------------------------------------------

@dataclass
class Entity:
    """A VM (all processes with that VM name) or a process without one."""
    key: str                 # "vm:NAME", "pid:N", "others", "unattributed"
    label: str               # raw text: escape before rendering
    kind: str                # "vm", "process", "others", "unattributed"
    pids: list[int]
    color: str
    score: int = 0           # activity, to order entities
    gid: str = ""            # opaque id (plotly legend groups): never a name


@dataclass
class Finding:
    level: str               # "warning", "info", "ok"
    title: str
    detail: str
    setting: str | None = None   # what to change, when something can be


@dataclass
class Sharing:
    """Who shares with whom, from streamed merge events."""
    keys: list[str]          # entity keys, rows and columns
    pages: np.ndarray        # [i, j]: pages of i merged into KSM pages j also maps;
                             # [i, i]: pages of i in KSM pages no other maps
    ksm_pages: np.ndarray    # [i, j]: KSM pages both map ([i, i]: i's KSM pages)
    merge_events: int
    distinct_ksm_pages: int
    labels: dict[str, str]   # key -> raw name (escape before rendering)


@dataclass
class Bins:
    """Intervals binned to at most MAX_POINTS: t = end of bin (s since the
    start), dt = summed interval lengths (s)."""
    t: np.ndarray
    dt: np.ndarray
    of_interval: dict[int, int]
    per_bin: int             # intervals per bin (1: not binned)


@dataclass
class HostReport:
    index: int
    path: Path
    meta: dict[str, Any]
    summary: dict[str, Any]          # tracer.aggregate.summarize()
    page_size: int
    duration_s: float
    entities: list[Entity]
    entity_of_pid: dict[int, str]
    bins: Bins
    activity: pd.DataFrame           # bin, entity, name, value (event counts)
    kernel: pd.DataFrame             # per bin: changes of kernel counters
    kernel_level: pd.DataFrame       # per bin: kernel counters at the end of it
    merging: pd.DataFrame            # per bin x entity: ksm_merging_pages at end
    balloon: dict[str, pd.DataFrame]  # per bin x entity, from the lab's qmp rows:
                                     # balloon_pages, target_pages (pages)
    phases: list[tuple[float, str]]  # the lab's phases: (t, name)
    headline: dict[str, Any]
    scans: dict[str, Any]
    advisor: pd.DataFrame | None
    findings: list[Finding]
    table: list[dict[str, Any]]
    sharing: Sharing | None
    sharing_note: str | None         # why there is no matrix
    balloon_active: bool
    integrity: dict[str, Any]

    @property
    def anchor(self) -> str:
        return f"h{self.index}"

    @property
    def title(self) -> str:
        return str(self.meta.get("host") or self.path.stem)

    def entity(self, key: str) -> Entity:
        return next(e for e in self.entities if e.key == key)

    def rate(self, kinds: Iterable[str], sign: float = 1.0) -> pd.DataFrame:
        """Events per second: index = bin, columns = entity keys (zeros dropped)."""
        a = self.activity[self.activity.name.isin(list(kinds))]
        if a.empty:
            return pd.DataFrame(index=pd.RangeIndex(len(self.bins.t)))
        p = a.pivot_table(index="bin", columns="entity", values="value", aggfunc="sum",
                          fill_value=0, observed=True)
        p = p.reindex(range(len(self.bins.t)), fill_value=0)
        p = p.loc[:, p.sum() != 0]
        order = [e.key for e in self.entities if e.key in p.columns]
        return p[order].div(self.bins.dt, axis=0) * sign


@dataclass
class ReportModel:
    hosts: list[HostReport]
    generated_at: str
    version: str = __version__

    @property
    def fleet(self) -> list[dict[str, Any]]:
        return [fleet_row(h) for h in self.hosts]


# -- reading -----------------------------------------------------------------

class _Framed(Recording):
    """A Recording whose rows are already a DataFrame: converted once, used by
    tracer.aggregate and by the report alike."""

    def __init__(self, rec: Recording, table: pa.Table, df: pd.DataFrame):
        super().__init__(rec.path, rec.meta, table, rec.closed, rec.damaged_bytes,
                         list(rec.notes))
        self._df = df

    def frame(self) -> pd.DataFrame:
        return self._df


def _frame(table: pa.Table) -> pd.DataFrame:
    """Like Recording.frame(), but strings go to categories inside Arrow,
    without a Python string per row."""
    for col in ("record", "name", "comm", "vm"):
        i = table.schema.get_field_index(col)
        table = table.set_column(i, col, pc.dictionary_encode(table[col]))
    return table.to_pandas()


# Streamed events that place pages into KSM pages, and the ends of KSM pages:
# all the sharing matrix needs.  Codes index SHARING_KINDS.
SHARING_KINDS = ("merge_with_ksm_page", "new_ksm_page", "remove_ksm_page")
MERGE_WITH, NEW_KSM, REMOVED = range(3)


@dataclass
class Merges:
    t: np.ndarray            # float64, s since the start
    kind: np.ndarray         # int8, index into SHARING_KINDS
    pid: np.ndarray          # int32
    pfn: np.ndarray          # uint64: the KSM page's frame
    streamed: int            # all streamed events of the recording, of any kind

    @classmethod
    def empty(cls, streamed: int = 0) -> "Merges":
        return cls(np.zeros(0), np.zeros(0, np.int8), np.zeros(0, np.int32),
                   np.zeros(0, np.uint64), streamed)


def _merges(batch: pa.RecordBatch) -> tuple[np.ndarray, ...]:
    """The sharing-relevant rows of a batch of events, as compact arrays:
    successful merges and KSM page removals, with a pfn."""
    name, pfn = batch.column("name"), pc.fill_null(batch.column("pfn"), 0)
    err = pc.fill_null(batch.column("err"), 0)
    kinds = pa.array(SHARING_KINDS)
    keep = pc.and_(pc.and_(pc.is_in(name, value_set=kinds), pc.not_equal(pfn, 0)),
                   pc.or_(pc.equal(err, 0), pc.equal(name, "remove_ksm_page")))
    keep = pc.fill_null(keep, False)
    sub = batch.filter(keep)
    return (sub.column("t").to_numpy(zero_copy_only=False),
            pc.index_in(sub.column("name"), value_set=kinds).to_numpy(
                zero_copy_only=False).astype(np.int8),
            pc.fill_null(sub.column("pid"), 0).to_numpy(zero_copy_only=False).astype(np.int32),
            pc.fill_null(sub.column("pfn"), 0).to_numpy(zero_copy_only=False).astype(np.uint64))


def load(path: Path | str, progress: Progress = _quiet) -> tuple[_Framed, Merges]:
    """Read a recording and split it, batch by batch, into streamed events
    (possibly millions: reduced at once to what the sharing matrix needs) and
    the rest (counts and counters, small), which becomes a DataFrame.  Each
    batch is freed once split, so memory peaks while reading, not after."""
    path = Path(path)
    started = time.monotonic()
    size = path.stat().st_size if path.exists() else 0
    if size >= LARGE_BYTES:
        progress(f"reading {path} ({size / 2**20:.0f} MiB)")
    rec = read(path)
    schema, batches = rec.table.schema, rec.table.to_batches()
    rec.table = None
    batches.reverse()
    rest: list[pa.RecordBatch] = []
    parts: list[tuple[np.ndarray, ...]] = []
    streamed = 0
    while batches:
        b = batches.pop()
        is_event = pc.fill_null(pc.equal(b.column("record"), "event"), False)
        n = pc.sum(is_event).as_py() or 0
        if n:
            streamed += n
            parts.append(_merges(b.filter(is_event) if n < b.num_rows else b))
            if n < b.num_rows:
                rest.append(b.filter(pc.invert(is_event)))
        else:
            rest.append(b)
        del b
    merges = Merges(*(np.concatenate(c) for c in zip(*parts)), streamed) if parts \
        else Merges.empty(streamed)
    table = pa.Table.from_batches(rest, schema=schema)
    df = _frame(table)
    if size >= LARGE_BYTES:
        progress(f"read {len(df) + streamed:,} rows ({streamed:,} streamed events) "
                 f"in {time.monotonic() - started:.1f}s")
    return _Framed(rec, table, df), merges


# -- building blocks -----------------------------------------------------------

def _last_by(df: pd.DataFrame, record: str) -> dict[str, float]:
    s = df[df.record == record]
    if s.empty:
        return {}
    return s.groupby("name", observed=True)["value"].last().to_dict()


def _settings(meta: dict[str, Any], df: pd.DataFrame) -> dict[str, Any]:
    """KSM settings at the end: the ksm rows carry them each interval (so a
    change during the recording shows), meta has them at the start."""
    out = dict(meta.get("ksm_settings") or {})
    last = _last_by(df, "ksm")
    for k in list(out) + ["run", "pages_to_scan", "sleep_millisecs"]:
        if k in last and not isinstance(out.get(k), str):
            out[k] = int(last[k])
    return out


def _with_vms(procs: list[dict[str, Any]], df: pd.DataFrame) -> list[dict[str, Any]]:
    """Add the VMs the lab reports (qmp, guest_stats rows) that KSM did not
    see, so that their balloons have a row and a color too."""
    known = {p["pid"] for p in procs}
    lab = df[df.record.isin(["qmp", "guest_stats"]) & ~df.pid.isin(list(known))]
    if lab.empty:
        return procs
    zero = {k: 0 for k in ("merged_pages", "new_ksm_pages", "zero_page_merges",
                           "merge_failures", "unmerged_pages", "unmerged_pages_seen",
                           "unmerged_pages_derived", "ksm_merging_pages_start",
                           "ksm_merging_pages_end", "host_discarded_pages", "inflated_pages",
                           "deflated_pages")}
    extra = []
    for pid, g in lab.groupby("pid", observed=True):
        comm, vm = g.comm.dropna(), g.vm.dropna()
        extra.append({"pid": int(pid), "comm": str(comm.iloc[-1]) if len(comm) else None,
                      "vm": str(vm.iloc[-1]) if len(vm) else None, **zero,
                      "exited": bool(((df.record == "process") & (df.pid == pid)
                                      & (df.name == "gone")).any())})
    return procs + extra


def _groups(procs: list[dict[str, Any]]) -> list[Entity]:
    """Every VM (its processes together) and every process without a VM,
    most active first; no colors yet."""
    groups: dict[str, Entity] = {}
    for p in procs:
        vm = p["vm"]
        key = f"vm:{vm}" if vm else f"pid:{p['pid']}"
        label = vm if vm else f"{p['comm'] or '?'} [{p['pid']}]"
        e = groups.setdefault(key, Entity(key, label, "vm" if vm else "process", [], ""))
        e.pids.append(p["pid"])
        e.score += (p["merged_pages"] + p["inflated_pages"] + p["host_discarded_pages"]
                    + p["ksm_merging_pages_end"] + p["unmerged_pages"])
    return sorted(groups.values(), key=lambda e: (-e.score, e.label))


def _entities(ordered: list[Entity], df: pd.DataFrame) -> tuple[list[Entity], dict[int, str]]:
    """The VMs/processes plots show: the MAX_ENTITIES most active with a
    color each, the rest summed as "others"."""
    own, rest = ordered[:MAX_ENTITIES], ordered[MAX_ENTITIES:]
    for i, e in enumerate(own):
        e.color = PALETTE[i % len(PALETTE)]
    entities = list(own)
    of_pid = {pid: e.key for e in own for pid in e.pids}
    if rest:
        others = Entity("others", f"{len(rest)} other VMs/processes", "others",
                        [pid for e in rest for pid in e.pids], OTHERS_COLOR,
                        sum(e.score for e in rest))
        entities.append(others)
        of_pid.update({pid: "others" for pid in others.pids})
    c = df[(df.record == "count") & ~df.pid.isin(list(of_pid))]
    if len(c) and c.value.sum() > 0:
        # Counted in a context without a process (pid 0), e.g. stable nodes
        # removed by ksmd itself.
        entities.append(Entity("unattributed", "not attributed (pid 0)", "unattributed",
                               sorted(set(c.pid.astype(int))), UNATTRIBUTED_COLOR))
    for i, e in enumerate(entities):
        e.gid = f"e{i}"
    return entities, of_pid


def _bins(df: pd.DataFrame) -> tuple[Bins, pd.DataFrame]:
    iv = df[df.record == "interval"].groupby("interval")[["t", "value"]].last()
    iv["dt"] = iv["value"].fillna(0) / 1e9
    timed = iv[iv.index > 0]          # interval 0 is the baseline, no length
    n = len(timed)
    per = max(1, math.ceil(n / MAX_POINTS))
    b = np.arange(n) // per
    g = pd.DataFrame({"t": timed.t.to_numpy(), "dt": timed.dt.to_numpy(), "bin": b})
    agg = g.groupby("bin").agg(t=("t", "max"), dt=("dt", "sum"))
    dt = agg.dt.to_numpy(dtype=float).copy()
    dt[dt <= 0] = np.nan
    return Bins(agg.t.to_numpy(), dt, dict(zip(timed.index.astype(int), b.tolist())), per), iv


def _activity(df: pd.DataFrame, bins: Bins, of_pid: dict[int, str]) -> pd.DataFrame:
    c = df[df.record == "count"][["interval", "pid", "name", "value"]]
    if c.empty:
        return pd.DataFrame({"bin": [], "entity": [], "name": [], "value": []})
    c = c.assign(bin=c.interval.map(bins.of_interval),
                 entity=c.pid.map(of_pid).fillna("unattributed"),
                 name=c.name.astype(str))
    c = c[c.bin.notna()]
    out = c.groupby(["bin", "entity", "name"], observed=True)["value"].sum().reset_index()
    out["bin"] = out["bin"].astype(int)
    return out


KERNEL_COUNTERS = {
    "ksm": ["pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "full_scans", "pages_scanned", "ksm_zero_pages", "general_profit",
            "stable_node_chains", "ksmd_cpu_ns"],
    "vmstat": ["cow_ksm", "balloon_inflate", "balloon_deflate", "nr_balloon_pages"],
}


def _kernel(df: pd.DataFrame, iv: pd.DataFrame, bins: Bins) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kernel counters per bin: their level at the end of it and their change
    over it (sampled at the end of each interval; interval 0 is the baseline)."""
    cols = []
    for record, names in KERNEL_COUNTERS.items():
        s = df[(df.record == record) & df.name.isin(names)]
        if s.empty:
            continue
        p = s.pivot_table(index="interval", columns="name", values="value", aggfunc="last",
                          observed=True)
        p.columns = [str(c) for c in p.columns]
        cols.append(p)
    n = len(bins.t)
    if not cols:
        return pd.DataFrame(index=range(n)), pd.DataFrame(index=range(n))
    level = pd.concat(cols, axis=1).reindex(iv.index).ffill()
    delta = level.diff()
    bin_of = pd.Series(level.index.map(bins.of_interval), index=level.index)
    keep = bin_of.notna()
    level_b = level[keep].groupby(bin_of[keep].astype(int)).last().reindex(range(n))
    delta_b = delta[keep].groupby(bin_of[keep].astype(int)).sum(min_count=1).reindex(range(n))
    if "pages_shared" in level_b and "pages_sharing" in level_b:
        level_b["ksm_mapped"] = level_b.pages_shared + level_b.pages_sharing
        delta_b["ksm_mapped"] = delta_b.pages_shared + delta_b.pages_sharing
    return delta_b, level_b


def _levels(df: pd.DataFrame, record: str, name: str, bins: Bins,
            of_pid: dict[int, str]) -> pd.DataFrame:
    """A per-process level (e.g. ksm_stat ksm_merging_pages, qmp
    balloon_pages) per entity at the end of each bin: summed over the
    entity's processes, 0 once a process is gone, NaN before it was seen."""
    s = df[(df.record == record) & (df.name == name)]
    n = len(bins.t)
    if s.empty:
        return pd.DataFrame(index=range(n))
    p = s.pivot_table(index="interval", columns="pid", values="value", aggfunc="last",
                      observed=True)
    gone = df[(df.record == "process") & (df.name.isin(["gone", "ksm_exit"]))]
    ivs = sorted(bins.of_interval)
    p = p.reindex(ivs)
    for pid in p.columns:
        col = p[pid]
        seen = col.notna()
        if seen.any():
            first = col[seen].index[0]
            filled = col.ffill()
            ended = gone[gone.pid == pid]
            if len(ended):
                after = col.index[(col.index > int(ended.interval.max())) & ~seen]
                filled[after] = 0
            filled[col.index < first] = np.nan
            p[pid] = filled
    p.columns = [of_pid.get(int(c), "unattributed") for c in p.columns]
    p = p.T.groupby(level=0).sum(min_count=1).T
    b = pd.Series([bins.of_interval[i] for i in ivs], index=ivs)
    return p.groupby(b).last().reindex(range(n))


def _balloons(df: pd.DataFrame, bins: Bins, of_pid: dict[int, str],
              page: int) -> dict[str, pd.DataFrame]:
    """From the lab's qmp rows, per entity and bin: the balloon (pages) and
    the balloon the last `balloon` command asked for (pages).  QEMU reports
    `actual`, the guest RAM less the balloon; `balloon` sets the RAM wanted."""
    size = _levels(df, "qmp", "balloon_pages", bins, of_pid)
    q = df[(df.record == "qmp") & df.name.isin(["balloon_actual", "balloon_pages",
                                                 "balloon_target"])]
    target = pd.DataFrame(index=size.index)
    if len(q):
        p = q.pivot_table(index=["interval", "pid"], columns="name",
                          values="value", aggfunc="last", observed=True)
        if {"balloon_actual", "balloon_pages", "balloon_target"} <= set(p.columns):
            ram = p.balloon_actual + p.balloon_pages * page
            rows = ((ram - p.balloon_target) / page).clip(lower=0).rename("value").reset_index()
            rows = rows.assign(record="qmp", name="balloon_target_pages")
            target = _levels(rows, "qmp", "balloon_target_pages", bins, of_pid)
    return {"balloon_pages": size, "target_pages": target}


def _scans(df: pd.DataFrame, kernel: pd.DataFrame, bins: Bins) -> dict[str, Any]:
    s = df[df.record == "scan"]
    out: dict[str, Any] = {"count": int(len(s))}
    d = s.duration_ns.dropna().to_numpy(dtype=float) / 1e6     # ms
    out["durations_ms"] = d
    if len(d):
        out["median_ms"] = float(np.median(d))
        out["p95_ms"] = float(np.percentile(d, 95))
        out["max_ms"] = float(d.max())
        lo, hi = max(float(d.min()), 1e-3), float(d.max())
        if hi / lo > 100:   # wide range: log-spaced bins
            edges = np.logspace(np.log10(lo), np.log10(hi * 1.0001), 41)
            out["hist_log"] = True
        else:
            edges = np.linspace(float(d.min()), hi * 1.0001 + 1e-9, 41)
            out["hist_log"] = False
        out["hist_counts"], out["hist_edges"] = np.histogram(d, bins=edges)
    # Pass durations over time: raw points, or mean and max per time bin.
    timed = s[s.duration_ns.notna()]
    if len(timed) > MAX_POINTS:
        edges = np.linspace(float(timed.t.min()), float(timed.t.max()) + 1e-9, MAX_POINTS + 1)
        idx = np.digitize(timed.t.to_numpy(), edges) - 1
        g = pd.DataFrame({"i": idx, "ms": timed.duration_ns.to_numpy() / 1e6,
                          "rmap": timed.value.to_numpy()}).groupby("i")
        out["over_time"] = pd.DataFrame({
            "t": edges[:-1][g.size().index] + (edges[1] - edges[0]) / 2,
            "mean_ms": g.ms.mean().to_numpy(), "max_ms": g.ms.max().to_numpy(),
            "rmap_entries": g.rmap.last().to_numpy(), "passes": g.size().to_numpy()})
        out["binned"] = True
    else:
        out["over_time"] = pd.DataFrame({
            "t": timed.t.to_numpy(), "mean_ms": timed.duration_ns.to_numpy() / 1e6,
            "max_ms": timed.duration_ns.to_numpy() / 1e6,
            "rmap_entries": timed.value.to_numpy(), "seq": timed.seq.to_numpy(),
            "passes": np.ones(len(timed), dtype=int)})
        out["binned"] = False
    # Pages scanned per second and per pass, from the counters.
    if "pages_scanned" in kernel and "full_scans" in kernel:
        per_s = kernel.pages_scanned / bins.dt
        passes = kernel.full_scans
        out["pages_scanned_per_s"] = per_s
        out["pages_per_pass"] = (kernel.pages_scanned / passes.where(passes > 0))
        out["passes_counter"] = int(np.nansum(passes.to_numpy()))
    return out


def _advisor(df: pd.DataFrame) -> pd.DataFrame | None:
    a = df[df.record == "advisor"]
    if a.empty:
        return None
    p = a.pivot_table(index="t", columns="name", values="value", aggfunc="last", observed=True)
    p.columns = [str(c) for c in p.columns]
    if len(p) > MAX_POINTS:     # keep the last decision of each time bin
        edges = np.linspace(p.index.min(), p.index.max() + 1e-9, MAX_POINTS + 1)
        p = p.assign(t=p.index).groupby(np.digitize(p.index, edges)).last().set_index("t")
    return p


def _counter_total(df: pd.DataFrame, name: str, duration_s: float) -> float | None:
    """A counter present as cumulative samples (ksm/vmstat rows) or as
    per-interval counts (count rows): its total over the recording."""
    for record in ("ksm", "vmstat", "ksmd"):
        s = df[(df.record == record) & (df.name == name)]
        if len(s):
            return float(s.value.iloc[-1] - s.value.iloc[0])
    s = df[(df.record == "count") & (df.name == name)]
    if len(s):
        return float(s.value.sum())
    return None


def _headline(s: dict[str, Any], df: pd.DataFrame, level: pd.DataFrame, page: int,
              duration: float, balloon_pages: pd.DataFrame) -> dict[str, Any]:
    k, b = s["ksm"], s["balloon"]

    def mib(pages):
        return None if pages is None or (isinstance(pages, float) and math.isnan(pages)) \
            else pages * page / 2**20

    def col(name):
        return level[name] if name in level else pd.Series(dtype=float)

    sharing, tracked = col("pages_sharing"), pd.Series(dtype=float)
    if all(n in level for n in ("pages_shared", "pages_sharing", "pages_unshared",
                                "pages_volatile")):
        # Every page ksmd has an rmap_item for is in exactly one of these.
        tracked = (level.pages_shared + level.pages_sharing + level.pages_unshared
                   + level.pages_volatile)
    peak_i = int(sharing.fillna(-1).to_numpy().argmax()) if sharing.notna().any() else None
    h: dict[str, Any] = {
        "saved_end_mib": mib(k["pages_sharing_end"]),
        "saved_peak_mib": mib(float(sharing.max())) if sharing.notna().any() else None,
        "zero_pages_end_mib": mib(k["ksm_zero_pages_end"]),
        "general_profit_end_mib": (None if k["general_profit_end"] is None
                                   else k["general_profit_end"] / 2**20),
        "general_profit_peak_mib": (float(col("general_profit").max()) / 2**20
                                    if col("general_profit").notna().any() else None),
        "share_end": None, "share_peak": None,
        "tracked_end_mib": None,
        "merged_mib": mib(k["merged_pages"]),
        "unmerged_mib": mib(k["unmerged_pages"]),
        "balloon_inflated_mib": mib(b["inflated_pages"]),
        "balloon_deflated_mib": mib(b["deflated_pages"]),
        "host_discarded_mib": mib(b["host_discarded_pages"]),
        "balloon_share": None,
    }
    if len(tracked) and tracked.notna().any():
        t_end = tracked.dropna().iloc[-1]
        h["tracked_end_mib"] = mib(float(t_end))
        if t_end > 0 and k["pages_sharing_end"] is not None:
            h["share_end"] = k["pages_sharing_end"] / t_end
        if peak_i is not None and tracked.iloc[peak_i] > 0:
            h["share_peak"] = float(sharing.iloc[peak_i] / tracked.iloc[peak_i])
    # What the balloons held (QEMU's query-balloon, from the lab's qmp rows)
    # and the guests' RAM: balloon_actual is the RAM less the balloon.
    held = balloon_pages.sum(axis=1, min_count=1) if balloon_pages.shape[1] else \
        pd.Series(dtype=float)
    h["balloon_peak_mib"] = mib(float(held.max())) if held.notna().any() else None
    h["balloon_end_mib"] = mib(float(held.dropna().iloc[-1])) if held.notna().any() else None
    guest = None
    q = df[(df.record == "qmp") & df.name.isin(["balloon_actual", "balloon_pages"])]
    if len(q):
        p = q.pivot_table(index=["interval", "pid"], columns="name", values="value",
                          aggfunc="last", observed=True)
        if {"balloon_actual", "balloon_pages"} <= set(p.columns):
            ram = (p.balloon_actual + p.balloon_pages * page).groupby(level="pid").max()
            guest = float(ram.sum()) / 2**20
    if guest is None:
        g = df[(df.record == "guest_stats") & (df.name == "total_memory")]
        if len(g):
            guest = float(g.groupby("pid", observed=True).value.max().sum()) / 2**20
    h["guest_memory_mib"] = guest or None
    returned = h["balloon_peak_mib"] or h["host_discarded_mib"] or h["balloon_inflated_mib"]
    if guest and returned:
        h["balloon_share"] = returned / guest
    # What ksmd cost: the recorder samples ksmd's run time (schedstat) as a
    # `ksmd_cpu_ns` ksm row each interval; older recordings lack it.
    cpu_ns = _counter_total(df, "ksmd_cpu_ns", duration)
    h["ksmd_cpu_s"] = None if cpu_ns is None else cpu_ns / 1e9
    h["ksmd_cpu_percent"] = (None if cpu_ns is None or duration <= 0
                             else 100 * cpu_ns / 1e9 / duration)
    return h


# -- findings --------------------------------------------------------------------

def _fmt_s(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _findings(s: dict[str, Any], settings: dict[str, Any], scans: dict[str, Any],
              level: pd.DataFrame, table: list[dict[str, Any]],
              duration: float) -> list[Finding]:
    """Plain-language findings, each warning with the setting to change."""
    out: list[Finding] = []
    k = s["ksm"]
    run = settings.get("run")
    if run == 0:
        out.append(Finding("warning", "ksmd was not running (run = 0)",
                           "Nothing is merged while run is 0, however much memory is "
                           "marked mergeable.", "echo 1 > /sys/kernel/mm/ksm/run"))
    elif run == 2:
        out.append(Finding("warning", "KSM was unmerging everything (run = 2)",
                           "run = 2 stops ksmd and unmerges every KSM page.",
                           "echo 1 > /sys/kernel/mm/ksm/run"))

    # Pass length against how long a merged page lives.
    pages_to_scan = settings.get("pages_to_scan")
    sleep_ms = settings.get("sleep_millisecs")
    tune = ("raise pages_to_scan or lower sleep_millisecs in /sys/kernel/mm/ksm "
            "(or advisor_mode = scan-time with advisor_target_scan_time)")
    tracked = None
    if all(n in level for n in ("pages_shared", "pages_sharing", "pages_unshared",
                                "pages_volatile")):
        tr = (level.pages_shared + level.pages_sharing + level.pages_unshared
              + level.pages_volatile).dropna()
        tracked = tr if len(tr) else None
    pass_s = None
    if scans.get("median_ms") is not None:
        pass_s = scans["median_ms"] / 1000
    elif scans.get("passes_counter"):
        pass_s = duration / scans["passes_counter"]
    if (run == 1 and not scans.get("count") and not scans.get("passes_counter")
            and tracked is not None and tracked.iloc[-1] > 0 and duration > 0):
        est = ""
        if pages_to_scan and sleep_ms is not None:
            batches = tracked.iloc[-1] / pages_to_scan
            est = (f" At pages_to_scan = {pages_to_scan} and sleep_millisecs = {sleep_ms}, "
                   f"one pass over {int(tracked.iloc[-1]):,} pages sleeps at least "
                   f"{_fmt_s(batches * sleep_ms / 1000)}.")
        out.append(Finding("warning", "No full pass of ksmd completed",
                           f"ksmd did not finish a pass over the mergeable memory in "
                           f"{_fmt_s(duration)}.{est}", tune))
    unmerged = k["unmerged_pages"]
    if pass_s and unmerged > 0 and duration > 0 and "ksm_mapped" in level:
        mapped = float(level.ksm_mapped.mean())
        lifetime = mapped / (unmerged / duration) if mapped > 0 else 0.0
        if lifetime and pass_s > lifetime:
            out.append(Finding(
                "warning", "A full pass takes longer than the churn allows",
                f"A full pass of ksmd takes {_fmt_s(pass_s)}, but a merged page lives "
                f"about {_fmt_s(lifetime)} ({unmerged:,} pages unmerged in "
                f"{_fmt_s(duration)}, {mapped:,.0f} KSM-mapped on average): pages "
                "change before ksmd comes back to them.", tune))

    # Volatile pages: their checksum changed between two passes.
    if "pages_volatile" in level and tracked is not None:
        vol = level.pages_volatile.reindex(tracked.index)
        share = vol / tracked.where(tracked > 0)
        if share.notna().any() and float(share.mean()) > VOLATILE_SHARE:
            out.append(Finding(
                "warning", "pages_volatile dominates",
                f"On average {100 * float(share.mean()):.0f}% of the pages ksmd scans "
                "were volatile: their content changed between two passes, so they are "
                "never merged.",
                "keep fast-changing memory out of MADV_MERGEABLE; if it changes slowly, a "
                "shorter pass catches it: " + tune))

    # Per process: does KSM pay?
    bad = [r for r in table if r["rmap_items"] is not None and r["rmap_items"] >= RMAP_MIN_ITEMS
           and (r["rmap_ratio"] is None or r["rmap_ratio"] > RMAP_RATIO_LIMIT)]
    if bad:
        def ratio(r):
            return "nothing merged" if r["rmap_ratio"] is None else f"{r['rmap_ratio']:.0f}:1"
        names = ", ".join(f"{r['label']} ({ratio(r)})" for r in bad[:6]) \
            + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        out.append(Finding(
            "warning", f"KSM does not pay for {len(bad)} process{'es' if len(bad) > 1 else ''}",
            f"ksm_rmap_items / ksm_merging_pages above {RMAP_RATIO_LIMIT} (the kernel "
            f"documentation's rule of thumb): ksmd spends more on tracking these pages than "
            f"merging them saves. {names}.",
            "stop marking that memory mergeable (madvise MADV_UNMERGEABLE, prctl "
            "PR_SET_MEMORY_MERGE 0, QEMU -machine mem-merge=off), or set smart_scan = 1 "
            "so ksmd skips pages that never merge"))
    losing = [r for r in table if r["profit_mib"] is not None and r["profit_mib"] < 0]
    if losing:
        out.append(Finding(
            "info", f"Negative ksm_process_profit for {len(losing)} process"
                    f"{'es' if len(losing) > 1 else ''}",
            "Their rmap items cost more memory than their merged pages save: "
            + ", ".join(f"{r['label']} ({r['profit_mib']:.2f} MiB)" for r in losing[:6]) + ".",
            None))

    attempts = k["merged_pages"] + k["merge_failures"]
    if attempts and k["merge_failures"] / attempts > 0.1:
        out.append(Finding(
            "info", "Many merge attempts failed",
            f"{k['merge_failures']:,} of {attempts:,} merge attempts failed "
            f"({100 * k['merge_failures'] / attempts:.0f}%): pages changed between "
            "ksmd's compare and its merge, or were locked or under writeback.", None))
    chains = level.stable_node_chains.dropna() if "stable_node_chains" in level else None
    if chains is not None and len(chains) and chains.max() > 0:
        out.append(Finding(
            "info", "KSM pages reached max_page_sharing",
            f"Up to {int(chains.max()):,} stable node chain{'s' if chains.max() > 1 else ''}: "
            f"some KSM pages have "
            f"{settings.get('max_page_sharing', 'max_page_sharing')} sharers and identical "
            "pages get another copy.",
            "raise max_page_sharing to save more, at the cost of longer rmap walks"))

    lost = s["lost_events"]
    if lost:
        out.append(Finding(
            "warning", f"{lost:,} streamed events were lost",
            "The counts are kept in the kernel and stay exact; only streamed events "
            "(and so the sharing matrix) are incomplete.",
            "record without --events, or only the processes of interest (-p PID)"))
    if not any(f.level == "warning" for f in out):
        out.append(Finding("ok", "Nothing to tune found",
                           "ksmd ran, kept up with the churn, and every process it "
                           "tracks merged enough to pay for its tracking.", None))
    return out


# -- table, sharing, integrity ---------------------------------------------------

def _table(procs: list[dict[str, Any]], df: pd.DataFrame, of_pid: dict[int, str],
           entities: list[Entity], page: int) -> list[dict[str, Any]]:
    st = df[df.record == "ksm_stat"]
    last = (st.groupby(["pid", "name"], observed=True)["value"].last()
            if len(st) else pd.Series(dtype=float))
    colors = {e.key: e.color for e in entities}
    rows = []
    for p in procs:
        pid = p["pid"]

        def stat(name):
            v = last.get((pid, name)) if len(last) else None
            return None if v is None or pd.isna(v) else int(v)

        rmap, merging = stat("ksm_rmap_items"), stat("ksm_merging_pages")
        profit = stat("ksm_process_profit")
        key = of_pid.get(pid, "others")
        rows.append({
            **p,
            "label": p["vm"] or f"{p['comm'] or '?'} [{pid}]",
            "entity": key, "color": colors.get(key, OTHERS_COLOR),
            "merging_now": p["ksm_merging_pages_end"],
            "merging_now_mib": p["ksm_merging_pages_end"] * page / 2**20,
            "rmap_items": rmap,
            "rmap_ratio": (rmap / merging) if rmap is not None and merging else None,
            "profit_mib": None if profit is None else profit / 2**20,
        })
    rows.sort(key=lambda r: (-r["merged_pages"], -r["merging_now"], r["pid"]))
    return rows


def _sharing(ev: Merges, of_pid: dict[int, str], order: list[str],
             labels: dict[str, str]) -> Sharing | None:
    if not (ev.kind != REMOVED).any():
        return None
    # By frame, then time: a frame holds one KSM page from the new_ksm_page
    # that made it (or from the start of the recording) until its
    # remove_ksm_page; after that it may hold an unrelated one.  So a KSM page
    # ("page" below) starts where the pfn changes or at one of those events.
    o = np.lexsort((ev.t, ev.pfn))
    pfn, kind = ev.pfn[o], ev.kind[o]
    starts = np.empty(len(o), bool)
    starts[0] = True
    np.not_equal(pfn[1:], pfn[:-1], out=starts[1:])
    starts |= kind != MERGE_WITH
    page = np.cumsum(starts) - 1
    merged = kind != REMOVED
    page, pid = page[merged], ev.pid[o][merged]
    del o, pfn, kind, starts
    # Rows/columns: VMs/processes as in the rest of the report, then pids
    # only seen in events; beyond MAX_MATRIX they are summed as "others".
    codes, upid = pd.factorize(pid)
    ukeys = [of_pid.get(int(p), f"pid:{int(p)}") for p in upid]
    per_key = pd.Series(np.bincount(codes, minlength=len(upid)), index=ukeys) \
        .groupby(level=0).sum().sort_values(ascending=False, kind="stable")
    ranked = [k for k in order if k in per_key.index]
    ranked += [k for k in per_key.index if k not in set(ranked)]
    keys = ranked[:MAX_MATRIX]
    if len(ranked) > MAX_MATRIX:
        keys.append("others")
    idx = {k: i for i, k in enumerate(keys)}
    ent = np.array([idx.get(k, idx.get("others", 0)) for k in ukeys], np.int64)[codes]
    k = len(keys)
    # pages[i, j] = sum over KSM pages p of count[p, i] * (count[p, j] > 0),
    # in dense blocks of pages (rows are sorted by page).
    pages, ksm, solo = np.zeros((k, k)), np.zeros((k, k)), np.zeros(k)
    npages = int(page[-1]) + 1
    chunk = max(1, 4_000_000 // k)
    for lo in range(int(page[0]), npages, chunk):
        a, b = np.searchsorted(page, [lo, lo + chunk])
        if a == b:
            continue
        c = np.bincount((page[a:b] - lo) * k + ent[a:b], minlength=chunk * k) \
            .reshape(chunk, k).astype(np.float64)
        present = (c > 0).astype(np.float64)
        pages += c.T @ present
        ksm += present.T @ present
        solo += c[present.sum(axis=1) == 1].sum(axis=0)
    np.fill_diagonal(pages, solo)
    distinct = int(np.count_nonzero(np.diff(page)) + 1)
    lab = {key: labels.get(key) or (f"{len(ranked) - MAX_MATRIX} other VMs/processes"
                                    if key == "others" else f"pid {key[4:]}")
           for key in keys}
    return Sharing(keys, pages.astype(np.int64), ksm.astype(np.int64), int(len(page)),
                   distinct, lab)


def _gaps(iv: pd.DataFrame, interval_s: float | None) -> list[dict[str, float]]:
    timed = iv[iv.index > 0]
    if not interval_s or timed.empty:
        return []
    long = timed[timed.dt > GAP_FACTOR * interval_s]
    return [{"interval": int(i), "t": float(r["t"]), "length_s": float(r["dt"])}
            for i, r in long.sort_values("dt", ascending=False).iterrows()]


def _crosscheck(s: dict[str, Any], totals: pd.Series) -> list[dict[str, Any]]:
    """What the events say next to what the kernel's counters say."""
    x = s["crosscheck"]

    def row(what, events_label, events, kernel_label, kernel):
        agree = None if events is None or kernel is None else int(events) == int(kernel)
        return {"what": what, "events_label": events_label, "events": events,
                "kernel_label": kernel_label, "kernel": kernel, "agree": agree}

    rows = [
        row("KSM-mapped pages, net change", "merged − unmerged", x["merged_minus_unmerged"],
            "pages_shared + pages_sharing", x["pages_shared_plus_sharing_change"]),
        row("Full passes of ksmd", "ksm_stop_scan", x["full_scans_traced"],
            "full_scans", x["full_scans_counter_change"]),
    ]
    for kind in ("balloon_inflate", "balloon_deflate"):
        vm = x[f"{kind}_vmstat_change"]
        ev = int(totals.get(kind, 0))
        if ev or vm:
            rows.append(row(f"Balloon {kind.split('_')[1]}", kind, ev,
                            f"/proc/vmstat {kind}", vm))
    return rows


def _meta_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    def text(key, v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if key == "pids":
            return ", ".join(map(str, v)) if v else "all processes"
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v))
        return str(v)
    keys = ("host", "kernel", "machine", "started_at", "interval_s", "events_streamed", "pids",
            "ksm_variant", "headers", "page_size", "tool", "version", "schema")
    return [(k, text(k, meta[k])) for k in keys if meta.get(k) is not None]


def _integrity(rec: Recording, s: dict[str, Any], iv: pd.DataFrame,
               df: pd.DataFrame, totals: pd.Series) -> dict[str, Any]:
    meta = rec.meta
    gaps = _gaps(iv, meta.get("interval_s"))
    x = s["crosscheck"]
    return {
        "closed": rec.closed,
        "notes": list(rec.notes),
        "damaged_bytes": rec.damaged_bytes,
        "lost_events": s["lost_events"],
        "lost_by_kind": s["lost_by_kind"],
        "attach": meta.get("attach", []),
        "gaps": gaps[:20], "gap_count": len(gaps),
        "gap_threshold_s": (GAP_FACTOR * meta["interval_s"]) if meta.get("interval_s") else None,
        "intervals": s["intervals"],
        "crosscheck": _crosscheck(s, totals),
        "unmerged_seen": x["unmerged_pages_seen"],
        "unmerged_derived": x["unmerged_pages_derived"],
        "cow_ksm_change": x["cow_ksm_change"],
        "meta_rows": _meta_rows(meta),
        "file": str(rec.path),
        "file_bytes": rec.path.stat().st_size if rec.path.exists() else None,
    }


def fleet_row(h: HostReport) -> dict[str, Any]:
    hl, s = h.headline, h.summary
    return {
        "anchor": h.anchor, "host": h.title, "file": h.path.name,
        "kernel": h.meta.get("kernel"), "started_at": h.meta.get("started_at"),
        "duration_s": h.duration_s,
        "saved_end_mib": hl["saved_end_mib"], "saved_peak_mib": hl["saved_peak_mib"],
        "share_end": hl["share_end"],
        "balloon_mib": (hl["balloon_peak_mib"] or hl["host_discarded_mib"]
                        or hl["balloon_inflated_mib"]),
        "processes": len(h.table), "merged_pages": s["ksm"]["merged_pages"],
        "lost_events": s["lost_events"], "closed": h.integrity["closed"],
        "warnings": sum(f.level == "warning" for f in h.findings),
    }


# -- the transform ---------------------------------------------------------------

def host_report(index: int, path: Path | str, progress: Progress = _quiet) -> HostReport:
    rec, events = load(path, progress)
    df = rec.frame()
    big = rec.path.stat().st_size >= LARGE_BYTES
    if big:
        progress(f"aggregating {rec.path.name}")
    s = aggregate.summarize(rec)
    meta = rec.meta
    page = int(meta.get("page_size") or PAGE_SIZE)
    procs = _with_vms(aggregate.processes(df), df)
    groups = _groups(procs)
    entities, of_pid = _entities(groups, df)
    bins, iv = _bins(df)
    activity = _activity(df, bins, of_pid)
    kernel, level = _kernel(df, iv, bins)
    merging = _levels(df, "ksm_stat", "ksm_merging_pages", bins, of_pid)
    balloon = _balloons(df, bins, of_pid, page)
    phases = [(float(r.t), str(r.name)) for r in
              df[df.record == "lab"][["t", "name"]].itertuples(index=False)]
    duration = float(s["duration_s"])
    settings = _settings(meta, df)
    scans = _scans(df, kernel, bins)
    table = _table(procs, df, of_pid, entities, page)
    headline = _headline(s, df, level, page, duration, balloon["balloon_pages"])
    headline["settings"] = settings
    findings = _findings(s, settings, scans, level, table, duration)
    sharing, note = None, None
    if not meta.get("events_streamed") and not events.streamed:
        note = ("This recording has no streamed events, so which pages merged into which "
                "KSM page is not known. Record with `overcommit record --events` to see "
                "who shares with whom.")
    else:
        if big:
            progress(f"who shares with whom: {len(events.t):,} merges and KSM page removals")
        # The matrix has room for more VMs than the plots' colors: its own
        # grouping, every VM up to MAX_MATRIX.
        sharing = _sharing(events, {pid: g.key for g in groups for pid in g.pids},
                           [g.key for g in groups], {g.key: g.label for g in groups})
        if sharing is None:
            note = "Events were streamed, but no successful merge was among them."
    del events
    totals = activity.groupby("name").value.sum() if len(activity) else pd.Series(dtype=float)
    balloon_active = bool(
        sum(totals.get(n, 0) for n in ("balloon_inflate", "balloon_deflate", "host_discard",
                                       "host_willneed"))
        or any(np.nansum(kernel[c].to_numpy()) > 0 for c in ("balloon_inflate",
                                                             "balloon_deflate") if c in kernel)
        or np.nansum(balloon["balloon_pages"].to_numpy()) > 0)
    return HostReport(
        index=index, path=rec.path, meta=meta, summary=s, page_size=page,
        duration_s=duration, entities=entities, entity_of_pid=of_pid, bins=bins,
        activity=activity, kernel=kernel, kernel_level=level, merging=merging,
        balloon=balloon, phases=phases,
        headline=headline, scans=scans, advisor=_advisor(df), findings=findings,
        table=table, sharing=sharing, sharing_note=note, balloon_active=balloon_active,
        integrity=_integrity(rec, s, iv, df, totals))


def from_recordings(paths: Iterable[Path | str], progress: Progress = _quiet) -> ReportModel:
    hosts = [host_report(i, p, progress) for i, p in enumerate(paths)]
    return ReportModel(hosts, datetime.now(timezone.utc).isoformat(timespec="seconds"))
