#!/usr/bin/env bash
# Debian's chromium for the panel's browser tests (tests/test_panel.py). Playwright drives it by
# executable path: its own browser downloads cannot be fetched here. Quick when already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "20-browser.sh: no apt-get; install chromium yourself (or set KERNELPROV_CHROMIUM) for tests/test_panel.py" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation >/dev/null
command -v chromium >/dev/null
