"""The lab's guest image and boot states, without QEMU, root or network."""
from __future__ import annotations

import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tracer import guest
from tracer.errors import UserError
from tracer.lab import LabGuest, Settings
from tracer.qemu import Guest

# Debian 12 (linux-image-6.1.0-*-amd64): `depends=` of the modules the guest loads.
DEBIAN_6_1 = {
    "virtio": ["virtio_ring"],
    "virtio_ring": [],
    "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"],
    "virtio_pci_modern_dev": [],
    "virtio_pci_legacy_dev": [],
    "virtio_balloon": ["virtio", "virtio_ring"],
}


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)) of a newc cpio archive."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def fake_elf(interp: bool) -> bytes:
    """A minimal 64-bit little-endian ELF with one program header."""
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x20, 64)           # e_phoff
    struct.pack_into("<HH", hdr, 0x36, 56, 1)       # e_phentsize, e_phnum
    ph = bytearray(56)
    struct.pack_into("<I", ph, 0, 3 if interp else 1)   # PT_INTERP or PT_LOAD
    return bytes(hdr + ph)


def test_load_order_puts_dependencies_first():
    order = guest.load_order(guest.ROOT_MODULES, DEBIAN_6_1)
    assert sorted(order) == sorted(DEBIAN_6_1)
    for mod, deps in DEBIAN_6_1.items():
        assert all(order.index(d) < order.index(mod) for d in deps)


def test_load_order_loop_is_a_user_error():
    with pytest.raises(UserError, match="a -> b -> a"):
        guest.load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_modinfo_depends():
    modinfo = b"\0license=GPL\0depends=virtio,virtio-ring\0retpoline=Y\0"
    assert guest.modinfo_depends(b"\x7fELF...." + modinfo) == ["virtio", "virtio_ring"]
    assert guest.modinfo_depends(b"\0depends=\0intree=Y\0") == []
    assert guest.module_name("kernel/drivers/virtio/virtio_pci.ko.xz") == "virtio_pci"


def test_decompress_xz_module():
    import lzma
    assert guest._decompress("virtio.ko.xz", lzma.compress(b"ELF")) == b"ELF"
    assert guest._decompress("virtio.ko", b"ELF") == b"ELF"


def test_static_busybox_check():
    assert guest.is_static(fake_elf(interp=False))
    assert not guest.is_static(fake_elf(interp=True))
    assert not guest.is_static(b"#!/bin/sh\n")


def test_pattern_pages_are_distinct_and_never_zero():
    data = guest.pattern()
    pages = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    assert len(data) == 1 << 20
    assert len(set(pages)) == guest.PATTERN_PAGES
    assert bytes(4096) not in pages


def test_initramfs_layout():
    mods = [("virtio_ring", b"ring"), ("virtio", b"virtio")]
    entries = read_newc(guest.initramfs(mods, b"busybox-bytes"))
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    mode, body, _ = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and body == guest.INIT.encode()
    assert entries["bin/busybox"][1] == b"busybox-bytes"
    assert entries["bin/busybox"][0] & 0o111
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert entries["lib/modules/order"][1] == b"virtio_ring\nvirtio\n"
    assert entries["lib/modules/virtio.ko"][1] == b"virtio"
    assert len(entries["lab/pattern"][1]) == 1 << 20
    for d in ("proc", "sys", "dev", "fill"):
        assert stat.S_ISDIR(entries[d][0])


