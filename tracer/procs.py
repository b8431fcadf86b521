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


def vmm_pids(proc: Path = Path("/proc")) -> list[int]:
    """Processes whose command looks like a VMM (by comm, cheap to scan)."""
    out = []
    for d in proc.iterdir():
        if d.name.isdigit():
            comm = _read(d / "comm")
            if comm and comm.decode(errors="replace").startswith(VMMS):
                out.append(int(d.name))
    return out


# Below this, a shared file mapping is the VMM's own business, not guest RAM.
MIN_FILE_RAM = 16 << 20


def guest_ram(pid: int, proc: Path = Path("/proc")) -> tuple[list[tuple[int, int]], list[int]]:
    """Where a VMM keeps guest RAM: address ranges and file descriptors.

    Anonymous guest RAM is what the VMM marked MADV_MERGEABLE (QEMU's default
    mem-merge=on): `mg` in the mapping's VmFlags.  Shared or file-backed RAM
    (memory-backend-memfd/-file) cannot be mergeable; it is a large shared
    mapping of a file the VMM holds open, and balloon discards on it are
    fallocate(PUNCH_HOLE) on that descriptor, by file offset.
    """
    raw = _read(proc / str(pid) / "smaps")
    if raw is None:
        return [], []
    ranges, files = [], set()
    head = None
    for line in raw.decode(errors="replace").splitlines():
        first = line.split(None, 1)[0] if line else ""
        if "-" in first and not first.endswith(":"):
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            head = (start, end, parts[1], parts[5] if len(parts) > 5 else "")
        elif first == "VmFlags:" and head:
            start, end, perms, path = head
            flags = line.split()[1:]
            if "mg" in flags:
                ranges.append((start, end))
            elif perms[3] == "s" and path.startswith("/") and end - start >= MIN_FILE_RAM:
                files.add(path)
    fds = []
    if files:
        for fd in (proc / str(pid) / "fd").iterdir():
            try:
                if str(fd.readlink()) in files:
                    fds.append(int(fd.name))
            except OSError:
                continue
    return sorted(ranges), sorted(fds)
