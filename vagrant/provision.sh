#!/usr/bin/env bash
# Runs inside the Vagrant VM, as root, from `vagrant up` (and `vagrant
# provision`).  The set-up is the project's own, as in the README: the
# Makefile installs the system packages and the venv (`make setup`) and runs
# the demo (`make demo`); nothing here installs anything else.
set -euo pipefail

cd /overcommit

# A fresh cloud box may lack make itself: the one thing needed to start.
if ! command -v make >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends make
fi

echo "== make setup"
make setup

echo "== overcommit doctor (kernel $(uname -r): kprobes, no KSM tracepoints)"
.venv/bin/overcommit doctor || true

echo "== make demo"
make demo

# The lab: QEMU guests inside this VM (nested KVM where the provider passes
# it through, TCG otherwise), ballooned and merged, traced from here.
if .venv/bin/overcommit lab --help >/dev/null 2>&1; then
    echo "== overcommit lab"
    .venv/bin/overcommit lab --guests 2 -o lab-out
else
    echo "== overcommit lab: not in this version, skipped"
fi

echo "== done: vagrant ssh, then: sudo /overcommit/.venv/bin/overcommit top"
