"""The lab's tiny guest: a distribution kernel and a busybox initramfs.

The kernel is the host's own (``/boot/vmlinuz-$(uname -r)``) where it is
readable and has virtio_balloon, else Debian's ``linux-image-<abi>-amd64``
(the version the ``linux-image-amd64`` metapackage points at), fetched with
``apt-get download`` into the cache and never installed.  The initramfs holds
a static busybox, the virtio modules the balloon needs (in dependency order,
decompressed), a 1 MiB block of page contents and /init (INIT below).  It is
written as a newc cpio by this module: no cpio or xz tool is needed.

Everything is cached under ``~/.cache/overcommit/lab`` and keyed by its
inputs, so a second lab run starts booting at once.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import platform
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError
from .workload import page_content

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "overcommit" / "lab"
# What the balloon needs in a guest: the driver and the PCI transport.  Their
# dependencies (virtio, virtio_ring, virtio_pci_modern_dev, ...) come from the
# modules' own `depends=` (.modinfo), so a kernel that splits them differently
# still works.
ROOT_MODULES = ("virtio_pci", "virtio_balloon")
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"), Path("/sbin/busybox"),
                      Path("/usr/sbin/busybox"))
PATTERN_SEED = 0x1ab         # page contents shared by every lab guest
PATTERN_PAGES = 256          # one MiB of distinct pages, copied fill_mib times
MARKER = "overcommit-lab:"   # every line /init prints starts with this
READY = f"{MARKER} ready"
FORMAT = 3                   # bump when the initramfs layout or INIT changes

# /init, run by busybox sh.  Everything it says goes to the serial console
# (console=ttyS0), which the lab reads for progress and the ready marker.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "overcommit-lab: $*"; }
say "init started"
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
done
if ls /sys/bus/virtio/drivers/virtio_balloon/ | grep -q virtio; then
    say "balloon driver bound"
else
    say "error: no virtio_balloon device bound"
fi
# The same pages in every guest: copies of one MiB of distinct page contents
# in tmpfs (page cache, so the balloon cannot take them; host KSM merges them
# across guests and between the copies).
fill=$(sed -n 's/.*lab\.fill_mib=\([0-9]*\).*/\1/p' /proc/cmdline)
fill=${fill:-0}
mkdir -p /fill
mount -t tmpfs -o size=$((fill + 1))m tmpfs /fill
say "filling $fill MiB"
i=0
while [ $i -lt $fill ]; do cat /lab/pattern; i=$((i + 1)); done > /fill/same
say "filled $fill MiB, $(grep MemFree /proc/meminfo | tr -s ' ')"
say "ready"
while :; do sleep 3600; done
"""


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    origin: str          # where the kernel came from, for the user and the recording
    modules: tuple[str, ...]


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    if progress:
        progress(text)


# -- kernel modules -----------------------------------------------------------

