"""`overcommit report`: the model, the figures and the HTML, from synthetic
recordings written with tracer.recording.Writer (no root, no kernel, no /tmp)."""
from __future__ import annotations

import html as htmllib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest_reports import HOSTILE_COMM, HOSTILE_VM, synthetic_recording
from reports import figures, html, model
from tracer.cli import main
from tracer.recording import Writer

MIB = 2**20


def _islands(text: str) -> dict[str, str]:
    """The JSON islands of a report: id -> raw text."""
    return dict(re.findall(r'<script type="application/json" id="([^"]+)">(.*?)</script>',
                           text, re.S))


def _report(tmp_path: Path, *paths: Path) -> str:
    out = tmp_path / "report.html"
    html.write(model.from_recordings(paths), out)
    text = out.read_text()
    # Every plot div has its figure, every figure its div.
    assert set(re.findall(r'data-fig="([^"]+)"', text)) == \
        {k[len("fig-"):] for k in _islands(text) if k.startswith("fig-")}
    return text


def _run(*args: str):
    return CliRunner().invoke(main, ["report", *args])


# -- the model -------------------------------------------------------------------

def test_model_numbers(tmp_path):
    rec = synthetic_recording(tmp_path / "a.arrow", events=True, balloon=True)
    h = model.from_recordings([rec]).hosts[0]
    k = h.summary["ksm"]
    assert k["merged_pages"] == 1550
    assert h.headline["saved_end_mib"] == pytest.approx(k["pages_sharing_end"] * 4096 / MIB)
    assert h.headline["saved_peak_mib"] >= h.headline["saved_end_mib"]
    assert h.headline["host_discarded_mib"] == pytest.approx((256 * 4 + 256 * 5) * 4096 / MIB)
    assert h.headline["ksmd_cpu_percent"] is None          # not recorded: "not measured"
    by_pid = {r["pid"]: r for r in h.table}
    assert [by_pid[p]["merged_pages"] for p in (101, 102, 103, 104)] == [800, 700, 50, 0]
    assert by_pid[102]["unmerged_pages"] == 60
    assert by_pid[102]["unmerged_pages_seen"] == 45
    assert by_pid[101]["host_discarded_pages"] == 2304
    assert by_pid[104]["rmap_ratio"] is None and by_pid[104]["rmap_items"] == 5000
    # One color per VM/process, the same in the table and the plots.
    assert len({e.color for e in h.entities}) == len(h.entities)
    assert by_pid[101]["color"] == h.entity("vm:vm-alpha").color
    assert h.balloon_active


def test_lab_rows(tmp_path):
    """Lab recordings: QEMU's balloon size per VM, guest RAM, phases."""
    rec = synthetic_recording(tmp_path / "a.arrow", balloon=True, lab=True)
    h = model.from_recordings([rec]).hosts[0]
    assert h.headline["guest_memory_mib"] == pytest.approx(128)      # two guests of 64 MiB
    assert h.headline["balloon_peak_mib"] == pytest.approx((256 * 9 + 128) * 4096 / MIB)
    assert h.headline["balloon_share"] == pytest.approx(h.headline["balloon_peak_mib"] / 128)
    assert [name for _, name in h.phases] == ["merge", "inflate", "deflate"]
    assert "vm:vm-gamma" in h.balloon["balloon_pages"].columns    # a VM KSM never saw
    assert any(r["vm"] == "vm-gamma" for r in h.table)
    fig = figures.balloon_and_ksm(h)
    assert fig.layout.annotations[0].text.startswith("Balloon size per VM")
    assert {a.text for a in fig.layout.annotations} >= {"merge", "inflate", "deflate"}


