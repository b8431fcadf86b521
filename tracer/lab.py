"""`overcommit lab`: many similar guests on one host, KSM and balloons at work.

The scenario, one interval of the recording at a time:

1. build (or take from the cache) the tiny guest: tracer/guest.py;
2. start recording (in this process), switch host KSM on, fast;
3. boot N guests with QEMU (KVM when a guest boots under it, else TCG); each
   fills part of its RAM with the same pages as the others, so host KSM
   merges across guests; wait until the merging settles;
4. inflate every balloon by B MiB through QMP (``balloon`` to M - B MiB) and
   wait until ``query-balloon`` reaches it (or stops moving): QEMU discards
   each ballooned page (madvise MADV_DONTNEED), seen as ``host_discard``;
5. deflate back to M MiB (QEMU: MADV_WILLNEED, seen as ``host_willneed``);
6. stop recording, stop the guests, restore KSM; print the summary.

Each interval also holds each guest's ``guest-stats`` (the balloon driver's
statistics) and its balloon size as QMP reports it (rows ``guest_stats`` and
``qmp``, see tracer/recording.py), and the phase boundaries (rows ``lab``).
Every guest is stopped at the end whatever happens (QMP quit, then SIGTERM,
then SIGKILL, by pid; and the kernel kills them should this process die:
tracer/qemu.py), and every KSM setting changed is restored, also on Ctrl-C
and SIGTERM.

`lab image` and `lab guest` (tracer/image.py, tracer/guestrun.py): the
tracer inside a Debian 12 guest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
from click.core import ParameterSource

from . import counters, guest, procs
from .errors import UserError
from .guestrun import guest_command
from .image import image_command
from .qemu import Guest, accel_option, choose_accel, qemu_binary, stop_all
from .qmp import QMPCommandError, QMPError

MIB = 1 << 20
PAGE = 4096
BALLOON = "/machine/peripheral/balloon0"
# Fast, but leaving the 2 CPUs mostly to the guests: 10000 pages every 20 ms.
KSM_LAB = {"run": 1, "pages_to_scan": 10000, "sleep_millisecs": 20}
# What a guest's kernel and initramfs take before /init fills anything, plus
# the slack its kernel needs to keep running with the balloon inflated.
GUEST_BASE_MIB = 96
KVM_PROBE_S = 10.0      # a guest under KVM prints its first init line in ~1 s
BOOT_TIMEOUT_S = 120.0  # TCG boots and fills in ~10 s on 2 cores
MERGE_TIMEOUT_S = 90.0
BALLOON_TIMEOUT_S = 90.0
SETTLE_S = 5.0          # merging / ballooning "has settled" after this long unchanged
HOLD_S = 5.0            # intervals recorded with the balloons inflated, and at the end


class Interrupted(UserError):
    def __init__(self):
        super().__init__("lab interrupted: guests stopped, KSM settings restored", 130)


class LabTimeout(UserError):
    """A phase did not finish in time."""


@dataclass
class LabGuest(Guest):
    """A lab guest (lab-N): the tiny busybox guest filling fill_mib MiB of
    its RAM with the pages every lab guest fills, and its balloon."""
    fill_mib: int = 0
    comm: str = "qemu-system-x86"
    target: int = 0           # balloon target (bytes of guest RAM)
    actual: int = 0           # last query-balloon

    def argv(self, image: guest.Image, qemu: str) -> list[str]:
        return [
            qemu, "-name", f"guest={self.name}",
            # mem-merge=on (the default, said explicitly): guest RAM is
            # MADV_MERGEABLE, for KSM and for telling guest RAM apart.
            "-machine", "pc,mem-merge=on", "-accel", self.accel,
            "-m", str(self.mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
            "-serial", f"file:{self.console}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"console=ttyS0 panic=-1 lab.fill_mib={self.fill_mib}",
            "-device", "virtio-balloon-pci,id=balloon0",
            "-qmp", self.qmp_arg,
            "-no-reboot",
        ]

    def states(self) -> list[str]:
        """Boot states reached since the last call, from the console."""
        out = []
        for line in self.new_lines():
            if self.state == "starting" and line.strip():
                self.state = "booting"
                out.append("kernel booting")
            if line.startswith(guest.MARKER):
                text = line[len(guest.MARKER):].strip()
                if text.startswith("error"):
                    raise UserError(f"{self.name}: {text} (console: {self.console})")
                self.state = "ready" if line.strip() == guest.READY else text
                out.append(text)
            elif "Kernel panic" in line:
                raise UserError(f"{self.name}: guest kernel panic: {line.strip()} "
                                f"(console: {self.console})")
        return out


# -- the scenario ---------------------------------------------------------------

@dataclass
class Settings:
    guests: int = 2
    guest_mib: int = 256
    balloon_mib: int = 64
    fill_mib: int | None = None
    outdir: Path = Path("lab-out")
    interval: float = 1.0
    accel: str = "auto"

    def resolve(self) -> Settings:
        if self.fill_mib is None:
            self.fill_mib = max(0, self.guest_mib - self.balloon_mib - GUEST_BASE_MIB)
        room = self.guest_mib - GUEST_BASE_MIB - self.fill_mib
        if self.balloon_mib > room:
            raise UserError(
                f"a {self.guest_mib} MiB guest filled with {self.fill_mib} MiB has room for a "
                f"balloon of about {max(room, 0)} MiB, not {self.balloon_mib}: raise --guest-mib "
                f"or lower --balloon-mib / --fill-mib")
        if self.fill_mib < 8:
            raise UserError(f"{self.guest_mib} MiB guests with a {self.balloon_mib} MiB balloon "
                            f"leave no room for identical memory: use --guest-mib "
                            f"{self.balloon_mib + GUEST_BASE_MIB + 32} or more")
        return self


class Lab:
    def __init__(self, s: Settings, rec, stop, guests: list[LabGuest], image: guest.Image,
                 qemu: str, accel: str, say: Callable[[str], None]):
        self.s, self.rec, self.stop = s, rec, stop
        self.guests, self.image, self.qemu, self.accel = guests, image, qemu, accel
        self.say = say
        self.t0 = time.monotonic()
        self.deadline = time.monotonic()
        self.results: dict[str, dict] = {}

    def log(self, text: str) -> None:
        self.say(f"{time.monotonic() - self.t0:6.1f}s {text}")

    # one interval: guest states, QMP samples, then the recorder's step
    def tick(self) -> None:
        for g in self.guests:
            g.check_alive()
            for state in g.states():
                self.log(f"{g.name}: {state}"
                         + (f" ({time.monotonic() - g.started:.1f}s after start)"
                            if state == "ready" else ""))
        self.rec.add_rows(self.sample())
        self.deadline = max(self.deadline + self.s.interval, time.monotonic() + 0.05)
        self.rec.step(self.deadline, self.stop)
        if self.stop.set:
            raise Interrupted()

    def phase(self, name: str) -> None:
        self.rec.add_rows([{"record": "lab", "name": name, "pid": 0, "value": 0}])

    def sample(self) -> list[dict]:
        rows: list[dict] = []
        for g in self.guests:
            if g.qmp is None:
                continue
            who = {"pid": g.pid, "comm": g.comm, "vm": g.name}
            g.actual = g.qmp.execute("query-balloon")["actual"]
            rows += [{"record": "qmp", "name": "balloon_actual", "value": g.actual, **who},
                     {"record": "qmp", "name": "balloon_pages",
                      "value": (g.mib * MIB - g.actual) // PAGE, **who}]
            if g.target:
                rows.append({"record": "qmp", "name": "balloon_target", "value": g.target, **who})
            try:
                stats = g.qmp.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
            except QMPCommandError:
                stats = {}   # no statistics from the guest yet
            for name, value in sorted(stats.get("stats", {}).items()):
                # (u64)-1: not reported (yet) by this guest
                if 0 <= value < 1 << 63:
                    rows.append({"record": "guest_stats",
                                 "name": name.removeprefix("stat-").replace("-", "_"),
                                 "value": int(value), **who})
            g.qmp.poll_events()  # BALLOON_CHANGE: query-balloon says the same
        return rows

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise LabTimeout(f"{what}: not done after {timeout:g}s "
                                f"(consoles and QEMU logs in {self.s.outdir})")
            self.tick()

    # phases
    def boot(self) -> None:
        self.phase("boot")
        self.log(f"booting {len(self.guests)} guests ({self.accel.upper()}): "
                 f"{self.s.guest_mib} MiB each, filling {self.s.fill_mib} MiB with the same pages")
        for g in self.guests:
            g.start(g.argv(self.image, self.qemu))
            self.log(f"{g.name}: QEMU pid {g.pid}")
        for g in self.guests:
            g.connect()
            p = procs.identify(g.pid)
            g.comm = p.comm if p else g.comm
            g.qmp.execute("qom-set", {"path": BALLOON, "property": "guest-stats-polling-interval",
                                      "value": 1})
        self.wait("booting the guests", lambda: all(g.state == "ready" for g in self.guests),
                  BOOT_TIMEOUT_S)

    def merging(self) -> dict[str, int]:
        out = {}
        for g in self.guests:
            st = counters.read_ksm_stat(g.pid) or {}
            out[g.name] = st.get("ksm_merging_pages", 0)
        return out

    def settled(self, read: Callable[[], object], state: dict) -> Callable[[], bool]:
        """A `done` for wait(): read() unchanged for SETTLE_S (and set in state)."""
        def done() -> bool:
            cur = read()
            now = time.monotonic()
            if cur != state.get("value"):
                state.update(value=cur, since=now)
                return False
            return now - state["since"] >= SETTLE_S
        return done

    def merge(self) -> None:
        self.phase("merge")
        self.log("waiting for KSM to merge the guests' memory")
        state: dict = {}
        last_print = [0.0]

        def read():
            m = self.merging()
            if time.monotonic() - last_print[0] >= 5:
                last_print[0] = time.monotonic()
                self.log("KSM merging pages: " + ", ".join(f"{k} {v}" for k, v in m.items()))
            return m if all(m.values()) else None
        done = self.settled(read, state)
        try:
            self.wait("KSM merging", done, MERGE_TIMEOUT_S)
        except LabTimeout:
            self.log("KSM is still merging; going on")
        self.log("KSM merged: " + ", ".join(f"{k} {v} pages" for k, v in self.merging().items()))

    def balloon(self, target_mib: int, phase: str) -> None:
        self.phase(phase)
        self.log(f"{phase}: balloon target {target_mib} MiB of guest RAM "
                 f"({self.s.guest_mib - target_mib} MiB in the balloon)")
        for g in self.guests:
            g.target = target_mib * MIB
            g.qmp.execute("balloon", {"value": g.target})
        state: dict = {}
        moving = self.settled(lambda: [g.actual for g in self.guests], state)

        def done() -> bool:
            # query-balloon is sampled every tick (sample())
            return all(g.actual == g.target for g in self.guests) or moving()
        self.wait(f"{phase} the balloons", done, BALLOON_TIMEOUT_S)
        self.tick()   # one more interval: the last discards counted
        for g in self.guests:
            pages = (g.mib * MIB - g.actual) // PAGE
            note = "" if g.actual == g.target else \
                f" (target {(g.mib * MIB - g.target) // PAGE}: the guest gave what it could)"
            self.log(f"{g.name}: balloon {pages} pages = {pages * PAGE / MIB:g} MiB" + note)
            self.results.setdefault(g.name, {"pid": g.pid})[f"{phase}_balloon_pages"] = pages

    def run(self) -> None:
        self.boot()
        self.merge()
        self.balloon(self.s.guest_mib - self.s.balloon_mib, "inflate")
        self.hold()
        self.balloon(self.s.guest_mib, "deflate")
        self.hold()
        self.phase("done")
        self.tick()

    def hold(self) -> None:
        end = time.monotonic() + HOLD_S
        while time.monotonic() < end:
            self.tick()


def _init_started(g: LabGuest) -> bool:
    """The guest booted: its /init printed a line."""
    return any(line.startswith(guest.MARKER) for line in g.new_lines())


def run(s: Settings, say: Callable[[str], None] = lambda t: click.echo(t, err=True)) -> Path:
    """The whole lab; returns the recording's path."""
    s.resolve()
    if os.geteuid() != 0:
        raise UserError("lab needs root (it records with BPF and switches host KSM on)")
    qemu = qemu_binary()
    try:
        counters.read_ksm_settings()
    except counters.KsmUnavailable as e:
        raise UserError(str(e)) from e
    s.outdir.mkdir(parents=True, exist_ok=True)
    image = guest.build(say)
    say(f"Guest: {image.origin}, busybox initramfs {image.initrd}")

    def probe(accel: str) -> LabGuest:   # a lab guest filling nothing
        g = LabGuest("lab-kvm-probe", 128, accel, s.outdir)
        g.start(g.argv(image, qemu))
        return g
    accel, _ = choose_accel(s.accel, qemu, image.origin, probe, _init_started, KVM_PROBE_S, say)
    from .record import Recorder, StopFlag, banner
    output = s.outdir / "lab.arrow"
    guests = [LabGuest(f"lab-{i + 1}", s.guest_mib, accel, s.outdir, fill_mib=s.fill_mib)
              for i in range(s.guests)]
    ksm = dict(KSM_LAB)
    if "advisor_mode" in counters.read_ksm_settings():
        ksm["advisor_mode"] = "none"   # pages_to_scan is refused under the advisor
    t0 = time.monotonic()
    lab = None
    with StopFlag() as stop:
        try:
            rec = Recorder(output, s.interval, None, False)
            say(banner(rec, output, None).replace("Ctrl-C to end", "until the lab is done"))
            try:
                with counters.ksm_settings(ksm):
                    say("KSM on: " + ", ".join(f"{k}={v}" for k, v in ksm.items())
                        + " (restored at the end)")
                    lab = Lab(s, rec, stop, guests, image, qemu, accel, say)
                    try:
                        lab.run()
                    except QMPError as e:
                        raise UserError(str(e)) from e
            finally:
                rec.close()
        finally:
            live = [g for g in guests if g.proc is not None]
            if live:
                say(f"Stopping {len(live)} guests: " + ", ".join(
                    f"{g.name} (pid {g.pid})" for g in live))
            stop_all(guests)
    say(f"Lab done in {time.monotonic() - t0:.0f}s; KSM settings restored, guests stopped.")
    info = {"settings": {"guests": s.guests, "guest_mib": s.guest_mib,
                         "balloon_mib": s.balloon_mib, "fill_mib": s.fill_mib,
                         "interval_s": s.interval},
            "accel": accel, "kernel": image.origin, "initrd": str(image.initrd),
            "guests": {g.name: {"pid": g.pid, **(lab.results.get(g.name, {}) if lab else {})}
                       for g in guests}}
    (s.outdir / "lab.json").write_text(json.dumps(info, indent=2) + "\n")
    return output


