"""KVM or TCG (tracer/qemu.py choose_accel) without QEMU: the probe guest is
a shell that prints a console line (boots) or does not (hangs), and the
verdicts go to a file of the test's own."""
from __future__ import annotations

import json
import sys

import pytest

from tracer import qemu
from tracer.errors import UserError
from tracer.qemu import Guest, choose_accel

QEMU = sys.executable   # only asked for --version (the verdict's key)


@pytest.fixture
def probes(tmp_path, monkeypatch):
    """Factory: boots(yes) -> start(accel); every guest started is stopped
    by its pid at teardown."""
    monkeypatch.setattr(qemu, "KVM_VERDICTS", tmp_path / "cache" / "kvm-verdicts.json")
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path / "kvm")
    (tmp_path / "kvm").touch()
    started: list[Guest] = []

    def factory(boots: bool):
        def start(accel: str) -> Guest:
            g = Guest(f"probe-{len(started)}", 128, accel, tmp_path)
            line = f"echo booted > '{g.console}'; " if boots else ""
            g.start(["sh", "-c", line + "exec sleep 60"])
            started.append(g)
            return g
        return start
    factory.started = started
    yield factory
    for g in started:
        g.stop(quit_timeout=0.1, term_timeout=2)


def printed(g: Guest) -> bool:
    return g.console.stat().st_size > 0


def verdicts() -> dict:
    return json.loads(qemu.KVM_VERDICTS.read_text())


def choose(start, want="auto", keep=False, say=print):
    return choose_accel(want, QEMU, "guest-kernel", start, printed, 1.0, say, keep=keep)


def test_a_probe_of_its_own_is_stopped_and_its_verdict_cached(probes):
    assert choose(probes(boots=True)) == ("kvm", None)
    (probe,) = probes.started
    assert probe.proc.returncode is not None
    assert not probe.console.exists() and not probe.qemu_log.exists()
    assert [v["kvm"] for v in verdicts().values()] == [True]
    # cached: no second probe
    said = []
    assert choose(probes(boots=True), say=said.append) == ("kvm", None)
    assert len(probes.started) == 1 and "cached in" in said[0]


def test_a_guest_that_does_not_boot_under_kvm_means_tcg(probes):
    assert choose(probes(boots=False)) == ("tcg", None)
    assert [v["kvm"] for v in verdicts().values()] == [False]
    # cached "does not boot": not even a kept probe is tried
    assert choose(probes(boots=True), keep=True) == ("tcg", None)
    assert len(probes.started) == 1


def test_a_kept_probe_is_the_guest_itself(probes):
    choose(probes(boots=True))   # cached "boots"
    accel, g = choose(probes(boots=True), keep=True)
    assert accel == "kvm" and g is probes.started[-1] and len(probes.started) == 2
    assert g.proc.poll() is None and g.console.read_text() == "booted\n"


def test_kvm_asked_for(probes):
    assert choose(probes(boots=False), want="kvm") == ("kvm", None)   # taken untried
    assert probes.started == []
    with pytest.raises(UserError, match="does not boot under KVM within 1s"):
        choose(probes(boots=False), want="kvm", keep=True)
    assert probes.started[0].proc.returncode is not None
    assert not qemu.KVM_VERDICTS.exists()    # only "auto" leaves a verdict
    assert choose(probes(boots=True), want="tcg", keep=True) == ("tcg", None)
    assert len(probes.started) == 1


def test_no_kvm_device_means_tcg(probes, monkeypatch, tmp_path):
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path / "none")
    assert choose(probes(boots=True), keep=True) == ("tcg", None)
    assert probes.started == []
