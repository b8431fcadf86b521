"""The built-in KSM workload: mergeable memory with a known number of distinct pages.

``overcommit workload --mib N --distinct K`` maps N MiB of anonymous private
memory, marks it MADV_MERGEABLE and fills it so that exactly K distinct page
contents exist. Once ksmd has merged it, the process holds K KSM pages and
N MiB / 4 KiB - K pages share them; ``--unmerge-after`` then writes every page
(copy-on-write breaks of the KSM pages), which is what KSM's unmerge looks like.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import signal
import struct
import sys
import time
from collections.abc import Callable

import click

# KSM merges base pages (THPs are split when merged).
PAGE_SIZE = mmap.PAGESIZE
MIB = 1024 * 1024


def page_content(seed: int, index: int) -> bytes:
    """Page content number ``index`` for ``seed``: never all zeros.

    Zero pages would be merged with the kernel's zero page when use_zero_pages=1
    and counted apart (ksm_zero_pages); these never are. Processes share content
    exactly when they use the same seed.
    """
    digest = hashlib.sha256(f"overcommit workload seed={seed} content={index}".encode()).digest()
    return digest * (PAGE_SIZE // len(digest))


def _print_ready(line: str) -> None:
    print(line, flush=True)


def run(
    mib: float | None = None,
    distinct: int = 1,
    hold: float = 60.0,
    unmerge_after: float | None = None,
    pages: int | None = None,
    seed: int = 0,
    ready: Callable[[str], None] = _print_ready,
) -> None:
    """Map, fill and hold mergeable memory; return after ``hold`` seconds.

    Give ``mib`` (rounded up to whole pages) or exactly ``pages``. Page i gets
    content i % distinct. ``ready`` receives one line once the memory is filled;
    ``hold`` and ``unmerge_after`` count from then. After ``unmerge_after``
    seconds every page is rewritten with unique content (a KSM unmerge) and
    ``ready`` receives a second line.
    Raises ValueError for bad arguments and OSError when mmap/madvise fail.
    """
    if (mib is None) == (pages is None):
        raise ValueError("give either mib or pages")
    if pages is None:
        if mib <= 0:
            raise ValueError(f"mib must be positive, not {mib}")
        pages = math.ceil(mib * MIB / PAGE_SIZE)
    if pages < 1:
        raise ValueError(f"pages must be positive, not {pages}")
    if not 1 <= distinct <= pages:
        raise ValueError(
            f"distinct contents ({distinct}) must be between 1 and the {pages} pages mapped"
        )
    if hold < 0 or (unmerge_after is not None and not 0 <= unmerge_after <= hold):
        raise ValueError(f"unmerge-after ({unmerge_after}s) must be between 0 and hold ({hold}s)")

    # Python's default anonymous mmap is MAP_SHARED, and KSM silently ignores
    # MADV_MERGEABLE on shared mappings: it must be private.
    try:
        mem = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        raise OSError(e.errno, f"cannot map {pages} pages: {e.strerror}") from None
    with mem:
        try:
            mem.madvise(mmap.MADV_MERGEABLE)
        except OSError as e:
            # EINVAL here means a kernel built without CONFIG_KSM.
            raise OSError(e.errno, f"madvise(MADV_MERGEABLE) failed: {e.strerror}") from None
        contents = [page_content(seed, k) for k in range(distinct)]
        for i in range(pages):
            mem[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = contents[i % distinct]

        plan = f", unmerging after {unmerge_after:g}s" if unmerge_after is not None else ""
        ready(
            f"workload: pid {os.getpid()}, {pages} pages ({pages * PAGE_SIZE / MIB:.1f} MiB) "
            f"MADV_MERGEABLE, {distinct} distinct contents, holding {hold:g}s{plan}"
        )
        start = time.monotonic()
        if unmerge_after is not None:
            time.sleep(unmerge_after)
            # A stamp unique to this run and page at the start of every page:
            # each write to a merged page is a COW break of its KSM page.
            nonce = int.from_bytes(os.urandom(8), "little")
            for i in range(pages):
                mem[i * PAGE_SIZE : i * PAGE_SIZE + 16] = struct.pack("<QQ", nonce, i)
            ready(f"workload: pid {os.getpid()}, rewrote {pages} pages with unique content")
        time.sleep(max(0.0, hold - (time.monotonic() - start)))


def _exit_quietly(signum: int, frame: object) -> None:
    sys.exit(0)


@click.command(
    "workload",
    epilog="""\b
Examples:
  overcommit workload --mib 256 --distinct 16 --hold 120
      256 MiB in which 16 page contents repeat: ksmd can free all but 16 pages.
  overcommit workload --mib 64 & overcommit workload --mib 64
      Two processes with the same (default) seed share their content.
  overcommit workload --mib 64 --seed 2 --unmerge-after 30
      Own content; after 30 s every page is rewritten (KSM unmerge: COW breaks).
""",
)
@click.option(
    "--mib",
    type=click.FloatRange(min=0, min_open=True),
    help="Size in MiB (rounded up to whole pages).",
)
@click.option(
    "--pages",
    type=click.IntRange(min=1),
    help="Size as an exact number of pages (instead of --mib).",
)
@click.option(
    "--distinct",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Number of distinct page contents.",
)
@click.option(
    "--hold",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to hold the memory once filled, then exit.",
)
@click.option(
    "--unmerge-after",
    type=click.FloatRange(min=0),
    help="Seconds after which every page gets unique content (breaks KSM sharing).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Content seed: processes share content only with the same seed.",
)
def workload_command(
    mib: float | None,
    pages: int | None,
    distinct: int,
    hold: float,
    unmerge_after: float | None,
    seed: int,
) -> None:
    """Hold MADV_MERGEABLE memory with a known number of distinct pages for KSM to merge.

    Prints one line when the memory is ready. Exits 0 after --hold seconds, or on
    SIGTERM or Ctrl-C.
    """
    if (mib is None) == (pages is None):
        raise click.UsageError("give the size as either --mib N or --pages N")
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        run(mib, distinct, hold, unmerge_after, pages, seed)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except OSError as e:
        raise click.ClickException(e.strerror or str(e)) from None
    except KeyboardInterrupt:
        sys.exit(0)
