"""BTF parsing: a hand-built blob with every case we rely on, then the real one."""
from __future__ import annotations

import struct

import pytest

from tracer.btf import VMLINUX, Btf, BtfError


def _blob() -> bytes:
    strings = b"\0int\0outer\0a\0b\0x\0do_thing\0bits\0flags\0"
    off = {s: strings.index(b"\0" + s.encode() + b"\0") + 1
           for s in ("int", "outer", "a", "b", "x", "do_thing", "bits", "flags")}

    def t(name, kind, vlen, size_or_type, kflag=0):
        return struct.pack("<III", name, (kflag << 31) | (kind << 24) | vlen, size_or_type)

    types = b"".join([
        t(off["int"], 1, 0, 4) + struct.pack("<I", 32),                 # 1: int
        t(0, 4, 2, 8) + struct.pack("<III", off["a"], 1, 0)              # 2: anon struct
        + struct.pack("<III", off["b"], 1, 32),
        t(off["outer"], 4, 3, 24, kflag=1)                               # 3: outer, bitfields
        + struct.pack("<III", off["x"], 1, 0)
        + struct.pack("<III", 0, 2, 64)                                  # anon at byte 8
        + struct.pack("<III", off["flags"], 1, (3 << 24) | 128),         # 3-bit field at 16
        t(off["do_thing"], 12, 0, 0),                                    # 4: func
    ])
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_offsets_through_anonymous_members_and_bitfield_encoding():
    b = Btf(_blob())
    assert b.offsetof("outer", "x") == 0
    assert b.offsetof("outer", "a") == 8
    assert b.offsetof("outer", "b") == 12
    assert b.offsetof("outer", "flags") == 16
    assert b.offsetof("outer", "nope") is None
    assert b.offsetof("missing", "x") is None
    assert b.sizeof("outer") == 24
    assert b.has_func("do_thing") and not b.has_func("outer")


def test_not_btf():
    with pytest.raises(BtfError):
        Btf(b"\0" * 64)
    with pytest.raises(BtfError):
        Btf.load("/nonexistent/btf")


@pytest.mark.skipif(not VMLINUX.exists(), reason="kernel without BTF")
def test_running_kernel_layouts_are_plausible():
    """The offsets the BPF programs use.  That they are right is proven by the
    kernel tests (attribution through mm->owner gets the right pid)."""
    b = Btf.load()
    assert b.sizeof("page") == 64
    for struct_name, member in [("task_struct", "tgid"), ("task_struct", "mm"),
                                ("mm_struct", "owner"), ("vm_area_struct", "vm_mm")]:
        off = b.offsetof(struct_name, member)
        assert off is not None and 0 <= off < b.sizeof(struct_name)
