"""Just enough of BTF (Documentation/bpf/btf.rst) to find struct layouts.

The BPF programs follow kernel pointers (mm->owner->tgid, vma->vm_mm) whose
offsets change with every kernel and config.  bcc compiles against whatever
headers it has, which need not match the running kernel, so the offsets are
taken from the kernel's own type information and passed in as constants.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_ENUM, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST = 6, 7, 8, 9, 10
KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC = 11, 12, 13, 14, 15
KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 16, 17, 18, 19

# Bytes that follow struct btf_type, per kind: (fixed, per vlen entry).
_TRAILER = {
    KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12), KIND_ENUM: (0, 8), KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0), KIND_DATASEC: (0, 12), KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}


class BtfError(Exception):
    pass


@dataclass(frozen=True)
class _Type:
    kind: int
    name_off: int
    vlen: int
    kind_flag: bool
    size_or_type: int
    data: int  # offset of the trailer in the type section


_NAMED = (KIND_STRUCT, KIND_UNION, KIND_FUNC)


class Btf:
    """Parsed type section of one BTF blob (kernel or module)."""

    def __init__(self, blob: bytes):
        if len(blob) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC:
            raise BtfError("not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._types_raw = blob[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strings = blob[hdr_len + str_off: hdr_len + str_off + str_len]
        # A kernel has ~100k types: keep the walk lean, build _Type lazily.
        self._offsets: list[int] = [-1]  # type id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos, raw, end = 0, self._types_raw, len(self._types_raw)
        unpack = struct.Struct("<III").unpack_from
        trailer = [_TRAILER.get(k, (0, 0)) for k in range(32)]
        strings = self._strings
        while pos < end:
            name_off, info, _ = unpack(raw, pos)
            kind = (info >> 24) & 0x1F
            self._offsets.append(pos)
            if name_off and kind in _NAMED:
                name = strings[name_off:strings.index(b"\0", name_off)].decode()
                self._by_name.setdefault((kind, name), len(self._offsets) - 1)
            fixed, each = trailer[kind]
            pos += 12 + fixed + each * (info & 0xFFFF)

    @classmethod
    def load(cls, path: Path | str = VMLINUX) -> "Btf":
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise BtfError(f"cannot read {path}: {e.strerror}") from e

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _type(self, type_id: int) -> _Type | None:
        if type_id == 0:
            return None
        pos = self._offsets[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._types_raw, pos)
        return _Type((info >> 24) & 0x1F, name_off, info & 0xFFFF, bool(info >> 31),
                     size_or_type, pos + 12)

    def _struct_id(self, name: str) -> int | None:
        return self._by_name.get((KIND_STRUCT, name)) or self._by_name.get((KIND_UNION, name))

    def _members(self, type_id: int):
        t = self._type(type_id)
        for i in range(t.vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._types_raw, t.data + 12 * i)
            bit_off = off & 0xFFFFFF if t.kind_flag else off
            yield self._str(name_off) if name_off else "", mtype, bit_off

    def _resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        while True:
            t = self._type(type_id)
            if t is None or t.kind not in (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST,
                                           KIND_RESTRICT, KIND_TYPE_TAG):
                return type_id
            type_id = t.size_or_type

    def _find(self, type_id: int, member: str) -> int | None:
        """Bit offset of `member`, looking into anonymous structs and unions."""
        for name, mtype, bit_off in self._members(type_id):
            if name == member:
                return bit_off
            if not name:
                inner = self._resolve(mtype)
                if self._type(inner).kind in (KIND_STRUCT, KIND_UNION):
                    found = self._find(inner, member)
                    if found is not None:
                        return bit_off + found
        return None

    def has_struct(self, name: str) -> bool:
        return self._struct_id(name) is not None

    def offsetof(self, struct_name: str, member: str) -> int | None:
        """Byte offset of struct_name.member, None if either is absent."""
        sid = self._struct_id(struct_name)
        if sid is None:
            return None
        bits = self._find(sid, member)
        return None if bits is None else bits // 8

    def sizeof(self, struct_name: str) -> int | None:
        sid = self._struct_id(struct_name)
        return None if sid is None else self._type(sid).size_or_type

    def func_id(self, name: str) -> int | None:
        """The BTF id of a function: what fentry programs attach to."""
        return self._by_name.get((KIND_FUNC, name))

    def has_func(self, name: str) -> bool:
        return self.func_id(name) is not None
