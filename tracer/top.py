"""`overcommit top`: KSM and balloon rates per VM/process, refreshed live.

In the style of bcc's *top tools: `[INTERVAL [COUNT]]`, `-p PID`, a sort
column, the screen cleared between intervals on a terminal and plain blocks
with a timestamp header when the output is not one.  A Recorder runs with the
live sink (tracer/live.py) instead of a file.
"""
from __future__ import annotations

import json
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .fields import LIVE, PAGE_SIZE

if TYPE_CHECKING:                 # pandas only when top runs
    from .live import Snapshot

COLUMNS = ("pid", "comm", "vm", "merges", "unmerges", "merging", "inflate", "discard")
TEXT = ("comm", "vm")
DEFAULT_SORT = "merges"


def _values(snap: Snapshot, p: dict) -> dict:
    """One process's row: the columns (rates over the interval) and, for
    -j, the interval's exact counts under their summary names."""
    d = p["delta"]
    return {
        "pid": p["pid"], "comm": p["comm"] or "?", "vm": p["vm"] or "",
        "merges": snap.rate(p, "merged_pages"),
        "unmerges": snap.rate(p, "unmerged_pages"),
        "merging": p["ksm_merging_pages_end"],
        "inflate": snap.mib_rate(p, "inflated_pages"),
        "discard": snap.mib_rate(p, "host_discarded_pages"),
        "merged_pages": d.get("merged_pages", 0),
        "unmerged_pages": d.get("unmerged_pages", 0),
        "merge_failures": d.get("merge_failures", 0),
        "inflated_pages": d.get("inflated_pages", 0),
        "deflated_pages": d.get("deflated_pages", 0),
        "host_discarded_pages": d.get("host_discarded_pages", 0),
    }


def rows(snap: Snapshot, sort: str = DEFAULT_SORT) -> list[dict]:
    """Processes with something to show this interval, sorted."""
    out = []
    for pid, p in snap.processes.items():
        if pid == 0:
            continue
        v = _values(snap, p)
        if any(v[c] for c in COLUMNS[3:]) or v["merge_failures"] or v["deflated_pages"]:
            out.append(v)
    if sort in TEXT:
        out.sort(key=lambda v: (v[sort], v["pid"]))
    elif sort == "pid":
        out.sort(key=lambda v: v["pid"])
    else:
        out.sort(key=lambda v: (-v[sort], v["pid"]))
    return out


def _cell(col: str, value) -> str:
    f = LIVE[col]
    if col in TEXT:
        return f"{str(value)[:f.width]:<{f.width}}"
    if col in ("pid", "merging"):
        return f"{value:>{f.width}}"
    text = f"{value:.1f}"
    return f"{text if len(text) <= f.width else f'{value:.0f}':>{f.width}}"


def header() -> str:
    return " ".join(f"{LIVE[c].header:<{LIVE[c].width}}" if c in TEXT
                    else f"{LIVE[c].header:>{LIVE[c].width}}" for c in COLUMNS)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "-"


def _duration(ns: int) -> str:
    return f"{ns / 1e6:.1f}ms" if ns < 1e9 else f"{ns / 1e9:.2f}s"


def host_lines(snap: Snapshot) -> list[str]:
    """The host's KSM totals and ksmd's latest pass, each line < 80 columns."""
    k = snap.ksm
    mib = PAGE_SIZE / 2**20
    lines = [f"KSM pages: {k.get('pages_shared', 0)} shared, {k.get('pages_sharing', 0)} "
             f"sharing: {k.get('pages_sharing', 0) * mib:.1f} MiB saved",
             f"           {k.get('pages_unshared', 0)} unshared, "
             f"{k.get('pages_volatile', 0)} volatile"]
    if "general_profit" in k:
        lines[-1] += f", profit {k['general_profit'] / 2**20:.1f} MiB"
    scan = f"ksmd: run={k.get('run', '?')}, full_scans {k.get('full_scans', '?')}"
    if snap.last_scan:
        s = snap.last_scan
        took = "" if s.get("duration_ns") is None else f" took {_duration(s['duration_ns'])}"
        scan += f"; {len(snap.scans)} passes, latest #{s['seq']}{took}"
    lines.append(scan)
    return lines


