#!/usr/bin/env bash
# squashfs image mode and its tests: mksquashfs/unsquashfs (squashfs-tools), squashfuse + fuse3
# (unprivileged mounts), and util-linux's flock for kernel leases. Installs only what is missing.
set -euo pipefail
missing=()
command -v mksquashfs >/dev/null || missing+=(squashfs-tools)
command -v squashfuse >/dev/null || missing+=(squashfuse)
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v flock >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "10-image-tools: installing ${missing[*]}"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
