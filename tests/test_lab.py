"""The lab on real QEMU guests (root; TCG where KVM does not boot them).

One `overcommit lab` run with 2 guests, checked in its recording against
what QEMU itself reported over QMP: merges attributed to each VM by name,
host-discarded pages equal to each balloon's inflation exactly, deflation,
KSM settings restored, no QEMU process left.  Then the same lab interrupted
(SIGTERM) and killed (SIGKILL): guests gone either way.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import OVERCOMMIT

from tracer import counters
from tracer.aggregate import summarize
from tracer.lab import KSM_LAB
from tracer.recording import read

pytestmark = pytest.mark.lab

GUEST_MIB, BALLOON_MIB = 256, 64
PAGES_PER_MIB = 256          # 4 KiB pages


def qemu_pids(stderr: str) -> dict[str, int]:
    """VM name -> QEMU pid, from the lab's progress lines."""
    return {m[0]: int(m[1]) for m in re.findall(r"(lab-\d+): QEMU pid (\d+)", stderr)}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def lab_qemus() -> list[str]:
    """Any lab guest still running on this machine, by its -name (pgrep -f
    guest=lab-, without needing procps)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.startswith(b"guest=lab-") for a in argv) and alive(int(d.name)):
                found.append(f"{d.name} {b' '.join(argv).decode(errors='replace')}")
    return found


class LabRun:
    def __init__(self, outdir: Path, proc: subprocess.CompletedProcess, before, after, secs):
        self.outdir, self.proc = outdir, proc
        self.settings_before, self.settings_after = before, after
        self.seconds = secs
        self.pids = qemu_pids(proc.stderr)

    def frame(self):
        return read(self.outdir / "lab.arrow").frame()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("lab") / "out"
    before = counters.read_ksm_settings()
    t = time.monotonic()
    proc = subprocess.run([OVERCOMMIT, "lab", "--guests", "2", "--guest-mib", str(GUEST_MIB),
                           "--balloon-mib", str(BALLOON_MIB), "-o", str(outdir)],
                          capture_output=True, text=True, timeout=600, check=False)
    secs = time.monotonic() - t
    after = counters.read_ksm_settings()
    run = LabRun(outdir, proc, before, after, secs)
    print(f"\nlab took {secs:.0f}s\n{proc.stderr}\n{proc.stdout}")
    return run


def test_lab_runs_and_prints_the_summary(lab):
    assert lab.proc.returncode == 0, lab.proc.stderr
    assert set(lab.pids) == {"lab-1", "lab-2"}
    for name in lab.pids:
        assert f"{name}: ready" in lab.proc.stderr
    assert "KSM" in lab.proc.stdout and "lab-1" in lab.proc.stdout
    assert f"Results in {lab.outdir}" in lab.proc.stderr
    assert (lab.outdir / "lab.arrow").exists() and (lab.outdir / "lab.json").exists()
    if importlib.util.find_spec("reports.cli"):
        assert (lab.outdir / "report.html").stat().st_size > 0


def test_merges_are_attributed_to_each_vm_by_name(lab):
    s = summarize(read(lab.outdir / "lab.arrow"))
    by_vm = {p["vm"]: p for p in s["processes"] if p["vm"]}
    for name, pid in lab.pids.items():
        assert by_vm[name]["pid"] == pid
        assert by_vm[name]["comm"].startswith("qemu")
        # every guest filled the same pages: ksmd merged them into each VM
        assert by_vm[name]["merged_pages"] > 0
        assert by_vm[name]["ksm_merging_pages_end"] > 0


def test_host_discards_equal_the_inflation_qmp_reports_exactly(lab):
    df = lab.frame()
    qmp = df[df.record == "qmp"]
    counts = df[df.record == "count"]
    s = summarize(read(lab.outdir / "lab.arrow"))
    by_pid = {p["pid"]: p for p in s["processes"]}
    for name, pid in lab.pids.items():
        mine = qmp[qmp.pid == pid]
        # QMP's view: the balloon at its fullest, in 4 KiB pages, two ways
        inflated = int(mine[mine.name == "balloon_pages"].value.max())
        actual_min = int(mine[mine.name == "balloon_actual"].value.min())
        assert inflated == (GUEST_MIB << 20) - actual_min >> 12
        assert inflated == BALLOON_MIB * PAGES_PER_MIB, f"{name} did not reach the target"
        # the kernel's view: pages of guest RAM QEMU discarded
        discarded = int(counts[(counts.pid == pid) & (counts.name == "host_discard")].value.sum())
        assert discarded == inflated, name
        assert by_pid[pid]["host_discarded_pages"] == inflated
    assert s["balloon"]["host_discarded_pages"] >= 2 * BALLOON_MIB * PAGES_PER_MIB


def test_deflation_is_seen(lab):
    df = lab.frame()
    qmp = df[df.record == "qmp"]
    counts = df[df.record == "count"]
    for name, pid in lab.pids.items():
        mine = qmp[qmp.pid == pid]
        actual = mine[mine.name == "balloon_actual"].sort_values("t").value
        assert int(actual.iloc[-1]) == GUEST_MIB << 20, f"{name} balloon not deflated"
        # QEMU asks each deflated page back with MADV_WILLNEED
        willneed = int(counts[(counts.pid == pid) & (counts.name == "host_willneed")].value.sum())
        assert willneed == BALLOON_MIB * PAGES_PER_MIB, name


def test_guest_stats_and_phases_are_recorded(lab):
    df = lab.frame()
    stats = df[df.record == "guest_stats"]
    for name, pid in lab.pids.items():
        mine = stats[stats.pid == pid]
        assert set(mine.vm) == {name}
        free = mine[mine.name == "free_memory"].value
        # the guest saw its free memory shrink by the balloon, and come back
        assert free.max() - free.min() >= (BALLOON_MIB - 8) << 20
    phases = df[df.record == "lab"].sort_values("t").name.tolist()
    assert phases == ["boot", "merge", "inflate", "deflate", "done"]
    info = json.loads((lab.outdir / "lab.json").read_text())
    assert {g: v["pid"] for g, v in info["guests"].items()} == lab.pids


def test_ksm_settings_are_restored(lab):
    assert lab.settings_after == lab.settings_before


def test_no_qemu_left(lab):
    for name, pid in lab.pids.items():
        assert not alive(pid), f"{name} (pid {pid}) still running"
    assert lab_qemus() == []
    assert not list(lab.outdir.glob("*.qmp"))


def _start_lab(outdir: Path) -> tuple[subprocess.Popen, dict[str, int], str]:
    """A lab in the background, returned once both QEMU processes exist."""
    proc = subprocess.Popen([OVERCOMMIT, "lab", "-o", str(outdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = ""
    while len(qemu_pids(seen)) < 2:
        line = proc.stderr.readline()
        if not line:
            proc.wait()
            pytest.fail(f"lab ended before booting guests:\n{seen}")
        seen += line
    return proc, qemu_pids(seen), seen


def test_interrupted_lab_stops_guests_and_restores_ksm(tmp_path):
    before = counters.read_ksm_settings()
    proc, pids, _ = _start_lab(tmp_path / "out")
    time.sleep(2)   # booting
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err.splitlines()[-1]
    assert counters.read_ksm_settings() == before
    assert not any(alive(p) for p in pids.values())
    assert lab_qemus() == []
    # the recording up to the interrupt is readable and closed
    assert read(tmp_path / "out" / "lab.arrow").closed


def test_killed_lab_takes_its_guests_along(tmp_path):
    """kill -9 leaves no time for clean-up: the kernel stops the guests
    (PR_SET_PDEATHSIG); KSM settings are this test's to restore."""
    before = counters.read_ksm_settings()
    try:
        proc, pids, _ = _start_lab(tmp_path / "out")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids.values())
        assert lab_qemus() == []
    finally:
        # undo what the killed lab set, and only that (where it still holds)
        now = counters.read_ksm_settings()
        lab_set = {**KSM_LAB, "advisor_mode": "none"}
        counters.write_ksm_settings({k: before[k] for k, v in lab_set.items()
                                     if now.get(k) == v and before.get(k) != v})