def render_text(snap: Snapshot, sort: str = DEFAULT_SORT, maxrows: int = 20) -> str:
    lost = sum(snap.lost.values())
    head = (f"{datetime.fromtimestamp(snap.time):%H:%M:%S}  {snap.length_s:.2f}s  "
            f"loadavg: {_loadavg()}")
    if lost:
        head += f"  LOST {lost}"
    lines = [head, *host_lines(snap), "", header()]
    for v in rows(snap, sort)[:maxrows]:
        lines.append(" ".join(_cell(c, v[c]) for c in COLUMNS))
    return "\n".join(lines) + "\n"


def render_json(snap: Snapshot, sort: str = DEFAULT_SORT) -> str:
    return json.dumps({
        "time": datetime.fromtimestamp(snap.time).isoformat(timespec="milliseconds"),
        "t": round(snap.t, 6), "interval_s": round(snap.length_s, 6),
        "ksm": snap.ksm, "vmstat": snap.vmstat,
        "last_scan": snap.last_scan, "scans": len(snap.scans),
        "lost_events": sum(snap.lost.values()),
        "processes": rows(snap, sort),
    })


def banner(rec, interval: float) -> str:
    m = rec.plan.modes
    who = f"PIDs {', '.join(map(str, rec.pids))}" if rec.pids else "all processes"
    return (f"Tracing KSM ({m['ksm']}), guest balloon ({m['balloon']}) and VMM discards "
            f"({m['vmm']}) for {who}. Output every {interval:g}s. Ctrl-C to end.")


def run(interval: float, count: int | None, pids: list[int], sort: str, noclear: bool,
        maxrows: int, as_json: bool) -> None:
    from .live import Live
    from .record import Recorder, StopFlag
    out = sys.stdout
    clear = out.isatty() and not noclear and not as_json
    live: list[Live] = []

    def sink(meta):
        live.append(Live(meta))
        return live[0]

    with StopFlag() as stop:
        rec = Recorder(None, interval, pids, False, sink_factory=sink)
        try:
            click.echo(banner(rec, interval), err=True)
            start = time.monotonic()
            shown = 0
            while not stop.set and (count is None or shown < count):
                rec.step(start + rec.index * interval, stop)
                if stop.set:
                    break          # a cut-short interval is not shown
                snap = live[0].latest
                if clear:
                    click.clear()
                text = render_json(snap, sort) + "\n" if as_json else render_text(
                    snap, sort, maxrows)
                out.write(text if clear or as_json or shown == 0 else "\n" + text)
                out.flush()
                shown += 1
        finally:
            rec.close()


def _columns_help() -> str:
    lines = []
    for c in COLUMNS:
        f = LIVE[c]
        unit = f" [{f.unit}]" if f.unit else ""
        lines += textwrap.wrap(f"{f.description}{unit}", 76,
                               initial_indent=f"  {f.header:<11}{c:<9}",
                               subsequent_indent=" " * 22)
    return "\n".join(lines)


EPILOG = f"""\b
Examples:
  overcommit top                 # every second, until Ctrl-C
  overcommit top 5 10            # every 5 s, 10 times
  overcommit top -p 4242         # only PID 4242 (one VM's QEMU, say)
  overcommit top -s discard      # busiest balloons first
  overcommit top -C 2 | tee log  # never clear the screen
  overcommit top -j 1 60         # one JSON object per interval, with counts
\b
Columns, the name -s sorts them by, and what they show:
{_columns_help()}"""


@click.command("top", epilog=EPILOG)
@click.argument("interval", type=click.FloatRange(min=0.1), default=1.0, required=False)
@click.argument("count", type=click.IntRange(min=1), required=False)
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Only this process (repeatable).")
@click.option("-s", "--sort", type=click.Choice(COLUMNS), default=DEFAULT_SORT,
              show_default=True, help="Sort by this column (numbers: largest first).")
@click.option("-C", "--noclear", is_flag=True, help="Do not clear the screen.")
@click.option("-r", "--maxrows", type=click.IntRange(min=1), default=20, show_default=True,
              help="Processes shown at most.")
@click.option("-j", "--json", "as_json", is_flag=True,
              help="One JSON object per interval (rates and exact counts).")
def top_command(interval, count, pids, sort, noclear, maxrows, as_json):
    """KSM merges, unmerges and balloon discards per VM/process, live.

    Every INTERVAL seconds (default 1), COUNT times (default: until Ctrl-C),
    a table of rates over the interval, with the host's KSM totals and
    ksmd's latest full pass.  Not on a terminal: one block per interval,
    nothing cleared.
    """
    run(interval, count, list(pids), sort, noclear, maxrows, as_json)
