"""Plotly figures of a report, from the model (reports/model.py).

Names of processes and VMs come from untrusted users, and plotly renders a
subset of HTML in trace names, tick labels and hover text: every such string
goes through `esc()` here.  Axis titles take units from tracer.fields.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tracer.fields import FAILED, MERGED, describe

from .model import HostReport, ReportModel

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
INK = "#202124"
MUTED = "#5f6368"
GRID = "#e8eaed"
KERNEL = "#202124"     # kernel counters: always black, dashed
PANEL_PX = 210
TIME_AXIS = "time since the start of the recording (s)"
LOG_AXIS = dict(type="log", dtick=1, exponentformat="none", minor=dict(ticks="inside"))

TEMPLATE = go.layout.Template(layout=dict(
    font=dict(family=FONT, size=12, color=INK),
    paper_bgcolor="white", plot_bgcolor="white",
    xaxis=dict(gridcolor=GRID, zerolinecolor="#c4c7c5", linecolor="#bdc1c6",
               ticks="outside", tickcolor="#bdc1c6", showline=True),
    yaxis=dict(gridcolor=GRID, zerolinecolor="#c4c7c5", linecolor="#bdc1c6",
               ticks="outside", tickcolor="#bdc1c6", showline=True, rangemode="tozero"),
    legend=dict(bgcolor="rgba(255,255,255,0.9)", font=dict(size=12)),
    hoverlabel=dict(font=dict(family=FONT)),
    margin=dict(l=80, r=30, t=40, b=50),
    title=dict(font=dict(size=14)),
))


def esc(text: Any) -> str:
    """A name as plotly text: shown as written, never as markup."""
    return html.escape(str(text), quote=False)


def unit(name: str, per_second: bool = False) -> str:
    u = describe(name).unit
    return f"{u}/s" if per_second else u


def _mem_unit(*mib_values) -> tuple[float, str]:
    """Scale and unit for memory axes: GiB once values reach 10 GiB."""
    top = max([float(np.nanmax(np.abs(np.asarray(v, dtype=float)), initial=0.0))
               for v in mib_values] + [0.0])
    return (1 / 1024, "GiB") if top >= 10 * 1024 else (1.0, "MiB")


def _steps(h: HostReport, y) -> tuple[np.ndarray, np.ndarray]:
    """x and y of a per-bin series drawn as steps (line shape "vh"): each
    value holds over its bin, the first one too (it starts one bin earlier)."""
    t, dt = h.bins.t, h.bins.dt
    y = np.asarray(y, dtype=float)
    if len(t) == 0:
        return t, y
    start = t[0] - (dt[0] if np.isfinite(dt[0]) else 0.0)
    return np.r_[start, t], np.r_[y[:1], y]


def _layout(fig: go.Figure, height: int, **kw) -> go.Figure:
    fig.update_layout(template=TEMPLATE, height=height, **kw)
    return fig


def _legend_right(fig: go.Figure) -> None:
    fig.update_layout(legend=dict(orientation="v", x=1.01, xanchor="left", y=1,
                                  yanchor="top", traceorder="normal", tracegroupgap=4))


# -- 1. headline: savings over time ------------------------------------------

def savings(h: HostReport) -> go.Figure | None:
    lv, mib = h.kernel_level, h.page_size / 2**20
    scale, mem = _mem_unit(h.merging.sum(axis=1) * mib,
                           lv["pages_sharing"] * mib if "pages_sharing" in lv else [])
    mib *= scale
    if "pages_sharing" not in lv and h.merging.empty:
        return None
    fig = go.Figure()
    for key in [e.key for e in h.entities if e.key in h.merging.columns]:
        y = h.merging[key] * mib
        if not np.nansum(y.to_numpy()):
            continue
        e = h.entity(key)
        x, y = _steps(h, y)
        fig.add_trace(go.Scatter(
            x=x, y=y, name=esc(e.label), legendgroup=e.gid, stackgroup="merging",
            line=dict(color=e.color, width=0.5, shape="vh"), fillcolor=e.color,
            hovertemplate="%{y:.2f} " + mem, opacity=0.8))
    lines = [("pages_sharing", "saved: pages_sharing", "solid", 1.0),
             ("ksm_zero_pages", "saved: ksm_zero_pages", "dot", 1.0),
             ("general_profit", "general_profit", "dash", 1.0 / h.page_size)]
    for col, name, dash, scale in lines:
        if col in lv and np.nansum(np.abs(lv[col].to_numpy())):
            x, y = _steps(h, lv[col] * scale * mib)
            fig.add_trace(go.Scatter(
                x=x, y=y, name=name, mode="lines",
                line=dict(color=KERNEL, dash=dash, width=2, shape="vh"),
                hovertemplate="%{y:.2f} " + mem))
    fig.update_xaxes(title_text=TIME_AXIS)
    fig.update_yaxes(title_text=mem)
    _layout(fig, max(340, 22 * len(fig.data) + 60), hovermode="x unified", margin=dict(t=20))
    _legend_right(fig)
    _phases(fig, h)
    return fig


# -- 2. rates over time --------------------------------------------------------

def _panels(h: HostReport) -> list[dict[str, Any]]:
    """The rate panels that have data (merges always)."""
    k, dt = h.kernel, h.bins.dt
    kinds = set(h.activity.name) if len(h.activity) else set()

    def kern(col, name, sign=1.0, dash="dash"):
        if col in k and k[col].notna().any() and np.nansum(np.abs(k[col].to_numpy())):
            return [(name, sign * k[col] / dt, dash)]
        return []

    panels = [
        dict(title="Pages merged (+) and unmerged, as seen (−)", pos=MERGED,
             neg=("remove_rmap_item",), unit=unit("merged_pages", True), always=True,
             kernel=kern("ksm_mapped", "kernel: change of pages_shared + pages_sharing")
             + kern("cow_ksm", "kernel: cow_ksm (COW breaks of KSM pages)", -1.0, "dot")),
        dict(title="New KSM pages (+) and KSM pages removed (−)", pos=("new_ksm_page",),
             neg=("remove_ksm_page",), unit=unit("new_ksm_page", True),
             kernel=kern("pages_shared", "kernel: change of pages_shared", 1.0, "dashdot")),
        dict(title="Merge failures", pos=FAILED, unit=unit("merge_failed", True), kernel=[]),
        dict(title="Zero-page merges (merge_zero_page)", pos=("merge_zero_page",),
             unit=unit("merge_zero_page", True),
             kernel=kern("ksm_zero_pages", "kernel: change of ksm_zero_pages", 1.0, "longdash")),
        dict(title="Balloon, guest side: inflate (+) / deflate (−)",
             pos=("balloon_inflate",), neg=("balloon_deflate",),
             unit=unit("balloon_inflate", True),
             kernel=kern("balloon_inflate", "kernel: /proc/vmstat balloon_inflate")
             + kern("balloon_deflate", "kernel: /proc/vmstat balloon_deflate", -1.0, "dot")),
        dict(title="Balloon, host side: VMM discards (+) / asks back (−)",
             pos=("host_discard",), neg=("host_willneed",), unit=unit("host_discard", True),
             kernel=[]),
    ]
    out = []
    for p in panels:
        has = kinds & set(p["pos"] + p.get("neg", ()))
        if has or p.get("always") or p["kernel"]:
            out.append(p)
    return out


def rates(h: HostReport) -> go.Figure:
    panels = _panels(h)
    n = len(panels)
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.35 / max(n, 1) / 2,
                        subplot_titles=[p["title"] for p in panels])
    shown: set[str] = set()
    for row, p in enumerate(panels, start=1):
        for sign, kinds in ((1.0, p["pos"]), (-1.0, p.get("neg", ()))):
            if not kinds:
                continue
            r = h.rate(kinds, sign)
            for key in r.columns:
                e = h.entity(key)
                x, y = _steps(h, r[key])
                fig.add_trace(go.Scatter(
                    x=x, y=y, name=esc(e.label), legendgroup=e.gid,
                    showlegend=key not in shown, stackgroup=f"p{row}{'+' if sign > 0 else '-'}",
                    line=dict(color=e.color, width=0.5, shape="vh"), fillcolor=e.color,
                    hovertemplate="%{y:,.1f} " + p["unit"]), row=row, col=1)
                shown.add(key)
        for name, y, dash in p["kernel"]:
            x, y = _steps(h, y)
            fig.add_trace(go.Scatter(
                x=x, y=y, name=name, mode="lines", legendgroup=name,
                line=dict(color=KERNEL, dash=dash, width=1.5, shape="vh"),
                hovertemplate="%{y:,.1f} " + p["unit"]), row=row, col=1)
        fig.update_yaxes(title_text=p["unit"], row=row, col=1)
    fig.update_xaxes(title_text=TIME_AXIS, row=n, col=1)
    fig.update_yaxes(rangemode="normal")
    _layout(fig, PANEL_PX * n + 140, hovermode="x unified")
    _legend_right(fig)
    for a in fig.layout.annotations:   # subplot titles: left-aligned
        a.update(x=0, xanchor="left", font=dict(size=13, color=INK))
    _phases(fig, h)
    return fig


# -- 3. ksmd ---------------------------------------------------------------------

def scan_histogram(h: HostReport) -> go.Figure | None:
    s = h.scans
    if "hist_counts" not in s:
        return None
    edges, counts = s["hist_edges"], s["hist_counts"]
    centers = np.sqrt(edges[:-1] * edges[1:]) if s["hist_log"] else (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(
        x=centers, y=counts, width=np.diff(edges), marker_color="#4e79a7",
        customdata=np.stack([edges[:-1], edges[1:]], axis=1), name="passes",
        hovertemplate="%{customdata[0]:.3g}–%{customdata[1]:.3g} ms: %{y} passes<extra></extra>"))
    fig.update_xaxes(title_text="duration of a full pass (ms)",
                     **(LOG_AXIS if s["hist_log"] else {}))
    fig.update_yaxes(title_text=unit("full_scan"))
    return _layout(fig, 360, bargap=0.05, showlegend=False, margin=dict(t=20))


def scans_over_time(h: HostReport) -> go.Figure | None:
    s = h.scans
    ot = s.get("over_time")
    has_counter = "pages_scanned_per_s" in s
    if (ot is None or ot.empty) and not has_counter:
        return None
    rows = []
    if ot is not None and len(ot):
        rows.append("Duration of each full pass (ms)" if not s["binned"]
                    else "Duration of full passes: mean and max per time bin (ms)")
    if has_counter:
        rows += ["Pages scanned per second (pages_scanned)",
                 "Pages scanned per full pass (pages_scanned / full_scans)"]
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, subplot_titles=rows,
                        vertical_spacing=0.12)
    r = 1
    if ot is not None and len(ot):
        if s["binned"]:
            fig.add_trace(go.Scatter(x=ot.t, y=ot.max_ms, name="max pass duration",
                                     mode="lines", line=dict(color="#e15759", width=1)), r, 1)
            fig.add_trace(go.Scatter(x=ot.t, y=ot.mean_ms, name="mean pass duration",
                                     mode="lines", line=dict(color="#4e79a7", width=1.5)), r, 1)
        else:
            fig.add_trace(go.Scatter(
                x=ot.t, y=ot.mean_ms, name="pass duration", mode="markers",
                marker=dict(color="#4e79a7", size=5, opacity=0.7),
                customdata=np.stack([ot.seq, ot.rmap_entries], axis=1),
                hovertemplate="pass %{customdata[0]}: %{y:.3g} ms, "
                              "%{customdata[1]:,} rmap entries<extra></extra>"), r, 1)
        fig.update_yaxes(title_text="ms", row=r, col=1,
                         **(LOG_AXIS if s.get("hist_log") else {}))
        r += 1
    if has_counter:
        t = h.bins.t
        x, y = _steps(h, s["pages_scanned_per_s"])
        fig.add_trace(go.Scatter(x=x, y=y, name="pages scanned/s",
                                 mode="lines", line=dict(color="#59a14f", shape="vh")), r, 1)
        fig.update_yaxes(title_text="pages/s", row=r, col=1)
        fig.add_trace(go.Scatter(x=t, y=s["pages_per_pass"], name="pages per pass",
                                 mode="lines+markers", marker=dict(size=4),
                                 line=dict(color="#f28e2b")), r + 1, 1)
        fig.update_yaxes(title_text="pages/pass", row=r + 1, col=1)
    fig.update_xaxes(title_text=TIME_AXIS, row=len(rows), col=1)
    for a in fig.layout.annotations:
        a.update(x=0, xanchor="left", font=dict(size=13, color=INK))
    return _layout(fig, 190 * len(rows) + 110, showlegend=False, hovermode="closest")


def advisor(h: HostReport) -> go.Figure | None:
    a = h.advisor
    if a is None or a.empty:
        return None
    cols = [c for c in ("pages_to_scan", "cpu_percent", "scan_time_ns") if c in a]
    titles = {"pages_to_scan": ("pages_to_scan chosen by the advisor", "pages"),
              "cpu_percent": ("ksmd CPU estimated by the advisor", "%"),
              "scan_time_ns": ("scan time seen by the advisor", "s")}
    fig = make_subplots(rows=len(cols), cols=1, shared_xaxes=True,
                        subplot_titles=[titles[c][0] for c in cols], vertical_spacing=0.14)
    for i, c in enumerate(cols, start=1):
        y = a[c] / 1e9 if c == "scan_time_ns" else a[c]
        fig.add_trace(go.Scatter(x=a.index, y=y, mode="lines+markers", name=c,
                                 line=dict(color="#b07aa1", shape="hv"), marker=dict(size=4)),
                      i, 1)
        fig.update_yaxes(title_text=titles[c][1], row=i, col=1)
    fig.update_xaxes(title_text=TIME_AXIS, row=len(cols), col=1)
    for ann in fig.layout.annotations:
        ann.update(x=0, xanchor="left", font=dict(size=13, color=INK))
    return _layout(fig, 170 * len(cols) + 100, showlegend=False)


# -- 5. who shares with whom -----------------------------------------------------

def sharing(h: HostReport) -> go.Figure | None:
    sh = h.sharing
    if sh is None:
        return None
    labels = [esc(sh.labels[k]) for k in sh.keys]
    k = len(labels)
    z = sh.pages.astype(float)
    text = np.array([[f"{int(v):,}" for v in row] for row in sh.pages])
    hover = np.empty((k, k), dtype=object)
    for i in range(k):
        for j in range(k):
            if i == j:
                hover[i, j] = (f"{labels[i]}: {sh.pages[i, j]:,} pages in KSM pages no other "
                               f"VM/process maps ({sh.ksm_pages[i, j]:,} KSM pages in all)")
            else:
                hover[i, j] = (f"{labels[i]}: {sh.pages[i, j]:,} pages merged into KSM pages "
                               f"{labels[j]} also maps ({sh.ksm_pages[i, j]:,} KSM pages "
                               "shared by both)")
    # "others" sums many VMs: it would wash out the colors of the rest.
    own = [i for i, key in enumerate(sh.keys) if key != "others"]
    zmax = float(z[np.ix_(own, own)].max()) if len(own) > 1 else None
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, colorscale="Blues", hovertext=hover,
        zmin=0, zmax=zmax or None,
        hovertemplate="%{hovertext}<extra></extra>", xgap=2, ygap=2,
        colorbar=dict(title=dict(text=unit("merged_pages"), side="right")),
        text=text if k <= 12 else None, texttemplate="%{text}" if k <= 12 else None))
    fig.update_xaxes(title_text="… into KSM pages that this one also maps", side="bottom",
                     showgrid=False, tickangle=-30 if k > 3 else 0, type="category",
                     automargin=True, showline=False, ticks="")
    fig.update_yaxes(title_text="pages of …", autorange="reversed", showgrid=False,
                     type="category", rangemode="normal", automargin=True, showline=False,
                     ticks="", title_standoff=12)
    cell = 64 if k <= 8 else 34 if k <= 20 else 22
    return _layout(fig, 180 + cell * k, width=min(1250, 420 + 2 * cell * k),
                   margin=dict(l=20, r=20, t=40, b=20))


# -- 6. balloon and KSM together -------------------------------------------------

def balloon_and_ksm(h: HostReport) -> go.Figure | None:
    if not h.balloon_active:
        return None
    mib = h.page_size / 2**20
    kinds = set(h.activity.name)
    host_side = bool(kinds & {"host_discard", "host_willneed"})
    up, down = (("host_discard",), ("host_willneed",)) if host_side else \
        (("balloon_inflate",), ("balloon_deflate",))
    size, target = h.balloon["balloon_pages"], h.balloon["target_pages"]
    has_size = bool(np.nansum(size.to_numpy()))
    titles = (["Balloon size per VM (QEMU query-balloon; dotted: target)"] if has_size else []) \
        + [f"Balloon: {'VMM discards' if host_side else 'guest inflates'} (+) / "
           f"{'asks back' if host_side else 'deflates'} (−), per VM (MiB/s)",
           "KSM-mapped pages of the same VMs (ksm_merging_pages)", "Host savings"]
    rows = len(titles)
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.27 / rows)
    lv = h.kernel_level
    scale, mem = _mem_unit(h.merging * mib, size * mib,
                           lv["pages_sharing"] * mib if "pages_sharing" in lv else [])
    shown: set[str] = set()

    def legend(key):
        first = key not in shown
        shown.add(key)
        return first

    r = 1
    if has_size:
        for key in [e.key for e in h.entities if e.key in size.columns]:
            e = h.entity(key)
            x, y = _steps(h, size[key] * mib * scale)
            fig.add_trace(go.Scatter(
                x=x, y=y, name=esc(e.label), legendgroup=e.gid, showlegend=legend(key),
                mode="lines", line=dict(color=e.color, width=2, shape="vh"),
                hovertemplate="balloon %{y:.2f} " + mem), r, 1)
            if key in target.columns and target[key].notna().any():
                x, y = _steps(h, target[key] * mib * scale)
                fig.add_trace(go.Scatter(
                    x=x, y=y, name=esc(e.label), legendgroup=e.gid, showlegend=False,
                    mode="lines", line=dict(color=e.color, width=1, dash="dot", shape="vh"),
                    hovertemplate="target %{y:.2f} " + mem), r, 1)
        fig.update_yaxes(title_text=mem, row=r, col=1)
        r += 1
    for sign, ks in ((1.0, up), (-1.0, down)):
        rate = h.rate(ks, sign) * mib
        for key in rate.columns:
            e = h.entity(key)
            x, y = _steps(h, rate[key])
            fig.add_trace(go.Scatter(
                x=x, y=y, name=esc(e.label), legendgroup=e.gid, showlegend=legend(key),
                stackgroup="b+" if sign > 0 else "b-", fillcolor=e.color,
                line=dict(color=e.color, width=0.5, shape="vh"),
                hovertemplate="%{y:.2f} MiB/s"), r, 1)
    if "balloon_inflate" in h.kernel and not host_side \
            and np.nansum(h.kernel.balloon_inflate.to_numpy()):
        x, y = _steps(h, h.kernel.balloon_inflate / h.bins.dt * mib)
        fig.add_trace(go.Scatter(x=x, y=y, name="kernel: /proc/vmstat balloon_inflate",
                                 mode="lines", line=dict(color=KERNEL, dash="dash", shape="vh")),
                      r, 1)
    fig.update_yaxes(title_text="MiB/s", rangemode="normal", row=r, col=1)
    ballooned = set(shown) or {e.key for e in h.entities}
    for key in [e.key for e in h.entities if e.key in h.merging.columns and e.key in ballooned]:
        e = h.entity(key)
        x, y = _steps(h, h.merging[key] * mib * scale)
        fig.add_trace(go.Scatter(
            x=x, y=y, name=esc(e.label), legendgroup=e.gid, showlegend=legend(key),
            mode="lines", line=dict(color=e.color, width=2, shape="vh"),
            hovertemplate="%{y:.2f} " + mem), r + 1, 1)
    for col, name, dash, factor in (
            ("pages_sharing", "saved by KSM: pages_sharing", "solid", mib),
            ("general_profit", "general_profit", "dash", 1 / 2**20),
            ("nr_balloon_pages", "in this kernel's balloon: nr_balloon_pages", "dot", mib)):
        if col in lv and lv[col].notna().any() and np.nansum(np.abs(lv[col].to_numpy())):
            x, y = _steps(h, lv[col] * factor * scale)
            fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines",
                                     line=dict(color=KERNEL, dash=dash, width=2, shape="vh"),
                                     hovertemplate="%{y:.2f} " + mem), r + 2, 1)
    fig.update_yaxes(title_text=mem, row=r + 1, col=1)
    fig.update_yaxes(title_text=mem, row=r + 2, col=1)
    fig.update_xaxes(title_text=TIME_AXIS, row=rows, col=1)
    for a in fig.layout.annotations:
        a.update(x=0, xanchor="left", font=dict(size=13, color=INK))
    _layout(fig, rows * PANEL_PX + 160, hovermode="x unified")
    _legend_right(fig)
    _phases(fig, h)
    return fig


def _phases(fig: go.Figure, h: HostReport) -> None:
    """The lab's phases (boot, merge, inflate, ...) as dotted lines across the
    whole figure, named at the top."""
    for t, name in h.phases:
        fig.add_shape(type="line", xref="x", yref="paper", x0=t, x1=t, y0=0, y1=1,
                      line=dict(color=MUTED, width=1, dash="dot"), layer="below")
        fig.add_annotation(x=t, xref="x", y=1, yref="paper", yanchor="bottom", yshift=18,
                           text=esc(name), showarrow=False, xanchor="left",
                           font=dict(size=11, color=MUTED))
    if h.phases:
        fig.update_layout(margin=dict(t=70))


# -- fleet -------------------------------------------------------------------------

def fleet(model: ReportModel) -> go.Figure | None:
    if len(model.hosts) < 2:
        return None
    rows = model.fleet
    names = [esc(f"{r['host']} ({r['file']})") for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=names, x=[r["saved_peak_mib"] or 0 for r in rows], orientation="h",
                         name="saved by KSM, peak (pages_sharing)", marker_color="#4e79a7",
                         hovertemplate="%{x:.1f} MiB<extra></extra>"))
    fig.add_trace(go.Bar(y=names, x=[r["saved_end_mib"] or 0 for r in rows], orientation="h",
                         name="saved by KSM, at the end", marker_color="#a0cbe8",
                         hovertemplate="%{x:.1f} MiB<extra></extra>"))
    fig.add_trace(go.Bar(y=names, x=[r["balloon_mib"] or 0 for r in rows], orientation="h",
                         name="returned by balloons", marker_color="#59a14f",
                         hovertemplate="%{x:.1f} MiB<extra></extra>"))
    fig.update_xaxes(title_text="MiB")
    fig.update_yaxes(autorange="reversed", type="category", rangemode="normal")
    _layout(fig, 140 + 60 * len(rows), barmode="group",
            margin=dict(l=220, r=30, t=30, b=50))
    _legend_right(fig)
    return fig


def host_figures(h: HostReport) -> dict[str, go.Figure]:
    """Figure id (unique in the document) -> figure; absent figures left out."""
    timed = len(h.bins.t) > 0      # at least one interval ended
    figs = {
        "savings": savings(h) if timed else None, "rates": rates(h) if timed else None,
        "scan_hist": scan_histogram(h), "scans": scans_over_time(h) if timed else None,
        "advisor": advisor(h), "sharing": sharing(h),
        "balloon": balloon_and_ksm(h) if timed else None,
    }
    return {f"{h.anchor}-{k}": f for k, f in figs.items() if f is not None}
