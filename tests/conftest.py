"""Shared fixtures: real KSM settings (saved and restored), real workload
processes, real recordings.  Kernel tests need root; they are skipped, with
the reason, elsewhere (CI runs as root)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracer import counters
from tracer.counters import wait_stable  # noqa: F401 (tests import it from here)

OVERCOMMIT = str(Path(sys.executable).parent / "overcommit")
ROOT = os.geteuid() == 0
# Fast but not flat out: ksmd passes over a few MiB in milliseconds.
KSM_FAST = {"run": 1, "pages_to_scan": 5000, "sleep_millisecs": 10}


def pytest_collection_modifyitems(config, items):
    if ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (BPF and KSM on the real kernel)")
    for item in items:
        if "root" in item.keywords or "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def ksm_settings_unchanged():
    """The whole suite leaves every KSM setting as it found it, failing or not."""
    try:
        before = counters.read_ksm_settings()
    except counters.KsmUnavailable:
        yield
        return
    yield
    # Each test restores what it changes (counters.ksm_settings); this checks
    # that they all did, without writing anything itself.
    after = counters.read_ksm_settings()
    assert after == before, f"KSM settings changed by the suite: {before} -> {after}"


@pytest.fixture
def ksm_off():
    """KSM stopped (run=0) for the test, then restored."""
    with counters.ksm_settings({"run": 0}):
        yield


@pytest.fixture
def ksm_fast():
    """ksmd running fast for the test, then every setting restored."""
    with counters.ksm_settings(KSM_FAST):
        yield


class Workload:
    """One `overcommit workload` process, stopped by its pid at teardown."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([OVERCOMMIT, "workload", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("workload: pid"):
            self.stop()
            raise RuntimeError(f"workload did not start: {line!r} {self.proc.stderr.read()}")
        self.pid = self.proc.pid

    def merging_pages(self) -> int:
        return counters.read_ksm_stat(self.pid)["ksm_merging_pages"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def workloads():
    """Factory: workloads("--pages", "1009", ...) -> Workload; all stopped after."""
    started: list[Workload] = []

    def start(*args):
        w = Workload(*args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


class Recorder:
    """`overcommit record` in the background."""

    def __init__(self, path: Path, *args: str):
        self.path = path
        self.proc = subprocess.Popen([OVERCOMMIT, "record", "-q", "-o", str(path), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The banner comes once the programs are attached.
        line = self.proc.stderr.readline()
        if not line.startswith("Tracing"):
            self.proc.kill()
            raise RuntimeError(f"record did not start: {line}{self.proc.stderr.read()}")

    def stop(self, sig=signal.SIGINT, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def recorder():
    started: list[Recorder] = []

    def start(path, *args):
        r = Recorder(path, *args)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


@pytest.fixture(scope="session")
def real_recording(tmp_path_factory):
    """A recording made on this kernel: three real workloads merged by ksmd
    (one of them unmerging), with streamed events."""
    if not ROOT:
        pytest.skip("needs root (BPF and KSM on the real kernel)")
    path = tmp_path_factory.mktemp("real") / "real.arrow"
    with counters.ksm_settings({"run": 0}):
        rec = Recorder(path, "-i", "0.5", "--events")
        ws = [Workload("--pages", "1009", "--distinct", "7", "--hold", "120"),
              Workload("--pages", "2003", "--distinct", "1", "--seed", "3", "--hold", "120"),
              Workload("--pages", "1511", "--distinct", "5", "--seed", "5", "--hold", "120",
                       "--unmerge-after", "4")]
        try:
            with counters.ksm_settings(KSM_FAST):
                wait_stable(lambda: [w.merging_pages() for w in ws], settle=2.0)
                time.sleep(5)  # past --unmerge-after, then settle again
                wait_stable(lambda: [w.merging_pages() for w in ws], settle=2.0)
            rec.stop()
        finally:
            for w in ws:
                w.stop()
            if rec.proc.poll() is None:
                rec.proc.kill()
    return path
