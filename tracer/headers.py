"""Kernel headers for bcc, on kernels that have no matching headers package.

bcc compiles BPF C with the kernel's headers: $BCC_KERNEL_SOURCE, else
/lib/modules/$(uname -r)/build, else the kernel's own /sys/kernel/kheaders.tar.xz
(CONFIG_IKHEADERS).  A cloud or custom kernel often has none of these.  Our
programs only need the generic headers (tracepoint arguments come from
tracefs, struct offsets from BTF), so the nearest distribution headers do.
Debian splits them into linux-headers-<v>-<flavour> (generated files) and
linux-headers-<v>-common (the rest), while bcc takes one directory: we merge
the two into a tree of symlinks in our cache, never under /lib/modules.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .kernel import release

SRC = Path("/usr/src")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "overcommit" / "kernel-headers"
INSTALL_HINT = "apt-get install linux-headers-amd64   (or: dnf install kernel-devel)"


@dataclass
class Headers:
    path: Path | None     # what BCC_KERNEL_SOURCE is set to; None: bcc finds its own
    origin: str           # how they were found, for doctor and the recording


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _debian_pairs() -> list[tuple[Path, Path]]:
    """(flavour dir, common dir) pairs under /usr/src, newest first."""
    pairs = []
    for d in SRC.glob("linux-headers-*"):
        m = re.fullmatch(r"linux-headers-(.+)-(amd64|arm64|cloud-amd64|cloud-arm64)", d.name)
        if m and (SRC / f"linux-headers-{m.group(1)}-common").is_dir():
            pairs.append((d, SRC / f"linux-headers-{m.group(1)}-common"))
    pairs.sort(key=lambda p: (_version_key(p[0].name), "cloud" not in p[0].name), reverse=True)
    return pairs


def _merge(flavour: Path, common: Path) -> Path:
    """One directory of symlinks holding both halves (built once, then reused)."""
    dest = CACHE / flavour.name.removeprefix("linux-headers-")
    stamp = dest / ".overcommit-merged"
    if stamp.exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for src in (common, flavour):  # flavour last: its generated files win
        for dirpath, dirnames, filenames in os.walk(src):
            rel = Path(dirpath).relative_to(src)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                link = tmp / rel / name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to((Path(dirpath) / name).resolve())
    (tmp / stamp.name).touch()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def find() -> Headers:
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return Headers(Path(env), f"BCC_KERNEL_SOURCE={env}")
    build = Path("/lib/modules") / release() / "build"
    if (build / "include").is_dir() or (build / "Makefile").exists():
        return Headers(None, f"{build} (matching the running kernel)")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return Headers(None, "/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS)")
    pairs = _debian_pairs()
    if pairs:
        flavour, common = pairs[0]
        merged = _merge(flavour, common)
        return Headers(merged, f"{flavour.name} + -common, nearest to {release()} "
                               f"(merged in {merged})")
    for d in sorted(SRC.glob("kernels/*"), key=lambda p: _version_key(p.name), reverse=True):
        return Headers(d, f"{d} (nearest kernel-devel)")
    return Headers(None, "none found")


def apply() -> Headers:
    """Point bcc at the headers found; returns what was chosen."""
    h = find()
    if h.path is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(h.path)
    return h
