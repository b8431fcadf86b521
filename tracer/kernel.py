"""What the running kernel offers, and the attach mode chosen for each event.

Every choice is a fallback chain (tracepoint, fentry, kprobe, counters) with
the reason recorded, so `doctor` and the recording can say why.  Nothing
here imports bcc.
"""
from __future__ import annotations

import ctypes
import errno
import gzip
import os
import struct
import platform
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from .btf import VMLINUX, Btf, BtfError

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
KALLSYMS = Path("/proc/kallsyms")

TRACEPOINT, FENTRY, KPROBE, COUNTERS = "tracepoint", "fentry", "kprobe", "counters"


class KernelError(Exception):
    """The kernel lacks something we need: one line with the fix."""


def release() -> str:
    return platform.release()


def version() -> tuple[int, int]:
    major, minor = release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def tracefs(mount: bool = False) -> Path | None:
    """The tracefs mount; with mount=True, mount it where it belongs if absent."""
    for p in TRACEFS_CANDIDATES:
        if (p / "events").is_dir():
            return p
    if mount and os.geteuid() == 0:
        # bcc reads tracepoint formats and attaches through tracefs; a host
        # without it mounted (containers, minimal VMs) only needs the mount.
        r = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS_CANDIDATES[0])],
                           capture_output=True)
        if r.returncode == 0 and (TRACEFS_CANDIDATES[0] / "events").is_dir():
            return TRACEFS_CANDIDATES[0]
    return None


def tracepoint_exists(category: str, event: str) -> bool:
    fs = tracefs()
    return fs is not None and (fs / "events" / category / event / "format").exists()


@lru_cache(maxsize=1)
def kallsyms() -> dict[str, int]:
    """Function and object symbols of vmlinux (not modules' ones) by name."""
    out: dict[str, int] = {}
    try:
        with open(KALLSYMS) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    out.setdefault(parts[2], int(parts[0], 16))
    except OSError:
        pass
    return out


def symbol(name: str) -> bool:
    """A symbol exists, i.e. the function was not inlined away."""
    return name in kallsyms()


@lru_cache(maxsize=1)
def kconfig() -> dict[str, str]:
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release()}")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_"):
                k, _, v = line.partition("=")
                out[k] = v
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                out[line[2:-11]] = "n"
        return out
    return {}


def kprobes() -> tuple[bool, str]:
    """Can kprobes attach? bcc uses the kprobe PMU, else tracefs kprobe_events."""
    if KPROBE_PMU.exists():
        return True, "kprobe PMU present"
    fs = tracefs()
    if fs and (fs / "kprobe_events").exists():
        return True, "tracefs kprobe_events present"
    if kconfig().get("CONFIG_KPROBES") == "n":
        return False, "kernel built without CONFIG_KPROBES"
    return False, "no kprobe PMU and no kprobe_events in tracefs"


@lru_cache(maxsize=1)
def btf() -> Btf | None:
    try:
        return Btf.load(VMLINUX)
    except BtfError:
        return None


@dataclass
class Attach:
    """How one event is traced, and why."""
    event: str
    mode: str          # tracepoint | fentry | kprobe | counters
    hook: str          # what is attached to (or the counter read)
    why: str

    def as_dict(self):
        return asdict(self)


@dataclass
class Capabilities:
    kernel: str
    tracefs: str | None
    btf: bool
    kprobes: tuple[bool, str]
    fentry: tuple[bool, str]


# bpf(2) as used by fentry_loads(): see include/uapi/linux/bpf.h
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_LOAD, _BPF_PROG_TYPE_TRACING, _BPF_TRACE_FENTRY = 5, 26, 24


