"""Loading the BPF programs with bcc and reading what they count.

The only module that imports bcc: everything else (summaries, reports,
parsing) works on machines without it.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import headers, kernel
from .fields import BPF_DIR, kinds

# struct oc_event and struct oc_rare in bpf/overcommit.h
EVENT_DTYPE = np.dtype([("ts_ns", "<u8"), ("pfn", "<u8"), ("tgid", "<u4"),
                        ("kind", "<u2"), ("err", "<i2"), ("pages", "<u4"), ("pad", "<u4")])
RARE_DTYPE = np.dtype([("ts_ns", "<u8"), ("a", "<u8"), ("b", "<i8"), ("tgid", "<u4"),
                       ("kind", "<u4"), ("seq", "<i4"), ("pad", "<u4"), ("comm", "S16")])


class ProbeError(Exception):
    """bcc missing, compile or load failure: one line for the user."""


def import_bcc():
    try:
        import bcc  # noqa: F401  (from the distribution: python3-bpfcc / python3-bcc)
    except ImportError as e:
        raise ProbeError("bcc is not importable: install python3-bpfcc (Debian/Ubuntu) or "
                         "python3-bcc (Fedora) and run overcommit from the environment "
                         "`make` creates") from e
    return bcc


CONCERNS = ("ksm", "balloon", "vmm")


def final_text(defines: dict[str, int]) -> str:
    """The program as compiled (and as --ebpf prints it): the settings, the
    shared header, then one source per concern.  Inlined, not #included: bcc
    rewrites map calls such as `counts.lookup()` only in its main file."""
    lines = [f"#define {k} {_c_literal(v)}" for k, v in defines.items()]
    parts = ["\n".join(lines), (BPF_DIR / "overcommit.h").read_text()]
    for concern in CONCERNS:
        text = (BPF_DIR / f"{concern}.bpf.c").read_text()
        parts.append(text.replace('#include "overcommit.h"', f"/* {concern}.bpf.c */"))
    return "\n".join(parts)


def _c_literal(v: int) -> str:
    return f"{v:#x}ULL" if v > 0x7FFFFFFF else str(v)


def _compile(bcc, defines: dict[str, int], autoload: bool):
    headers.apply()
    cls = bcc.BPF
    if not autoload:
        class _NoAttach(bcc.BPF):
            """Compile, and load only what we ask for: nothing attaches."""
            def _trace_autoload(self):
                pass
        cls = _NoAttach
    try:
        return cls(text=final_text(defines).encode())
    except Exception as e:  # bcc raises bare Exception
        raise ProbeError(f"cannot load the BPF program ({e}); "
                         f"kernel headers: {headers.find().origin}") from e


def function_names(bpf) -> list[str]:
    bcc = import_bcc()
    n = bcc.lib.bpf_num_functions(bpf.module)
    return [bcc.lib.bpf_function_name(bpf.module, i).decode() for i in range(n)]


def verify(plan: kernel.Plan) -> list[str]:
    """Compile a plan's program and load every kprobe function through the
    verifier, attaching nothing.  fentry functions are only compiled: loading
    a tracing program needs a kernel that allows it."""
    bcc = import_bcc()
    bpf = _compile(bcc, plan.defines, autoload=False)
    names = function_names(bpf)
    try:
        for p in plan.kprobes:
            bpf.load_func(p.program.encode(), bcc.BPF.KPROBE)
    finally:
        bpf.cleanup()
    return names


class Tracer:
    """The program, attached: counts per (tgid, kind), streamed events, and
    the guest RAM ranges of VMMs that host-side discards are matched against.

    The events ring buffer (32 MiB by default) holds ~2 s of ksmd merging
    flat out (350k events/s of 40 bytes with the ring buffer's header), so
    writing an interval never makes the kernel side drop events."""

    def __init__(self, plan: kernel.Plan, pids: list[int] | None = None,
                 stream_events: bool = False, ringbuf_pages: int = 8192):
        bcc = import_bcc()
        self.plan = plan
        self.defines = dict(plan.defines, OC_STREAM_EVENTS=int(stream_events),
                            OC_FILTER_PIDS=int(bool(pids)),
                            OC_EVENTS_RINGBUF_PAGES=ringbuf_pages)
        # tracepoints and fentry attach as bcc loads them; kprobes by hand
        self.bpf = _compile(bcc, self.defines, autoload=True)
        try:
            for p in plan.kprobes:
                attach = self.bpf.attach_kretprobe if p.ret else self.bpf.attach_kprobe
                attach(event=p.function.encode(), fn_name=p.program.encode())
        except Exception as e:
            self.bpf.cleanup()
            raise ProbeError(f"cannot attach kprobes ({e})") from e
        if pids:
            flt = self.bpf["pid_filter"]
            for pid in pids:
                flt[flt.Key(pid)] = flt.Leaf(1)
        self.events: list[bytes] = []
        self.rare: list[bytes] = []
        self.bpf["rare"].open_ring_buffer(self._on_rare)
        if stream_events:
            self.bpf["events"].open_ring_buffer(self._on_event)

    # bcc calls these from ring_buffer_poll(); keep them as cheap as possible
    def _on_event(self, ctx, data, size):
        self.events.append(ctypes.string_at(data, size))

    def _on_rare(self, ctx, data, size):
        self.rare.append(ctypes.string_at(data, size))

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """Take what the ring buffers delivered so far."""
        self.bpf.ring_buffer_consume()
        ev = np.frombuffer(b"".join(self.events), dtype=EVENT_DTYPE)
        rare = np.frombuffer(b"".join(self.rare), dtype=RARE_DTYPE)
        self.events, self.rare = [], []
        return ev, rare

    def counts(self) -> dict[tuple[int, str], int]:
        """Cumulative in-kernel counts by (tgid, kind name)."""
        names = kinds()
        table = self.bpf["counts"]   # per CPU
        return {(k.tgid, names.get(k.kind, str(k.kind))): table.sum(k).value
                for k in table.keys()}

    def lost(self) -> dict[str, int]:
        names = kinds()
        return {names[i]: v.value for i, v in enumerate(self.bpf["lost"].values())
                if v.value and i in names}

    def set_guest_ram(self, tgid: int, ranges: list[tuple[int, int]],
                      fds: list[int]) -> None:
        """Tell the kernel side where a VMM's guest RAM is."""
        if not self.defines.get("OC_VMM"):
            return
        n_map, ram, fd_map = (self.bpf[m] for m in ("vmm_ranges", "guest_ram", "guest_ram_fds"))
        for i, (start, end) in enumerate(ranges[:16]):
            ram[ram.Key(tgid, i)] = ram.Leaf(start, end)
        for fd in fds:
            fd_map[fd_map.Key(tgid, fd)] = fd_map.Leaf(1)
        n_map[n_map.Key(tgid)] = n_map.Leaf(min(len(ranges), 16))

    def forget_vmm(self, tgid: int) -> None:
        n_map = self.bpf["vmm_ranges"]
        try:
            del n_map[n_map.Key(tgid)]
        except KeyError:
            pass

    def close(self) -> None:
        self.bpf.cleanup()
