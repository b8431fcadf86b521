"""`overcommit serve` scraped by a real Prometheus server, against a recording.

Prometheus (Debian package `prometheus`) runs on loopback with a scratch
config and storage, scraping the exporter every second.  The workload is a
fake VM: a process whose command line reads like QEMU's (`-name guest=...`),
so the tracer attributes it to a VM, and whose comm and VM name hold the
characters the exposition format must escape.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import KSM_FAST, OVERCOMMIT, wait_stable
from tracer import counters, serve
from tracer.aggregate import summarize
from tracer.live import Live
from tracer.recording import read

PROMETHEUS = Path("/usr/bin/prometheus")
PAGES = 1009
COMM = 'vm "a\\b\nc}'                  # 11 bytes: fits comm's 15
VM = 'oc-test "vm\\1'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=20) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class FakeVM:
    """A workload whose /proc/PID/cmdline says qemu-system-x86_64 -name
    guest=VM (argv[0] only: the interpreter is still this venv's Python)."""

    CODE = ("import ctypes, sys\n"
            "ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME\n"
            "from tracer.workload import run\n"
            "run(pages=int(sys.argv[2]), distinct=7, hold=120)\n")

    def __init__(self, comm: str, vm: str, pages: int):
        argv0 = str(Path(sys.executable).parent / "qemu-system-x86_64")
        self.proc = subprocess.Popen(
            [argv0, "-c", self.CODE, comm, str(pages), "-name", f"guest={vm},debug-threads=on"],
            executable=sys.executable, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("workload: pid"):
            _stop(self.proc, signal.SIGKILL)
            raise RuntimeError(f"fake VM did not start: {line!r} {self.proc.stderr.read()}")
        self.pid = self.proc.pid

    def merging_pages(self) -> int:
        return counters.read_ksm_stat(self.pid)["ksm_merging_pages"]


class Prometheus:
    def __init__(self, tmp: Path, target: str):
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: overcommit\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()}")
            time.sleep(0.2)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, want: float, timeout: float = 30.0) -> list[dict]:
        """Poll until the first result's value is `want`; the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.query(expr)
            if res and float(res[0]["value"][1]) == want or time.monotonic() > deadline:
                return res
            time.sleep(0.5)


@pytest.fixture
def procs():
    """Processes started by the test, stopped by pid whatever happens."""
    started: list = []
    yield started
    for p in reversed(started):
        _stop(p.proc if hasattr(p, "proc") else p)
        if isinstance(p, Prometheus):
            p.log.close()


def start_serve(port: int, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([OVERCOMMIT, "serve", "--listen", f"127.0.0.1:{port}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if not line.startswith("Serving"):
        _stop(proc, signal.SIGKILL)
        raise RuntimeError(f"serve did not start: {line}{proc.stderr.read()}")
    return proc


@pytest.mark.root
def test_prometheus_scrapes_what_the_recording_says(tmp_path, ksm_off, recorder, procs):
    if not PROMETHEUS.exists():
        pytest.skip("no /usr/bin/prometheus: apt-get install prometheus (Debian)")
    rec = recorder(tmp_path / "r.arrow", "-i", "0.5")
    port = free_port()
    served = start_serve(port, "-i", "0.5")
    procs.append(served)
    prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
    procs.append(prom)
    assert prom.wait_for('up{job="overcommit"}', 1)[0]["value"][1] == "1"

    vm = FakeVM(COMM, VM, PAGES)
    procs.append(vm)
    with counters.ksm_settings(KSM_FAST):
        assert wait_stable(vm.merging_pages, settle=1.5, timeout=30) == PAGES
        time.sleep(1.0)          # one more interval with everything quiet
        assert rec.stop() == 0

    p = {p["pid"]: p for p in summarize(read(rec.path))["processes"]}[vm.pid]
    assert (p["comm"], p["vm"]) == (COMM, VM)
    assert p["merged_pages"] == PAGES

    # Per VM, as the dashboard asks, and per process with every label.
    pid = f'pid="{vm.pid}"'
    per_vm = prom.wait_for(f"sum by (vm) (overcommit_ksm_merged_pages_total{{{pid}}})",
                           p["merged_pages"])
    assert [(r["metric"]["vm"], float(r["value"][1])) for r in per_vm] == [
        (VM, p["merged_pages"])]
    (series,) = prom.query(f"overcommit_ksm_merged_pages_total{{{pid}}}")
    assert series["metric"]["comm"] == COMM           # escaped, and parsed back
    assert series["metric"]["job"] == "overcommit"
    (merging,) = prom.wait_for(f"overcommit_process_ksm_merging_pages{{{pid}}}",
                               p["ksm_merging_pages_end"])
    assert float(merging["value"][1]) == p["ksm_merging_pages_end"] == PAGES
    (unmerged,) = prom.query(f"overcommit_ksm_unmerged_pages_total{{{pid}}}")
    assert float(unmerged["value"][1]) == p["unmerged_pages"] == 0
    kinds = prom.query(f"sum(overcommit_merge_with_ksm_page_pages_total{{{pid}}}) + "
                       f"sum(overcommit_new_ksm_page_pages_total{{{pid}}})")
    assert float(kinds[0]["value"][1]) == PAGES

    assert _stop(served) == 0                         # SIGTERM: a clean exit
    assert "Traceback" not in served.stderr.read()


def _exporter_with(rows_by_interval):
    live, exporter = Live({}), serve.Exporter({"version": "test", "kernel": "test"})
    for rows in rows_by_interval:
        live.write(rows)
        exporter.update(live.latest)
    return exporter


def test_label_values_from_process_names_are_escaped():
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_om
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
    from prometheus_client.parser import text_string_to_metric_families as parse

    rows = serve.synthetic_rows()
    nasty = {"comm": 'x"}\n{y\\', "vm": 'a",b="c'}
    rows = [[{**r, **nasty} if r.get("pid") == 4242 else r for r in iv] for iv in rows]
    registry = serve.make_registry(_exporter_with(rows))
    for text, parser in ((generate_latest(registry), parse), (generate_om(registry), parse_om)):
        samples = [s for f in parser(text.decode()) for s in f.samples
                   if s.name == "overcommit_ksm_merged_pages_total"]
        assert [(s.labels["comm"], s.labels["vm"], s.labels["pid"]) for s in samples] == [
            (nasty["comm"], nasty["vm"], "4242")]


def test_metric_names_are_what_is_exported():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families as parse
    names = set(serve.metric_names())
    text = generate_latest(serve.make_registry(_exporter_with(serve.synthetic_rows())))
    exported = {s.name for f in parse(text.decode()) for s in f.samples}
    assert exported == names
    assert "overcommit_ksm_merged_pages_total" in names
    assert {"overcommit_ksm_scan_duration_seconds_bucket", "overcommit_lost_events_total",
            "overcommit_kernel_ksm_pages_sharing"} <= names


def test_counters_follow_the_summary_rules():
    """Cumulative over intervals; the scan histogram counts each pass once."""
    rows = serve.synthetic_rows()
    second = [{**r, "interval": 2, "t": r["t"] + 1.0} for r in rows[1]]
    exporter = _exporter_with([*rows, second])
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in exporter.collect() for s in f.samples}
    who = (("comm", "qemu-system-x86"), ("pid", "4242"), ("vm", "guest1"))
    assert values["overcommit_ksm_merged_pages_total", who] == 4        # 2 kinds x 2
    assert values["overcommit_host_discard_pages_total", who] == 2
    assert values["overcommit_ksm_scan_duration_seconds_count", ()] == 2
    assert values["overcommit_ksm_scan_duration_seconds_bucket", (("le", "0.025"),)] == 2
    assert values["overcommit_ksm_scan_duration_seconds_bucket", (("le", "0.01"),)] == 0
    assert values["overcommit_lost_events_total", (("kind", "merge_with_ksm_page"),)] == 1


@pytest.mark.parametrize("listen, want", [
    ("127.0.0.1:9465", ("127.0.0.1", 9465)),
    ("[::1]:9000", ("::1", 9000)),
    (":9465", ("0.0.0.0", 9465)),
])
def test_parse_listen(listen, want):
    assert serve.parse_listen(listen) == want


def test_bad_listen_is_one_line():
    from click.testing import CliRunner
    from tracer.cli import main
    r = CliRunner().invoke(main, ["serve", "--listen", "localhost"])
    assert r.exit_code == 1
    assert "HOST:PORT" in r.output


def test_processes_gone_long_enough_are_forgotten():
    """A long-running exporter does not keep every short-lived process."""
    rows = serve.synthetic_rows()
    live = Live({}, keep_gone_s=10)
    live.write(rows[0])
    live.write(rows[1])
    assert 4242 in live.latest.processes

    def interval(i, extra=()):
        return [*extra, {"t": float(i), "interval": i, "record": "interval", "name": "end",
                         "pid": 0, "value": 10**9}]
    gone = {"t": 2.0, "interval": 2, "record": "process", "name": "gone", "pid": 4242,
            "comm": "qemu-system-x86", "vm": "guest1", "value": 0}
    live.write(interval(2, [gone]))
    p = live.latest.processes[4242]
    assert p["exited"] and p["ksm_merging_pages_end"] == 0
    assert p["merged_pages"] == 2                     # still counted while it is fresh
    live.write(interval(13))
    assert 4242 not in live.latest.processes