def _report(recording: Path, html: Path, say) -> bool:
    """The HTML report of the recording (`overcommit report`)."""
    r = subprocess.run([sys.executable, "-c", "from tracer.cli import main; main()",
                        "report", str(recording), "-o", str(html)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        say(f"(no report: {(r.stderr.strip().splitlines() or ['failed'])[-1]})")
        return False
    return True


@click.group("lab", invoke_without_command=True, subcommand_metavar="[COMMAND [ARGS]...]",
             epilog="""\b
Examples:
  overcommit lab                               # 2 guests of 256 MiB, 64 MiB balloons
  overcommit lab --guests 3 -o /tmp/lab        # three guests
  overcommit lab --guest-mib 512 --balloon-mib 128
  overcommit lab image                         # build (or reuse) the Debian 12 guest
  overcommit lab guest -o guest-out            # the tracer inside that guest
Then:  overcommit summary lab-out/lab.arrow""")
@click.option("--guests", type=click.IntRange(1, 32), default=2, show_default=True,
              help="Number of guests.")
@click.option("--guest-mib", type=click.IntRange(128), default=256, show_default=True,
              help="RAM of each guest (MiB).")
@click.option("--balloon-mib", type=click.IntRange(1), default=64, show_default=True,
              help="How much each balloon inflates (MiB).")
@click.option("--fill-mib", type=click.IntRange(0), default=None,
              help="MiB of identical memory each guest fills [default: guest - balloon - 96].")
@click.option("-o", "--output", "outdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("lab-out"), show_default=True,
              help="Directory for the recording, report, consoles and QMP sockets.")
@click.option("-i", "--interval", type=click.FloatRange(min=0.2), default=1.0,
              show_default=True, help="Seconds per recording interval.")
@accel_option
@click.pass_context
def lab_command(ctx, guests, guest_mib, balloon_mib, fill_mib, outdir, interval, accel):
    """Boot similar guests and watch KSM and balloons overcommit them.

    Without a command: builds a tiny guest (a distribution kernel and a
    busybox initramfs, cached), boots GUESTS of them with QEMU, fills them
    with the same pages, switches host KSM on, records, inflates and deflates
    every balloon through QMP, and leaves the recording (lab.arrow), the
    summary and the report (report.html) in the output directory.  KSM
    settings are restored and all guests stopped at the end, whatever happens.

    `lab image` builds a Debian 12 guest with the tracer in it; `lab guest`
    runs the tracer inside that guest.
    """
    if ctx.invoked_subcommand is not None:
        given = [p.opts[-1] for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)}: options of `lab` itself, "
                                   f"not of `lab {ctx.invoked_subcommand}`")
        return
    from .summary import run as summary
    s = Settings(guests, guest_mib, balloon_mib, fill_mib, outdir, interval, accel)
    say = lambda t: click.echo(t, err=True)
    output = run(s, say)
    click.echo(summary(output, False))
    html = outdir / "report.html"
    made = _report(output, html, say)
    say(f"\nResults in {outdir}/: lab.arrow (overcommit summary {output}), lab.json"
        + (", report.html" if made else "") + ", guest consoles lab-*.console")


lab_command.add_command(image_command)
lab_command.add_command(guest_command)