def fentry_loads() -> tuple[bool, str]:
    """Load the smallest fentry program there is (r0 = 0; exit) on a BTF
    function, straight through bpf(2): the only sure way to know whether this
    kernel takes BPF tracing programs (BPF trampolines, CONFIG_DYNAMIC_FTRACE
    with direct calls, not locked down)."""
    b = btf()
    if b is None:
        return False, f"no kernel BTF ({VMLINUX}); CONFIG_DEBUG_INFO_BTF=y is needed"
    target = b.func_id("do_nanosleep")
    if target is None or _SYS_BPF is None:
        return False, "cannot probe on this architecture"
    insns = ctypes.create_string_buffer(
        struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0))
    license = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, _BPF_PROG_TYPE_TRACING, 2,
                     ctypes.addressof(insns), ctypes.addressof(license))
    struct.pack_into("<I", attr, 68, _BPF_TRACE_FENTRY)      # expected_attach_type
    struct.pack_into("<I", attr, 108, target)                 # attach_btf_id
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True, "the kernel loads BPF tracing (fentry) programs"
    err = ctypes.get_errno()
    if err == errno.EPERM and os.geteuid() != 0:
        return False, "probing needs root"
    return False, (f"the kernel refuses BPF tracing (fentry) programs "
                   f"({errno.errorcode.get(err, err)})")


ATTACH_ENV = "OVERCOMMIT_ATTACH"


def capabilities() -> Capabilities:
    """What this kernel offers.  OVERCOMMIT_ATTACH=kprobe (or fentry) leaves
    the other function-hook mechanism out, to run a given variant for real
    where the kernel offers both."""
    fs = tracefs(mount=True)
    kp, fe = kprobes(), fentry_loads()
    forced = os.environ.get(ATTACH_ENV)
    if forced == KPROBE and fe[0]:
        fe = (False, f"left out ({ATTACH_ENV}=kprobe)")
    elif forced == FENTRY and kp[0]:
        kp = (False, f"left out ({ATTACH_ENV}=fentry)")
    return Capabilities(release(), str(fs) if fs else None, btf() is not None, kp, fe)


def _fn_hookable(cap: Capabilities, fn: str) -> tuple[str, str] | None:
    """fentry, else kprobe, for one kernel function; None if neither."""
    b = btf()
    if not symbol(fn):
        return None
    if cap.fentry[0] and b is not None and b.has_func(fn):
        return FENTRY, f"BPF trampolines work and {fn} has BTF"
    if cap.kprobes[0]:
        return KPROBE, f"{fn} is in kallsyms and kprobes attach ({cap.kprobes[1]})"
    return None


def _no_hook(cap: Capabilities, fn: str) -> str:
    if not symbol(fn):
        return f"{fn} is not in kallsyms (inlined or not built)"
    return f"kprobes: {cap.kprobes[1]}; fentry: {cap.fentry[1]}"


@dataclass
class Probe:
    """One kprobe/kretprobe to attach by hand (tracepoints and fentry attach
    themselves when bcc loads the program)."""
    function: str
    program: str
    ret: bool = False


@dataclass
class Plan:
    """Per concern, the variant compiled in; per event, how it is traced."""
    modes: dict[str, str]
    attach: list[Attach]
    kprobes: list[Probe]
    defines: dict[str, int]


