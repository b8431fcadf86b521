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

# The demo is the lab: QEMU guests inside this VM (nested KVM where the
# provider passes it through, TCG otherwise), merged and ballooned, traced
# from here; results in /overcommit/lab-out.
echo "== make demo"
make demo

echo "== done: vagrant ssh, then: sudo /overcommit/.venv/bin/overcommit top"