def test_rates_keep_totals_when_binned(tmp_path, monkeypatch):
    rec = synthetic_recording(tmp_path / "a.arrow", intervals=20, gap_at=7, advisor=True)
    full = model.from_recordings([rec]).hosts[0]
    monkeypatch.setattr(model, "MAX_POINTS", 6)
    binned = model.from_recordings([rec]).hosts[0]
    assert len(full.bins.t) == 20 and len(binned.bins.t) <= 6 and binned.bins.per_bin == 4
    for h in (full, binned):
        merged = h.rate(("merge_with_ksm_page", "new_ksm_page")).mul(h.bins.dt, axis=0)
        assert merged.to_numpy().sum() == pytest.approx(1550)
        assert np.nansum(h.kernel["ksm_mapped"]) == pytest.approx(
            h.summary["crosscheck"]["pages_shared_plus_sharing_change"])
    assert np.nansum(binned.bins.dt) == pytest.approx(np.nansum(full.bins.dt))
    # Scan passes and advisor decisions are binned in time too.
    assert not full.scans["binned"] and binned.scans["binned"]
    assert len(binned.scans["over_time"]) <= 6
    assert binned.scans["over_time"].passes.sum() == full.scans["count"] == 60
    assert len(full.advisor) == 60 and len(binned.advisor) <= 6
    assert binned.advisor.index.is_monotonic_increasing
    for h in (full, binned):
        figs = figures.host_figures(h)
        assert {"h0-scans", "h0-scan_hist", "h0-advisor", "h0-rates"} <= set(figs)


def test_sharing_matrix(tmp_path):
    rec = synthetic_recording(tmp_path / "a.arrow", events=True)
    h = model.from_recordings([rec]).hosts[0]
    sh = h.sharing
    i = {k: n for n, k in enumerate(sh.keys)}
    a, b, p = i["vm:vm-alpha"], i["vm:vm-beta"], i["pid:103"]
    assert sh.merge_events == 1550
    assert sh.pages[a, b] == 800 and sh.pages[b, a] == 700      # they share every page
    assert sh.pages[a, a] == 0 and sh.pages[p, p] == 50         # 103 only with itself
    assert sh.pages[p, a] == 0 and sh.ksm_pages[a, b] == sh.ksm_pages[b, a] == 16
    assert sh.pages.sum() == 1550                                # no merge lost


def _rows_recording(path: Path, events: list[tuple[float, str, int, int]], **meta) -> Path:
    w = Writer(path, {"host": "h", "interval_s": 1.0, "events_streamed": True, **meta})
    w.write([{"t": t, "interval": 1, "record": "event", "name": name, "pid": pid,
              "comm": f"p{pid}", "pfn": pfn, "err": 0} for t, name, pid, pfn in events]
            + [{"t": 0.0, "interval": 0, "record": "interval", "name": "baseline", "pid": 0,
                "value": 0},
               {"t": 1.0, "interval": 1, "record": "interval", "name": "end", "pid": 0,
                "value": 10**9}])
    w.close()
    return path


def test_sharing_a_reused_pfn_is_another_ksm_page(tmp_path):
    """After remove_ksm_page the frame can hold an unrelated KSM page."""
    rec = _rows_recording(tmp_path / "r.arrow", [
        (0.1, "new_ksm_page", 1, 5), (0.2, "merge_with_ksm_page", 2, 5),
        (0.3, "remove_ksm_page", 0, 5),
        (0.4, "new_ksm_page", 3, 5), (0.5, "merge_with_ksm_page", 4, 5),
        (0.6, "merge_with_ksm_page", 4, 5)])
    sh = model.from_recordings([rec]).hosts[0].sharing
    i = {k: n for n, k in enumerate(sh.keys)}
    assert sh.distinct_ksm_pages == 2
    assert sh.pages[i["pid:1"], i["pid:2"]] == 1 and sh.pages[i["pid:4"], i["pid:3"]] == 2
    assert sh.pages[i["pid:1"], i["pid:3"]] == 0 and sh.pages[i["pid:2"], i["pid:4"]] == 0


def test_findings(tmp_path):
    rec = synthetic_recording(tmp_path / "a.arrow", lost=5)
    titles = [f.title for f in model.from_recordings([rec]).hosts[0].findings]
    assert "KSM does not pay for 1 process" in titles          # java: 5000 rmap items, 0 merged
    assert any("streamed events were lost" in t for t in titles)
    for f in model.from_recordings([rec]).hosts[0].findings:
        assert f.level == "info" or f.setting, f"a warning without a setting to change: {f}"


