"""`overcommit lab image`: a Debian 12 guest with the tracer in it.

The guest that runs the kprobe/fentry path for real (Linux 6.1: kprobes, no
KSM tracepoints), built from distribution packages only:

1. ``debootstrap --variant=minbase bookworm`` (one suite only), then, in the
   chroot, ``apt-get install`` from bookworm + bookworm-security (where the
   current 6.1 kernel lives): the stock ``linux-image-6.1.0-N-amd64``, the
   ``linux-headers`` of the same version (bcc compiles against
   /lib/modules/$(uname -r)/build), ``python3-bpfcc``, ``python3-venv``,
   ``make`` (no recommends).  The kernel's own postinst builds the initrd
   (initramfs-tools, MODULES=most: virtio_pci, virtio_blk, ext4);
2. the project, copied from the working tree (git's tracked and untracked,
   not ignored, files) to /opt/overcommit and installed the README's way,
   ``make setup``, with the guest's system packages named on the command line
   (no QEMU, Chromium, bpftrace in a guest);
3. packed without mounting anything: ``mke2fs -d ROOTFS -t ext4`` into
   root.img, beside the guest's vmlinuz and initrd.img.

Cached under ~/.cache/overcommit/guest-image/: the root file system is keyed
by the package versions (the candidates of the host's package lists where the
host is Debian 12 too) and reused while they hold; the project is keyed by a
hash of its files: when only the project changed it is re-copied into the
cached root file system and ``make setup`` re-run (seconds), and when
nothing changed the image is used as it is.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import click

from .errors import UserError

CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
         / "overcommit" / "guest-image")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
PROJECT = Path(__file__).resolve().parents[1]
GUEST_PROJECT = "opt/overcommit"          # in the guest's root file system
SESSION = "tracer/guest_session.py"       # the guest's init (see guestrun.py)
# Installed in the chroot besides the kernel and its headers.  make:
# `make setup`; kmod and initramfs-tools: the initrd; procps: ps/free for a
# human at the console log.
PACKAGES = ("python3-bpfcc", "python3-venv", "make", "kmod", "initramfs-tools", "procps")
# Bump when the steps below change what a root file system holds.
FORMAT = 1
IMAGE_SLACK = 1.25                        # root.img size / used size
IMAGE_FREE_MIB = 512                      # plus this much free space


@dataclass(frozen=True)
class GuestImage:
    """What QEMU boots: -kernel KERNEL -initrd INITRD, root.img as /dev/vda."""
    root: Path
    kernel: Path
    initrd: Path
    release: str             # uname -r in the guest
    packages: dict           # package -> version installed
    project_hash: str

    @property
    def init(self) -> str:
        return f"/{GUEST_PROJECT}/{SESSION}"

    def describe(self) -> str:
        return (f"Debian 12, Linux {self.release} "
                f"({self.packages.get('linux-image-' + self.release, '?')}), "
                f"bcc {self.packages.get('python3-bpfcc', '?')}")


class Progress:
    """Each step with the time it took, and the elapsed time of the build."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        self(text + " ...")
        t = time.monotonic()
        yield
        self(f"  done in {time.monotonic() - t:.1f}s")


# -- inputs and keys ------------------------------------------------------------

def _run(cmd: list[str], log: Path | None = None, env: dict | None = None,
         what: str | None = None, **kw) -> str:
    """Run a command; its output goes to `log` (shown in part on failure)."""
    if log is None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, **kw)
        out = r.stdout + r.stderr
    else:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env,
                               check=False, **kw)
        out = ""
    if r.returncode:
        tail = out if log is None else log.read_text(errors="replace")
        tail = "\n".join(tail.strip().splitlines()[-15:])
        raise UserError(f"{what or cmd[0]} failed (exit {r.returncode})"
                        + (f"; log: {log}" if log else "") + f":\n{tail}")
    return r.stdout if log is None else ""


