"""Host-side balloon tracing: a VMM's discards count only inside guest RAM.

The VMM here is a real process that looks like QEMU to the tracer (its comm
and command line) and does what QEMU's virtio-balloon does: madvise on its
MADV_MERGEABLE guest RAM, plus madvise on memory of its own.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tracer.aggregate import summarize
from tracer.recording import read

pytestmark = pytest.mark.root

FAKE_VMM = r"""
import ctypes, mmap, sys
ctypes.CDLL(None).prctl(15, b"qemu-system-x86", 0, 0, 0)     # PR_SET_NAME
P = mmap.PAGESIZE
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
ram = mmap.mmap(-1, 4096 * P, flags=flags)                     # guest RAM
ram.madvise(mmap.MADV_MERGEABLE)
heap = mmap.mmap(-1, 2048 * P, flags=flags)                    # the VMM's own
for m in (ram, heap):
    m.write(b"x" * len(m))
print("ready", flush=True)
sys.stdin.readline()
ram.madvise(mmap.MADV_DONTNEED, 0, 509 * P)        # balloon inflation: counted
heap.madvise(mmap.MADV_DONTNEED, 0, 2048 * P)      # not guest RAM: not counted
ram.madvise(mmap.MADV_WILLNEED, 1024 * P, 101 * P) # deflation
try:
    ram.madvise(mmap.MADV_DONTNEED, 1, P)          # EINVAL: gave nothing back
except OSError:
    pass
heap.madvise(mmap.MADV_WILLNEED, 0, 64 * P)
print("done", flush=True)
sys.stdin.readline()
"""


def test_only_guest_ram_discards_count(tmp_path, recorder):
    vmm = subprocess.Popen(["qemu-system-x86_64", "-c", FAKE_VMM, "-name", "guest=fake-vm"],
                           executable=sys.executable, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert vmm.stdout.readline() == "ready\n"
        rec = recorder(tmp_path / "r.arrow", "-i", "0.5")
        time.sleep(0.6)
        vmm.stdin.write("go\n")
        vmm.stdin.flush()
        assert vmm.stdout.readline() == "done\n"
        time.sleep(0.6)
        assert rec.stop() == 0
    finally:
        vmm.kill()
        vmm.wait()
    s = summarize(read(rec.path))
    p = {p["pid"]: p for p in s["processes"]}[vmm.pid]
    assert p["vm"] == "fake-vm" and p["comm"] == "qemu-system-x86"
    assert p["host_discarded_pages"] == 509
    assert s["balloon"]["host_willneed_pages"] == 101
    df = read(rec.path).frame()
    assert ((df.record == "process") & (df.name == "vmm") & (df.pid == vmm.pid)
            & (df.value == 4096)).any()