def test_ksmd_not_running(tmp_path, monkeypatch):
    import conftest_reports
    monkeypatch.setitem(conftest_reports.SETTINGS, "run", 0)
    rec = synthetic_recording(tmp_path / "a.arrow")
    f = model.from_recordings([rec]).hosts[0].findings[0]
    assert f.title.startswith("ksmd was not running") and "run" in f.setting


def test_ksmd_cpu_fills_the_headline(tmp_path):
    """A future `ksmd_cpu_ns` counter (a ksm row) turns "not measured" into CPU %."""
    path = synthetic_recording(tmp_path / "a.arrow", intervals=4)
    rec = model.read(path)
    w = Writer(tmp_path / "cpu.arrow", rec.meta)
    table = rec.table.to_pylist()
    ends = [r for r in table if r["record"] == "interval"]
    extra = [{"t": r["t"], "interval": r["interval"], "record": "ksm", "name": "ksmd_cpu_ns",
              "pid": 0, "value": int(r["t"] * 0.25e9)} for r in ends]
    w.write(table + extra)
    w.close()
    h = model.from_recordings([tmp_path / "cpu.arrow"]).hosts[0]
    assert h.headline["ksmd_cpu_percent"] == pytest.approx(25, rel=0.01)
    text = _report(tmp_path, tmp_path / "cpu.arrow")
    assert "% CPU" in text


def test_gaps_and_integrity(tmp_path):
    rec = synthetic_recording(tmp_path / "a.arrow", gap_at=3, close=False)
    ig = model.from_recordings([rec]).hosts[0].integrity
    assert ig["gap_count"] == 1 and ig["gaps"][0]["length_s"] == pytest.approx(5.0)
    assert not ig["closed"] and "not closed" in ig["notes"][0]


def test_empty_recording(tmp_path):
    path = tmp_path / "empty.arrow"
    Writer(path, {"host": "idle", "interval_s": 1.0}).close()
    text = _report(tmp_path, path)
    assert "idle" in text and "No KSM process in this recording" in text


@pytest.mark.parametrize("intervals", [0, 1])
def test_short_recordings(tmp_path, intervals):
    """Killed right after the baseline, or after one interval."""
    text = _report(tmp_path, synthetic_recording(tmp_path / "a.arrow", intervals=intervals,
                                                 events=True, balloon=True, lab=True))
    assert ("nothing to plot over time" in text) == (intervals == 0)


# -- the HTML --------------------------------------------------------------------

def test_hostile_names_are_text(tmp_path):
    script = "</script><script>alert(2)</script><!--"
    a = synthetic_recording(tmp_path / "a.arrow", vm=HOSTILE_VM, comm=HOSTILE_COMM,
                            events=True, balloon=True)
    b = synthetic_recording(tmp_path / "b.arrow", vm=script, comm="x\u2028y", host="<b>h2</b>",
                            events=True)
    text = _report(tmp_path, a, b)
    for raw in (HOSTILE_VM, HOSTILE_COMM, script, "<b>h2</b>", "alert(2)</script>"):
        assert raw not in text, f"{raw!r} appears unescaped"
    # ... but the names are there, as text, in the tables and in the plots.
    assert htmllib.escape(HOSTILE_VM, quote=False) in text
    assert htmllib.escape(HOSTILE_COMM, quote=False) in text
    islands = _islands(text)
    plots = [json.loads(v) for v in islands.values()]
    names = {t.get("name") for p in plots for t in p.get("data", [])}
    assert figures.esc(HOSTILE_VM) in names and figures.esc(HOSTILE_COMM + " [102]") not in names
    ticks = {x for p in plots for t in p.get("data", []) if t.get("type") == "heatmap"
             for x in t["x"]}
    assert figures.esc(HOSTILE_VM) in ticks and figures.esc(script) in ticks
    for raw in islands.values():   # nothing in a JSON island can end its <script>
        assert "<" not in raw and ">" not in raw
    # Every <script> element is one of ours: plotly.js, config, islands, the renderer.
    assert text.count("<script") == text.count("</script>") == len(islands) + 2


