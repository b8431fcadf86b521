"""Attribution: a tgid to its process name and, for a VMM, its VM's name."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VMMS = ("qemu", "firecracker", "cloud-hypervisor", "crosvm")


@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    vm: str | None     # the VM's name when the process is a VMM


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _option(argv: list[str], *names: str) -> str | None:
    """Value of `--name value`, `--name=value` or `-name value`."""
    for i, arg in enumerate(argv):
        for n in names:
            if arg == n and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(n + "="):
                return arg[len(n) + 1:]
    return None


def vm_name(argv: list[str]) -> str | None:
    """The VM name from a VMM's command line, None for other processes."""
    if not argv:
        return None
    exe = Path(argv[0]).name
    if not any(exe.startswith(v) for v in VMMS):
        return None
    if exe.startswith("qemu"):
        # -name guest=NAME,debug-threads=on   or   -name NAME
        name = _option(argv, "-name", "--name")
        if name:
            for part in name.split(","):
                if part.startswith("guest="):
                    return part[len("guest="):]
            return name.split(",")[0]
    elif exe.startswith("firecracker"):
        name = _option(argv, "--id")
        if name:
            return name
    elif exe.startswith("crosvm"):
        name = _option(argv, "--name", "--socket")
        if name:
            return Path(name).name
    elif exe.startswith("cloud-hypervisor"):
        sock = _option(argv, "--api-socket")
        if sock:
            return Path(sock.split(",")[0].removeprefix("path=")).name
    return None


def identify(pid: int, proc: Path = Path("/proc")) -> Process | None:
    """comm and VM of a live process; None once it is gone."""
    comm = _read(proc / str(pid) / "comm")
    if comm is None:
        return None
    raw = _read(proc / str(pid) / "cmdline") or b""
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    name = comm.decode(errors="replace").rstrip("\n")
    vm = vm_name(argv)
    if vm is None and argv and any(Path(argv[0]).name.startswith(v) for v in VMMS):
        vm = f"{name}-{pid}"   # a VMM without a name: still one VM per process
    return Process(pid, name, vm)


class Registry:
    """Everything known about the processes seen during a recording.

    A process can exit before user space gets to /proc: the kernel side
    captured its comm at ksm_enter, so `learn` takes that as a fallback.
    """

    def __init__(self, proc: Path = Path("/proc")):
        self.proc = proc
        self._known: dict[int, Process] = {}

    def get(self, pid: int) -> Process:
        p = self._known.get(pid)
        if p is None:
            p = identify(pid, self.proc) or Process(pid, "?" if pid else "-", None)
            if pid == 0:
                p = Process(0, "-", None)   # host-wide (stable nodes have no owner)
            self._known[pid] = p
        return p

    def learn(self, pid: int, comm: str) -> Process:
        p = identify(pid, self.proc) or Process(pid, comm, None)
        self._known[pid] = p
        return p

    def __contains__(self, pid: int) -> bool:
        return pid in self._known