def _candidate(package: str) -> str | None:
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True,
                         check=False).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m and m.group(1) != "(none)" else None


def host_versions() -> dict[str, str] | None:
    """The versions a build would install today, from the host's own package
    lists (no network) where the host is Debian 12 too; None elsewhere."""
    try:
        osr = Path("/etc/os-release").read_text()
    except OSError:
        return None
    if f"VERSION_CODENAME={SUITE}" not in osr or not shutil.which("apt-cache"):
        return None
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                         text=True, check=False).stdout
    m = re.search(r"Depends:\s*linux-image-(\S+)", out)
    if not m:
        return None
    image = f"linux-image-{m.group(1)}"
    versions = {p: _candidate(p) for p in (image, "python3-bpfcc")}
    if None in versions.values():
        return None
    return versions


def base_key(versions: dict[str, str] | None) -> str | None:
    if versions is None:
        return None
    h = hashlib.sha256(json.dumps([FORMAT, SUITE, MIRROR, PACKAGES, sorted(versions.items())])
                       .encode())
    return h.hexdigest()[:12]


def project_files(root: Path = PROJECT) -> list[str]:
    """The working tree's files the way git sees them: tracked and untracked,
    less what .gitignore ignores (.venv, caches), as they are on disk."""
    if (root / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached",
                              "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
    else:   # an unpacked release: everything but what a build leaves
        skip = {".venv", ".git", "__pycache__", "build", ".pytest_cache"}
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                       if p.is_file() and not skip & set(p.relative_to(root).parts)
                       and ".egg-info" not in str(p))
    return [n for n in names if (root / n).is_file() and not (root / n).is_symlink()]


def project_hash(root: Path = PROJECT, files: list[str] | None = None) -> str:
    h = hashlib.sha256()
    for name in files if files is not None else project_files(root):
        p = root / name
        h.update(name.encode() + b"\0" + (b"x" if os.access(p, os.X_OK) else b"-"))
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


# -- the chroot -----------------------------------------------------------------

HOST_CA = "etc/overcommit/host-ca-certificates.crt"   # in the chroot, while building


