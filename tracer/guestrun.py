"""`overcommit lab guest`: the tracer inside a Debian 12 guest (Linux 6.1).

Boots the image of `overcommit lab image` (tracer/image.py) under QEMU, KVM
when the guest kernel boots under it, else TCG, with a virtio-balloon device,
QMP, the serial console in a file and no network:

  /dev/vda  root.img (snapshot=on: the cached image is never written)
  /dev/vdb  results.img, a small ext4 made with mke2fs -d from a directory
            holding session.json; the guest writes its results there

The guest's init is tracer/guest_session.py (no systemd): doctor, then two
recordings of the same events (guest.arrow with the attach modes the kernel
allows, guest-kprobe.arrow with the kprobe variant) while KSM merges the
built-in workloads inside the guest and while the host inflates, then
deflates, the guest's balloon through QMP when the guest says it is ready
(markers on the serial console).  Once the guest has powered off, its
results are read back with debugfs (nothing is mounted on the host) into the
output directory: the recordings, doctor.json, guest.json (what the guest
read itself), session.log; host.json says what the host asked through QMP.
The guest is stopped whatever happens: QMP quit, then SIGTERM and SIGKILL by
pid (and the kernel kills it should this process be killed): tracer/qemu.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from . import guest_session as gs
from . import image as guest_image
from .errors import UserError
from .qemu import Guest, accel_option, choose_accel, qemu_binary
from .qmp import QMPError

MIB = 1 << 20
PAGE = 4096
KVM_PROBE_S = 15.0         # a guest under KVM prints its first console line in ~1 s
BOOT_TIMEOUT_S = 300.0     # until init's first line (TCG: ~10-30 s)
SESSION_TIMEOUT_S = 1500.0  # the whole session (TCG: a few minutes)
BALLOON_TIMEOUT_S = 300.0
RESULTS_MIB = 256           # the results disk (sparse)
# Workloads with prime page counts; every page has a twin (7, 1 and 5
# distinct contents).  The third rewrites its pages once merged (unmerges);
# the fourth holds the same 5 contents (same seed), so that the KSM pages
# outlive the rewrite: each of its COW breaks is then dropped by ksmd in
# remove_rmap_item_from_tree(), which the kprobe/fentry variants hook (a KSM
# page left with no mapper is dropped whole, in remove_node_from_stable_tree(),
# which they do not).  Contents of one seed stay under max_page_sharing (256).
WORKLOADS = (
    ["--pages", "1009", "--distinct", "7", "--hold", "3600"],
    ["--pages", "2003", "--distinct", "1", "--seed", "3", "--hold", "3600"],
    ["--pages", "1201", "--distinct", "5", "--seed", "5", "--hold", "3600",
     "--unmerge-after", "{unmerge_after}"],
    ["--pages", "11", "--distinct", "5", "--seed", "5", "--hold", "3600"],
)
KSM_GUEST = {"pages_to_scan": 5000, "sleep_millisecs": 10, "run": 1}
KPROBE_RECORDING = "guest-kprobe.arrow"
RESULT_FILES = ("guest.arrow", "guest.log", KPROBE_RECORDING, "guest-kprobe.log",
                "doctor.json", "doctor.stderr", "guest.json", "session.log", "error.txt")


@dataclass
class Settings:
    outdir: Path = Path("guest-out")
    mib: int = 1024
    cpus: int = 2
    balloon_mib: int = 64
    interval: float = 0.5
    accel: str = "auto"
    events: bool = True
    unmerge_after: float = 15.0
    kprobe_too: bool = True     # a second recording with the kprobe variant
    timeout: float = SESSION_TIMEOUT_S


@dataclass
class GuestVM(Guest):
    """The Debian image under QEMU, its results disk beside it."""
    cpus: int = 2
    results: Path | None = None

    def argv(self, image: guest_image.GuestImage, qemu: str) -> list[str]:
        # -cpu max under TCG: the default qemu64 model lacks SSE4.2/POPCNT,
        # and the wheels pip installs (numpy, pyarrow) die of SIGILL without.
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-accel", "tcg,thread=multi", "-cpu", "max"]
        return [
            qemu, "-name", f"guest={self.name}",
            # mem-merge=off: this guest's RAM stays out of the host's KSM,
            # which other tests on this host count.
            "-machine", "pc,mem-merge=off", *accel,
            "-m", str(self.mib), "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
            "-serial", f"file:{self.console}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", (f"root=/dev/vda rw console=ttyS0 panic=1 fsck.mode=skip "
                        f"init={image.init}"),
            "-drive", f"file={image.root},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={self.results},format=raw,if=virtio",
            "-device", "virtio-balloon-pci,id=balloon0",
            "-qmp", self.qmp_arg,
            "-no-reboot",
        ]


def _results_disk(path: Path, session: dict) -> None:
    """A fresh ext4 holding session.json, made without mounting (mke2fs -d)."""
    src = path.with_name("session")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / "session.json").write_text(json.dumps(session, indent=1) + "\n")
    path.unlink(missing_ok=True)
    r = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", gs.RESULTS_LABEL, "-d",
                        str(src), str(path), f"{RESULTS_MIB}M"],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise UserError(f"mke2fs {path} failed: {r.stderr.strip()}")


def read_results(disk: Path, outdir: Path) -> list[str]:
    """Copy the guest's results out of its disk image with debugfs."""
    got = []
    for name in RESULT_FILES:
        dest = outdir / name
        dest.unlink(missing_ok=True)
        r = subprocess.run(["debugfs", "-R", f"dump /{name} {dest}", str(disk)],
                           capture_output=True, text=True, check=False)
        if r.returncode == 0 and dest.exists() and ("File not found" not in r.stderr):
            got.append(name)
        else:
            dest.unlink(missing_ok=True)
    return got


