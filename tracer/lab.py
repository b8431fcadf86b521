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
then SIGKILL, by pid; and the kernel kills them should this process die),
and every KSM setting changed is restored, also on Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from . import counters, guest, procs
from .errors import UserError
from .qmp import QMP, QMPCommandError, QMPError

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
QMP_TIMEOUT_S = 10.0
HOLD_S = 5.0            # intervals recorded with the balloons inflated, and at the end


class Interrupted(UserError):
    def __init__(self):
        super().__init__("lab interrupted: guests stopped, KSM settings restored", 130)


class LabTimeout(UserError):
    """A phase did not finish in time."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """The kernel kills the guest should the lab itself be killed (kill -9)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if not path:
        raise UserError("qemu-system-x86_64 not found: apt-get install qemu-system-x86 "
                        "(or dnf install qemu-system-x86)")
    return path


@dataclass
class Guest:
    """One QEMU process, named lab-N, and what the lab knows about it."""
    name: str
    mib: int
    fill_mib: int
    accel: str
    dir: Path
    proc: subprocess.Popen | None = None
    qmp: QMP | None = None
    state: str = "not started"
    console_pos: int = 0
    started: float = 0.0
    quit_sent: bool = False
    comm: str = "qemu-system-x86"
    target: int = 0           # balloon target (bytes of guest RAM)
    actual: int = 0           # last query-balloon
    last_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def console(self) -> Path:
        return self.dir / f"{self.name}.console"

    @property
    def qmp_path(self) -> Path:
        path = self.dir / f"{self.name}.qmp"
        if len(str(path)) < 100:
            return path
        # A UNIX socket's path must fit in 108 bytes (sun_path).
        return Path(tempfile.gettempdir()) / f"overcommit-lab-{os.getpid()}" / path.name

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
            # (QEMU option syntax: a comma in a value is written twice)
            "-qmp", f"unix:{str(self.qmp_path).replace(',', ',,')},server=on,wait=off",
            "-no-reboot",
        ]

    def start(self, image: guest.Image, qemu: str) -> None:
        for p in (self.console, self.qmp_path):
            p.unlink(missing_ok=True)
        self.qmp_path.parent.mkdir(parents=True, exist_ok=True)
        self.console.touch()
        with open(self.dir / f"{self.name}.qemu.log", "wb") as log:
            # preexec_fn: the lab runs no threads of its own while starting guests
            self.proc = subprocess.Popen(self.argv(image, qemu), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,  # Ctrl-C is the lab's
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.started = time.monotonic()
        self.state = "starting"

    def new_lines(self) -> list[str]:
        """Serial console lines since the last call."""
        try:
            with open(self.console, "rb") as f:
                f.seek(self.console_pos)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.console_pos += end
        lines = data[:end].decode(errors="replace").splitlines()
        self.last_lines = (self.last_lines + lines)[-8:]
        return lines

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

    def check_alive(self) -> None:
        if self.proc and self.proc.poll() is not None:
            log = (self.dir / f"{self.name}.qemu.log").read_text(errors="replace").strip()
            raise UserError(f"{self.name}: QEMU exited with status {self.proc.returncode}"
                            + (f": {log.splitlines()[-1]}" if log else "")
                            + f" (console: {self.console})")

    def connect(self) -> QMP:
        if self.qmp is None:
            self.qmp = QMP(self.qmp_path, QMP_TIMEOUT_S, name=self.name)
        return self.qmp

    def request_quit(self, timeout: float = 2.0) -> None:
        """Ask QEMU to quit (QMP), without waiting for it to exit."""
        if self.proc is None or self.proc.poll() is not None or self.qmp is None \
                or self.quit_sent:
            return
        self.quit_sent = True
        try:
            self.qmp.execute("quit", timeout=timeout)
        except QMPError:
            pass   # hung, or gone while answering: stop() sends signals

    def stop(self, quit_timeout: float = 2.0, term_timeout: float = 5.0) -> int | None:
        """Stop QEMU by its pid: QMP quit, then SIGTERM, then SIGKILL."""
        stop_all([self], quit_timeout, term_timeout)
        return self.proc.returncode if self.proc else None


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def stop_all(guests: list[Guest], quit_timeout: float = 2.0, term_timeout: float = 5.0) -> None:
    """Stop every guest by its pid, all at once: QMP quit, then SIGTERM, then
    SIGKILL for those still there.  A hung guest neither keeps the others
    running nor makes them wait in turn."""
    started = [g for g in guests if g.proc is not None]
    for g in started:
        g.request_quit(quit_timeout)
    if any(g.quit_sent for g in started):
        _wait_all([g.proc for g in started], quit_timeout)
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, 30.0)):
        alive = [g.proc for g in started if g.proc.poll() is None]
        for p in alive:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
        _wait_all(alive, timeout)
    for g in started:
        if g.qmp is not None:
            g.qmp.close()
            g.qmp = None
        g.state = "stopped"
        g.qmp_path.unlink(missing_ok=True)
        if g.qmp_path.parent != g.dir:
            try:
                g.qmp_path.parent.rmdir()
            except OSError:
                pass   # another guest's socket is still there


