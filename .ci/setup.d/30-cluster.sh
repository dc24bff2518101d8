#!/usr/bin/env bash
# The one-node Slurm + JupyterHub cluster that tests/test_cluster.py starts: Debian's slurm-wlm
# and munge, npm's configurable-http-proxy, and a shared venv every test user can execute
# (/opt/kernelprov-ci/venv, made from Debian's /usr/bin/python3: interpreters under /root are not
# executable by other users) holding this checkout's kernelprov, JupyterHub and batchspawner.
#
# Idempotent and quick when done. Run from the repository root (as .ci/setup does).
#   bash .ci/setup.d/30-cluster.sh            install what is missing, refresh kernelprov
#   bash .ci/setup.d/30-cluster.sh --check    install nothing but kernelprov (the test's call);
#                                             exit 3 naming what is missing
set -euo pipefail
cd "$(dirname "$0")/../.."

CI_ROOT=${KERNELPROV_CI_ROOT:-/opt/kernelprov-ci}
VENV=$CI_ROOT/venv
# What the shared venv holds besides kernelprov (JupyterLab: the Slurm test opens the panel in a
# browser on a user's server); bump CLUSTER_REQUIREMENTS to change it.
CLUSTER_REQUIREMENTS="jupyterhub>=5,<7 batchspawner==1.3.0 jupyter_server>=2.10 jupyterlab>=4.2,<5"
APT_PACKAGES="slurm-wlm munge python3-venv iproute2"
CHECK_ONLY=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1

say() { echo "30-cluster: $*"; }

if [ "$(id -u)" != 0 ]; then
    say "not root: skipping (the cluster test needs root to run daemons and add users)"
    exit 0
fi

# One cluster test at a time per machine (they share the users, the venv and the daemons' binaries):
# the test holds this lock from set-up to teardown and tells us so; otherwise wait for it here, so
# that a refresh of the shared venv never swaps kernelprov under a running test.
mkdir -p "$CI_ROOT"
chmod 755 "$CI_ROOT"
if [ -z "${KERNELPROV_CI_LOCK_HELD:-}" ]; then
    exec 8>"$CI_ROOT/cluster.lock"
    flock -w 900 8 || { say "timed out waiting for $CI_ROOT/cluster.lock (a cluster test is running)"; exit 3; }
fi

missing_apt() {
    local pkg missing=""
    for pkg in $APT_PACKAGES; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing="$missing $pkg"
        fi
    done
    echo "$missing"
}

missing=$(missing_apt)
if [ -n "$missing" ]; then
    if [ "$CHECK_ONLY" = 1 ]; then say "missing Debian packages:$missing (run bash .ci/setup)"; exit 3; fi
    say "installing$missing"
    # Never let the packages' maintainer scripts start system-wide slurmctld/slurmd/munged (they
    # would listen on every interface); the test starts its own daemons on loopback.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added_policy=1
    fi
    install_apt() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null; }
    if ! install_apt; then apt-get update -q >/dev/null && install_apt; fi
    if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi
fi

if ! command -v configurable-http-proxy >/dev/null; then
    if [ "$CHECK_ONLY" = 1 ]; then say "configurable-http-proxy is missing (run bash .ci/setup)"; exit 3; fi
    say "installing configurable-http-proxy (npm)"
    npm install -g --silent --no-fund --no-audit configurable-http-proxy >/dev/null
fi

# pip's exit status, its noise filtered (PIPESTATUS read before anything else runs).
quiet_pip() {
    local status
    set +e
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | grep -v '^WARNING: Location'
    status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

requirements_stamp=$CI_ROOT/requirements.txt
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$requirements_stamp" 2>/dev/null)" != "$CLUSTER_REQUIREMENTS" ]; then
    if [ "$CHECK_ONLY" = 1 ]; then say "the shared venv $VENV is missing or outdated (run bash .ci/setup)"; exit 3; fi
    say "building the shared venv $VENV from /usr/bin/python3"
    [ -x "$VENV/bin/python" ] || (umask 022 && /usr/bin/python3 -m venv "$VENV")
    (umask 022 && quiet_pip install --quiet --upgrade pip && quiet_pip install --quiet $CLUSTER_REQUIREMENTS)
    echo "$CLUSTER_REQUIREMENTS" > "$requirements_stamp"
    rm -f "$CI_ROOT/kernelprov.source"
fi

# kernelprov from this checkout, as a wheel: an editable install would point other users into a
# checkout they may not be able to read. Rebuilt only when its sources change.
source_hash=$( (git ls-files --cached --others --exclude-standard -z -- kernelprov pyproject.toml README.md labextension \
                 | sort -z | xargs -0 sha256sum 2>/dev/null) | sha256sum | cut -c1-16)
if [ "$(cat "$CI_ROOT/kernelprov.source" 2>/dev/null)" != "$source_hash" ]; then
    say "installing this checkout's kernelprov ($source_hash) into $VENV"
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' EXIT
    PYTHON_FOR_WHEEL=.venv/bin/python
    [ -x "$PYTHON_FOR_WHEEL" ] || PYTHON_FOR_WHEEL=$VENV/bin/python
    set +e
    "$PYTHON_FOR_WHEEL" -m pip --disable-pip-version-check wheel --quiet --no-deps -w "$wheels" . 2>&1 \
        | grep -v '^WARNING: Location'
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" = 0 ] || { say "building the kernelprov wheel failed (pip exit $status)"; exit "$status"; }
    wheel=$(ls "$wheels"/kernelprov-*.whl)
    # The first install brings kernelprov's dependencies; the forced one replaces an equal version.
    (umask 022 && quiet_pip install --quiet "$wheel" && quiet_pip install --quiet --no-deps --force-reinstall "$wheel")
    echo "$source_hash" > "$CI_ROOT/kernelprov.source"
fi
chmod -R a+rX "$CI_ROOT"
"$VENV/bin/python" -c "import kernelprov, jupyterhub, batchspawner, jupyter_server" \
    || { say "the shared venv $VENV is broken; remove it and run bash .ci/setup"; exit 3; }