def _host_ca_bundle() -> Path | None:
    """The CA bundle the host's pip trusts (a TLS-intercepting proxy's CA
    is often only there): pip in the chroot trusts the same."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return Path(os.environ[var])
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


def _chroot_env(rootfs: Path | None = None) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_CACHE_DIR": "1", "PIP_ROOT_USER_ACTION": "ignore"}
    for k, v in os.environ.items():   # proxies and package indexes the host uses
        if k.lower() in ("http_proxy", "https_proxy", "no_proxy") or (
                k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL") and v.startswith("http")):
            env[k] = v
    if rootfs is not None and (rootfs / HOST_CA).is_file():
        env["PIP_CERT"] = env["SSL_CERT_FILE"] = "/" + HOST_CA
    return env


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    return [line.split()[1] for line in lines if line.split()[1].startswith(prefix)]


@contextmanager
def _proc_mounted(rootfs: Path) -> Iterator[None]:
    """/proc in the chroot while packages install (as debootstrap does), and
    unmounted whatever happens: nothing stays mounted in the cache."""
    target = rootfs / "proc"
    if not os.path.ismount(target):     # else left by a build that was killed
        subprocess.run(["mount", "-t", "proc", "proc", str(target)], check=True)
    try:
        yield
    finally:
        if subprocess.run(["umount", str(target)], check=False).returncode:
            subprocess.run(["umount", "-l", str(target)], check=False)


def _chroot(rootfs: Path, cmd: list[str], log: Path, what: str) -> str:
    return _run(["chroot", str(rootfs), *cmd], log, env=_chroot_env(rootfs), what=what)


def _chroot_out(rootfs: Path, cmd: list[str]) -> str:
    return _run(["chroot", str(rootfs), *cmd], env=_chroot_env())


def _remove_tree(path: Path) -> None:
    mounted = _mounts_under(path)
    if mounted:
        raise UserError(f"{path} still has mounts ({', '.join(mounted)}): unmount them first")
    shutil.rmtree(path, ignore_errors=True)


# -- the steps ------------------------------------------------------------------

def _debootstrap(rootfs: Path, log: Path, p: Progress) -> None:
    if not shutil.which("debootstrap"):
        raise UserError("debootstrap not found: apt-get install debootstrap "
                        "(the guest's root file system is built from Debian packages)")
    debs = CACHE / "debs"       # debootstrap's own cache: reused when only a few changed
    debs.mkdir(parents=True, exist_ok=True)
    with p.step(f"debootstrap {SUITE} (minbase) from {MIRROR}"):
        _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", SUITE, str(rootfs),
              MIRROR], log, what="debootstrap")


def _configure(rootfs: Path) -> None:
    """apt sources with bookworm-security (debootstrap takes one suite),
    fast dpkg (the image is packed afterwards; a crash means a rebuild) and
    nothing started in the chroot."""
    etc = rootfs / "etc"
    (etc / "apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n")
    (etc / "apt/apt.conf.d/90overcommit").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
        'Acquire::Languages "none";\n')
    (etc / "dpkg/dpkg.cfg.d/90overcommit").write_text("force-unsafe-io\n")
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    resolv = etc / "resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    try:
        resolv.write_text(Path("/etc/resolv.conf").read_text())
    except OSError:
        pass
    (etc / "hostname").write_text("oc-guest\n")
    (etc / "fstab").write_text("# the guest's init mounts what it needs "
                               "(tracer/guest_session.py)\n")


def _install_packages(rootfs: Path, log: Path, p: Progress) -> dict[str, str]:
    with p.step("apt-get update (bookworm, bookworm-updates, bookworm-security)"):
        _chroot(rootfs, ["apt-get", "update", "-q"], log, "apt-get update in the chroot")
    deps = _chroot_out(rootfs, ["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends:\s*linux-image-(\S+)", deps)
    if not m:
        raise UserError(f"the chroot's apt knows no linux-image-amd64 ({deps.strip()[:200]})")
    release = m.group(1)
    version = re.search(r"Candidate:\s*(\S+)",
                        _chroot_out(rootfs, ["apt-cache", "policy", f"linux-image-{release}"]))
    if not version:
        raise UserError(f"no candidate for linux-image-{release} in the chroot")
    kernel = [f"linux-image-{release}={version.group(1)}",
              f"linux-headers-{release}={version.group(1)}"]
    with p.step(f"apt-get install {' '.join(kernel)} {' '.join(PACKAGES)}"):
        _chroot(rootfs, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                         *kernel, *PACKAGES], log, "apt-get install in the chroot")
    _chroot(rootfs, ["apt-get", "clean"], log, "apt-get clean")
    out = _chroot_out(rootfs, ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n"])
    installed = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    return {"release": release, **{k: installed[k] for k in
            (f"linux-image-{release}", f"linux-headers-{release}", "python3-bpfcc",
             "python3-venv") if k in installed}}


def _check_initrd(rootfs: Path, release: str) -> None:
    """The guest boots root=/dev/vda through these modules (MODULES=most)."""
    listing = _chroot_out(rootfs, ["lsinitramfs", f"/boot/initrd.img-{release}"])
    have = {Path(line).name.split(".ko")[0] for line in listing.splitlines() if ".ko" in line}
    missing = {"virtio_pci", "virtio_blk", "ext4"} - have
    if missing:
        raise UserError(f"initrd.img-{release} lacks {', '.join(sorted(missing))}")


def _copy_project(rootfs: Path, files: list[str]) -> None:
    """The working tree into /opt/overcommit, keeping the venv (and the
    metadata pip left) of an earlier `make setup`: mtimes are kept, so make
    reinstalls only when pyproject.toml changed."""
    dest = rootfs / GUEST_PROJECT
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dest.iterdir():
        if entry.name == ".venv" or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, target)
    # The guest's init must be executable whatever mode git checked it out with.
    (dest / SESSION).chmod(0o755)


def _make_setup(rootfs: Path, release: str, log: Path, p: Progress) -> None:
    # The README's install path; only the packages a guest needs (no QEMU,
    # Chromium, bpftrace): already installed, so make installs none.
    apt = f"python3-venv python3-bpfcc linux-headers-{release}"
    ca = _host_ca_bundle()
    if ca is not None:
        (rootfs / HOST_CA).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca, rootfs / HOST_CA)
    try:
        with p.step(f'make setup APT_PACKAGES="{apt}" in the chroot'):
            _chroot(rootfs, ["make", "-C", f"/{GUEST_PROJECT}", "setup",
                             f"APT_PACKAGES={apt}"], log, "make setup in the chroot")
            _chroot(rootfs, [f"/{GUEST_PROJECT}/.venv/bin/overcommit", "--version"], log,
                    "the installed overcommit")
            # Byte-compiled now: the guest's root file system is a snapshot,
            # every boot would compile the project again (slow under TCG).
            _chroot(rootfs, [f"/{GUEST_PROJECT}/.venv/bin/python", "-m", "compileall", "-q",
                             f"/{GUEST_PROJECT}/tracer", f"/{GUEST_PROJECT}/reports"], log,
                    "compileall")
    finally:
        (rootfs / HOST_CA).unlink(missing_ok=True)   # the guest needs no network


def _du(path: Path) -> int:
    out = _run(["du", "-sxb", str(path)])
    return int(out.split()[0])


def _pack(rootfs: Path, out: Path, p: Progress) -> None:
    size_mib = int(_du(rootfs) * IMAGE_SLACK / 2**20) + IMAGE_FREE_MIB
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with p.step(f"mke2fs -t ext4 -d rootfs {out.name} ({size_mib} MiB, sparse)"):
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "oc-guest-root", "-d", str(rootfs),
              str(tmp), f"{size_mib}M"], what="mke2fs")
        tmp.rename(out)


# -- the build ------------------------------------------------------------------

class Interrupted(UserError):
    def __init__(self):
        super().__init__("interrupted (SIGTERM)", 143)


def _raise_interrupted(signum, frame):
    raise Interrupted()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, through every `finally` (unmounting
    /proc in the chroot, stopping a guest), instead of ending at once."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def _locked() -> Iterator[None]:
    """One build at a time (two test runs, or a test and a user)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _bases() -> list[Path]:
    """Finished base builds, newest first."""
    done = [d for d in CACHE.glob("base-*") if (d / "base.json").exists()]
    return sorted(done, key=lambda d: (d / "base.json").stat().st_mtime, reverse=True)


