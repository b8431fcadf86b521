"""Benchmarks of the KSM tracing (not tests: figures to read, with a peer).

    sudo .venv/bin/python tests/bench/bench_ksm.py            # all, ~4 min
    sudo .venv/bin/python tests/bench/bench_ksm.py --only overhead --rounds 7
    sudo .venv/bin/python tests/bench/bench_ksm.py --long 600  # 10-min memory run

1. overhead: ksmd's CPU time per merged page with nothing attached, with
   `overcommit record` attached and with bpftrace counting the same
   tracepoints, interleaved round by round (this machine is shared and
   noisy: compare the ratios, not the absolute figures).  ksmd's CPU time is
   its schedstat run time (ns, exact).  Beside it, the exact time spent in
   each tracer's BPF programs (kernel.bpf_stats_enabled: run_time_ns in the
   programs' fdinfo), per merged page.
2. events: `record --events` while ksmd merges flat out (pages_to_scan=20000,
   sleep_millisecs=0): streamed events vs the in-kernel count, and losses.
3. startup: from exec of `overcommit record` to the first traced event.
4. memory: the recorder's peak RSS for a short and a long recording with
   ksmd merging all along.

Every KSM setting is restored and every process stopped at the end.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tracer import counters  # noqa: E402
from tracer.aggregate import summarize  # noqa: E402
from tracer.recording import read  # noqa: E402

OVERCOMMIT = str(Path(sys.executable).parent / "overcommit")
BPFTRACE = r"""
tracepoint:ksm:ksm_merge_with_ksm_page { @merge[args->mm, args->ksm_page != 0, args->err] = count(); }
tracepoint:ksm:ksm_merge_one_page { @zero[args->mm, args->err] = count(); }
tracepoint:ksm:ksm_remove_rmap_item { @unmerge[args->mm] = count(); }
tracepoint:ksm:ksm_remove_ksm_page { @removed = count(); }
tracepoint:ksm:ksm_start_scan { @start = nsecs; }
tracepoint:ksm:ksm_stop_scan { @scan = hist(nsecs - @start); }
tracepoint:ksm:ksm_enter, tracepoint:ksm:ksm_exit { @mm[args->mm] = count(); }
"""
MERGE_PAGES = 65536   # 256 MiB per round
MERGING_SETTINGS = {"run": 1, "pages_to_scan": 20000, "sleep_millisecs": 0}


def ksmd_pid() -> int:
    out = subprocess.run(["pgrep", "-x", "ksmd"], capture_output=True, text=True).stdout
    return int(out.split()[0])


def ksmd_cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def workload(*args: str) -> subprocess.Popen:
    p = subprocess.Popen([OVERCOMMIT, "workload", *args], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    return p


def stop(p: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def shared() -> int:
    k = counters.read_ksm()
    return k["pages_shared"] + k["pages_sharing"]


def unmerge_all() -> None:
    """Start each round from an empty stable tree."""
    counters.write_ksm_settings({"run": 2})
    counters.write_ksm_settings({"run": 0})


def tracer_proc(kind: str, tmp: Path) -> subprocess.Popen | None:
    if kind == "nothing":
        return None
    if kind == "overcommit":
        p = subprocess.Popen([OVERCOMMIT, "record", "-q", "-o", str(tmp / "o.arrow")],
                             stderr=subprocess.PIPE, text=True)
        p.stderr.readline()          # the banner: attached
        return p
    p = subprocess.Popen(["bpftrace", "-e", BPFTRACE], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()              # "Attaching N probes..."
    return p


def bpf_run_time_ns(pid: int) -> int:
    """Time the BPF programs a process holds have run (bpf_stats_enabled)."""
    total = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        if "prog_tag:" in text:
            for line in text.splitlines():
                if line.startswith("run_time_ns:"):
                    total += int(line.split()[1])
    return total


def overhead(rounds: int, tmp: Path) -> None:
    print(f"\n1. ksmd CPU per merged page, {MERGE_PAGES} pages per round, {rounds} rounds")
    pid = ksmd_pid()
    per_page: dict[str, list[float]] = {"nothing": [], "overcommit": [], "bpftrace": []}
    in_bpf: dict[str, list[float]] = {"overcommit": [], "bpftrace": []}
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    saved_stats = stats.read_text()
    stats.write_text("1")
    try:
        _overhead_rounds(rounds, tmp, pid, per_page, in_bpf)
    finally:
        stats.write_text(saved_stats)
    med = {k: statistics.median(v) for k, v in per_page.items()}
    print("   median ns of ksmd CPU per merged page: "
          + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
    print(f"   ratio overcommit/nothing {med['overcommit'] / med['nothing']:.3f}   "
          f"bpftrace/nothing {med['bpftrace'] / med['nothing']:.3f}   "
          f"overcommit/bpftrace {med['overcommit'] / med['bpftrace']:.3f}")
    bpf = {k: statistics.median(v) for k, v in in_bpf.items()}
    print("   exact ns in BPF programs per merged page: "
          + ", ".join(f"{k} {v:.0f} ({100 * v / med['nothing']:.1f}% of ksmd's "
                      "CPU per page)" for k, v in bpf.items()))


def _overhead_rounds(rounds, tmp, pid, per_page, in_bpf) -> None:
    for r in range(rounds):
        for kind in per_page:
            unmerge_all()
            w = workload("--pages", str(MERGE_PAGES), "--distinct", "64", "--hold", "600")
            t = tracer_proc(kind, tmp)
            try:
                base, cpu0 = shared(), ksmd_cpu_ns(pid)
                counters.write_ksm_settings(MERGING_SETTINGS)
                while shared() - base < MERGE_PAGES:
                    time.sleep(0.005)
                cpu = ksmd_cpu_ns(pid) - cpu0
                counters.write_ksm_settings({"run": 0})
                merged = shared() - base
                per_page[kind].append(cpu / merged)
                if t:
                    in_bpf[kind].append(bpf_run_time_ns(t.pid) / merged)
            finally:
                if t:
                    stop(t, signal.SIGINT)
                stop(w)
        print(f"   round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f} ns/page"
                                              for k, v in per_page.items()))


def events(tmp: Path) -> None:
    print("\n2. record --events at ksmd's fastest (pages_to_scan=20000, sleep_millisecs=0)")
    unmerge_all()
    ws = [workload("--pages", "131072", "--distinct", "256", "--seed", str(i), "--hold", "600")
          for i in range(2)]
    path = tmp / "events.arrow"
    rec = subprocess.Popen([OVERCOMMIT, "record", "-q", "--events", "-i", "0.5",
                            "-o", str(path)], stderr=subprocess.PIPE, text=True)
    rec.stderr.readline()
    try:
        base = shared()
        t0 = time.monotonic()
        counters.write_ksm_settings(MERGING_SETTINGS)
        while shared() - base < 2 * 131072 - 1024 and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        took = time.monotonic() - t0
        time.sleep(1)
        counters.write_ksm_settings({"run": 0})
    finally:
        stop(rec, signal.SIGINT)
        for w in ws:
            stop(w)
    df = read(path).frame()
    streamed = int((df.record == "event").sum())
    counted = int(df[df.record == "count"].value.sum())
    s = summarize(read(path))
    print(f"   {s['ksm']['merged_pages']} merges in {took:.2f}s "
          f"({s['ksm']['merged_pages'] / took:,.0f} merges/s)")
    print(f"   events counted in the kernel {counted}, streamed {streamed}, "
          f"lost {s['lost_events']}")


def startup(tmp: Path) -> None:
    print("\n3. from exec to the first traced event (ksmd scanning continuously)")
    unmerge_all()
    w = workload("--pages", "2048", "--distinct", "2048", "--hold", "600")
    counters.write_ksm_settings({"run": 1, "pages_to_scan": 100, "sleep_millisecs": 1})
    times = []
    try:
        for i in range(3):
            path = tmp / f"start{i}.arrow"
            t0 = time.monotonic_ns()
            rec = subprocess.Popen([OVERCOMMIT, "record", "-q", "-i", "0.2", "-d", "3",
                                    "-o", str(path)], stderr=subprocess.DEVNULL)
            rec.wait()
            r = read(path)
            df = r.frame()
            first = df[df.record == "scan"].t.min()
            times.append((r.meta["t0_monotonic_ns"] - t0) / 1e9 + first)
    finally:
        counters.write_ksm_settings({"run": 0})
        stop(w)
    print("   " + ", ".join(f"{t:.2f}s" for t in times) + f"  (median {statistics.median(times):.2f}s)")


def memory(durations: list[int], tmp: Path) -> None:
    print("\n4. recorder peak memory, ksmd merging new processes all along")
    counters.write_ksm_settings({"run": 1, "pages_to_scan": 5000, "sleep_millisecs": 10})
    try:
        for d in durations:
            path = tmp / f"mem{d}.arrow"
            rec = subprocess.Popen([OVERCOMMIT, "record", "-q", "--events", "-d", str(d),
                                    "-o", str(path)], stderr=subprocess.DEVNULL)
            hwm = rss = 0
            seed = 0
            w = None
            while rec.poll() is None:
                if w is None or w.poll() is not None:   # a new process to merge every ~3 s
                    seed += 1
                    w = workload("--pages", "8192", "--distinct", "32", "--seed", str(seed),
                                 "--hold", "3")
                try:
                    for line in Path(f"/proc/{rec.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm = max(hwm, int(line.split()[1]))
                        elif line.startswith("VmRSS:"):
                            rss = int(line.split()[1])
                except OSError:
                    pass
                time.sleep(0.5)
            stop(w)
            s = summarize(read(path))
            print(f"   {d:4d}s: peak RSS {hwm / 1024:.1f} MiB (bcc's compile), RSS at the end "
                  f"{rss / 1024:.1f} MiB, {s['ksm']['merged_pages']} merges, "
                  f"file {path.stat().st_size / 2**20:.1f} MiB")
    finally:
        counters.write_ksm_settings({"run": 0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", choices=["overhead", "events", "startup", "memory"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--short", type=int, default=60)
    ap.add_argument("--long", type=int, default=120)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    print(f"rerun: sudo {sys.executable} {' '.join(sys.argv)}")
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs")
    saved = counters.read_ksm_settings()
    keep = {k: saved[k] for k in ("run", "pages_to_scan", "sleep_millisecs")}
    with tempfile.TemporaryDirectory() as d, counters.ksm_settings(keep):
        tmp = Path(d)
        if a.only in (None, "overhead"):
            overhead(a.rounds, tmp)
        if a.only in (None, "events"):
            events(tmp)
        if a.only in (None, "startup"):
            startup(tmp)
        if a.only in (None, "memory"):
            memory([a.short, a.long], tmp)
        unmerge_all()


if __name__ == "__main__":
    main()