def test_report_is_offline(tmp_path):
    text = _report(tmp_path, synthetic_recording(tmp_path / "a.arrow", events=True))
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", text, re.I)
    assert "Plotly.newPlot" in text and text.count("plotly.js v") <= 2   # inlined once
    for raw in _islands(text).values():
        json.loads(raw)


def test_sections(tmp_path):
    text = _report(tmp_path, synthetic_recording(tmp_path / "a.arrow", events=True,
                                                 balloon=True))
    for heading in ("Headline", "Rates over time", "ksmd", "Per VM and process",
                    "Who shares with whom", "Balloon and KSM together", "Integrity"):
        assert f"</span>{heading}</h3>" in text
    ids = set(_islands(text))
    assert {"fig-h0-rates", "fig-h0-savings", "fig-h0-sharing", "fig-h0-balloon",
            "fig-h0-scan_hist", "fig-h0-scans"} <= ids
    assert 'id="h0-processes"' in text and "not measured" in text
    rates = json.loads(_islands(text)["fig-h0-rates"])
    axes = {v["title"]["text"] for k, v in rates["layout"].items() if k.startswith("yaxis")}
    assert "pages/s" in axes                                    # units from tracer.fields


def test_without_events_or_balloons_says_how(tmp_path):
    text = _report(tmp_path, synthetic_recording(tmp_path / "a.arrow"))
    assert "overcommit record --events" in text
    assert "No balloon activity in this recording" in text
    assert "fig-h0-sharing" not in text and "fig-h0-balloon" not in text


# -- the command -------------------------------------------------------------------

def test_fleet_of_two_hosts(tmp_path):
    a = synthetic_recording(tmp_path / "a.arrow", host="host-a", events=True)
    b = synthetic_recording(tmp_path / "b.arrow", host="host-b", balloon=True)
    out = tmp_path / "fleet.html"
    r = _run(str(a), str(b), "-o", str(out), "-q")
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert 'id="fleet-table"' in text and "fig-fleet" in text
    fleet = text[text.index('id="fleet-table"'):text.index("</table>", text.index('id="fleet-table"'))]
    assert "host-a" in fleet and "host-b" in fleet
    assert 'id="h0"' in text and 'id="h1"' in text
    assert "fig-h0-sharing" in text and "fig-h1-balloon" in text


def test_default_output_and_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic_recording(tmp_path / "a.arrow")
    r = _run("a.arrow")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report.html").stat().st_size > 1_000_000   # plotly.js inlined
    assert "Wrote report.html" in r.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "empty"])
def test_unreadable_recording_is_one_line(tmp_path, damage):
    path = tmp_path / "bad.arrow"
    if damage != "missing":
        good = synthetic_recording(tmp_path / "good.arrow").read_bytes()
        path.write_bytes({"truncated": good[:40], "garbage": b"not a recording\n" * 10,
                          "empty": b""}[damage])
    r = _run(str(path), "-o", str(tmp_path / "out.html"))
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("overcommit: ") and str(path) in lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "out.html").exists()


def test_killed_recording_is_reported(tmp_path):
    """Footer missing and the last batch cut (kill -9): still a report."""
    data = synthetic_recording(tmp_path / "good.arrow").read_bytes()
    cut = tmp_path / "killed.arrow"
    cut.write_bytes(data[: len(data) * 3 // 4])
    out = tmp_path / "out.html"
    r = _run(str(cut), "-o", str(out), "-q")
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "recording was not closed" in text and "not closed cleanly" in text


def test_unwritable_output_is_one_line(tmp_path):
    rec = synthetic_recording(tmp_path / "a.arrow")
    r = _run(str(rec), "-o", str(tmp_path / "no" / "such" / "dir.html"))
    assert r.exit_code != 0 and r.stderr.startswith("overcommit: cannot write")


def test_help_has_examples():
    r = CliRunner().invoke(main, ["report", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "-o, --output" in r.output
    assert _run().exit_code == 2          # FILE... is required
