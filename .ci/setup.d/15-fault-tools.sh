#!/usr/bin/env bash
# strace: tests/test_cache_security.py injects a lock-less filesystem's ENOLCK into the real
# flock syscall of a stage (strace -e inject), as no such filesystem exists on a CI machine.
set -euo pipefail
if ! command -v strace >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "15-fault-tools: installing strace"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends strace >/dev/null
fi