@pytest.mark.skipif(not shutil.which("cpio"), reason="no cpio tool to cross-check with")
def test_initramfs_reads_with_cpio(tmp_path):
    data = guest.initramfs([("virtio", b"x")], b"bb")
    out = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True,
                         check=True).stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console", "lib/modules/virtio.ko"} <= set(out)


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox not installed")
def test_init_script_parses():
    r = subprocess.run(["busybox", "sh", "-n", "-c", guest.INIT], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr


def test_settings_leave_room_for_the_balloon():
    s = Settings().resolve()
    assert (s.guest_mib, s.balloon_mib, s.fill_mib) == (256, 64, 96)
    with pytest.raises(UserError, match="room for a balloon"):
        Settings(guest_mib=256, balloon_mib=64, fill_mib=150).resolve()
    with pytest.raises(UserError, match="no room for identical memory"):
        Settings(guest_mib=160, balloon_mib=64).resolve()


def _console(tmp_path: Path, text: str) -> LabGuest:
    g = LabGuest("lab-1", 256, "tcg", tmp_path, fill_mib=96)
    g.state = "starting"
    g.console.write_text(text)
    return g


def test_boot_states_from_the_console(tmp_path):
    g = _console(tmp_path, "[    0.000000] Linux version 6.1.0\n"
                           "overcommit-lab: init started\n"
                           "overcommit-lab: balloon driver bound\n"
                           "overcommit-lab: filling 96 MiB\n"
                           "overcommit-lab: rea")   # a line still being written
    assert g.states() == ["kernel booting", "init started", "balloon driver bound",
                          "filling 96 MiB"]
    assert g.state == "filling 96 MiB"
    with g.console.open("a") as f:
        f.write("dy\n")
    assert g.states() == ["ready"] and g.state == "ready"
    assert g.states() == []


def test_guest_errors_are_user_errors(tmp_path):
    g = _console(tmp_path, "overcommit-lab: error: no virtio_balloon device bound\n")
    with pytest.raises(UserError, match="lab-1: error: no virtio_balloon device bound"):
        g.states()
    g = _console(tmp_path, "[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root\n")
    with pytest.raises(UserError, match="guest kernel panic"):
        g.states()


def test_qmp_socket_path_fits_sun_path(tmp_path):
    """A deep -o directory still gives QEMU a QMP socket path under 108 bytes."""
    assert Guest("lab-1", 256, "tcg", tmp_path).qmp_path == tmp_path / "lab-1.qmp"
    deep = tmp_path / ("d" * 120)
    path = Guest("lab-1", 256, "tcg", deep).qmp_path
    assert len(str(path)) < 108 and path.name == "lab-1.qmp"


def _module(depends: str) -> bytes:
    return b"\x7fELF" + b"\0" * 60 + f"\0license=GPL\0depends={depends}\0".encode()


@pytest.mark.skipif(not any(p.exists() for p in guest.BUSYBOX_CANDIDATES),
                    reason="no busybox")
def test_host_kernel_image(tmp_path, monkeypatch):
    """The host's own kernel: modules found through modules.dep (xz-compressed,
    as Debian ships them), built-in ones skipped, dependencies first; the
    initramfs is cached by its inputs."""
    import lzma
    monkeypatch.setattr(guest, "CACHE", tmp_path / "cache")
    rel = "6.1.0-test-amd64"
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / f"vmlinuz-{rel}").write_bytes(b"kernel")
    mods = tmp_path / "lib/modules" / rel
    (mods / "kernel/drivers/virtio").mkdir(parents=True)
    files = {"virtio_pci": "virtio_ring,virtio_pci_modern_dev,virtio",
             "virtio_pci_modern_dev": "", "virtio_balloon": "virtio,virtio_ring"}
    dep = []
    for name, deps in files.items():
        rel_path = f"kernel/drivers/virtio/{name}.ko.xz"
        (mods / rel_path).write_bytes(lzma.compress(_module(deps)))
        dep.append(f"{rel_path}: ...")
    (mods / "modules.dep").write_text("\n".join(dep) + "\n")
    # virtio and virtio_ring built in (as on kernels with CONFIG_VIRTIO=y)
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n"
                                          "kernel/drivers/virtio/virtio_ring.ko\n")
    src = guest.HostKernel.find(rel, tmp_path)
    assert src is not None and src.origin == f"host kernel {tmp_path}/boot/vmlinuz-{rel}"
    messages = []
    image = guest.build(messages.append, src)
    assert image.modules == ("virtio_pci_modern_dev", "virtio_pci", "virtio_balloon")
    entries = read_newc(image.initrd.read_bytes())
    assert entries["lib/modules/order"][1].split() == [m.encode() for m in image.modules]
    assert entries["lib/modules/virtio_balloon.ko"][1] == _module("virtio,virtio_ring")
    assert len(messages) == 1 and messages[0].startswith("Built initramfs-")
    # the same inputs: the cached initramfs, not rebuilt
    assert guest.build(messages.append, src).initrd == image.initrd and len(messages) == 1
    # no virtio_balloon at all: not a usable host kernel
    (mods / "kernel/drivers/virtio/virtio_balloon.ko.xz").unlink()
    (mods / "modules.dep").write_text(dep[0] + "\n" + dep[1] + "\n")
    assert guest.HostKernel.find(rel, tmp_path) is None
