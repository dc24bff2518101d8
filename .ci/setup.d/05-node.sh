#!/usr/bin/env bash
# Node.js and npm: building the panel (labextension/) from a git checkout runs jlpm, which needs
# node; 30-cluster.sh's configurable-http-proxy comes from npm. Run by .ci/setup before kernelprov
# is installed. Installs Debian's nodejs + npm only when node is missing or older than 18.
set -euo pipefail
if command -v node >/dev/null 2>&1 && [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 18 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "05-node.sh: Node.js >= 18 is needed to build the panel from a checkout; install it yourself" >&2
    exit 1
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "05-node: installing nodejs npm"
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
node --version
