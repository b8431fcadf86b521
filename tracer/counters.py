"""The kernel's own KSM and balloon counters: parsing, polling and KSM settings.

Pure file reading (no bcc). Every reader takes ``root`` so that tests can point
it at a fixture tree shaped like ``/`` (``sys/kernel/mm/ksm``, ``proc/vmstat``,
``proc/PID/ksm_stat``).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

KSM_SYSFS = "sys/kernel/mm/ksm"

# Writable knobs in the order they must be written (see write_ksm_settings).
KSM_SETTINGS = (
    # Switching advisor_mode resets pages_to_scan (to 100 for "none", to
    # advisor_min_pages_to_scan for "scan-time"), and pages_to_scan rejects
    # writes (EINVAL) unless the advisor is "none": the mode goes first.
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "pages_to_scan",
    "sleep_millisecs",
    "use_zero_pages",
    "smart_scan",
    "stable_node_chains_prune_millisecs",
    # These two answer EBUSY while any KSM page exists (pages_shared > 0):
    # only an empty stable tree can be re-rooted per NUMA node or rechained.
    # merge_across_nodes exists only with CONFIG_NUMA.
    "merge_across_nodes",
    "max_page_sharing",
    # run goes last so that ksmd starts with every other knob already set,
    # except run=2 (stop and unmerge everything), which goes first because it
    # empties the stable tree that the two knobs above need empty.
    "run",
)
_NEED_EMPTY_STABLE_TREE = frozenset({"merge_across_nodes", "max_page_sharing"})
RUN_UNMERGE = 2

VMSTAT_KEYS = (
    "cow_ksm",
    "ksm_swpin_copy",
    "balloon_inflate",
    "balloon_deflate",
    "balloon_migrate",
    "nr_balloon_pages",
)


class KsmUnavailable(Exception):
    """The running kernel has no KSM."""

    def __init__(self) -> None:
        super().__init__(
            "this kernel has no KSM (/sys/kernel/mm/ksm is missing; CONFIG_KSM=y is needed)"
        )


def _ksm_dir(root: Path) -> Path:
    path = Path(root) / KSM_SYSFS
    if not path.is_dir():
        raise KsmUnavailable()
    return path


def read_ksm(root: Path = Path("/")) -> dict[str, int]:
    """Every numeric file of /sys/kernel/mm/ksm: counters and numeric settings.

    general_profit (and ksm_zero_pages) are printed as signed longs; general_profit
    is negative while the rmap_items cost more than the merged pages save.
    """
    values = {}
    for path in sorted(_ksm_dir(root).iterdir()):
        try:
            values[path.name] = int(path.read_text())
        except ValueError:  # advisor_mode: "[none] scan-time"
            continue
    return values


def read_ksm_settings(root: Path = Path("/")) -> dict[str, str | int]:
    """The writable KSM knobs this kernel has; advisor_mode as its selected word."""
    ksm = _ksm_dir(root)
    settings: dict[str, str | int] = {}
    for name in KSM_SETTINGS:
        try:
            text = (ksm / name).read_text()
        except FileNotFoundError:  # older kernel, or merge_across_nodes without NUMA
            continue
        if name == "advisor_mode":
            # "[none] scan-time": the bracketed word is selected. Writes take the
            # bare word; a tree written by write_ksm_settings reads back as such.
            selected = re.search(r"\[(.+?)\]", text)
            settings[name] = selected.group(1) if selected else text.strip()
        else:
            settings[name] = int(text)
    return settings


def _write_setting(ksm: Path, name: str, value: str | int) -> None:
    path = ksm / name
    try:
        # One write(2) per value: sysfs parses each write separately.
        with path.open("w") as f:
            f.write(f"{value}\n")
    except OSError as e:
        raise OSError(
            e.errno, f"cannot set KSM {name}={value}: {e.strerror}", str(path)
        ) from None


def _write_order(settings: Mapping[str, str | int]) -> list[str]:
    """The names of ``settings`` in the order to write them; ValueError if not knobs."""
    unknown = set(settings) - set(KSM_SETTINGS)
    if unknown:
        raise ValueError(f"not KSM settings: {', '.join(sorted(unknown))}")
    order = [name for name in KSM_SETTINGS if name in settings]
    if settings.get("run") == RUN_UNMERGE:
        order.insert(0, order.pop())
    return order


def write_ksm_settings(settings: Mapping[str, str | int], root: Path = Path("/")) -> None:
    """Write KSM knobs in the order the kernel accepts (see KSM_SETTINGS).

    advisor_mode is the bare word ("none" or "scan-time"). Raises ValueError for
    names that are not knobs and OSError (naming the knob) when the kernel refuses.
    """
    ksm = _ksm_dir(root)
    for name in _write_order(settings):
        _write_setting(ksm, name, settings[name])


@contextmanager
def ksm_settings(changes: Mapping[str, str | int], root: Path = Path("/")) -> Iterator[None]:
    """Apply KSM setting changes for the duration of a ``with`` block.

    Saves every knob it will change (including knobs the kernel changes as a side
    effect), applies ``changes`` and restores the saved values on exit, also on
    exceptions and KeyboardInterrupt. Only knobs that differ are written back;
    if the kernel refuses one, the others are still restored and the first error
    is raised.
    If merge_across_nodes or max_page_sharing must be restored while KSM pages
    exist, everything is unmerged first (run=2, the only way the kernel allows
    it), then run is restored last.
    """
    _write_order(changes)  # ValueError for names that are not knobs
    current = read_ksm_settings(root)
    missing = set(changes) - set(current)
    if missing:
        raise ValueError(f"this kernel lacks KSM settings: {', '.join(sorted(missing))}")
    names = set(changes)
    if "advisor_mode" in names:
        names.add("pages_to_scan")  # reset by the kernel on a mode switch
    if names & _NEED_EMPTY_STABLE_TREE:
        names.add("run")  # restoring them may need run=2
    saved = {name: current[name] for name in names if name in current}
    try:
        write_ksm_settings(changes, root)
        yield
    finally:
        _restore(saved, root)


def _restore(saved: Mapping[str, str | int], root: Path) -> None:
    # A second Ctrl-C must not cut the restore short: hold SIGINT/SIGTERM back
    # until it is done (they are delivered when unblocked). Blocking also keeps
    # a run=2 unmerge from being aborted by a signal (it returns ERESTARTSYS).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        current = read_ksm_settings(root)
        todo = {name: value for name, value in saved.items() if current.get(name) != value}
        if saved.get("advisor_mode") == "scan-time":
            # The advisor owns pages_to_scan (writes are refused with EINVAL).
            todo.pop("pages_to_scan", None)
        if todo.keys() & _NEED_EMPTY_STABLE_TREE and read_ksm(root).get("pages_shared"):
            # run is always saved along with these knobs, so it is restored last.
            _write_setting(_ksm_dir(root), "run", RUN_UNMERGE)
            todo["run"] = saved["run"]
        errors = []
        for name in _write_order(todo):
            try:
                _write_setting(_ksm_dir(root), name, todo[name])
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def read_vmstat(root: Path = Path("/"), keys: tuple[str, ...] = VMSTAT_KEYS) -> dict[str, int]:
    """The given /proc/vmstat counters, only those this kernel has."""
    wanted = set(keys)
    values = {}
    for line in (Path(root) / "proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = int(value)
    return values


def _read_proc_file(path: Path) -> str | None:
    """A /proc/PID file's text, or None if the process or the file is gone."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        # A process that exits between open() and read() gives ESRCH.
        if e.errno == errno.ESRCH:
            return None
        raise


