#!/usr/bin/env bash
# Reference tools the tests compare kernelprov against: zstd and pzstd (Debian's zstd package:
# tests/test_multiframe.py reads kernelprov's multi-frame .tar.zst with them, tests/test_relocate.py
# unpacks with GNU tar + zstd), and Debian's own /usr/bin/python3 (tests/test_tar_bypasses.py runs
# the engine under it; tests/test_multiuser.py stages as other users through it). Installs only
# what is missing.
set -euo pipefail
missing=()
command -v zstd >/dev/null || missing+=(zstd)
command -v pzstd >/dev/null || missing+=(zstd)
command -v tar >/dev/null || missing+=(tar)
[ -x /usr/bin/python3 ] || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "12-archive-tools.sh: install ${missing[*]} yourself (the tests that need them fail under CI=true)" >&2
        exit 1
    fi
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "12-archive-tools: installing ${missing[*]}"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