# -- the run ----------------------------------------------------------------------

def _printed(vm: GuestVM) -> bool:
    """The guest booted: anything on its console."""
    return vm.console.exists() and vm.console.stat().st_size > 0


@dataclass
class Run:
    s: Settings
    image: guest_image.GuestImage
    qemu: str
    say: Callable[[str], None]
    t0: float = field(default_factory=time.monotonic)
    asked: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    vm: GuestVM | None = None

    def log(self, text: str) -> None:
        self.say(f"{time.monotonic() - self.t0:6.1f}s {text}")

    def session(self) -> dict:
        return {
            "interval": self.s.interval, "events": self.s.events, "ksm": KSM_GUEST,
            "recordings": [{"name": "guest.arrow", "attach": "auto"}] + (
                [{"name": KPROBE_RECORDING, "attach": "kprobe"}] if self.s.kprobe_too else []),
            "workloads": [[a.format(unmerge_after=f"{self.s.unmerge_after:g}") for a in w]
                          for w in WORKLOADS],
            "inflate_pages": self.s.balloon_mib * MIB // PAGE,
            "deflate_pages": self.s.balloon_mib * MIB // PAGE,
        }

    def start(self, accel: str) -> GuestVM:
        results = self.s.outdir / "results.img"
        _results_disk(results, self.session())
        vm = GuestVM(f"oc-guest-{os.getpid()}", self.s.mib, accel, self.s.outdir,
                     cpus=self.s.cpus, results=results)
        vm.start(vm.argv(self.image, self.qemu))
        self.vm = vm
        self.log(f"QEMU pid {vm.pid} ({accel.upper()}, {self.s.mib} MiB, {self.s.cpus} vCPUs); "
                 f"console {vm.console}")
        return vm

    def boot(self) -> GuestVM:
        """Under KVM when the guest prints its first console line under it
        within KVM_PROBE_S (that guest goes on), else under TCG."""
        accel, vm = choose_accel(self.s.accel, self.qemu, self.image.release, self.start,
                                 _printed, KVM_PROBE_S, self.log, keep=True)
        return vm if vm is not None else self.start(accel)

    def balloon(self, vm: GuestVM, phase: str) -> None:
        q = vm.connect()
        old = q.execute("query-balloon")["actual"]
        target = old - self.s.balloon_mib * MIB if phase == "inflate" else self.s.mib * MIB
        self.log(f"{phase}: QMP balloon {old // MIB} -> {target // MIB} MiB "
                 f"({(old - target) // PAGE:+d} pages in the balloon)")
        t = time.monotonic()
        q.execute("balloon", {"value": target})
        end = time.monotonic() + BALLOON_TIMEOUT_S
        actual = old
        while time.monotonic() < end:
            actual = q.execute("query-balloon")["actual"]
            if actual == target:
                break
            vm.check_alive()
            time.sleep(0.2)
        took = time.monotonic() - t
        self.log(f"{phase}: query-balloon {actual // MIB} MiB after {took:.1f}s")
        self.asked[phase] = {"old_target": old, "new_target": target, "actual": actual,
                             "pages": abs(old - target) // PAGE, "seconds": round(took, 2)}
        if actual != target:
            raise UserError(f"{phase}: the balloon reached {actual} of {target} bytes "
                            f"in {BALLOON_TIMEOUT_S:g}s (console {vm.console})")

    def watch(self, vm: GuestVM) -> None:
        """Follow the console until the guest powers off."""
        booted = False
        end_boot = time.monotonic() + BOOT_TIMEOUT_S
        end = time.monotonic() + self.s.timeout
        while vm.proc.poll() is None:
            for line in vm.new_lines():
                if "Kernel panic" in line:
                    raise UserError(f"guest kernel panic: {line.strip()} (console {vm.console})")
                if not line.startswith(gs.MARKER):
                    continue
                text = line[len(gs.MARKER):].strip()
                if not booted:
                    booted = True
                    self.timings["boot_s"] = round(time.monotonic() - vm.started, 1)
                if text == gs.READY_INFLATE:
                    self.balloon(vm, "inflate")
                elif text == gs.READY_DEFLATE:
                    self.balloon(vm, "deflate")
                elif text == gs.ERROR:
                    self.log("the guest failed: see error.txt and the console")
                elif text != gs.DONE:
                    self.log(f"guest {text}")
            now = time.monotonic()
            if not booted and now > end_boot:
                raise UserError(f"the guest's init said nothing within {BOOT_TIMEOUT_S:g}s "
                                f"(console {vm.console})")
            if now > end:
                raise UserError(f"the guest session did not end within {self.s.timeout:g}s "
                                f"(console {vm.console})")
            time.sleep(0.2)
        vm.new_lines()
        self.timings["session_s"] = round(time.monotonic() - vm.started, 1)
        self.log(f"guest powered off (QEMU exit {vm.proc.returncode})")


def run(s: Settings, say: Callable[[str], None] = lambda t: click.echo(t, err=True),
        image: guest_image.GuestImage | None = None) -> dict:
    """Build (or reuse) the image, run the guest session, read its results
    back into s.outdir; returns host.json's contents."""
    if os.geteuid() != 0:
        raise UserError("lab guest needs root (building the image: debootstrap, chroot)")
    for tool in ("mke2fs", "debugfs"):
        if not shutil.which(tool):
            raise UserError(f"{tool} not found: apt-get install e2fsprogs")
    qemu = qemu_binary()
    with guest_image.sigterm_raises():
        return _run(s, say, image, qemu)


def _run(s: Settings, say, image, qemu) -> dict:
    t0 = time.monotonic()
    image = image or guest_image.build(say)
    s.outdir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES + ("host.json",):
        (s.outdir / name).unlink(missing_ok=True)
    r = Run(s, image, qemu, say)
    r.timings["image_s"] = round(time.monotonic() - t0, 1)
    r.log(f"guest: {image.describe()}; session {json.dumps(r.session()['workloads'])}")
    try:
        vm = r.boot()
        r.watch(vm)
    except KeyboardInterrupt:
        raise UserError("interrupted: guest stopped", 130) from None
    except QMPError as e:
        raise UserError(str(e)) from e
    finally:
        if r.vm is not None and r.vm.proc.poll() is None:
            r.log(f"stopping {r.vm.name} (pid {r.vm.pid})")
        if r.vm is not None:
            r.vm.stop()
            # Even after a failure: what the guest wrote tells what happened.
            got = read_results(s.outdir / "results.img", s.outdir)
    r.log(f"results read back from results.img: {', '.join(got) or 'none'}")
    info = {"image": {"release": image.release, "packages": image.packages,
                      "root": str(image.root), "project_hash": image.project_hash},
            "accel": r.vm.accel, "qemu_pid": r.vm.pid, "settings": {
                "mib": s.mib, "cpus": s.cpus, "balloon_mib": s.balloon_mib,
                "interval_s": s.interval},
            "session": r.session(), "balloon_asked": r.asked,
            "timings": {**r.timings, "total_s": round(time.monotonic() - t0, 1)},
            "results": got, "console": str(r.vm.console)}
    (s.outdir / "host.json").write_text(json.dumps(info, indent=1) + "\n")
    if "error.txt" in got:
        err = (s.outdir / "error.txt").read_text().strip().splitlines()[-1]
        raise UserError(f"the guest session failed: {err} (console {r.vm.console})")
    if "guest.arrow" not in got:
        raise UserError(f"the guest left no recording (console {r.vm.console})")
    return info


def checks(outdir: Path) -> dict[str, dict]:
    """What each of the guest's recordings says against what the guest read
    and what the host asked: the numbers `lab guest` prints and the test
    asserts, by recording name (guest.arrow, guest-kprobe.arrow)."""
    from .aggregate import summarize
    from .recording import read
    host = json.loads((outdir / "host.json").read_text())
    g = json.loads((outdir / "guest.json").read_text())
    vm = g["vmstat"]
    out = {}
    for name in g["recordings"]:
        s = summarize(read(outdir / name))
        (outdir / (Path(name).stem + ".summary.json")).write_text(
            json.dumps(s, indent=1, default=str) + "\n")
        procs = {p["pid"]: p for p in s["processes"]}
        workloads = []
        for w in g["workloads"]:
            p = procs.get(w["pid"], {})
            workloads.append({
                "pid": w["pid"], "args": " ".join(w["args"]), "unmerges": w["unmerges"],
                "recorded_net": p.get("merged_pages", 0) - p.get("unmerged_pages", 0),
                "guest_net": w["ksm_merging_pages_after"] - w["ksm_merging_pages_before"],
                "ksm_merging_pages_merged": w["ksm_merging_pages_merged"],
                **{k: p.get(k) for k in ("merged_pages", "new_ksm_pages", "merge_failures",
                                         "unmerged_pages", "unmerged_pages_seen")}})
        out[name] = {
            "kernel": s["kernel"], "attach": s["attach"], "workloads": workloads,
            "balloon": {
                "inflated_pages": s["balloon"]["inflated_pages"],
                "deflated_pages": s["balloon"]["deflated_pages"],
                "host_asked_inflate": host["balloon_asked"].get("inflate", {}).get("pages"),
                "host_asked_deflate": host["balloon_asked"].get("deflate", {}).get("pages"),
                "vmstat_inflate": vm["after_deflate"]["balloon_inflate"]
                - vm["before_inflate"]["balloon_inflate"],
                "vmstat_deflate": vm["after_deflate"]["balloon_deflate"]
                - vm["before_inflate"]["balloon_deflate"]},
            "crosscheck": s["crosscheck"],
            "lost_events": s["lost_events"],
            "closed_cleanly": s["closed_cleanly"],
        }
    return out


def render_checks(checked: dict[str, dict]) -> str:
    ok = lambda a, b: "ok" if a == b else "MISMATCH"
    lines = []
    for name, c in checked.items():
        modes = sorted({f"{k} {v}" for k, v in c["attach"].items()
                        if k in ("merges", "unmerges", "balloon_inflate", "balloon_deflate")})
        lines.append(f"{name} (Linux {c['kernel']}; {', '.join(modes)}):")
        for w in c["workloads"]:
            lines.append(f"  pid {w['pid']:<6} merged {w['merged_pages']} - unmerged "
                         f"{w['unmerged_pages']} = {w['recorded_net']}; the guest's "
                         f"ksm_merging_pages {w['guest_net']:+d}: "
                         f"{ok(w['recorded_net'], w['guest_net'])}")
        b = c["balloon"]
        for what in ("inflate", "deflate"):
            traced, asked = b[f"{what}d_pages"], b[f"host_asked_{what}"]
            lines.append(f"  balloon {what}: traced {traced}, host asked {asked} (QMP), "
                         f"/proc/vmstat {b[f'vmstat_{what}']}: "
                         f"{ok(traced, asked)}/{ok(traced, b[f'vmstat_{what}'])}")
    return "\n".join(lines)


@click.command("guest", short_help="Run the tracer inside the Debian 12 guest.",
               epilog="""\b
Examples:
  overcommit lab guest                     # results in guest-out/
  overcommit lab guest -o /tmp/g --accel tcg
Then:  overcommit summary guest-out/guest.arrow""")
@click.option("-o", "--output", "outdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("guest-out"), show_default=True,
              help="Directory for the results, the console log and the QMP socket.")
@click.option("--mib", type=click.IntRange(512), default=1024, show_default=True,
              help="Guest RAM (MiB).")
@click.option("--balloon-mib", type=click.IntRange(1, 256), default=64, show_default=True,
              help="How much the balloon inflates (MiB), then deflates.")
@click.option("-i", "--interval", type=click.FloatRange(min=0.2), default=0.5,
              show_default=True, help="Seconds per interval of the guest's recording.")
@accel_option
def guest_command(outdir, mib, balloon_mib, interval, accel):
    """Run the tracer inside a Debian 12 guest (Linux 6.1: kprobes, no KSM
    tracepoints) while KSM merges in it and the host inflates and deflates
    its balloon.

    Builds or reuses the image of `lab image`, boots it with QEMU, and leaves
    in the output directory the guest's recording (guest.arrow), its
    `doctor --json` (doctor.json), its own readings (guest.json), what the
    host asked through QMP (host.json) and the console log.  The guest is
    stopped at the end whatever happens.
    """
    from .summary import run as summary
    s = Settings(outdir=outdir, mib=mib, balloon_mib=balloon_mib, interval=interval,
                 accel=accel)
    say = lambda t: click.echo(t, err=True)
    run(s, say)
    click.echo(summary(outdir / "guest.arrow", False))
    click.echo()
    click.echo(render_checks(checks(outdir)))
