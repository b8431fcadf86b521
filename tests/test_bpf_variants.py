"""Every attach variant compiles; every kprobe program passes this kernel's
verifier (loaded, not attached: this kernel has no kprobes to attach to);
fentry programs compile (this kernel cannot load tracing programs at all)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import OVERCOMMIT
from tracer import kernel, probes

pytestmark = pytest.mark.root

KSM_KPROBES = {"oc_try_to_merge_one_page", "oc_try_to_merge_one_page_ret",
               "oc_remove_rmap_item_from_tree", "oc_break_ksm"}
BALLOON_KPROBES = {"oc_balloon_page_enqueue", "oc_balloon_page_list_enqueue_ret",
                   "oc_balloon_page_list_dequeue_ret", "oc_balloon_page_dequeue_ret"}


def _kprobe_plan(p: kernel.Plan) -> kernel.Plan:
    """Every kprobe program of the variant, to be loaded through the verifier."""
    p.kprobes = [kernel.Probe("-", name) for name in sorted(KSM_KPROBES | BALLOON_KPROBES)]
    return p


def test_kprobe_variants_pass_the_verifier():
    plan = _kprobe_plan(kernel.variant(ksm=kernel.KPROBE, balloon=kernel.KPROBE))
    names = set(probes.verify(plan))
    assert KSM_KPROBES | BALLOON_KPROBES <= names


def test_kprobe_variant_without_the_list_dequeue():
    """Kernels before 5.2 only have balloon_page_dequeue()."""
    plan = kernel.variant(ksm=kernel.KPROBE, balloon=kernel.KPROBE)
    plan.defines["OC_HOOK_BALLOON_PAGE_LIST_DEQUEUE"] = 0
    plan.kprobes = [kernel.Probe("-", "oc_balloon_page_dequeue_ret")]
    assert "oc_balloon_page_dequeue_ret" in probes.verify(plan)


@pytest.mark.parametrize("list_dequeue", [1, 0])
def test_fentry_variants_compile(list_dequeue):
    plan = kernel.variant(ksm=kernel.FENTRY, balloon=kernel.FENTRY)
    plan.defines["OC_HOOK_BALLOON_PAGE_LIST_DEQUEUE"] = list_dequeue
    names = set(probes.verify(plan))
    dequeue = ("kretfunc__balloon_page_list_dequeue" if list_dequeue
               else "kretfunc__balloon_page_dequeue")
    assert {"kretfunc__try_to_merge_one_page", "kfunc__remove_rmap_item_from_tree",
            "kfunc__break_ksm", "kfunc__balloon_page_enqueue", dequeue} <= names


def test_tracepoint_variant_passes_the_verifier():
    plan = kernel.variant(ksm=kernel.TRACEPOINT, balloon=kernel.COUNTERS)
    names = set(probes.verify(plan))
    assert "tracepoint__ksm__ksm_merge_with_ksm_page" in names
    assert "tracepoint__syscalls__sys_enter_madvise" in names


def test_doctor_says_which_mode_and_why():
    r = subprocess.run([OVERCOMMIT, "doctor", "--json"], capture_output=True, text=True)
    d = json.loads(r.stdout)
    events = {e["event"]: e for e in d["events"]}
    # this machine: KSM tracepoints, no kprobes, no fentry
    assert events["merges"]["mode"] == "tracepoint"
    assert events["host_discards"]["mode"] == "tracepoint"
    assert events["balloon"]["mode"] == "counters"
    assert "CONFIG_KPROBES" in events["balloon"]["why"]
    assert d["mechanisms"]["kprobes"]["ok"] is False
    assert d["mechanisms"]["fentry"]["ok"] is False
    assert r.returncode == (1 if d["problems"] else 0)


def test_ebpf_prints_the_program():
    r = subprocess.run([OVERCOMMIT, "record", "--ebpf"], capture_output=True, text=True,
                       check=True)
    assert "#define OC_KSM_TRACEPOINT 1" in r.stdout
    assert "TRACEPOINT_PROBE(ksm, ksm_merge_with_ksm_page)" in r.stdout