def _build_base(key: str, p: Progress) -> Path:
    d = CACHE / f"base-{key}"
    _remove_tree(d)
    rootfs = d / "rootfs"
    d.mkdir(parents=True)
    log = d / "build.log"
    p(f"Building the guest's root file system in {d} (log: {log})")
    _debootstrap(rootfs, log, p)
    _configure(rootfs)
    with _proc_mounted(rootfs):
        info = _install_packages(rootfs, log, p)
    release = info["release"]
    for src, name in ((f"boot/vmlinuz-{release}", "vmlinuz"),
                      (f"boot/initrd.img-{release}", "initrd.img")):
        if not (rootfs / src).exists():
            raise UserError(f"the chroot has no /{src} (log: {log})")
        shutil.copy2(rootfs / src, d / name)
    _check_initrd(rootfs, release)
    (d / "base.json").write_text(json.dumps(info, indent=1) + "\n")
    return d


def build(say: Callable[[str], None] = lambda t: click.echo(t, err=True),
          rebuild: bool = False) -> GuestImage:
    """The guest image, from the cache where its inputs have not changed."""
    if os.geteuid() != 0:
        raise UserError("building the guest image needs root (debootstrap, chroot)")
    for tool, pkg in (("mke2fs", "e2fsprogs"), ("chroot", "coreutils")):
        if not shutil.which(tool):
            raise UserError(f"{tool} not found: apt-get install {pkg}")
    p = Progress(say)
    files = project_files()
    phash = project_hash(PROJECT, files)
    versions = host_versions()
    key = base_key(versions)
    with _locked():
        bases = _bases()
        if key is not None:
            base = CACHE / f"base-{key}"
            if not (base / "base.json").exists():
                base = None
            else:
                p("Root file system cached for "
                  + ", ".join(f"{k} {v}" for k, v in versions.items()))
        else:
            # Not a Debian 12 host: the packages cannot be known offline; the
            # newest cached root file system stands (rebuild to refresh it).
            base = bases[0] if bases else None
            key = base.name.removeprefix("base-") if base else "unkeyed"
            if base:
                p(f"Root file system cached in {base} (this host's package lists cannot "
                  "say whether it is current: --rebuild refreshes it)")
        if rebuild or base is None:
            base = _build_base(key, p)
        info = json.loads((base / "base.json").read_text())
        release = info["release"]
        rootfs = base / "rootfs"
        image_json = base / "image.json"
        state = json.loads(image_json.read_text()) if image_json.exists() else {}
        if state.get("project_hash") != phash or not (base / "root.img").exists():
            p(f"Project {phash} ({len(files)} files) into /{GUEST_PROJECT}"
              + (f" (was {state['project_hash']})" if state.get("project_hash") else ""))
            with p.step("copying the project"):
                _copy_project(rootfs, files)
            with _proc_mounted(rootfs):
                _make_setup(rootfs, release, base / "build.log", p)
            _pack(rootfs, base / "root.img", p)
            state = {"project_hash": phash, "built_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            image_json.write_text(json.dumps(state, indent=1) + "\n")
        else:
            p(f"Image current for project {phash}: {base / 'root.img'}")
        # Older root file systems (other package versions) only take space.
        for old in bases:
            if old != base:
                p(f"Removing the outdated {old.name}")
                _remove_tree(old)
    img = GuestImage(base / "root.img", base / "vmlinuz", base / "initrd.img", release,
                     {k: v for k, v in info.items() if k != "release"}, phash)
    p(f"Guest image: {img.describe()}")
    return img


@click.command("image", short_help="Build (or reuse) the Debian 12 guest for `lab guest`.",
               epilog="""\b
Examples:
  overcommit lab image              # build, or reuse what is cached
  overcommit lab image --rebuild    # fresh root file system (new packages)
Then:  overcommit lab guest -o guest-out""")
@click.option("--rebuild", is_flag=True, help="Build the root file system anew.")
@click.option("--json", "as_json", is_flag=True, help="Print the image's paths as JSON.")
def image_command(rebuild, as_json):
    """Build the Debian 12 guest (Linux 6.1, bcc, this project) for `lab guest`.

    debootstrap, then the stock 6.1 kernel, its headers and bcc from
    bookworm(-security), then the project installed by `make setup`; packed
    as an ext4 image beside its kernel and initrd.  Cached in
    ~/.cache/overcommit/guest-image/: the packages are reused while their
    versions hold, the project re-copied when it changed.  Needs root,
    debootstrap and e2fsprogs, and Debian's mirrors and PyPI.
    """
    with sigterm_raises():
        img = build(lambda t: click.echo(t, err=True), rebuild)
    if as_json:
        click.echo(json.dumps({k: str(v) if isinstance(v, Path) else v
                               for k, v in asdict(img).items()}, indent=1))
    else:
        click.echo(f"root   {img.root}\nkernel {img.kernel}\ninitrd {img.initrd}")