def _decompress(name: str, data: bytes) -> bytes:
    """A module file's ELF bytes (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        # Python's standard library reads zstd only from 3.14 on.
        if not shutil.which("zstd"):
            raise UserError(f"{name} is zstd-compressed: install zstd")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                              check=True).stdout
    return data


def module_name(path: str) -> str:
    """virtio_pci from .../virtio_pci.ko.xz; the kernel treats - and _ alike."""
    base = Path(path).name
    return base[:base.index(".ko")].replace("-", "_")


def modinfo_depends(elf: bytes) -> list[str]:
    """The `depends=` of a module (its .modinfo section is NUL-separated key=value)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", elf)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def load_order(roots: Iterable[str], deps: dict[str, list[str]]) -> list[str]:
    """Modules in insmod order: every module after what it depends on."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise UserError(f"module dependency loop: {' -> '.join(path + (name,))}")
        for d in deps.get(name, []):
            visit(d, path + (name,))
        order.append(name)

    for r in roots:
        visit(r, ())
    return order


def _builtin(text: str) -> set[str]:
    """modules.builtin: kernel/drivers/virtio/virtio.ko per line."""
    return {module_name(line) for line in text.split() if ".ko" in line}


class KernelSource:
    """A kernel image and a way to fetch its modules."""
    origin: str
    vmlinuz: Path
    builtin: set[str]

    def module(self, name: str) -> bytes | None:
        raise NotImplementedError

    def identity(self) -> str:
        st = self.vmlinuz.stat()
        return f"{self.vmlinuz}:{st.st_size}:{st.st_mtime_ns}"


class HostKernel(KernelSource):
    """The running kernel, when /boot/vmlinuz-$(uname -r) is readable."""

    def __init__(self, release: str, root: Path = Path("/")):
        self.vmlinuz = root / f"boot/vmlinuz-{release}"
        self.moddir = root / f"lib/modules/{release}"
        self.origin = f"host kernel {self.vmlinuz}"
        builtin = self.moddir / "modules.builtin"
        self.builtin = _builtin(builtin.read_text()) if builtin.exists() else set()
        self._paths: dict[str, Path] = {}
        dep = self.moddir / "modules.dep"
        if dep.exists():
            for line in dep.read_text().splitlines():
                rel = line.split(":", 1)[0]
                self._paths[module_name(rel)] = self.moddir / rel

    @classmethod
    def find(cls, release: str | None = None, root: Path = Path("/")) -> HostKernel | None:
        k = cls(release or platform.release(), root)
        if not os.access(k.vmlinuz, os.R_OK):
            return None
        if not all(m in k.builtin or m in k._paths for m in ROOT_MODULES):
            return None   # no virtio_balloon (e.g. a microVM kernel without it)
        return k

    def module(self, name: str) -> bytes | None:
        p = self._paths.get(name)
        return _decompress(p.name, p.read_bytes()) if p else None


class PackageKernel(KernelSource):
    """Debian's kernel package, downloaded (never installed) and unpacked into
    the cache: vmlinuz, modules.builtin and the modules the guest needs."""

    META = "linux-image-amd64"

    def __init__(self, progress=None, package: str | None = None, version: str | None = None):
        self.progress = progress
        if package is None:
            package, version = self._resolve()
        self._use(package, version)
        stamp = self.dir / ".unpacked"
        if not stamp.exists():
            deb = self._download()
            self._unpack(deb, want_dirs=("kernel/drivers/virtio/",), want_names=set())
            deb.unlink()
            (self.dir / ".unpacked").touch()
        self.builtin = _builtin((self.dir / "modules.builtin").read_text())

    def _use(self, package: str, version: str) -> None:
        self.package, self.version = package, version
        self.dir = CACHE / f"{package}_{version}"
        self.origin = f"Debian {package} {version}"
        self.vmlinuz = self.dir / "vmlinuz"

    @classmethod
    def cached(cls, progress=None) -> PackageKernel | None:
        """The newest kernel already unpacked in the cache (for when apt
        cannot say which one is current, e.g. offline without package lists)."""
        dirs = sorted((d for d in CACHE.glob("linux-image-*_*") if (d / ".unpacked").exists()),
                      key=lambda d: d.stat().st_mtime)
        if not dirs:
            return None
        package, version = dirs[-1].name.split("_", 1)
        return cls(progress, package, version)

    def _resolve(self) -> tuple[str, str]:
        if not shutil.which("apt-cache"):
            raise UserError("no readable kernel image (/boot/vmlinuz-*) and no apt to fetch "
                            "one: install a kernel image readable by root")
        arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                              text=True, check=False).stdout.strip()
        if arch != "amd64":
            raise UserError(f"the lab fetches amd64 kernels; this is {arch or platform.machine()}")
        out = subprocess.run(["apt-cache", "depends", self.META], capture_output=True,
                             text=True, check=False).stdout
        m = re.search(r"Depends:\s*(linux-image-\S+)", out)
        if not m:
            raise UserError(f"apt-cache does not know {self.META}: run apt-get update")
        package = m.group(1)
        out = subprocess.run(["apt-cache", "policy", package], capture_output=True,
                             text=True, check=False).stdout
        v = re.search(r"Candidate:\s*(\S+)", out)
        if not v or v.group(1) == "(none)":
            raise UserError(f"apt has no candidate for {package}: run apt-get update")
        return package, v.group(1)

    def _download(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        _say(self.progress, f"Downloading {self.package} {self.version} with apt-get download "
                            f"(once; cached in {self.dir})")
        cmd = ["apt-get", "download", "-q", f"{self.package}={self.version}"]
        if os.geteuid() == 0:
            # apt drops to _apt, which may not write here: download as root.
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        r = subprocess.run(cmd, cwd=self.dir, stdout=sys.stderr, stderr=subprocess.PIPE,
                           text=True, check=False)
        if r.returncode and os.geteuid() == 0:
            # Stale package lists name a version the mirror no longer has.
            _say(self.progress, "apt-get download failed; running apt-get update once")
            subprocess.run(["apt-get", "update", "-qq"], stdout=sys.stderr, check=False)
            self._use(*self._resolve())
            self.dir.mkdir(parents=True, exist_ok=True)
            cmd[-1] = f"{self.package}={self.version}"
            r = subprocess.run(cmd, cwd=self.dir, stdout=sys.stderr, stderr=subprocess.PIPE,
                               text=True, check=False)
        debs = sorted(self.dir.glob(f"{self.package}_*.deb"))
        if r.returncode or not debs:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
            raise UserError(f"apt-get download {self.package} failed: {last}")
        return debs[-1]

    def _unpack(self, deb: Path, want_dirs: tuple[str, ...], want_names: set[str]) -> None:
        """Extract vmlinuz, config, modules.builtin and the wanted modules, then
        the modules those depend on (a second pass only if they live elsewhere)."""
        _say(self.progress, f"Unpacking the kernel and virtio modules from {deb.name}")
        mods = self.dir / "modules"
        mods.mkdir(parents=True, exist_ok=True)
        self._extract(deb, want_dirs, want_names)
        builtin = _builtin((self.dir / "modules.builtin").read_text())
        while True:
            have = {module_name(p.name) for p in mods.iterdir()}
            missing = set()
            for p in mods.iterdir():
                missing |= set(modinfo_depends(p.read_bytes())) - have
            missing -= builtin
            if not missing:
                break
            before = len(have)
            self._extract(deb, (), missing)
            if len({module_name(p.name) for p in mods.iterdir()}) == before:
                raise UserError(f"{deb.name} lacks modules {', '.join(sorted(missing))}")

    def _extract(self, deb: Path, want_dirs: tuple[str, ...], want_names: set[str]) -> None:
        # dpkg-deb knows every compression a .deb may use (xz, zstd, gzip).
        p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    name = m.name.lstrip("./")
                    base = Path(name).name
                    if name.startswith("boot/vmlinuz-"):
                        dest = self.dir / "vmlinuz"
                    elif name.startswith("boot/config-"):
                        dest = self.dir / "config"
                    elif name.endswith("/modules.builtin"):
                        dest = self.dir / "modules.builtin"
                    elif ".ko" in base and (any(d in name for d in want_dirs)
                                            or module_name(base) in want_names):
                        dest = self.dir / "modules" / f"{module_name(base)}.ko"
                        dest.write_bytes(_decompress(base, tar.extractfile(m).read()))
                        continue
                    else:
                        continue
                    dest.write_bytes(tar.extractfile(m).read())
        finally:
            p.stdout.close()
            if p.wait():
                raise UserError(f"dpkg-deb could not read {deb}")

    def identity(self) -> str:
        return f"{self.package}={self.version}"

    def module(self, name: str) -> bytes | None:
        p = self.dir / "modules" / f"{name}.ko"
        return p.read_bytes() if p.exists() else None


def kernel_source(progress=None) -> KernelSource:
    """The host's kernel where readable (and with virtio_balloon), else Debian's."""
    host = HostKernel.find()
    if host:
        return host
    try:
        return PackageKernel(progress)
    except UserError:
        cached = PackageKernel.cached(progress)
        if cached is None:
            raise
        _say(progress, f"apt cannot fetch a kernel now: using the cached {cached.origin}")
        return cached


# -- the initramfs ------------------------------------------------------------

class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks as initramfs."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name_b), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def pattern() -> bytes:
    """The MiB every guest copies into its tmpfs: PATTERN_PAGES distinct,
    non-zero pages (zero pages would go to KSM's zero-page path instead)."""
    return b"".join(page_content(PATTERN_SEED, i) for i in range(PATTERN_PAGES))


def is_static(elf: bytes) -> bool:
    """An ELF executable without a program interpreter (PT_INTERP)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:   # 64-bit only: the lab is x86_64
        return False
    order = "<" if elf[5] == 1 else ">"
    phoff, = struct.unpack_from(order + "Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from(order + "HH", elf, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from(order + "I", elf, phoff + i * phentsize)
        if p_type == 3:   # PT_INTERP: needs a dynamic loader the initramfs lacks
            return False
    return True


def busybox() -> bytes:
    """A static busybox (Debian: busybox-static; Fedora's busybox is static)."""
    for p in BUSYBOX_CANDIDATES:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if is_static(data):
            return data
    raise UserError("no static busybox: apt-get install busybox-static (or dnf install busybox)")


def initramfs(modules: list[tuple[str, bytes]], bb: bytes) -> bytes:
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "lab", "fill", "tmp"):
        c.dir(d)
    # The kernel opens /dev/console for init's stdio before /init mounts devtmpfs.
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", bb, 0o755)
    c.symlink("bin/sh", "busybox")
    for name, elf in modules:
        c.file(f"lib/modules/{name}.ko", elf)
    c.file("lib/modules/order", "".join(f"{n}\n" for n, _ in modules).encode())
    c.file("lab/pattern", pattern())
    c.file("init", INIT.encode(), 0o755)
    return c.finish()


def build(progress: Callable[[str], None] | None = None,
          src: KernelSource | None = None) -> Image:
    """The guest image, from the cache when its inputs have not changed."""
    t0 = time.monotonic()
    src = src or kernel_source(progress)
    bb = busybox()
    deps: dict[str, list[str]] = {}
    elves: dict[str, bytes] = {}
    todo = [m for m in ROOT_MODULES if m not in src.builtin]
    while todo:
        name = todo.pop()
        if name in elves or name in src.builtin:
            continue
        elf = src.module(name)
        if elf is None:
            raise UserError(f"{src.origin} has no module {name}")
        elves[name] = elf
        deps[name] = [d for d in modinfo_depends(elf) if d not in src.builtin]
        todo += deps[name]
    order = load_order([m for m in ROOT_MODULES if m in elves], deps)
    key = hashlib.sha256()
    for part in (str(FORMAT), INIT, src.identity(), hashlib.sha256(bb).hexdigest(),
                 *(hashlib.sha256(elves[m]).hexdigest() for m in order)):
        key.update(part.encode() + b"\0")
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"initramfs-{key.hexdigest()[:16]}.cpio"
    if not path.exists():
        data = initramfs([(m, elves[m]) for m in order], bb)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.rename(path)
        _say(progress, f"Built {path.name} ({len(data) / 2**20:.1f} MiB: busybox, "
                       f"{len(order)} modules) in {time.monotonic() - t0:.1f}s")
    return Image(src.vmlinuz, path, src.origin, tuple(order))
