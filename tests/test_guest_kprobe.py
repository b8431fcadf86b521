"""The tracer inside a Debian 12 guest, for real: Linux 6.1 has kprobes and
BPF trampolines but no KSM tracepoints, and a guest's balloon can only be
traced from inside the guest.

One guest run (module fixture): the image of `overcommit lab image` (built
cold, or reused), booted by `overcommit lab guest` under QEMU (KVM when it
boots, else TCG).  Inside: `doctor --json`, then two recordings of the same
events, one with the attach modes the kernel allows (fentry on Debian's 6.1)
and one with fentry left out (the kprobe variant), while four workloads
merge (one unmerges) and the host inflates, then deflates, the balloon
through QMP.  Every number asserted is also read by the guest itself
(/proc/PID/ksm_merging_pages, /proc/vmstat) or asked by the host (QMP).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections import Counter

import pytest
from conftest import OVERCOMMIT

from tracer import guestrun
from tracer import image as guest_image
from tracer.errors import UserError
from tracer.recording import read

pytestmark = [pytest.mark.lab, pytest.mark.root]

TRACED = ("kprobe", "fentry")
BALLOON_MIB = 64


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    out = tmp_path_factory.mktemp("guest")
    t0 = time.monotonic()
    try:
        img = guest_image.build(print)
        t_image = time.monotonic() - t0
        guestrun.run(guestrun.Settings(outdir=out, balloon_mib=BALLOON_MIB), print, img)
    except UserError as e:
        pytest.fail(f"lab guest: {e}")
    t_total = time.monotonic() - t0
    print(f"guest test set-up: image {t_image:.0f}s, total {t_total:.0f}s")
    return {
        "dir": out,
        "doctor": json.loads((out / "doctor.json").read_text()),
        "guest": json.loads((out / "guest.json").read_text()),
        "host": json.loads((out / "host.json").read_text()),
        "checks": guestrun.checks(out),
    }


def _arg(args: list[str], name: str, default: int) -> int:
    return int(args[args.index(name) + 1]) if name in args else default


def _contents(args: list[str]) -> Counter:
    """Pages per content of one workload: page i has content i % distinct,
    the same in every process with the same seed."""
    pages, distinct, seed = (_arg(args, "--pages", 0), _arg(args, "--distinct", 1),
                             _arg(args, "--seed", 0))
    return Counter((seed, i % distinct) for i in range(pages))


def _ksm_pages_needed(sharers: Counter, max_page_sharing: int) -> int:
    """One KSM page per content per max_page_sharing sharers (stable node
    chains)."""
    return sum(math.ceil(n / max_page_sharing) for n in sharers.values())


def test_doctor_traces_ksm_and_balloon_with_kprobes_or_fentry(guest):
    d = guest["doctor"]
    assert d["kernel"].startswith("6.1."), d["kernel"]
    assert d["problems"] == []
    assert d["mechanisms"]["kprobes"]["ok"], d["mechanisms"]["kprobes"]
    assert d["headers"].startswith(f"/lib/modules/{d['kernel']}/build"), d["headers"]
    assert d["balloon"]["driver_loaded"]
    modes = {e["event"]: e for e in d["events"]}
    for event in ("merges", "balloon_inflate", "balloon_deflate"):
        assert modes[event]["mode"] in TRACED, modes[event]
    assert modes["merges"]["hook"] == "try_to_merge_one_page"


def test_recordings_say_kernel_and_attach_modes(guest):
    """Each recording reads on the host like any other, and says which
    kernel and which attach modes it was made with."""
    doctor = {e["event"]: e["mode"] for e in guest["doctor"]["events"]}
    want = {"guest.arrow": doctor["merges"], guestrun.KPROBE_RECORDING: "kprobe"}
    assert set(guest["checks"]) == set(want)
    for name, mode in want.items():
        path = guest["dir"] / name
        meta = read(path).meta
        assert meta["kernel"] == guest["doctor"]["kernel"]
        assert meta["variants"]["ksm"] == meta["variants"]["balloon"] == mode
        s = json.loads(subprocess.run([OVERCOMMIT, "summary", "--json", str(path)],
                                      capture_output=True, text=True, check=True).stdout)
        assert s["kernel"] == guest["doctor"]["kernel"]
        for event in ("merges", "unmerges", "balloon_inflate", "balloon_deflate"):
            assert s["attach"][event] == mode, (name, event, s["attach"])
        assert s["closed_cleanly"] and s["lost_events"] == 0


@pytest.mark.parametrize("recording", ["guest.arrow", guestrun.KPROBE_RECORDING])
def test_per_process_merges_match_ksm_merging_pages(guest, recording):
    """merged - unmerged = change of the guest's own ksm_merging_pages,
    exactly, per process; and the merges and unmerges themselves are exact."""
    c = guest["checks"][recording]
    mps = guest["guest"]["ksm_settings"]["max_page_sharing"]
    assert len(c["workloads"]) == len(guestrun.WORKLOADS)
    new_ksm_pages: Counter = Counter()
    sharers: dict[int, Counter] = {}
    for w, g in zip(c["workloads"], guest["guest"]["workloads"]):
        args = g["args"]
        pages, seed = _arg(args, "--pages", 0), _arg(args, "--seed", 0)
        assert w["recorded_net"] == w["guest_net"], w
        # Every page has a twin: all of it became KSM-mapped, each page once.
        assert g["ksm_merging_pages_merged"] == pages
        assert w["merged_pages"] == pages, w
        # A merge attempt may fail and be retried on ksmd's next pass (the
        # folio lock taken, the page written meanwhile): no fixed number, but
        # both variants must see the same ones (test_kprobe_and_fentry_...).
        new_ksm_pages[seed] += w["new_ksm_pages"]
        sharers.setdefault(seed, Counter()).update(_contents(args))
        if w["unmerges"]:
            assert g["ksm_merging_pages_after"] == 0
            assert w["unmerged_pages"] == pages
            # Its KSM pages outlive the rewrite (another process maps them):
            # every COW break went through remove_rmap_item_from_tree(), and
            # the hook saw each one.
            assert w["unmerged_pages_seen"] == pages, w
        else:
            assert w["unmerged_pages"] == 0 and w["unmerged_pages_seen"] == 0, w
    # The partner rule of try_to_merge_two_pages() (kpage == NULL first): one
    # new KSM page per content and max_page_sharing sharers, whichever
    # process of a seed gave the page.
    for seed, n in new_ksm_pages.items():
        assert n == _ksm_pages_needed(sharers[seed], mps), (seed, n)
    x = c["crosscheck"]
    assert x["merged_minus_unmerged"] == x["pages_shared_plus_sharing_change"]


@pytest.mark.parametrize("recording", ["guest.arrow", guestrun.KPROBE_RECORDING])
def test_balloon_matches_qmp_and_vmstat(guest, recording):
    b = guest["checks"][recording]["balloon"]
    asked = BALLOON_MIB * 2**20 // 4096
    inflate, deflate = guest["host"]["balloon_asked"]["inflate"], \
        guest["host"]["balloon_asked"]["deflate"]
    assert (inflate["old_target"] - inflate["new_target"]) // 4096 == asked
    assert (deflate["new_target"] - deflate["old_target"]) // 4096 == asked
    assert b["inflated_pages"] == b["host_asked_inflate"] == b["vmstat_inflate"] == asked
    assert b["deflated_pages"] == b["host_asked_deflate"] == b["vmstat_deflate"] == asked


def test_kprobe_and_fentry_see_the_same_events(guest):
    """Two attach mechanisms on the same functions, at the same time: the
    same counts per process and kind, and the same frames."""
    frames = {}
    for name in guest["checks"]:
        df = read(guest["dir"] / name).frame()
        counts = df[df.record == "count"].groupby(["pid", "name"], observed=True)["value"].sum()
        ev = df[df.record == "event"]
        frames[name] = (counts[counts > 0].to_dict(),
                        {k: sorted(ev[ev.name == k].pfn.tolist())
                         for k in ("new_ksm_page", "merge_with_ksm_page", "balloon_inflate")})
    (a_counts, a_pfns), (b_counts, b_pfns) = frames.values()
    assert a_counts == b_counts
    assert a_pfns == b_pfns
    assert len(set(a_pfns["balloon_inflate"])) == BALLOON_MIB * 2**20 // 4096


def test_fleet_report_shows_host_and_guest_kernels(guest, tmp_path):
    """The host's recording and the guest's in one report, each with its
    kernel and attach modes."""
    from tracer import cli
    if "report" not in cli.main.list_commands(None):
        pytest.skip("no `report` command in this installation")
    host = tmp_path / "host.arrow"
    subprocess.run([OVERCOMMIT, "record", "-q", "-d", "2", "-o", str(host)], check=True,
                   capture_output=True)
    html = tmp_path / "fleet.html"
    subprocess.run([OVERCOMMIT, "report", "-q", str(host), str(guest["dir"] / "guest.arrow"),
                    str(guest["dir"] / guestrun.KPROBE_RECORDING), "-o", str(html)],
                   check=True, capture_output=True)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(
        r"<script.*?</script>", " ", html.read_text(), flags=re.DOTALL)))
    assert read(host).meta["kernel"] in text
    assert guest["doctor"]["kernel"] in text
    mode = {e["event"]: e["mode"] for e in guest["doctor"]["events"]}["merges"]
    assert re.search(rf"merges {mode} try_to_merge_one_page", text)
    assert re.search(r"merges kprobe try_to_merge_one_page", text)