_YES_NO = {"yes": 1, "no": 0}


def read_ksm_stat(pid: int, root: Path = Path("/")) -> dict[str, int] | None:
    """A process's KSM counters from /proc/PID/ksm_stat (6.1+), or None if gone.

    Values are ints; "ksm_merge_any: yes" and "ksm_mergeable: no" become 1/0.
    /proc/PID/ksm_merging_pages (5.19+) is read only when ksm_stat lacks that key.
    Processes without an mm (kernel threads, zombies) give an empty dict.
    Reading another user's process needs root (the files are mode 0400).
    """
    proc = Path(root) / "proc" / str(pid)
    stat = _read_proc_file(proc / "ksm_stat")
    values: dict[str, int] = {}
    for line in (stat or "").splitlines():
        name, _, value = line.partition(" ")
        value = value.strip()
        values[name.rstrip(":")] = _YES_NO[value] if value in _YES_NO else int(value)
    if "ksm_merging_pages" not in values:
        merging = _read_proc_file(proc / "ksm_merging_pages")
        if merging is None and stat is None:
            return None
        if merging and merging.strip():  # empty for processes without an mm
            values["ksm_merging_pages"] = int(merging)
    return values


def ksm_pids(root: Path = Path("/")) -> list[int]:
    """Pids of the processes KSM knows: rmap_items, merged pages or mergeable VMAs.

    /proc lists thread-group leaders only, so threads are excluded. Processes that
    vanish during the scan, and those this user may not inspect, are skipped.
    """
    pids = []
    for entry in os.scandir(Path(root) / "proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = read_ksm_stat(int(entry.name), root)
        except PermissionError:
            continue
        if stat and (
            stat.get("ksm_rmap_items", 0) > 0
            or stat.get("ksm_merging_pages", 0) > 0
            or stat.get("ksm_mergeable") == 1
        ):
            pids.append(int(entry.name))
    return sorted(pids)


def ksmd_pid(root: Path = Path("/")) -> int | None:
    """The ksmd kernel thread (one per host)."""
    for entry in os.scandir(Path(root) / "proc"):
        if entry.name.isdigit() and _read_proc_file(Path(entry.path) / "comm") == "ksmd\n":
            return int(entry.name)
    return None


def ksmd_cpu_ns(pid: int, root: Path = Path("/")) -> int | None:
    """CPU time ksmd has run, in ns: the first field of its schedstat
    (CONFIG_SCHED_INFO), exact where utime/stime are tick-sampled."""
    text = _read_proc_file(Path(root) / "proc" / str(pid) / "schedstat")
    return int(text.split()[0]) if text else None


def wait_stable(read, settle: float = 1.5, timeout: float = 60.0, poll: float = 0.25):
    """read() once it has returned the same value for `settle` seconds: KSM
    counters move in bursts, one per ksmd batch, so "done" means "quiet"."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(poll)
        cur = read()
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= settle:
            return cur
    raise TimeoutError(f"still changing after {timeout:g}s: {last}")
