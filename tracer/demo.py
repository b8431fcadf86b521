"""`make demo` without guests: trace the built-in workload with KSM switched on.

Three workload processes (two sharing content, one rewriting its pages after
a while) are recorded for ~20 s with ksmd running fast; every KSM setting
is restored afterwards and every process stopped, whatever happens.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import counters, record, summary

OUT = Path("demo-out")
KSM_FAST = {"run": 1, "pages_to_scan": 5000, "sleep_millisecs": 10}
WORKLOADS = [
    ("--mib", "64", "--distinct", "16", "--hold", "30"),
    ("--mib", "64", "--distinct", "16", "--hold", "30"),
    ("--mib", "32", "--distinct", "8", "--seed", "7", "--hold", "30", "--unmerge-after", "10"),
]


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (sudo make demo)", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    path = OUT / "demo.arrow"
    exe = str(Path(sys.executable).parent / "overcommit")
    procs: list[subprocess.Popen] = []
    try:
        with contextlib.ExitStack() as ksm:
            ksm.enter_context(counters.ksm_settings({"run": 0}))
            for args in WORKLOADS:
                p = subprocess.Popen([exe, "workload", *args], stdout=subprocess.PIPE, text=True)
                procs.append(p)
                print(p.stdout.readline().strip())

            def ksm_on():
                ksm.enter_context(counters.ksm_settings(KSM_FAST))
                print("KSM on: run=1 pages_to_scan=5000 sleep_millisecs=10 (restored after)")

            record.run(path, duration=20, interval=1.0, pids=None, stream_events=True,
                       on_start=ksm_on)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait()
    print()
    print(summary.run(path, as_json=False))
    print(f"\nRecording: {path}   (overcommit summary {path}; pandas.read_feather)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
