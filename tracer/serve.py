"""`overcommit serve`: a Prometheus exporter with the recording's counters.

A Recorder runs with the live sink (tracer/live.py); after every interval
the collector below publishes its state with the official client library
(prometheus_client), which also escapes label values: process names come
from /proc/PID/comm, which the process itself sets to anything.

Metric names (all help texts come from tracer/fields.py):

- per process, labels pid, comm, vm (empty for processes that are no VM):
  ``overcommit_<kind>_<unit>_total`` for every event kind counted in the
  kernel (tracer.fields.EVENTS, e.g. ``overcommit_host_discard_pages_total``),
  ``overcommit_ksm_merged_pages_total``, ``..._unmerged_pages_total``, ... (the
  summary's per-process numbers) and ``overcommit_process_<key>`` gauges from
  /proc/PID/ksm_stat;
- per host: ``overcommit_kernel_ksm_<file>`` (/sys/kernel/mm/ksm) and
  ``overcommit_kernel_vmstat_<key>`` gauges, ``overcommit_ksm_full_scans_total``
  and the ``overcommit_ksm_scan_duration_seconds`` histogram of ksmd's passes,
  ``overcommit_lost_events_total{kind}``, ``overcommit_tracer_info``.

`metric_names()` lists them all; tests/test_grafana.py checks the dashboard
against it.
"""
from __future__ import annotations

import bisect
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

import click

from . import __version__
from .errors import UserError
from .fields import EVENTS, KSM_STAT, KSM_SYSFS, LIVE, SUMMARY, VMSTAT

if TYPE_CHECKING:
    from .live import Snapshot

DEFAULT_LISTEN = "127.0.0.1:9465"     # 9465: free in Prometheus' port allocations
LABELS = ["pid", "comm", "vm"]
# ksmd's passes last milliseconds (small hosts, fast settings) to many minutes
# (hundreds of GiB at the default pages_to_scan=100 every 20 ms).
SCAN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0, 600.0, 1800.0)
# The summary's per-process numbers exported as counters, by their names there.
KSM_TOTALS = ("merged_pages", "unmerged_pages", "new_ksm_pages", "zero_page_merges",
              "merge_failures")


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9465', '[::1]:9465' or ':9465' (all addresses) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--listen takes HOST:PORT, not {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _kind_metric(kind: str) -> str:
    unit = EVENTS[kind].unit
    return f"overcommit_{kind}_{unit}" if unit else f"overcommit_{kind}"


