"""Unit tests of tracer.counters against fixture trees (no root, no KSM needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tracer import counters
from tracer.counters import (
    KSM_SYSFS,
    VMSTAT_KEYS,
    KsmUnavailable,
    ksm_pids,
    ksm_settings,
    read_ksm,
    read_ksm_settings,
    read_ksm_stat,
    read_vmstat,
    write_ksm_settings,
)

DATA = Path(__file__).parent / "data"
HOST = DATA / "host-6.18"
OLD = DATA / "old-5.15"
GUEST = DATA / "guest-balloon"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A writable copy of the host-6.18 tree."""
    root = tmp_path / "root"
    shutil.copytree(HOST, root)
    return root


def ksm_file(root: Path, name: str) -> str:
    return (root / KSM_SYSFS / name).read_text()


def test_read_ksm_host() -> None:
    ksm = read_ksm(HOST)
    assert len(ksm) == 23  # every file but advisor_mode
    assert "advisor_mode" not in ksm
    assert ksm["pages_shared"] == 14
    assert ksm["pages_sharing"] == 1986
    assert ksm["stable_node_chains"] == 7
    assert ksm["stable_node_dups"] == 14
    assert ksm["general_profit"] == 7878656
    assert ksm["run"] == 1
    assert ksm["advisor_max_pages_to_scan"] == 30000
    assert all(isinstance(v, int) for v in ksm.values())


def test_read_ksm_old_kernel() -> None:
    ksm = read_ksm(OLD)
    assert len(ksm) == 14
    assert ksm["pages_shared"] + ksm["pages_sharing"] == 1200
    for name in ("general_profit", "ksm_zero_pages", "smart_scan", "advisor_max_cpu"):
        assert name not in ksm


def test_negative_general_profit(host: Path) -> None:
    (host / KSM_SYSFS / "general_profit").write_text("-4096000\n")
    assert read_ksm(host)["general_profit"] == -4096000


def test_missing_ksm_dir_raises(tmp_path: Path) -> None:
    for reader in (read_ksm, read_ksm_settings):
        with pytest.raises(KsmUnavailable, match=r"CONFIG_KSM=y is needed"):
            reader(tmp_path)
    with pytest.raises(KsmUnavailable):
        write_ksm_settings({"run": 1}, tmp_path)


def test_read_ksm_settings_host() -> None:
    assert read_ksm_settings(HOST) == {
        "advisor_mode": "none",
        "advisor_max_cpu": 70,
        "advisor_min_pages_to_scan": 500,
        "advisor_max_pages_to_scan": 30000,
        "advisor_target_scan_time": 200,
        "pages_to_scan": 5000,
        "sleep_millisecs": 10,
        "use_zero_pages": 0,
        "smart_scan": 1,
        "stable_node_chains_prune_millisecs": 2000,
        "merge_across_nodes": 1,
        "max_page_sharing": 256,
        "run": 1,
    }


def test_read_ksm_settings_old_kernel() -> None:
    assert set(read_ksm_settings(OLD)) == {
        "pages_to_scan",
        "sleep_millisecs",
        "use_zero_pages",
        "stable_node_chains_prune_millisecs",
        "merge_across_nodes",
        "max_page_sharing",
        "run",
    }


def test_advisor_mode_selected_word(host: Path) -> None:
    (host / KSM_SYSFS / "advisor_mode").write_text("none [scan-time]\n")
    assert read_ksm_settings(host)["advisor_mode"] == "scan-time"


def test_write_ksm_settings(host: Path) -> None:
    write_ksm_settings({"run": 0, "sleep_millisecs": 0, "advisor_mode": "scan-time"}, host)
    assert ksm_file(host, "run") == "0\n"
    assert ksm_file(host, "sleep_millisecs") == "0\n"
    assert ksm_file(host, "advisor_mode") == "scan-time\n"  # the bare word
    with pytest.raises(ValueError, match="pages_shared"):
        write_ksm_settings({"pages_shared": 0}, host)


