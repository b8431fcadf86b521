"""Loading the BPF programs with bcc and reading what they count.

The only module that imports bcc: everything else (summaries, reports,
parsing) works on machines without it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np

from . import headers, kernel
from .fields import BPF_DIR, kinds

# struct oc_event and struct oc_rare in bpf/overcommit.h
EVENT_DTYPE = np.dtype([("ts_ns", "<u8"), ("pfn", "<u8"), ("tgid", "<u4"),
                        ("kind", "<u2"), ("err", "<i2")])
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


def source(concern: str) -> Path:
    return BPF_DIR / f"{concern}.bpf.c"


def final_text(concern: str, defines: dict[str, int]) -> str:
    """The program as compiled (and as --ebpf prints it): the settings, then
    the source with the shared header inlined.  Inlined, not #included: bcc
    rewrites map calls such as `counts.lookup()` only in its main file."""
    lines = [f"#define {k} {_c_literal(v)}" for k, v in defines.items()]
    header = (BPF_DIR / "overcommit.h").read_text()
    body = source(concern).read_text().replace('#include "overcommit.h"', header)
    return "\n".join(lines) + "\n" + body


def _c_literal(v: int) -> str:
    return f"{v:#x}ULL" if v > 0x7FFFFFFF else str(v)


def _compile(bcc, concern: str, defines: dict[str, int], autoload: bool):
    headers.apply()
    cls = bcc.BPF
    if not autoload:
        class _NoAttach(bcc.BPF):
            """Compile, and load only what we ask for: nothing attaches."""
            def _trace_autoload(self):
                pass
        cls = _NoAttach
    try:
        return cls(text=final_text(concern, defines).encode())
    except Exception as e:  # bcc raises bare Exception
        raise ProbeError(f"cannot compile bpf/{concern}.bpf.c ({e}); "
                         f"kernel headers: {headers.find().origin}") from e


def function_names(bpf) -> list[str]:
    bcc = import_bcc()
    n = bcc.lib.bpf_num_functions(bpf.module)
    return [bcc.lib.bpf_function_name(bpf.module, i).decode() for i in range(n)]


def verify(concern: str, defines: dict[str, int], prog_type: str) -> list[str]:
    """Compile and, for kprobe programs, load every function through the
    verifier without attaching.  prog_type "fentry" only compiles: loading a
    tracing program needs the target's BTF id and a kernel that allows it."""
    bcc = import_bcc()
    bpf = _compile(bcc, concern, defines, autoload=False)
    names = function_names(bpf)
    try:
        if prog_type == kernel.KPROBE:
            for name in names:
                bpf.load_func(name, bcc.BPF.KPROBE)
    finally:
        bpf.cleanup()
    return names


def fentry_probe() -> tuple[bool, str]:
    """Does this kernel load BPF tracing (fentry) programs? Try one."""
    try:
        bcc = import_bcc()
    except ProbeError as e:
        return False, str(e)
    if not bcc.BPF.support_kfunc():
        return False, "bcc reports no kfunc/fentry support on this kernel"
    headers.apply()
    try:
        class _NoAttach(bcc.BPF):
            def _trace_autoload(self):
                pass
        with quiet_stderr():  # libbcc prints the verifier's refusal itself
            b = _NoAttach(text=b"KFUNC_PROBE(do_nanosleep, u64 t) { return 0; }")
            b.load_func(b"kfunc__do_nanosleep", bcc.BPF.TRACING)
        b.cleanup()
        return True, "a tracing program loaded"
    except Exception:
        if not is_root():
            return False, "probing needs root"
        return False, "the kernel refuses to load BPF tracing (fentry) programs"


class KsmProbe:
    """The KSM program, attached: counts per (tgid, kind), streams events."""

    def __init__(self, mode: str, pids: list[int] | None = None, stream_events: bool = False,
                 ringbuf_pages: int = 16384):
        bcc = import_bcc()
        self.mode = mode
        defines = kernel.ksm_defines(mode)
        defines["OC_STREAM_EVENTS"] = int(stream_events)
        defines["OC_FILTER_PIDS"] = int(bool(pids))
        defines["OC_EVENTS_RINGBUF_PAGES"] = ringbuf_pages
        self.defines = defines
        self.bpf = _compile(bcc, "ksm", defines, autoload=(mode == kernel.TRACEPOINT))
        if pids:
            flt = self.bpf["pid_filter"]
            for pid in pids:
                flt[flt.Key(pid)] = flt.Leaf(1)
        if mode == kernel.KPROBE:
            self._attach_kprobes(bcc)
        elif mode == kernel.FENTRY:
            for name in function_names(self.bpf):
                fn = name.encode()
                if name.startswith("kretfunc__"):
                    self.bpf.attach_kretfunc(fn_name=fn)
                elif name.startswith("kfunc__") and kernel.symbol(name[len("kfunc__"):]):
                    self.bpf.attach_kfunc(fn_name=fn)
        self.events: list[bytes] = []
        self.rare: list[bytes] = []
        self.bpf["rare"].open_ring_buffer(self._on_rare)
        if stream_events:
            self.bpf["events"].open_ring_buffer(self._on_event)

    def _attach_kprobes(self, bcc):
        b = self.bpf
        b.attach_kprobe(event=b"try_to_merge_one_page", fn_name=b"oc_try_to_merge_one_page")
        b.attach_kretprobe(event=b"try_to_merge_one_page",
                           fn_name=b"oc_try_to_merge_one_page_ret")
        if kernel.symbol("remove_rmap_item_from_tree"):
            b.attach_kprobe(event=b"remove_rmap_item_from_tree",
                            fn_name=b"oc_remove_rmap_item_from_tree")
        if kernel.symbol("break_ksm"):
            b.attach_kprobe(event=b"break_ksm", fn_name=b"oc_break_ksm_entry")

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
        return {(k.tgid, names.get(k.kind, str(k.kind))): v.value
                for k, v in self.bpf["counts"].items()}

    def lost(self) -> dict[str, int]:
        names = kinds()
        return {names[i]: v.value for i, v in enumerate(self.bpf["lost"].values())
                if v.value and i in names}

    def close(self) -> None:
        self.bpf.cleanup()


@contextlib.contextmanager
def quiet_stderr():
    """Silence what libbcc writes to fd 2 (not Python's sys.stderr)."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def is_root() -> bool:
    return os.geteuid() == 0