# -- KVM or TCG ---------------------------------------------------------------

def _kvm_cache_key(image: guest.Image, qemu: str) -> str:
    ver = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                         check=False).stdout
    h = hashlib.sha256(f"{os.uname().release}\0{image.origin}\0{ver}".encode())
    return h.hexdigest()[:16]


def choose_accel(image: guest.Image, qemu: str, workdir: Path, say: Callable[[str], None],
                 want: str = "auto") -> str:
    """KVM when a guest actually boots under it here, else TCG.

    /dev/kvm can exist and still not run a stock kernel (nested
    virtualization without the CPU features it needs: the guest hangs before
    its first console line).  A guest that prints nothing within
    KVM_PROBE_S does not boot; the verdict is cached per host kernel, guest
    kernel and QEMU version.
    """
    if want != "auto":
        return want
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        say("No usable /dev/kvm: guests run under TCG (emulation).")
        return "tcg"
    cache = guest.CACHE / "kvm-verdicts.json"
    key = _kvm_cache_key(image, qemu)
    try:
        verdicts = json.loads(cache.read_text())
    except (OSError, ValueError):
        verdicts = {}
    if key in verdicts:
        ok = verdicts[key]["kvm"]
        say(f"KVM {'boots' if ok else 'does not boot'} this guest here "
            f"(found on {verdicts[key]['at']}, cached in {cache}): using {'KVM' if ok else 'TCG'}.")
        return "kvm" if ok else "tcg"
    say(f"Trying KVM: does a guest boot under it within {KVM_PROBE_S:g}s?")
    probe = Guest("lab-kvm-probe", 128, 0, "kvm", workdir)
    try:
        probe.start(image, qemu)
        deadline = time.monotonic() + KVM_PROBE_S
        ok = False
        while time.monotonic() < deadline and probe.proc.poll() is None:
            probe.new_lines()
            if any(line.startswith(guest.MARKER) for line in probe.last_lines):
                ok = True
                break
            time.sleep(0.2)
    finally:
        probe.stop(quit_timeout=0.5)
        for suffix in (".console", ".qemu.log"):
            (workdir / f"lab-kvm-probe{suffix}").unlink(missing_ok=True)
    say("KVM boots the guest: using KVM." if ok else
        f"The guest does not boot under KVM here (no init within {KVM_PROBE_S:g}s): "
        "using TCG (emulation).")
    verdicts[key] = {"kvm": ok, "at": time.strftime("%Y-%m-%d")}
    try:
        cache.write_text(json.dumps(verdicts, indent=1))
    except OSError:
        pass
    return "kvm" if ok else "tcg"


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
    def __init__(self, s: Settings, rec, stop, guests: list[Guest], image: guest.Image,
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
            g.start(self.image, self.qemu)
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
    accel = choose_accel(image, qemu, s.outdir, say, s.accel)
    from .record import Recorder, StopFlag, banner
    output = s.outdir / "lab.arrow"
    guests = [Guest(f"lab-{i + 1}", s.guest_mib, s.fill_mib, accel, s.outdir)
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
    """The HTML report, if this installation has the `report` command."""
    from . import cli
    try:   # the reports package is optional (and its command imported lazily)
        if cli.main.get_command(click.Context(cli.main), "report") is None:
            return False
    except ImportError:
        return False
    r = subprocess.run([sys.executable, "-c", "from tracer.cli import main; main()",
                        "report", str(recording), "-o", str(html)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        say(f"(no report: {(r.stderr.strip().splitlines() or ['failed'])[-1]})")
        return False
    return True


@click.command("lab", epilog="""\b
Examples:
  overcommit lab                               # 2 guests of 256 MiB, 64 MiB balloons
  overcommit lab --guests 3 -o /tmp/lab        # three guests
  overcommit lab --guest-mib 512 --balloon-mib 128
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
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True, help="KVM, TCG, or KVM when a guest boots under it.")
def lab_command(guests, guest_mib, balloon_mib, fill_mib, outdir, interval, accel):
    """Boot similar guests and watch KSM and balloons overcommit them.

    Builds a tiny guest (a distribution kernel and a busybox initramfs,
    cached), boots GUESTS of them with QEMU, fills them with the same pages,
    switches host KSM on, records, inflates and deflates every balloon through
    QMP, and leaves the recording (lab.arrow), the summary and, where the
    report command exists, report.html in the output directory.  KSM
    settings are restored and all guests stopped at the end, whatever happens.
    """
    from .summary import run as summary
    s = Settings(guests, guest_mib, balloon_mib, fill_mib, outdir, interval, accel)
    say = lambda t: click.echo(t, err=True)
    output = run(s, say)
    click.echo(summary(output, False))
    html = outdir / "report.html"
    made = _report(output, html, say)
    say(f"\nResults in {outdir}/: lab.arrow (overcommit summary {output}), lab.json"
        + (", report.html" if made else "") + ", guest consoles lab-*.console")
