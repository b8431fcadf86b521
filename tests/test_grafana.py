"""The Grafana dashboard asks only for what `overcommit serve` exports.

The names come from the exporter itself (tracer.serve.metric_names(): its
collector fed one synthetic interval), never from a list kept here.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tracer import serve

DASHBOARD = Path(__file__).resolve().parent.parent / "reports" / "grafana" / "overcommit.json"
# Labels Prometheus itself adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan", "atan2"}


def _grafana_vars(expr: str) -> str:
    """Grafana's variables as PromQL would see them after substitution."""
    expr = re.sub(r"\$__(rate_)?interval|\$__range", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, keywords, labels)."""
    e = _grafana_vars(expr)
    e = re.sub(r'"(\\.|[^"\\])*"|\'(\\.|[^\'\\])*\'|`[^`]*`', '""', e)   # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                     # matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                    # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def label_names(expr: str) -> set[str]:
    """Label names in matchers and grouping clauses."""
    e = re.sub(r'"(\\.|[^"\\])*"', '""', _grafana_vars(expr))
    out = set()
    for block in re.findall(r"\{([^}]*)\}", e):
        out |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        out |= {g.strip() for g in group.split(",") if g.strip()}
    return out


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    d = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r}", t["expr"])
           for p in _panels(d["panels"]) for t in p.get("targets", [])]
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
        out.append((f"variable {v['name']!r}", m.group(1) if m else q))
    return out


def exported_labels() -> set[str]:
    from tracer.live import Live
    live, exporter = Live({}), serve.Exporter({})
    for rows in serve.synthetic_rows():
        live.write(rows)
        exporter.update(live.latest)
    return {k for f in serve.make_registry(exporter).collect() for s in f.samples
            for k in s.labels}


def test_the_extractor_finds_metrics_and_nothing_else():
    expr = ('histogram_quantile(0.9, sum by (le, instance) (rate(a_bucket{vm=~"$vm", '
            'comm="x(y) b"}[$__rate_interval]))) * 4096 / 1e6 + on (instance) group_left '
            'b_total offset 5m and c')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert label_names(expr) == {"le", "instance", "vm", "comm"}


def test_dashboard_parses_and_has_the_panels():
    d = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in _panels(d["panels"]))
    for word in ("merges", "unmerges", "saved", "balloon", "discards", "pass duration", "lost"):
        assert word in titles
    ids = [p["id"] for p in _panels(d["panels"])]
    assert len(ids) == len(set(ids))


def test_every_query_names_only_exported_metrics():
    exported = set(serve.metric_names())
    labels = exported_labels() | TARGET_LABELS
    qs = queries()
    assert len(qs) > 10
    for where, expr in qs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: not exported: {sorted(names - exported)}"
        assert label_names(expr) <= labels, f"{where}: unknown labels in {expr!r}"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="no promtool (Debian package prometheus) to check PromQL syntax")
def test_every_query_is_valid_promql(tmp_path):
    """promtool (from the prometheus package) parses each query as a rule."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": _grafana_vars(expr)}
        for i, (_, expr) in enumerate(queries())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))          # JSON is YAML
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
