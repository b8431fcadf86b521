"""Render a report model to one self-contained HTML file.

plotly.js is inlined once; every figure is a JSON island
(<script type="application/json">) drawn by a few lines of inline JS, so the
file opens offline, with no CDN and no network.  Text goes through Jinja2's
autoescape; JSON islands have "<", ">" and "&" as \\u escapes, so no string in
them (a VM named "</script><script>...") can end the script element.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jinja2
import plotly.io as pio
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from tracer import fields
from tracer.fields import SUMMARY

from . import figures
from .model import ReportModel

TEMPLATES = Path(__file__).parent / "templates"


def safe_json(text: str) -> str:
    """JSON that is safe inside a <script> element (and still the same JSON)."""
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def figure_json(fig) -> str:
    return safe_json(pio.to_json(fig, validate=False, engine="json"))


# -- formatting filters (None shows as a dash) ------------------------------------

def _none(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def f_int(v) -> str:
    return "—" if _none(v) else f"{int(v):,}"


def f_mib(v, digits: int = 1) -> str:
    if _none(v):
        return "—"
    if abs(v) >= 1024:
        return f"{v / 1024:,.{digits + 1}f} GiB"
    return f"{v:,.{digits}f} MiB"


def f_pct(v) -> str:
    return "—" if _none(v) else f"{100 * v:.1f}%"


def f_num(v, digits: int = 1) -> str:
    return "—" if _none(v) else f"{v:,.{digits}f}"


def f_s(v) -> str:
    if _none(v):
        return "—"
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def f_bytes(v) -> str:
    if _none(v):
        return "—"
    for u in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or u == "GiB":
            return f"{v:,.0f} {u}" if u == "B" else f"{v:,.1f} {u}"
        v /= 1024
    return str(v)


def sort_key(v) -> str:
    """data-sort value of a table cell: numbers sort as numbers, None last."""
    if _none(v):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    return repr(float(v)) if isinstance(v, (int, float)) else str(v)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(int=f_int, mib=f_mib, pct=f_pct, num=f_num, secs=f_s,
                       bytes=f_bytes, sortkey=sort_key, none=_none)
    return env


def help_text(name: str) -> str:
    """Tooltip of a summary field or a KSM counter/setting, from tracer.fields."""
    f = SUMMARY.get(name) or getattr(fields, "KSM_SYSFS", {}).get(name)
    if f is None:
        return ""
    return f"{f.description} ({f.unit})" if f.unit and f.unit != "setting" else f.description


def render(model: ReportModel) -> str:
    figs: dict[str, str] = {}
    per_host: list[dict[str, Any]] = []
    for h in model.hosts:
        hf = figures.host_figures(h)
        figs.update({k: figure_json(f) for k, f in hf.items()})
        per_host.append({"h": h, "figs": set(hf)})
    fleet = figures.fleet(model)
    if fleet is not None:
        figs["fleet"] = figure_json(fleet)
    return _env().get_template("report.html.j2").render(
        model=model, hosts=per_host, fleet=model.fleet if len(model.hosts) > 1 else None,
        figures=figs, plotlyjs=get_plotlyjs(), plotlyjs_version=get_plotlyjs_version(),
        help=help_text, config=safe_json(json.dumps(
            {"responsive": True, "displaylogo": False,
             "modeBarButtonsToRemove": ["lasso2d", "select2d"]})))


def write(model: ReportModel, path: Path | str) -> int:
    """Render to `path`; returns its size in bytes."""
    text = render(model)
    data = text.encode("utf-8")
    Path(path).write_bytes(data)
    return len(data)
