"""QEMU guests as `overcommit lab` and `overcommit lab guest` run them.

One QEMU process per guest (Guest: a subclass says its command line), its
serial console in a file, its QMP socket; stopped by its pid whatever
happens: QMP quit, then SIGTERM, then SIGKILL (stop_all), and killed by the
kernel should the process that started it die (PR_SET_PDEATHSIG).
choose_accel: KVM where the guest boots under it, else TCG, the verdict
cached.  Used by tracer/lab.py (tiny busybox guests) and tracer/guestrun.py
(the Debian 12 image).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from .errors import UserError
from .qmp import QMP, QMPError

QMP_TIMEOUT_S = 10.0
KVM_DEVICE = Path("/dev/kvm")
# Whether KVM boots a guest, by host kernel, guest kernel and QEMU version.
KVM_VERDICTS = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "overcommit" / "kvm-verdicts.json")


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if not path:
        raise UserError("qemu-system-x86_64 not found: apt-get install qemu-system-x86 "
                        "(or dnf install qemu-system-x86)")
    return path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """The kernel kills the guest should its parent be killed (kill -9)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Guest:
    """One QEMU process: its serial console (a file), its QMP socket, its
    pid.  Subclasses add argv(...), the command line, which uses `console`
    and `qmp_arg`."""
    name: str
    mib: int
    accel: str
    dir: Path
    proc: subprocess.Popen | None = None
    qmp: QMP | None = None
    state: str = "not started"
    console_pos: int = 0
    started: float = 0.0
    quit_sent: bool = False
    last_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def console(self) -> Path:
        return self.dir / f"{self.name}.console"

    @property
    def qemu_log(self) -> Path:
        return self.dir / f"{self.name}.qemu.log"

    @property
    def qmp_path(self) -> Path:
        path = self.dir / f"{self.name}.qmp"
        if len(str(path)) < 100:
            return path
        # A UNIX socket's path must fit in 108 bytes (sun_path).
        return Path(tempfile.gettempdir()) / f"overcommit-lab-{os.getpid()}" / path.name

    @property
    def qmp_arg(self) -> str:
        """-qmp's value: QMP served on qmp_path, QEMU not waiting for a client."""
        # (QEMU option syntax: a comma in a value is written twice)
        return f"unix:{str(self.qmp_path).replace(',', ',,')},server=on,wait=off"

    def start(self, argv: list[str]) -> None:
        for p in (self.console, self.qmp_path):
            p.unlink(missing_ok=True)
        self.qmp_path.parent.mkdir(parents=True, exist_ok=True)
        self.console.touch()
        with open(self.qemu_log, "wb") as log:
            # preexec_fn: no threads of our own run while guests start
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,  # Ctrl-C is ours
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

    def check_alive(self) -> None:
        if self.proc and self.proc.poll() is not None:
            log = self.qemu_log.read_text(errors="replace").strip()
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

accel_option = click.option(
    "--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
    help="KVM, TCG, or KVM when the guest boots under it.")


def kvm_key(guest_kernel: str, qemu: str) -> str:
    """What a KVM verdict holds for: this host kernel, guest kernel and QEMU."""
    ver = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                         check=False).stdout
    h = hashlib.sha256(f"{os.uname().release}\0{guest_kernel}\0{ver}".encode())
    return h.hexdigest()[:16]


def choose_accel(want: str, qemu: str, guest_kernel: str, start: Callable[[str], Guest],
                 booted: Callable[[Guest], bool], probe_s: float,
                 say: Callable[[str], None], keep: bool = False) -> tuple[str, Guest | None]:
    """KVM when the guest actually boots under it here, else TCG: the
    accelerator to use (`want` unless "auto") and, with `keep`, the guest
    that booted under KVM, still running (else None).

    /dev/kvm can exist and still not run a stock kernel (nested
    virtualization without the CPU features it needs: the guest hangs before
    its first console line).  The probe is start("kvm"): a guest that is not
    booted() within probe_s does not boot.  The verdict is cached per host
    kernel, guest kernel and QEMU version.  A probe that is not kept costs a
    boot of its own: a cached verdict spares it, and `want` "kvm" is taken
    untried.  A kept probe is the guest itself, and costs nothing: only a
    cached "does not boot" spares it, and `want` "kvm" that does not boot is
    an error rather than a hang.
    """
    if want == "tcg" or (want == "kvm" and not keep):
        return want, None
    auto = want == "auto"
    if auto and not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        say(f"No usable {KVM_DEVICE}: guests run under TCG (emulation).")
        return "tcg", None
    key = kvm_key(guest_kernel, qemu)
    try:
        verdicts = json.loads(KVM_VERDICTS.read_text())
    except (OSError, ValueError):
        verdicts = {}
    known = verdicts.get(key) if auto else None
    if known is not None and not (known["kvm"] and keep):
        ok = known["kvm"]
        say(f"KVM {'boots' if ok else 'does not boot'} this guest here "
            f"(found on {known['at']}, cached in {KVM_VERDICTS}): "
            f"using {'KVM' if ok else 'TCG'}.")
        return ("kvm" if ok else "tcg"), None
    say(f"Trying KVM: does the guest boot under it within {probe_s:g}s?")
    probe, ok = None, False
    try:
        probe = start("kvm")
        end = time.monotonic() + probe_s
        while True:
            exited = probe.proc.poll() is not None
            ok = booted(probe)
            if ok or exited or time.monotonic() > end:
                break
            time.sleep(0.2)
    finally:
        if probe is not None and not (ok and keep):
            probe.stop(quit_timeout=0.5)
            if not keep:   # a probe of its own leaves nothing behind
                probe.console.unlink(missing_ok=True)
                probe.qemu_log.unlink(missing_ok=True)
    if auto:
        verdicts[key] = {"kvm": ok, "at": time.strftime("%Y-%m-%d")}
        try:
            KVM_VERDICTS.parent.mkdir(parents=True, exist_ok=True)
            KVM_VERDICTS.write_text(json.dumps(verdicts, indent=1) + "\n")
        except OSError:
            pass
    if ok:
        say("KVM boots the guest: using KVM.")
        return "kvm", probe if keep else None
    if not auto:
        raise UserError(f"the guest does not boot under KVM within {probe_s:g}s "
                        f"(console {probe.console})")
    say(f"The guest does not boot under KVM here (not booted within {probe_s:g}s): "
        "using TCG (emulation).")
    return "tcg", None
