"""`overcommit record`: trace, attribute, poll counters, write a recording."""
from __future__ import annotations

import os
import platform
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import __version__, counters, headers, kernel
from .errors import UserError
from .fields import kinds
from . import procs
from .procs import Registry
from .recording import COLUMNS, Writer


class StopFlag:
    """Ctrl-C, SIGTERM and SIGHUP end the recording at the next poll, never
    in the middle of writing an interval."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Recorder:
    """One tracing session.  `step()` runs one interval and hands its rows to
    the sink: a recording file (tracer.recording.Writer, the default when
    `output` is a path), or anything with the same write(rows),
    write_batch(batch) and close() -- `top` and `serve` aggregate the same
    rows live instead of storing them."""

    def __init__(self, output: Path | None, interval: float, pids: list[int] | None,
                 stream_events: bool, sink_factory=None):
        from . import probes  # bcc only here
        if os.geteuid() != 0:
            raise UserError("record needs root (BPF programs and /proc/PID/ksm_stat)")
        probes.import_bcc()
        try:
            counters.read_ksm()
        except counters.KsmUnavailable as e:
            raise UserError(str(e)) from e
        for pid in pids or []:
            if not Path(f"/proc/{pid}").exists():
                raise UserError(f"no such process: {pid}")
        if output is not None:
            parent = Path(output).resolve().parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise UserError(f"cannot write {output}: no writable directory {parent}")
        self.interval = interval
        self.pids = pids or []
        cap = kernel.capabilities()
        if cap.tracefs is None:
            raise UserError("tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing")
        self.hdrs = headers.apply()
        try:
            self.plan = kernel.plan(cap)
            self.probe = probes.Tracer(self.plan, self.pids, stream_events)
        except (probes.ProbeError, kernel.KernelError) as e:
            raise UserError(str(e)) from e
        self.vmms: dict[int, tuple] = {}
        self.ksmd = counters.ksmd_pid()
        self.t0_ns = time.monotonic_ns()
        self.registry = Registry()
        self.kind_names = np.array([""] + [kinds().get(i, str(i))
                                           for i in range(1, max(kinds()) + 1)], dtype=object)
        self.prev_counts: dict[tuple[int, str], int] = {}
        self.alive: set[int] = set()
        self.index = 0
        self.events_total = 0
        self.pending_rows: list[dict] = []
        meta = {
            "tool": "overcommit", "version": __version__,
            "host": socket.gethostname(), "kernel": platform.release(),
            "machine": platform.machine(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "interval_s": interval, "pids": self.pids, "events_streamed": stream_events,
            # t = 0 in CLOCK_MONOTONIC (bpf_ktime_get_ns), to line up other traces
            "t0_monotonic_ns": self.t0_ns,
            "page_size": os.sysconf("SC_PAGE_SIZE"),
            "ksm_settings": counters.read_ksm_settings(),
            "variants": self.plan.modes,
            "attach": [a.as_dict() for a in self.plan.attach],
            "headers": self.hdrs.origin,
        }
        self.meta = meta
        self.writer = sink_factory(meta) if sink_factory else Writer(output, meta)
        self._baseline()

    # -- rows ---------------------------------------------------------------

    def _t(self) -> float:
        return (time.monotonic_ns() - self.t0_ns) / 1e9

    def _proc_row(self, record: str, name: str, pid: int, value, t: float | None = None):
        p = self.registry.get(pid)
        return {"t": self._t() if t is None else t, "interval": self.index, "record": record,
                "name": name, "pid": pid, "comm": p.comm, "vm": p.vm, "value": value}

    def _host_row(self, record: str, name: str, value: int, t: float):
        return {"t": t, "interval": self.index, "record": record, "name": name,
                "pid": 0, "value": value}

    def _watched(self) -> set[int]:
        pids = set(self.pids) if self.pids else set(counters.ksm_pids())
        return pids | self.alive

    def _sample(self, rows: list[dict]) -> None:
        """The kernel's own accounting, at the end of the interval."""
        t = self._t()
        rows += [self._host_row("ksm", k, v, t) for k, v in counters.read_ksm().items()]
        if self.ksmd is not None:
            cpu = counters.ksmd_cpu_ns(self.ksmd)
            if cpu is not None:
                rows.append(self._host_row("ksm", "ksmd_cpu_ns", cpu, t))
        rows += [self._host_row("vmstat", k, v, t) for k, v in counters.read_vmstat().items()]
        for pid in sorted(self._watched()):
            stat = counters.read_ksm_stat(pid)
            if stat is None:
                if pid in self.alive:
                    self.alive.discard(pid)
                    rows.append(self._proc_row("process", "gone", pid, 0, t))
                continue
            if pid not in self.alive:
                self.alive.add(pid)
                if self.index > 0:
                    rows.append(self._proc_row("process", "appeared", pid, 0, t))
            rows += [self._proc_row("ksm_stat", k, pid, v, t) for k, v in stat.items()]

    def _track_vmms(self, rows: list[dict]) -> None:
        """Keep the kernel's view of every VMM's guest RAM current (guests
        come and go, and hotplug memory)."""
        pids = set(procs.vmm_pids())
        if self.pids:
            pids &= set(self.pids)
        for pid in pids:
            ram = procs.guest_ram(pid)
            if ram[0] or ram[1]:
                if self.vmms.get(pid) != ram:
                    if pid not in self.vmms:
                        rows.append(self._proc_row("process", "vmm", pid,
                                                   sum(e - s for s, e in ram[0]) // 4096))
                    self.vmms[pid] = ram
                    self.probe.set_guest_ram(pid, *ram)
        for pid in set(self.vmms) - pids:
            del self.vmms[pid]
            self.probe.forget_vmm(pid)

    def _baseline(self) -> None:
        """Interval 0: who is there and what the counters say, before tracing."""
        rows: list[dict] = []
        self._track_vmms(rows)
        for pid in sorted(self._watched()):
            if counters.read_ksm_stat(pid) is not None:
                rows.append(self._proc_row("process", "running", pid, 0))
        self._sample(rows)
        rows.append(self._host_row("interval", "baseline", 0, self._t()))
        self.writer.write(rows)
        self.index = 1

    def _counts(self, rows: list[dict]) -> int:
        cur = self.probe.counts()
        n = 0
        t = self._t()
        for key, value in sorted(cur.items()):
            delta = value - self.prev_counts.get(key, 0)
            if delta:
                tgid, name = key
                rows.append(self._proc_row("count", name, tgid, delta, t))
                n += delta
        self.prev_counts = cur
        for name, value in self.probe.lost().items():
            rows.append(self._host_row("lost", name, value, t))
        return n

    def _rare(self, rare: np.ndarray, rows: list[dict]) -> None:
        names = kinds()
        for r in rare:
            kind = names.get(int(r["kind"]), str(r["kind"]))
            t = (int(r["ts_ns"]) - self.t0_ns) / 1e9
            tgid = int(r["tgid"])
            if kind in ("ksm_enter", "ksm_exit"):
                if tgid:
                    if kind == "ksm_enter" or tgid not in self.registry:
                        self.registry.learn(tgid, r["comm"].decode(errors="replace"))
                    rows.append(self._proc_row("process", kind, tgid, 0, t))
            elif kind == "full_scan":
                rows.append({**self._host_row("scan", kind, int(r["a"]), t),
                             "seq": int(r["seq"]),
                             "duration_ns": int(r["b"]) if r["b"] >= 0 else None})
            elif kind == "ksm_advisor":
                rows += [self._host_row("advisor", "pages_to_scan", int(r["a"]), t),
                         self._host_row("advisor", "scan_time_ns", int(r["b"]), t),
                         self._host_row("advisor", "cpu_percent", int(r["seq"]), t)]

    def _events_batch(self, ev: np.ndarray) -> pa.RecordBatch | None:
        """Streamed events as one columnar batch: no per-event Python."""
        if len(ev) == 0:
            return None
        pids, inverse = np.unique(ev["tgid"], return_inverse=True)
        procs = [self.registry.get(int(p)) for p in pids]
        comm = np.array([p.comm for p in procs], dtype=object)[inverse]
        vm = np.array([p.vm for p in procs], dtype=object)[inverse]
        n = len(ev)
        cols = {
            "t": (ev["ts_ns"].astype(np.int64) - self.t0_ns) / 1e9,
            "interval": np.full(n, self.index, dtype=np.int32),
            "record": np.full(n, "event", dtype=object),
            "name": self.kind_names[ev["kind"]],
            "pid": ev["tgid"].astype(np.int32),
            "comm": comm, "vm": vm,
            "value": ev["pages"].astype(np.int64), "pfn": ev["pfn"],
            "err": ev["err"].astype(np.int32),
            "seq": None, "duration_ns": None,
        }
        arrays = [pa.nulls(n, f.type) if cols[f.name] is None else pa.array(cols[f.name], f.type)
                  for f in COLUMNS]
        return pa.RecordBatch.from_arrays(arrays, schema=COLUMNS)

    # -- running ------------------------------------------------------------

    def step(self, deadline: float, stop: StopFlag) -> int:
        """Poll until `deadline` (monotonic s) or a stop signal, then write
        one interval."""
        start = time.monotonic()
        while not stop.set:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.probe.poll(int(min(left, 0.1) * 1000) or 1)
        return self._flush(time.monotonic() - start)

    def add_rows(self, rows: list[dict]) -> None:
        """Rows from outside the kernel (e.g. the lab's QMP guest-stats),
        written with the next interval; `t` and `interval` are filled in."""
        t = self._t()
        self.pending_rows += [{"t": t, **r} for r in rows]

    def _flush(self, elapsed: float) -> int:
        rows: list[dict] = [{**r, "interval": self.index} for r in self.pending_rows]
        self.pending_rows = []
        ev, rare = self.probe.drain()
        self._rare(rare, rows)
        batch = self._events_batch(ev)
        self.events_total += len(ev)
        n = self._counts(rows)
        self._track_vmms(rows)
        self._sample(rows)
        rows.append(self._host_row("interval", "end", int(elapsed * 1e9), self._t()))
        if batch is not None:
            self.writer.write_batch(batch)
        self.writer.write(rows)
        self.index += 1
        return n

    def close(self, clean: bool = True) -> None:
        if clean:
            self.writer.write([self._host_row("end", "closed", 0, self._t())])
        self.writer.close()
        self.probe.close()


def banner(rec: Recorder, output: Path, duration: float | None) -> str:
    modes = rec.plan.modes
    until = f"for {duration:g}s" if duration else "Ctrl-C to end"
    who = f"PIDs {', '.join(map(str, rec.pids))}" if rec.pids else "all processes"
    return (f"Tracing KSM ({modes['ksm']}), guest balloon ({modes['balloon']}) and VMM "
            f"discards ({modes['vmm']}) for {who}, every {rec.interval:g}s, {until}.\n"
            f"Writing {output}.")


def run(output: Path, duration: float | None, interval: float, pids: list[int] | None,
        stream_events: bool, progress: bool = True, on_start=None) -> Path:
    """Record until the duration ends, or Ctrl-C / SIGTERM.  `on_start()` is
    called once tracing is attached."""
    err = sys.stderr
    tty = progress and err.isatty()
    with StopFlag() as stop:
        rec = Recorder(output, interval, pids, stream_events)
        print(banner(rec, output, duration), file=err, flush=True)
        if on_start:
            on_start()
        start = time.monotonic()
        total = 0
        try:
            while not stop.set and (duration is None or time.monotonic() - start < duration):
                deadline = start + rec.index * interval
                if duration is not None:
                    deadline = min(deadline, start + duration)
                n = rec.step(deadline, stop)
                total += n
                if progress:
                    line = (f"{time.monotonic() - start:7.1f}s {n / interval:10.0f} events/s "
                            f"{total:12d} events {rec.events_total:11d} streamed")
                    print(("\r" + line) if tty else line, end="" if tty else "\n",
                          file=err, flush=True)
        finally:
            rec.close()
    if tty:
        print(file=err)
    print(f"Recorded {rec.index - 1} intervals to {output}.", file=err)
    return output
