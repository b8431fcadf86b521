"""`overcommit doctor`: what this host offers, and the one fix for each gap."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from . import counters, headers, kernel


def _bcc() -> dict:
    from . import probes
    try:
        bcc = probes.import_bcc()
    except probes.ProbeError as e:
        return {"ok": False, "version": None, "fix": str(e)}
    return {"ok": True, "version": getattr(bcc, "__version__", "?"), "fix": None}


def _balloon() -> dict:
    drivers = Path("/sys/bus/virtio/drivers/virtio_balloon")
    vmstat = counters.read_vmstat()
    return {
        "driver_loaded": drivers.is_dir(),
        "vmstat_counters": sorted(k for k in vmstat if "balloon" in k),
        "note": ("guest balloon driver present" if drivers.is_dir() else
                 "no virtio_balloon driver: this is a host (or a guest without a balloon)"),
    }


def check() -> dict:
    root = os.geteuid() == 0
    bcc = _bcc()
    cap = kernel.capabilities()
    hdrs = headers.find()
    try:
        now = counters.read_ksm()
        ksm = {"available": True, "settings": counters.read_ksm_settings(),
               "pages_shared": now["pages_shared"], "pages_sharing": now["pages_sharing"]}
    except counters.KsmUnavailable as e:
        ksm = {"available": False, "fix": str(e)}
    plan = kernel.plan(cap) if cap.btf else None
    problems = []
    if not root:
        problems.append({"what": "not root", "fix": "run as root (sudo overcommit ...)"})
    if not bcc["ok"]:
        problems.append({"what": "bcc missing", "fix": bcc["fix"]})
    if cap.tracefs is None:
        problems.append({"what": "tracefs not mounted",
                         "fix": "mount -t tracefs nodev /sys/kernel/tracing"})
    if hdrs.origin == "none found":
        problems.append({"what": "no kernel headers for bcc", "fix": headers.INSTALL_HINT})
    if kernel.version() < (5, 8):
        problems.append({"what": "no BPF ring buffer (Linux 5.8+): events cannot be streamed",
                         "fix": "a kernel of 5.8 or later"})
    if not cap.btf:
        problems.append({"what": "no kernel BTF", "fix": "a kernel with CONFIG_DEBUG_INFO_BTF=y"})
    if not ksm["available"]:
        problems.append({"what": "no KSM", "fix": ksm["fix"]})
    notes = []
    if ksm["available"] and ksm["settings"].get("run") != 1:
        notes.append({"what": "ksmd is not running (nothing will merge)",
                      "fix": "echo 1 > /sys/kernel/mm/ksm/run"})
    return {
        "root": root,
        "kernel": cap.kernel,
        "bcc": bcc,
        "headers": hdrs.origin,
        "tracefs": cap.tracefs,
        "btf": cap.btf,
        "mechanisms": {
            "tracepoints": {"ok": cap.tracefs is not None, "why": cap.tracefs or "no tracefs"},
            "kprobes": {"ok": cap.kprobes[0], "why": cap.kprobes[1]},
            "fentry": {"ok": cap.fentry[0], "why": cap.fentry[1]},
        },
        "ksm": ksm,
        "variants": plan.modes if plan else {},
        "balloon": _balloon(),
        "events": [a.as_dict() for a in plan.attach] if plan else [],
        "problems": problems,
        "notes": notes,
    }


def render(d: dict) -> str:
    yes = lambda ok: "yes" if ok else "NO "  # noqa: E731
    m = d["mechanisms"]
    lines = [
        f"kernel      {d['kernel']}",
        f"root        {yes(d['root'])}",
        f"bcc         {d['bcc']['version'] or 'missing'}",
        f"headers     {d['headers']}",
        f"tracefs     {d['tracefs'] or 'not mounted'}",
        f"BTF         {yes(d['btf'])}",
        f"tracepoints {yes(m['tracepoints']['ok'])} {m['tracepoints']['why']}",
        f"kprobes     {yes(m['kprobes']['ok'])} {m['kprobes']['why']}",
        f"fentry      {yes(m['fentry']['ok'])} {m['fentry']['why']}",
    ]
    k = d["ksm"]
    if k["available"]:
        s = k["settings"]
        lines.append(f"KSM         run={s.get('run')} pages_to_scan={s.get('pages_to_scan')} "
                     f"sleep_millisecs={s.get('sleep_millisecs')} pages_shared="
                     f"{k['pages_shared']} pages_sharing={k['pages_sharing']}")
    else:
        lines.append("KSM         NO")
    lines.append(f"balloon     {d['balloon']['note']}")
    lines.append("")
    lines.append(f"{'EVENT':<16} {'MODE':<11} HOOK (and why)")
    for e in d["events"]:
        lines.append(f"{e['event']:<16} {e['mode']:<11} {e['hook']}")
        lines += [f"{'':<29}{w}" for w in textwrap.wrap(e["why"], 50)]
    if d["problems"] or d["notes"]:
        lines.append("")
    lines += [f"problem: {p['what']}: {p['fix']}" for p in d["problems"]]
    lines += [f"note: {n['what']}: {n['fix']}" for n in d["notes"]]
    return "\n".join(lines)


def run(as_json: bool) -> tuple[str, int]:
    d = check()
    return (json.dumps(d, indent=2) if as_json else render(d)), (1 if d["problems"] else 0)
