"""vagrant/ checked as far as it can be without a hypervisor.

- `ruby -c` on the Vagrantfile (Debian `ruby`);
- `vagrant validate` (Debian `vagrant`), which runs offline: with the
  libvirt provider's settings checked too when `vagrant-libvirt` is
  installed, else with `--ignore-provider`.  VirtualBox is not in Debian, and
  Vagrant validates only the provider it would use, so the VirtualBox block
  is checked here by reading it;
- `bash -n` on provision.sh, and that it sets up and runs the demo through
  the Makefile targets the README documents, installing nothing itself.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VAGRANT = ROOT / "vagrant"
VAGRANTFILE = VAGRANT / "Vagrantfile"
PROVISION = VAGRANT / "provision.sh"


def _commands(script: str) -> list[str]:
    """The script's command lines, comments and blank lines dropped."""
    out = []
    for line in script.splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("echo") else ""
        if line:
            out.append(line)
    return out


@pytest.mark.skipif(shutil.which("ruby") is None, reason="no ruby (Debian package ruby)")
def test_vagrantfile_is_valid_ruby():
    r = subprocess.run(["ruby", "-c", str(VAGRANTFILE)], capture_output=True, text=True)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr


def test_provision_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(PROVISION)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(PROVISION, os.X_OK)


def _vagrant_env(tmp_path: Path) -> dict[str, str]:
    # Vagrant's state goes to the test's directory, not into vagrant/.vagrant
    # or ~/.vagrant.d; no network is needed to validate.
    return {**os.environ, "VAGRANT_HOME": str(tmp_path / "home"),
            "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_NO_COLOR": "1"}


def _has_libvirt_plugin(env) -> bool:
    r = subprocess.run(["vagrant", "plugin", "list"], cwd=VAGRANT, env=env,
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0 and "vagrant-libvirt" in r.stdout


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="no vagrant (Debian package vagrant)")
def test_vagrant_validate(tmp_path):
    env = _vagrant_env(tmp_path)
    if _has_libvirt_plugin(env):
        cmd = ["vagrant", "validate"]
        env["VAGRANT_DEFAULT_PROVIDER"] = "libvirt"
    else:
        # No provider here: validate everything but the provider blocks.
        cmd = ["vagrant", "validate", "--ignore-provider"]
    r = subprocess.run(cmd, cwd=VAGRANT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
    assert not (VAGRANT / ".vagrant").exists()


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="no vagrant (Debian package vagrant)")
def test_vagrant_validate_catches_a_wrong_setting(tmp_path):
    """The validation above is not a no-op: a wrong setting fails it."""
    env = _vagrant_env(tmp_path)
    copy = tmp_path / "vagrant"
    copy.mkdir()
    shutil.copy(PROVISION, copy)
    if _has_libvirt_plugin(env):
        env["VAGRANT_DEFAULT_PROVIDER"] = "libvirt"
        bad = VAGRANTFILE.read_text().replace("lv.nested = true",
                                              "lv.nested = true\n    lv.no_such_setting = 1")
        args = []
    else:
        bad = VAGRANTFILE.read_text().replace(
            'config.vm.hostname = "overcommit"',
            'config.vm.hostname = "overcommit"\n  config.vm.no_such_setting = 1')
        args = ["--ignore-provider"]
    (copy / "Vagrantfile").write_text(bad)
    r = subprocess.run(["vagrant", "validate", *args], cwd=copy, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0, r.stdout


def test_vagrantfile_settings():
    """What `vagrant validate` cannot check without the providers."""
    text = VAGRANTFILE.read_text()
    assert re.search(r'config\.vm\.box = "debian/bookworm64"', text)
    assert "config.vm.provider :libvirt" in text and "config.vm.provider :virtualbox" in text
    assert "lv.nested = true" in text
    assert '"--nested-hw-virt", "on"' in text
    # the project root (the Vagrantfile's parent) is what gets synced
    assert re.search(r'synced_folder "\.\.", "/overcommit"', text)
    assert re.search(r'path: "provision\.sh"', text)


def test_provision_runs_the_readme_set_up_through_the_makefile():
    commands = _commands(PROVISION.read_text())
    makes = [c for c in commands if re.match(r"make\b", c)]
    assert makes == ["make setup", "make demo"]
    # No install steps of its own: apt-get only to get make itself.
    for c in commands:
        if re.search(r"\b(apt-get|apt|dnf|yum)\s+install\b|\bpip\d*\s+install\b", c):
            assert re.search(r"install\b.*\bmake$", c), f"provision.sh installs by itself: {c}"
    # The targets exist (dry run: nothing is executed).
    r = subprocess.run(["make", "-n", "-C", str(ROOT), "setup", "demo"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet: cannot compare with its commands")
    documented = set(re.findall(r"^\s*(?:\$\s*)?(?:sudo\s+)?(make\s+[\w-]+)", readme.read_text(),
                                re.M))
    assert "make demo" in documented, f"README documents {sorted(documented)}"
    assert {m for m in makes if m != "make setup"} <= documented