class Exporter:
    """The collector (prometheus_client calls collect() on every scrape, in
    its HTTP thread); update() publishes an interval from the main thread."""

    def __init__(self, meta: dict[str, Any], buckets=SCAN_BUCKETS):
        from .live import Snapshot, counted_kinds
        self.meta = meta
        self.kinds = counted_kinds()
        self.buckets = list(buckets)
        self._lock = threading.Lock()
        self._snap: Snapshot = Snapshot()
        self._hist = [0] * (len(self.buckets) + 1)    # per bucket, +Inf last
        self._hist_sum = 0.0

    def update(self, snap: Snapshot) -> None:
        with self._lock:
            for s in snap.scans:
                if s.get("duration_ns") is None:   # a pass whose start was not seen
                    continue
                d = s["duration_ns"] / 1e9
                self._hist[bisect.bisect_left(self.buckets, d)] += 1
                self._hist_sum += d
            self._snap = snap

    def collect(self) -> Iterator:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, InfoMetricFamily)
        with self._lock:
            snap, hist, hist_sum = self._snap, list(self._hist), self._hist_sum

        procs = sorted(snap.processes.values(), key=lambda p: p["pid"])

        def labels(p):
            return [str(p["pid"]), p["comm"] or "?", p["vm"] or ""]

        for kind in self.kinds:
            f = CounterMetricFamily(_kind_metric(kind), EVENTS[kind].description,
                                    labels=LABELS)
            for p in procs:
                if kind in p["counts"]:
                    f.add_metric(labels(p), p["counts"][kind])
            yield f
        for name in KSM_TOTALS:
            f = CounterMetricFamily(f"overcommit_ksm_{name}", SUMMARY[name].description,
                                    labels=LABELS)
            for p in procs:
                if p["pid"]:
                    f.add_metric(labels(p), p[name])
            yield f
        for key, field in KSM_STAT.items():
            f = GaugeMetricFamily(f"overcommit_process_{key}",
                                  f"/proc/PID/ksm_stat {key}: {field.description}",
                                  labels=LABELS)
            for p in procs:
                if key in p["stat"]:
                    f.add_metric(labels(p), p["stat"][key])
            yield f
        for source, values, registry in (("ksm", snap.ksm, KSM_SYSFS),
                                         ("vmstat", snap.vmstat, VMSTAT)):
            where = "/sys/kernel/mm/ksm/" if source == "ksm" else "/proc/vmstat "
            for key, value in sorted(values.items()):
                field = registry.get(key)
                doc = f"{where}{key}" + (f": {field.description}" if field else "")
                yield GaugeMetricFamily(f"overcommit_kernel_{source}_{key}", doc, value=value)

        yield CounterMetricFamily("overcommit_ksm_full_scans", EVENTS["full_scan"].description
                                  + " (traced; kernels without the KSM tracepoints: see "
                                  "overcommit_kernel_ksm_full_scans)", value=snap.scans_total)
        cumulative, n = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], hist):
            n += count
            cumulative.append((bound, n))
        h = HistogramMetricFamily("overcommit_ksm_scan_duration_seconds",
                                  LIVE["scan_duration"].description, labels=[])
        h.add_metric([], cumulative, hist_sum)
        yield h
        last = snap.last_scan or {}
        for key, name in (("seq", "scan_seq"), ("rmap_entries", "scan_rmap_entries")):
            f = GaugeMetricFamily(f"overcommit_ksm_{name}", LIVE[name].description)
            if last.get(key) is not None:
                f.add_metric([], last[key])
            yield f
        f = CounterMetricFamily("overcommit_lost_events", LIVE["lost_events"].description,
                                labels=["kind"])
        for kind, n in sorted(snap.lost.items()):
            f.add_metric([kind], n)
        yield f
        yield CounterMetricFamily("overcommit_intervals", LIVE["intervals"].description,
                                  value=snap.index)
        yield GaugeMetricFamily("overcommit_last_interval_timestamp_seconds",
                                LIVE["last_interval"].description, value=snap.time)
        modes = self.meta.get("variants", {})
        yield InfoMetricFamily("overcommit_tracer", LIVE["tracer"].description, value={
            "version": str(self.meta.get("version", __version__)),
            "kernel": str(self.meta.get("kernel", "")),
            **{f"{k}_attach": str(v) for k, v in modes.items()}})


