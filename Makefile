# overcommit: `make demo` and `make test` do all the set-up on a fresh
# Debian/Ubuntu (apt) or Fedora (dnf) machine, then run.
#
#   make demo    set up, then run the VM lab (2 guests, KSM and balloons)
#   make test    set up, then run the whole test suite (needs root)
#   make setup   only the set-up (system packages + .venv)

SHELL       := /bin/bash
VENV        := .venv
PY          := $(VENV)/bin/python
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARCH        := $(shell dpkg --print-architecture 2>/dev/null || uname -m)
PYTEST_ARGS ?=

# System packages: bcc (from the distribution, never PyPI), kernel headers
# for bcc, bpftrace (the peer in benchmarks), QEMU and busybox for the lab.
APT_PACKAGES := python3-venv python3-bpfcc bpftrace linux-headers-$(ARCH) \
                qemu-system-x86 qemu-utils busybox-static cpio
DNF_PACKAGES := python3 python3-bcc bpftrace kernel-devel qemu-system-x86 \
                busybox cpio
# What only the tests need: Chromium (report tests), Prometheus (exporter
# test, promtool), Ruby and Vagrant (Vagrantfile checks), debootstrap and
# e2fsprogs (the Debian 12 guest image).
APT_TEST_PACKAGES := chromium prometheus ruby vagrant debootstrap e2fsprogs
DNF_TEST_PACKAGES := chromium golang-github-prometheus ruby vagrant debootstrap e2fsprogs

.PHONY: setup setup-test demo test bench clean
.DEFAULT_GOAL := demo

setup: $(VENV)/.installed
setup-test: setup $(VENV)/.system-test

# Installs what is missing, and nothing when all is there (no apt-get update).
define install_packages
	@if command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "Installing system packages:" $$missing; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	elif command -v dnf >/dev/null; then \
	  $(SUDO) dnf install -y -q $(2); \
	else echo "no apt-get or dnf: install bcc's Python bindings and kernel headers by hand"; exit 1; fi
	@mkdir -p $(VENV) && touch $@
endef

$(VENV)/.system:
	$(call install_packages,$(APT_PACKAGES),$(DNF_PACKAGES))

$(VENV)/.system-test:
	$(call install_packages,$(APT_TEST_PACKAGES),$(DNF_TEST_PACKAGES))

# The venv uses the distribution's Python, and sees bcc from the distribution
# through one symlink (not --system-site-packages, which would drag in every
# system package).
$(VENV)/.installed: $(VENV)/.system pyproject.toml
	@[ -x $(PY) ] || /usr/bin/python3 -m venv $(VENV)
	@bcc_dir=$$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))') && \
	  site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  ln -sfn $$bcc_dir $$site/bcc
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: setup
	$(SUDO) $(VENV)/bin/overcommit lab

test: setup-test
	$(SUDO) $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(SUDO) $(PY) tests/bench/bench_ksm.py

clean:
	rm -rf $(VENV) build *.egg-info
