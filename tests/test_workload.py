"""Tests of the built-in workload, run as a subprocess (no root, KSM need not run)."""

from __future__ import annotations

import mmap
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracer.counters import read_ksm_stat
from tracer.workload import PAGE_SIZE, page_content, run

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = [
    sys.executable,
    "-c",
    "from tracer.workload import workload_command; workload_command()",
]


def start(*args: str) -> subprocess.Popen[str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.Popen(
        WORKLOAD + list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the workload printed nothing"
    return proc.stdout.readline()


@pytest.fixture
def workload() -> Iterator[list[subprocess.Popen[str]]]:
    """Started workloads; killed at the end if still running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def mergeable_mappings(pid: int) -> list[tuple[int, int, int]]:
    """(start, end, size in kB) of every VMA of pid with VM_MERGEABLE ("mg")."""
    found = []
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path(f"/proc/{pid}/smaps").read_text()):
        flags = re.search(r"^VmFlags:(.*)$", block, re.M).group(1).split()
        if "mg" in flags:
            start, end = (int(x, 16) for x in block.split(None, 1)[0].split("-"))
            size_kb = int(re.search(r"^Size:\s+(\d+) kB", block, re.M).group(1))
            found.append((start, end, size_kb))
    return found


def read_pages(pid: int, start: int, end: int) -> list[bytes]:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(start)
        data = mem.read(end - start)
    return [data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]


def test_mapping_is_mergeable_with_distinct_contents(workload: list) -> None:
    proc = start("--pages", "101", "--distinct", "7", "--hold", "60")
    workload.append(proc)
    line = read_line(proc)
    assert line.startswith(f"workload: pid {proc.pid}, 101 pages (0.4 MiB) MADV_MERGEABLE, 7 ")

    [(begin, end, size_kb)] = mergeable_mappings(proc.pid)
    assert size_kb == 101 * PAGE_SIZE // 1024
    stat = read_ksm_stat(proc.pid)
    assert stat is not None and stat.get("ksm_mergeable", 1) == 1

    pages = read_pages(proc.pid, begin, end)
    assert pages == [page_content(0, i % 7) for i in range(101)]
    assert len(set(pages)) == 7
    assert bytes(PAGE_SIZE) not in pages

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stderr.read() == ""


def test_exits_after_hold(workload: list) -> None:
    proc = start("--pages", "13", "--hold", "0.5")
    workload.append(proc)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "13 pages" in out and "holding 0.5s" in out
    assert err == ""


def test_sigint_exits_quietly(workload: list) -> None:
    proc = start("--pages", "17", "--hold", "60")
    workload.append(proc)
    read_line(proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert proc.stderr.read() == ""


def test_unmerge_rewrites_every_page(workload: list) -> None:
    proc = start("--pages", "31", "--distinct", "1", "--hold", "60", "--unmerge-after", "0.2")
    workload.append(proc)
    assert "unmerging after 0.2s" in read_line(proc)
    assert read_line(proc) == f"workload: pid {proc.pid}, rewrote 31 pages with unique content\n"
    [(begin, end, _)] = mergeable_mappings(proc.pid)
    assert len(set(read_pages(proc.pid, begin, end))) == 31
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "either --mib N or --pages N"),
        (["--mib", "1", "--pages", "3"], "either --mib N or --pages N"),
        (["--pages", "3", "--distinct", "0"], "'--distinct': 0 is not in the range"),
        (["--pages", "3", "--distinct", "4"], "distinct contents (4) must be between 1 and the 3"),
        (["--pages", "3", "--hold", "1", "--unmerge-after", "2"], "must be between 0 and hold"),
        (["--mib", "-1"], "'--mib': -1.0 is not in the range"),
    ],
)
def test_usage_errors(workload: list, args: list[str], message: str) -> None:
    proc = start(*args)
    workload.append(proc)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert message in err
    assert "Traceback" not in err


def test_mmap_failure_is_one_line(workload: list) -> None:
    proc = start("--mib", str(2**40), "--hold", "0")  # 1 EiB
    workload.append(proc)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert err.startswith("Error: cannot map ") and err.count("\n") == 1


def test_mib_rounds_up_to_whole_pages() -> None:
    lines: list[str] = []
    run(mib=0.01, hold=0, ready=lines.append)
    assert lines == [
        f"workload: pid {os.getpid()}, 3 pages (0.0 MiB) MADV_MERGEABLE, "
        "1 distinct contents, holding 0s"
    ]


def test_page_content() -> None:
    assert len(page_content(0, 0)) == PAGE_SIZE == mmap.PAGESIZE
    assert page_content(0, 5) == page_content(0, 5)
    assert len({page_content(0, i) for i in range(50)}) == 50
    assert page_content(1, 0) != page_content(0, 0)
    assert all(any(page_content(s, i)) for s in range(3) for i in range(50))  # never all zeros