def make_registry(exporter: Exporter):
    """The exporter's collectors: its own, and the exporter process's CPU
    and memory (process_*), to see what the tracing costs."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector
    registry = CollectorRegistry()
    registry.register(exporter)
    ProcessCollector(registry=registry)
    return registry


def synthetic_rows() -> list[list[dict]]:
    """Two intervals (baseline, one traced) with every kind of row the
    Recorder writes: for metric_names() and the tests, no kernel needed."""
    from .live import counted_kinds
    p = {"pid": 4242, "comm": "qemu-system-x86", "vm": "guest1"}
    base = [{"t": 0.0, "interval": 0, "record": "process", "name": "running", "value": 0, **p}]
    one = []
    for i, rows in enumerate((base, one)):
        t = float(i)
        rows += [{"t": t, "interval": i, "record": "ksm", "name": k, "pid": 0, "value": i}
                 for k in KSM_SYSFS]
        rows += [{"t": t, "interval": i, "record": "vmstat", "name": k, "pid": 0, "value": i}
                 for k in VMSTAT]
        rows += [{"t": t, "interval": i, "record": "ksm_stat", "name": k, "value": i, **p}
                 for k in KSM_STAT]
    one += [{"t": 0.5, "interval": 1, "record": "count", "name": k, "value": 1, **p}
            for k in counted_kinds()]
    one += [{"t": 0.7, "interval": 1, "record": "scan", "name": "full_scan", "pid": 0,
             "value": 9, "seq": 1, "duration_ns": 20_000_000},
            {"t": 1.0, "interval": 1, "record": "lost", "name": "merge_with_ksm_page",
             "pid": 0, "value": 1}]
    base.append({"t": 0.0, "interval": 0, "record": "interval", "name": "baseline",
                 "pid": 0, "value": 0})
    one.append({"t": 1.0, "interval": 1, "record": "interval", "name": "end", "pid": 0,
                "value": 10**9})
    return [base, one]


def metric_names() -> list[str]:
    """Every sample name the exporter exports (with the _total, _bucket, ...
    suffixes PromQL sees), collected from the exporter itself after one
    synthetic interval in which every family has a sample."""
    from .live import Live
    meta = {"version": __version__, "kernel": "synthetic",
            "variants": {"ksm": "tracepoint", "balloon": "kprobe", "vmm": "tracepoint"}}
    live, exporter = Live(meta), Exporter(meta)
    for rows in synthetic_rows():
        live.write(rows)
        exporter.update(live.latest)
    registry = make_registry(exporter)
    return sorted({s.name for family in registry.collect() for s in family.samples})


def run(listen: str, interval: float, pids: list[int]) -> None:
    from prometheus_client import start_http_server
    from .live import Live
    from .record import Recorder, StopFlag
    host, port = parse_listen(listen)
    live: list[Live] = []

    def sink(meta):
        live.append(Live(meta))
        return live[0]

    # Listen first: a port in use fails before the BPF program is compiled.
    # Until the tracer is attached, scrapes get families without samples.
    exporter = Exporter({})
    try:
        server, _ = start_http_server(port, addr=host, registry=make_registry(exporter))
    except OSError as e:
        raise UserError(f"cannot listen on {listen}: {e.strerror or e}") from e
    try:
        with StopFlag() as stop:
            rec = Recorder(None, interval, pids, False, sink_factory=sink)
            try:
                exporter.meta = rec.meta
                exporter.update(live[0].latest)
                m = rec.plan.modes
                click.echo(f"Serving Prometheus metrics on http://{listen}/metrics: KSM "
                           f"({m['ksm']}), guest balloon ({m['balloon']}), VMM discards "
                           f"({m['vmm']}), every {interval:g}s. Ctrl-C or SIGTERM to end.",
                           err=True)
                start = time.monotonic()
                while not stop.set:
                    rec.step(start + rec.index * interval, stop)
                    exporter.update(live[0].latest)
            finally:
                rec.close()
    finally:
        server.shutdown()
        server.server_close()
    click.echo("overcommit serve: stopped.", err=True)


@click.command("serve", epilog=f"""\b
Examples:
  overcommit serve                         # http://{DEFAULT_LISTEN}/metrics
  overcommit serve --listen 10.0.0.5:9465  # for a Prometheus on another host
  overcommit serve -i 5 -p 4242            # every 5 s, only PID 4242
\b
Prometheus (prometheus.yml):
  scrape_configs:
    - job_name: overcommit
      static_configs: [{{targets: ["{DEFAULT_LISTEN}"]}}]
Grafana: import reports/grafana/overcommit.json.""")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to serve /metrics on (loopback unless told otherwise).")
@click.option("-i", "--interval", type=click.FloatRange(min=0.1), default=1.0,
              show_default=True, help="Seconds between updates of the metrics.")
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Only this process (repeatable).")
def serve_command(listen, interval, pids):
    """Export KSM and balloon counters per VM/process to Prometheus.

    The same numbers as a recording: KSM events per process and VM, balloon
    and VMM discard pages, ksmd's passes and their durations, the kernel's
    own counters, lost events.  Runs until Ctrl-C or SIGTERM.
    """
    run(listen, interval, list(pids))