def _ksm(cap: Capabilities, plan: Plan) -> None:
    if tracepoint_exists("ksm", "ksm_merge_with_ksm_page"):
        why = "KSM tracepoints exist (Linux 6.4+)"
        plan.modes["ksm"] = TRACEPOINT
        plan.attach += [
            Attach("merges", TRACEPOINT, "ksm:ksm_merge_with_ksm_page", why),
            Attach("zero_page_merges", TRACEPOINT, "ksm:ksm_merge_one_page", why),
            Attach("unmerges", TRACEPOINT, "ksm:ksm_remove_rmap_item, ksm:ksm_remove_ksm_page",
                   why + "; COW breaks are seen lazily, through ksm_merging_pages"),
            Attach("scan_passes", TRACEPOINT, "ksm:ksm_start_scan, ksm:ksm_stop_scan", why),
            Attach("ksm_enter_exit", TRACEPOINT, "ksm:ksm_enter, ksm:ksm_exit", why),
        ]
        advisor = tracepoint_exists("ksm", "ksm_advisor")
        plan.defines["OC_HAVE_KSM_ADVISOR"] = int(advisor)
        plan.attach.append(
            Attach("advisor", TRACEPOINT, "ksm:ksm_advisor", "ksm_advisor tracepoint (6.8+)")
            if advisor else
            Attach("advisor", COUNTERS, "-", "no ksm_advisor tracepoint (before 6.8)"))
        return
    merge = _fn_hookable(cap, "try_to_merge_one_page")
    if merge is None:
        why = ("no KSM tracepoints (before Linux 6.4) and try_to_merge_one_page cannot be "
               "hooked: " + _no_hook(cap, "try_to_merge_one_page"))
        plan.modes["ksm"] = COUNTERS
        plan.attach += [
            Attach("merges", COUNTERS, "/proc/PID/ksm_merging_pages", why),
            Attach("scan_passes", COUNTERS, "/sys/kernel/mm/ksm/full_scans", why),
        ]
        return
    mode, why = merge
    plan.modes["ksm"] = mode
    plan.attach.append(Attach("merges", mode, "try_to_merge_one_page",
                              "no KSM tracepoints (before Linux 6.4); " + why))
    if mode == KPROBE:
        plan.kprobes += [Probe("try_to_merge_one_page", "oc_try_to_merge_one_page"),
                         Probe("try_to_merge_one_page", "oc_try_to_merge_one_page_ret", True)]
    for fn, event in (("remove_rmap_item_from_tree", "unmerges"), ("break_ksm", "break_ksm")):
        hook = _fn_hookable(cap, fn)
        ok = hook is not None and hook[0] == mode
        plan.defines[f"OC_HOOK_{fn.upper()}"] = int(ok)
        if ok:
            plan.attach.append(Attach(event, mode, fn, hook[1]))
            if mode == KPROBE:
                plan.kprobes.append(Probe(fn, f"oc_{fn}"))
        else:
            plan.attach.append(Attach(event, COUNTERS, "/proc/PID/ksm_merging_pages",
                                      _no_hook(cap, fn)))
    plan.attach += [
        Attach("scan_passes", COUNTERS, "/sys/kernel/mm/ksm/full_scans",
               "ksm_do_scan() is inlined on distribution kernels"),
        Attach("ksm_enter_exit", COUNTERS, "/proc/PID/ksm_stat",
               "no ksm_enter/ksm_exit tracepoints; processes found by polling"),
    ]


def _balloon(cap: Capabilities, plan: Plan) -> None:
    """Guest side: the balloon core has no tracepoints."""
    enqueue = _fn_hookable(cap, "balloon_page_enqueue")
    if enqueue is None:
        plan.modes["balloon"] = COUNTERS
        plan.attach.append(Attach(
            "balloon", COUNTERS, "/proc/vmstat balloon_inflate, balloon_deflate",
            "no balloon tracepoints and balloon_page_enqueue cannot be hooked: "
            + _no_hook(cap, "balloon_page_enqueue")))
        return
    mode, why = enqueue
    plan.modes["balloon"] = mode
    has_list = {fn: symbol(fn) for fn in ("balloon_page_list_enqueue",
                                          "balloon_page_list_dequeue")}
    for fn, ok in has_list.items():
        plan.defines[f"OC_HOOK_{fn.upper()}"] = int(ok)
    dequeue = ("balloon_page_list_dequeue" if has_list["balloon_page_list_dequeue"]
               else "balloon_page_dequeue")
    plan.attach += [
        Attach("balloon_inflate", mode, "balloon_page_enqueue"
               + (", balloon_page_list_enqueue" if has_list["balloon_page_list_enqueue"] else ""),
               why),
        Attach("balloon_deflate", mode, dequeue,
               "each dequeued page counted once, by the return value"),
    ]
    if mode == KPROBE:
        plan.kprobes.append(Probe("balloon_page_enqueue", "oc_balloon_page_enqueue"))
        if has_list["balloon_page_list_enqueue"]:
            plan.kprobes.append(Probe("balloon_page_list_enqueue",
                                      "oc_balloon_page_list_enqueue_ret", True))
        plan.kprobes.append(Probe(dequeue, f"oc_{dequeue}_ret", True))