def test_write_order(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []
    monkeypatch.setattr(counters, "_write_setting", lambda ksm, name, value: written.append(name))
    changes = {"run": 1, "max_page_sharing": 512, "pages_to_scan": 1, "advisor_mode": "none"}
    write_ksm_settings(changes, host)
    assert written == ["advisor_mode", "pages_to_scan", "max_page_sharing", "run"]
    written.clear()
    write_ksm_settings({"merge_across_nodes": 0, "run": 2}, host)
    assert written == ["run", "merge_across_nodes"]  # unmerge first: EBUSY otherwise


def test_settings_context_restores(host: Path) -> None:
    before = read_ksm_settings(host)
    with ksm_settings({"run": 0, "pages_to_scan": 20000, "sleep_millisecs": 0}, host):
        changed = {"run": 0, "pages_to_scan": 20000, "sleep_millisecs": 0}
        assert read_ksm_settings(host) == before | changed
    assert read_ksm_settings(host) == before


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_settings_context_restores_on_exception(host: Path, error: type[BaseException]) -> None:
    before = read_ksm_settings(host)
    with pytest.raises(error):
        with ksm_settings({"run": 2, "use_zero_pages": 1, "advisor_mode": "scan-time"}, host):
            assert ksm_file(host, "use_zero_pages") == "1\n"
            raise error()
    assert read_ksm_settings(host) == before


def test_settings_context_saves_side_effects(host: Path) -> None:
    # A real kernel resets pages_to_scan when advisor_mode changes: emulate it.
    with ksm_settings({"advisor_mode": "scan-time"}, host):
        (host / KSM_SYSFS / "pages_to_scan").write_text("500\n")
    assert read_ksm_settings(host)["pages_to_scan"] == 5000


def test_settings_context_unmerges_to_restore_structural_knob(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = []
    real_write = counters._write_setting

    def record(ksm: Path, name: str, value: object) -> None:
        written.append((name, value))
        real_write(ksm, name, value)

    monkeypatch.setattr(counters, "_write_setting", record)
    with ksm_settings({"max_page_sharing": 512}, host):
        pass  # pages_shared is 14 in the fixture: restoring needs run=2 first
    assert written == [
        ("max_page_sharing", 512),
        ("run", 2),
        ("max_page_sharing", 256),
        ("run", 1),
    ]
    assert read_ksm_settings(host)["max_page_sharing"] == 256


def test_settings_context_unknown_knob() -> None:
    with pytest.raises(ValueError, match="lacks KSM settings: smart_scan"):
        with ksm_settings({"smart_scan": 0}, OLD):
            pass
    with pytest.raises(ValueError, match="not KSM settings: pages_shared"):
        with ksm_settings({"pages_shared": 0}, HOST):
            pass


def test_settings_context_restores_the_rest_after_a_refusal(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = counters._write_setting
    with pytest.raises(OSError, match="sleep_millisecs"):
        with ksm_settings({"sleep_millisecs": 0, "run": 0}, host):

            def refuse_sleep(ksm: Path, name: str, value: object) -> None:
                if name == "sleep_millisecs":
                    raise OSError(16, f"cannot set KSM {name}={value}: Device or resource busy")
                real_write(ksm, name, value)

            monkeypatch.setattr(counters, "_write_setting", refuse_sleep)
    assert ksm_file(host, "run") == "1\n"
    assert ksm_file(host, "sleep_millisecs") == "0\n"


def test_read_vmstat() -> None:
    assert read_vmstat(HOST) == {
        "cow_ksm": 1000,
        "ksm_swpin_copy": 0,
        "balloon_inflate": 0,
        "balloon_deflate": 0,
        "balloon_migrate": 0,
        "nr_balloon_pages": 0,
    }
    assert set(read_vmstat(HOST)) == set(VMSTAT_KEYS)
    assert read_vmstat(OLD) == {"balloon_inflate": 0, "balloon_deflate": 0, "balloon_migrate": 0}
    guest = read_vmstat(GUEST)
    assert guest["balloon_inflate"] - guest["balloon_deflate"] == guest["nr_balloon_pages"] == 65536
    assert read_vmstat(HOST, keys=("pgfault", "no_such_key")).keys() == {"pgfault"}


def test_read_ksm_stat_merged() -> None:
    assert read_ksm_stat(3596, HOST) == {
        "ksm_rmap_items": 2000,
        "ksm_zero_pages": 0,
        "ksm_merging_pages": 2000,
        "ksm_process_profit": 8064000,
        "ksm_merge_any": 0,
        "ksm_mergeable": 1,
    }


def test_read_ksm_stat_negative_profit() -> None:
    assert read_ksm_stat(3598, HOST)["ksm_process_profit"] == -64000


def test_read_ksm_stat_old_kernel() -> None:
    assert read_ksm_stat(4242, OLD) == {"ksm_merging_pages": 1200}


def test_read_ksm_stat_falls_back_to_merging_pages(host: Path) -> None:
    stat = host / "proc/3596/ksm_stat"
    stat.write_text("ksm_rmap_items 2000\n")  # a 6.1 kernel: no ksm_merging_pages line
    assert read_ksm_stat(3596, host) == {"ksm_rmap_items": 2000, "ksm_merging_pages": 2000}


def test_read_ksm_stat_kernel_thread(host: Path) -> None:
    kthread = host / "proc/2"
    kthread.mkdir()
    (kthread / "ksm_stat").write_text("")  # no mm: both files are empty
    (kthread / "ksm_merging_pages").write_text("")
    assert read_ksm_stat(2, host) == {}


def test_read_ksm_stat_vanished_pid() -> None:
    assert read_ksm_stat(999999, HOST) is None
    assert read_ksm_stat(999999, OLD) is None


def test_read_ksm_stat_esrch(monkeypatch: pytest.MonkeyPatch) -> None:
    def exited(self: Path) -> str:
        raise ProcessLookupError(3, "No such process")  # errno ESRCH

    monkeypatch.setattr(Path, "read_text", exited)
    assert read_ksm_stat(3596, HOST) is None


def test_ksm_pids() -> None:
    assert ksm_pids(HOST) == [3596, 3597, 3598]
    assert ksm_pids(OLD) == [4242]


def test_ksm_pids_skips_vanishing(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = counters.read_ksm_stat

    def vanish_3597(pid: int, root: Path) -> dict[str, int] | None:
        return None if pid == 3597 else real(pid, root)

    monkeypatch.setattr(counters, "read_ksm_stat", vanish_3597)
    (host / "proc/self").mkdir()  # not a pid: ignored
    assert ksm_pids(host) == [3596, 3598]
