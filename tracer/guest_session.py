#!/opt/overcommit/.venv/bin/python3
"""The guest side of `overcommit lab guest`: the guest's init (PID 1).

The guest boots with ``init=/opt/overcommit/tracer/guest_session.py`` (no
systemd: under TCG it would take minutes).  This script mounts what the
tracer needs, finds the results disk (ext4 labelled ``oc-results``, the
second virtio disk) and runs the session its ``session.json`` describes:

1. ``overcommit doctor --json`` into doctor.json;
2. ``overcommit record -o guest.arrow`` in the background (the attach modes
   the kernel allows: fentry on Debian's 6.1) and, beside it, a second
   recording of the same events with fentry left out, guest-kprobe.arrow
   (the kprobe variant); then the built-in ``overcommit workload`` processes
   (KSM still off), then KSM on, fast; wait until their
   ``/proc/PID/ksm_merging_pages`` settle (one of them rewrites its pages:
   unmerges), reading them before and after;
3. the balloon: print READY_INFLATE on the console, which the host watches;
   the host inflates the balloon through QMP; wait until /proc/vmstat
   ``balloon_inflate`` has risen by what the host asks (session.json says
   how much) and stops; the same for deflating (READY_DEFLATE);
4. stop the recordings (SIGINT: a clean close), write guest.json (the
   guest's own readings, for the host to compare with the recording),
   unmount the results disk and power off.

Every line meant for the host starts with MARKER.  Whatever fails, the
error goes to the console and error.txt, and the guest powers off.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from tracer.counters import wait_stable

MARKER = "OC-GUEST:"
READY_INFLATE = "ready-for-inflate"
READY_DEFLATE = "ready-for-deflate"
DONE = "done"
ERROR = "error"
RESULTS_LABEL = "oc-results"
RESULTS = Path("/results")
PROJECT = Path("/opt/overcommit")
OVERCOMMIT = str(PROJECT / ".venv/bin/overcommit")
T0 = time.monotonic()
_log = None


def say(text: str) -> None:
    """One line for the host (the serial console) and for session.log."""
    line = f"{MARKER} [{time.monotonic() - T0:7.1f}s] {text}"
    print(line, flush=True)
    if _log:
        _log.write(line + "\n")
        _log.flush()


def marker(text: str) -> None:
    """A line the host acts on: exactly MARKER and the word."""
    print(f"{MARKER} {text}", flush=True)
    say(f"(said {text})")


# -- booting ----------------------------------------------------------------------

def _mount(fstype: str, target: str, source: str | None = None, opts: str | None = None):
    if os.path.ismount(target):
        return
    os.makedirs(target, exist_ok=True)
    cmd = ["mount", "-t", fstype] + (["-o", opts] if opts else []) + [source or fstype, target]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        say(f"mount {target} failed: {r.stderr.strip()}")


def boot() -> None:
    os.environ.update(PATH=f"{PROJECT}/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                      HOME="/root", LANG="C.UTF-8")
    _mount("proc", "/proc")
    _mount("sysfs", "/sys")
    _mount("devtmpfs", "/dev")
    subprocess.run(["mount", "-o", "remount,rw", "/"], capture_output=True, check=False)
    _mount("tmpfs", "/run", opts="mode=755")
    _mount("tmpfs", "/tmp", opts="mode=1777")
    _mount("tracefs", "/sys/kernel/tracing")
    _mount("debugfs", "/sys/kernel/debug")
    _mount("bpf", "/sys/fs/bpf")
    Path("/proc/sys/kernel/hostname").write_text("oc-guest\n")
    # No udev runs after the initrd: load the balloon driver ourselves.
    r = subprocess.run(["modprobe", "virtio_balloon"], capture_output=True, text=True, check=False)
    if r.returncode:
        say(f"modprobe virtio_balloon: {r.stderr.strip()}")


def _ext4_label(dev: str) -> str | None:
    try:
        with open(dev, "rb") as f:
            f.seek(1024)
            sb = f.read(256)
    except OSError:
        return None
    if sb[56:58] != b"\x53\xef":          # s_magic
        return None
    return sb[120:136].rstrip(b"\0").decode(errors="replace")   # s_volume_name


def mount_results() -> None:
    for name in sorted(os.listdir("/sys/block")):
        dev = f"/dev/{name}"
        if _ext4_label(dev) == RESULTS_LABEL:
            RESULTS.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "ext4", dev, str(RESULTS)], check=True)
            return
    raise RuntimeError(f"no disk labelled {RESULTS_LABEL} "
                       f"(block devices: {', '.join(os.listdir('/sys/block'))})")


def poweroff() -> None:
    os.sync()
    if os.path.ismount(RESULTS):
        subprocess.run(["umount", str(RESULTS)], check=False)
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)               # RB_POWER_OFF
    Path("/proc/sysrq-trigger").write_text("o")
    while True:
        time.sleep(60)


# -- the session ------------------------------------------------------------------

def start_workload(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([OVERCOMMIT, "workload", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class Workload:
    """One `overcommit workload` process, once it has filled its memory."""

    def __init__(self, args: list[str], proc: subprocess.Popen):
        self.args = args
        self.proc = proc
        line = self.proc.stdout.readline()
        if not line.startswith("workload: pid"):
            raise RuntimeError(f"workload {' '.join(args)} did not start: {line!r}")
        self.pid = self.proc.pid
        self.unmerges = "--unmerge-after" in args

    def merging_pages(self) -> int:
        from tracer import counters
        st = counters.read_ksm_stat(self.pid)
        return st["ksm_merging_pages"] if st else 0

    def rewrote(self, timeout: float) -> bool:
        """Wait for the line `--unmerge-after` prints once it rewrote its pages."""
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return bool(r) and "rewrote" in self.proc.stdout.readline()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# `overcommit record`, with the attach modes the kernel allows (the default),
# or with fentry left out so that the kprobe variant runs: where the kernel
# loads BPF tracing programs (Debian's 6.1 does) the default is fentry, and
# a second recording of the same events checks the kprobe programs for real.


class Recording:
    """One `overcommit record` in the background, its output in NAME.log."""

    def __init__(self, name: str, attach: str, interval: float, events: bool):
        self.name, self.attach = name, attach
        self.path = RESULTS / name
        self.log = RESULTS / (Path(name).stem + ".log")
        args = [OVERCOMMIT, "record", "-q", "-i", str(interval), "-o", str(self.path)] + \
            (["--events"] if events else [])
        env = dict(os.environ)
        if attach != "auto":
            env["OVERCOMMIT_ATTACH"] = attach
        say(f"overcommit record -i {interval} -o {self.path} (attach: {attach})")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.exit: int | None = None

    def wait_banner(self, end: float) -> None:
        while time.monotonic() < end:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "Tracing" in text:
                say(f"{self.name}: {text.strip().splitlines()[0]}")
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"overcommit record ({self.name}) exited "
                                   f"({self.proc.returncode}): {text.strip()}")
            time.sleep(0.2)
        raise TimeoutError(f"overcommit record ({self.name}) did not start in time")

    def stop(self, timeout: float = 300) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.exit = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit = self.proc.wait()
        return self.exit


def _wait_balloon(counter: str, start: dict, pages: int, timeout: float) -> int:
    """/proc/vmstat `counter` risen by `pages` (what the host asks) and still."""
    from tracer import counters
    end = time.monotonic() + timeout
    delta = lambda: counters.read_vmstat()[counter] - start[counter]
    last_print = 0.0
    while delta() < pages and time.monotonic() < end:
        if time.monotonic() - last_print > 5:
            last_print = time.monotonic()
            say(f"{counter} +{delta()} of {pages}")
        time.sleep(0.2)
    got = wait_stable(delta, settle=2.0, timeout=60)
    say(f"{counter} +{got} (host asked {pages})")
    return got


def session(cfg: dict) -> None:
    from tracer import counters
    out: dict = {"kernel": platform.release(), "session": cfg, "timings": {}}
    timings = out["timings"]

    def timed(name, t):
        timings[name] = round(time.monotonic() - t, 2)

    t = time.monotonic()
    say("overcommit doctor --json")
    r = subprocess.run([OVERCOMMIT, "doctor", "--json"], capture_output=True, text=True,
                       check=False)
    (RESULTS / "doctor.json").write_text(r.stdout)
    if r.stderr.strip():
        (RESULTS / "doctor.stderr").write_text(r.stderr)
    out["doctor_exit"] = r.returncode
    timed("doctor_s", t)
    try:
        d = json.loads(r.stdout)
        say("doctor: " + ", ".join(f"{e['event']}={e['mode']}" for e in d["events"]))
        for p in d.get("problems", []):
            say(f"doctor problem: {p['what']}: {p['fix']}")
    except (ValueError, KeyError):
        say(f"doctor printed no JSON (exit {r.returncode}): {r.stderr.strip()[-300:]}")

    counters.write_ksm_settings({"run": 0})
    out["vmstat_start"] = counters.read_vmstat()
    t = time.monotonic()
    recs = [Recording(r["name"], r["attach"], cfg["interval"], cfg.get("events", False))
            for r in cfg["recordings"]]
    workloads: list[Workload] = []
    try:
        end = time.monotonic() + cfg.get("record_start_timeout", 600)
        for rec in recs:
            rec.wait_banner(end)
        timed("record_start_s", t)

        # Started together (each takes seconds to import under TCG), KSM off.
        t = time.monotonic()
        procs = [start_workload(w) for w in cfg["workloads"]]
        workloads = [Workload(w, p) for w, p in zip(cfg["workloads"], procs)]
        for w in workloads:
            say(f"workload pid {w.pid}: {' '.join(w.args)}")
        timed("workloads_start_s", t)
        before = [w.merging_pages() for w in workloads]
        merging = lambda: [w.merging_pages() for w in workloads]
        t = time.monotonic()
        counters.write_ksm_settings(cfg["ksm"])
        say("KSM on: " + ", ".join(f"{k}={v}" for k, v in cfg["ksm"].items()))
        merged = wait_stable(merging, settle=cfg.get("settle", 3.0), timeout=600)
        timed("merge_s", t)
        say(f"merged: {merged}")
        for w in workloads:
            if w.unmerges:
                if not w.rewrote(cfg.get("unmerge_timeout", 300)):
                    raise RuntimeError(f"workload {w.pid} did not rewrite its pages")
                say(f"workload {w.pid} rewrote its pages")
        t = time.monotonic()
        after_ksm = wait_stable(merging, settle=cfg.get("settle", 3.0), timeout=600)
        timed("unmerge_s", t)
        say(f"after unmerging: {after_ksm}")

        t = time.monotonic()
        vm_before = counters.read_vmstat()
        marker(READY_INFLATE)
        inflated = _wait_balloon("balloon_inflate", vm_before, cfg["inflate_pages"], 600)
        vm_inflated = counters.read_vmstat()
        marker(READY_DEFLATE)
        deflated = _wait_balloon("balloon_deflate", vm_inflated, cfg["deflate_pages"], 600)
        vm_after = counters.read_vmstat()
        timed("balloon_s", t)
        # Two more intervals with everything still: the last counts written.
        time.sleep(2 * cfg["interval"] + 0.5)
        final = merging()
        say(f"final ksm_merging_pages: {final}")
        for rec in recs:
            say(f"{rec.name}: overcommit record exited {rec.stop()}")
        out["recordings"] = {rec.name: {"attach": rec.attach, "exit": rec.exit} for rec in recs}
        out["ksm_settings"] = counters.read_ksm_settings()
        out["ksm_end"] = counters.read_ksm()
        out["workloads"] = [
            {"pid": w.pid, "args": w.args, "unmerges": w.unmerges,
             "ksm_merging_pages_before": b, "ksm_merging_pages_merged": m,
             "ksm_merging_pages_after": f}
            for w, b, m, f in zip(workloads, before, merged, final)]
        out["vmstat"] = {"before_inflate": vm_before, "after_inflate": vm_inflated,
                         "after_deflate": vm_after}
        out["balloon"] = {"inflate_pages": inflated, "deflate_pages": deflated,
                          "nr_balloon_pages_inflated": vm_inflated.get("nr_balloon_pages"),
                          "nr_balloon_pages_end": vm_after.get("nr_balloon_pages")}
    finally:
        for w in workloads:
            w.stop()
        for rec in recs:
            if rec.proc.poll() is None:
                rec.stop(60)
        (RESULTS / "guest.json").write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    global _log
    try:
        boot()
        say(f"init: Linux {platform.release()}, {os.cpu_count()} CPUs")
        mount_results()
        _log = open(RESULTS / "session.log", "a")  # noqa: SIM115 - open for the session
        cfg = json.loads((RESULTS / "session.json").read_text())
        session(cfg)
        marker(DONE)
    except BaseException as e:  # noqa: BLE001 - PID 1 must power off whatever happens
        text = traceback.format_exc()
        print(text, flush=True)
        try:
            (RESULTS / "error.txt").write_text(text)
        except OSError:
            pass
        say(f"{ERROR}: {type(e).__name__}: {e}")
        marker(ERROR)
    finally:
        if _log:
            _log.close()
        poweroff()


if __name__ == "__main__":
    # Run as a script, its own directory (tracer/) comes first on sys.path,
    # where record.py, qmp.py ... would shadow nothing but confuse imports.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    main()