def _vmm(cap: Capabilities, plan: Plan) -> None:
    """Host side: the VMM's madvise/fallocate on guest RAM."""
    if tracepoint_exists("syscalls", "sys_enter_madvise"):
        plan.modes["vmm"] = TRACEPOINT
        plan.attach.append(Attach(
            "host_discards", TRACEPOINT,
            "syscalls:sys_{enter,exit}_{madvise,fallocate}",
            "syscall tracepoints; only ranges inside a VMM's guest RAM count"))
    else:
        plan.modes["vmm"] = COUNTERS
        plan.attach.append(Attach("host_discards", COUNTERS, "-",
                                  "no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"))


def plan(cap: Capabilities) -> Plan:
    p = Plan({}, [], [], {})
    _ksm(cap, p)
    _balloon(cap, p)
    _vmm(cap, p)
    p.defines.update(_defines(p))
    return p


def _defines(p: Plan) -> dict[str, int]:
    """The constants the program is compiled with (see bpf/overcommit.h)."""
    b = btf()
    if b is None:
        raise KernelError(f"no kernel BTF at {VMLINUX}: attribution needs struct offsets "
                          "(CONFIG_DEBUG_INFO_BTF=y)")
    ksm, balloon = p.modes["ksm"], p.modes["balloon"]
    d = {
        "OC_KSM_TRACEPOINT": int(ksm == TRACEPOINT),
        "OC_KSM_KPROBE": int(ksm == KPROBE),
        "OC_KSM_FENTRY": int(ksm == FENTRY),
        "OC_BALLOON_KPROBE": int(balloon == KPROBE),
        "OC_BALLOON_FENTRY": int(balloon == FENTRY),
        "OC_VMM": int(p.modes["vmm"] == TRACEPOINT),
        "OC_TASK_TGID_OFFSET": b.offsetof("task_struct", "tgid"),
        "OC_TASK_MM_OFFSET": b.offsetof("task_struct", "mm"),
        "OC_MM_OWNER_OFFSET": _or(b.offsetof("mm_struct", "owner"), -1),  # CONFIG_MEMCG
        "OC_VMA_MM_OFFSET": b.offsetof("vm_area_struct", "vm_mm"),
        "OC_STRUCT_PAGE_SIZE": b.sizeof("page"),
        # x86_64 VMEMMAP_START without CONFIG_RANDOMIZE_MEMORY
        "OC_VMEMMAP_BASE": 0xFFFFEA0000000000,
        "OC_VMEMMAP_BASE_SYM": kallsyms().get("vmemmap_base", 0),
    }
    # struct rmap_item became struct ksm_rmap_item in 6.4
    rmap = "ksm_rmap_item" if b.has_struct("ksm_rmap_item") else "rmap_item"
    d["OC_RMAP_ITEM_MM_OFFSET"] = _or(b.offsetof(rmap, "mm"), 0)
    d["OC_RMAP_ITEM_ADDRESS_OFFSET"] = _or(b.offsetof(rmap, "address"), 0)
    return d


def _or(value, default):
    return default if value is None else value


HOOKS = ("remove_rmap_item_from_tree", "break_ksm", "balloon_page_list_enqueue",
         "balloon_page_list_dequeue")


def variant(ksm: str, balloon: str, vmm: str = TRACEPOINT) -> Plan:
    """A plan forced to given variants, every optional hook compiled in: for
    checking variants this kernel would not choose (compile, verifier)."""
    p = Plan({"ksm": ksm, "balloon": balloon, "vmm": vmm}, [], [],
             {f"OC_HOOK_{fn.upper()}": 1 for fn in HOOKS})
    p.defines["OC_HAVE_KSM_ADVISOR"] = 0
    p.defines.update(_defines(p))
    return p
