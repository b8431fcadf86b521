"""Attribution without root: VM names from VMM command lines, guest RAM from smaps."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tracer import procs

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("argv,vm", [
    (["/usr/bin/qemu-system-x86_64", "-name", "guest=web-1,debug-threads=on", "-m", "1G"],
     "web-1"),
    (["qemu-system-x86_64", "-m", "1G", "-name", "db"], "db"),
    (["qemu-kvm", "-name=guest=x"], "x"),
    (["firecracker", "--id", "fc-7", "--api-sock", "/run/fc.sock"], "fc-7"),
    (["cloud-hypervisor", "--api-socket", "path=/run/ch/vm3.sock"], "vm3.sock"),
    (["crosvm", "run", "--socket", "/run/crosvm/android.sock"], "android.sock"),
    (["/usr/bin/python3", "-name", "guest=not-a-vm"], None),
    ([], None),
])
def test_vm_name(argv, vm):
    assert procs.vm_name(argv) == vm


def _fake_proc(tmp_path, pid, comm, argv):
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return d


def test_identify_untrusted_names_are_kept_verbatim(tmp_path):
    _fake_proc(tmp_path, 42, "<svg onload=1>", ["qemu-system-x86_64", "-name",
                                                 "guest=<img src=x onerror=alert(1)>"])
    p = procs.identify(42, tmp_path)
    assert p.comm == "<svg onload=1>"
    assert p.vm == "<img src=x onerror=alert(1)>"


def test_unnamed_vmm_is_still_one_vm(tmp_path):
    _fake_proc(tmp_path, 7, "qemu-system-x86", ["qemu-system-x86_64", "-m", "1G"])
    assert procs.identify(7, tmp_path).vm == "qemu-system-x86-7"


def test_registry_falls_back_to_kernel_comm_for_exited(tmp_path):
    reg = procs.Registry(tmp_path)
    assert reg.learn(99, "gone-proc").comm == "gone-proc"
    assert reg.get(99).comm == "gone-proc"
    assert reg.get(0).comm == "-"


def test_vmm_pids(tmp_path):
    _fake_proc(tmp_path, 10, "qemu-system-x86", ["qemu-system-x86_64"])
    _fake_proc(tmp_path, 11, "bash", ["bash"])
    _fake_proc(tmp_path, 12, "firecracker", ["firecracker"])
    (tmp_path / "self").mkdir()
    assert sorted(procs.vmm_pids(tmp_path)) == [10, 12]


def test_guest_ram_is_the_mergeable_mapping_and_large_shared_files(tmp_path):
    d = _fake_proc(tmp_path, 5, "qemu-system-x86", ["qemu-system-x86_64"])
    shutil.copy(DATA / "vmm" / "smaps", d / "smaps")
    (d / "fd").mkdir()
    os.symlink("/memfd:pc.ram (deleted)", d / "fd" / "12")
    os.symlink("/dev/shm/small", d / "fd" / "13")
    os.symlink("/dev/null", d / "fd" / "0")
    ranges, fds = procs.guest_ram(5, tmp_path)
    # the heap, the stack and the binary are not guest RAM
    assert ranges == [(0x7F3A40000000, 0x7F3A50000000)]
    # the 16 MiB memfd is guest RAM, the 1 MiB shared file is not
    assert fds == [12]


def test_guest_ram_of_a_gone_process(tmp_path):
    assert procs.guest_ram(12345, tmp_path) == ([], [])
