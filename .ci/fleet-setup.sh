#!/usr/bin/env bash
# What the fleet tests (tests/test_fleet_ssh.py) need beyond pip: an sshd
# binary and ssh client tools. The tests start their own sshd instances on
# 127.0.0.1 with throwaway keys; nothing here starts a daemon.
# CI runs as root on a fresh Debian machine; elsewhere this only checks.
set -euo pipefail

if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "fleet-setup: openssh-server is missing and this is not root;" \
            "install it (apt-get install openssh-server) or the ssh tests skip" >&2
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null
fi
# sshd refuses to start without its privilege-separation folder.
if [ "$(id -u)" -eq 0 ]; then
    mkdir -p /run/sshd
fi
# ansible-playbook comes with ansible-core, a dependency of edgeq.
command -v ansible-playbook >/dev/null || echo "fleet-setup: ansible-playbook not on PATH" >&2
echo "fleet-setup: $(/usr/sbin/sshd -V 2>&1 | head -1 || true)"
