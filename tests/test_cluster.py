"""End to end on a real scheduler: JupyterHub + batchspawner on a one-node Slurm cluster.

An admin installs a global kernelprov kernel (``kernelprov install --archive ... --kernels-dir``)
from a world-readable archive; two real unix users each get a server as a Slurm job through the
Hub's REST API; each starts that kernel through its server's REST API and runs code over the
kernel's websocket. Asserted: each kernel runs inside its user's Slurm job, from an env staged in
that user's own kernelprov cache under the job's node-local TMPDIR (pre-warmed by the batch
script's prologue with ``kernelprov unpack``), and neither user can read the other's.

Needs root, Debian's slurm-wlm and munge, npm's configurable-http-proxy and the shared venv
/opt/kernelprov-ci/venv (``bash .ci/setup``); skips with the reason otherwise. Every daemon is
started by this module on 127.0.0.1 and stopped by its PID; the users are removed afterwards.
"""

from __future__ import annotations

import collections

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .cluster.harness import CI_ROOT, VENV, Cluster, ClusterUnavailable, as_user, create_user, execute, machine_lock, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
USERS = ["kpci-alice", "kpci-bob"]
KERNEL = "kpci-demo"

# What the kernel reports about itself.
PROBE = """
import json, os, pwd, sys
print("KPCI " + json.dumps({
    "user": pwd.getpwuid(os.getuid()).pw_name,
    "prefix": sys.prefix,
    "executable": sys.executable,
    "job": os.environ.get("SLURM_JOB_ID"),
    "step": os.environ.get("SLURM_STEP_ID"),
    "tmpdir": os.environ.get("TMPDIR"),
    "kernelprov_env": os.environ.get("KERNELPROV_ENV"),
}))
"""


def _require_cluster_prerequisites() -> None:
    """Skip unless this machine can run the cluster; refresh the shared venv's kernelprov.

    Called with the machine lock held (the set-up script would otherwise wait for it).
    """
    for tool in ("munged", "slurmctld", "slurmd", "configurable-http-proxy", "useradd"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed; run `bash .ci/setup`")
    # Installs this checkout's kernelprov into the shared venv if it changed; installs nothing else.
    check = subprocess.run(["bash", ".ci/setup.d/30-cluster.sh", "--check"], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "KERNELPROV_CI_LOCK_HELD": "1"})
    if check.returncode != 0:
        pytest.skip(f"the shared cluster venv is not ready: {(check.stdout + check.stderr).strip()}")


def _start_server(cluster: Cluster, user: str) -> None:
    status, body = cluster.hub("POST", f"/users/{user}")
    assert status in (201, 409), (status, body)
    status, body = cluster.hub("POST", f"/users/{user}/server")
    assert status in (201, 202), (status, body)


def _server_model(cluster: Cluster, user: str) -> dict | None:
    status, model = cluster.hub("GET", f"/users/{user}")
    assert status == 200, (status, model)
    server = model.get("servers", {}).get("")
    if server is None:
        raise AssertionError(f"{user}'s server stopped while starting")
    return server if server.get("ready") else None


def _published_env(cluster: Cluster, user: str) -> dict | None:
    """The marker of the env staged in ``user``'s cache (root can look), once there is one."""
    # A published env is a <key>/ dir beside its <key>.json marker (read directly: kernelprov's
    # own helpers, run as root, would tidy the user's lease files).
    markers = [path for path in (cluster.node_local / f"kernelprov-{user}").glob("*.json") if path.with_suffix("").is_dir()]
    if len(markers) != 1:
        return None
    return {"prefix": str(markers[0].with_suffix("")), **json.loads(markers[0].read_text())}


def _run_probe(cluster: Cluster, user: str) -> dict:
    status, kernel = cluster.server(user, "POST", "/kernels", {"name": KERNEL})
    assert status == 201, (status, kernel)
    output = execute(cluster.kernel_ws_url(user, kernel["id"]), cluster.token, PROBE)
    line = next(line for line in output.splitlines() if line.startswith("KPCI "))
    return {"kernel_id": kernel["id"], **json.loads(line[len("KPCI "):])}


@pytest.fixture(scope="module")
def cluster_run(runnable_archive):
    """Bring the cluster up, deploy the kernel, start both users' servers and kernels; tear down.

    Yields (cluster, archive, results): per user what the kernel reported, plus the queue, the
    listening sockets and the seconds each phase took.
    """
    if os.geteuid() != 0:
        pytest.skip("the cluster test runs Slurm daemons and adds unix users: it needs root")
    if not CI_ROOT.is_dir():
        pytest.skip(f"{CI_ROOT} does not exist; run `bash .ci/setup`")
    with machine_lock(timeout=300):
        yield from _cluster_run(runnable_archive)


def _cluster_run(runnable_archive):
    _require_cluster_prerequisites()
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 1)
        clock = now

    cluster = Cluster.make(USERS)
    try:
        # The admin's part: a world-readable archive in a shared read-only place, a global kernel.
        archive = cluster.base / "archives" / runnable_archive.name
        for source in (runnable_archive, Path(f"{runnable_archive}.manifest.json")):
            target = archive.parent / source.name
            shutil.copy2(source, target)
            target.chmod(0o444)
        subprocess.run([f"{VENV}/bin/kernelprov", "install", KERNEL, "--archive", str(archive),
                        "--kernels-dir", str(cluster.kernels_dir), "--display-name", "Python (cluster demo)"],
                       check=True, capture_output=True, text=True)
        for user in USERS:
            create_user(user)
        phase("install kernel, add users")
        try:
            cluster.start_munge()
            cluster.start_slurm()
        except (ClusterUnavailable, TimeoutError) as err:
            pytest.skip(f"Slurm cannot start on this machine: {err}")
        phase("munged, slurmctld, slurmd")
        cluster.start_proxy()
        cluster.start_hub(archive)
        phase("proxy, hub")
        for user in USERS:  # both jobs are queued at once and run side by side
            _start_server(cluster, user)
        servers = {user: wait_for(lambda user=user: _server_model(cluster, user), 180, f"{user}'s server")
                   for user in USERS}
        phase("two servers as Slurm jobs")
        prewarmed = {user: wait_for(lambda user=user: _published_env(cluster, user), 120,
                                    f"the pre-warm in {user}'s batch script") for user in USERS}
        phase("pre-warm finished")
        results: dict = {}
        for user in USERS:
            results[user] = {**_run_probe(cluster, user), "prewarmed": prewarmed[user],
                             "job_id": servers[user]["state"]["job_id"]}
        phase("two kernels started and run")
        results["queue"] = cluster.squeue()
        results["listening"] = cluster.listening_sockets()
        phase("queue and sockets")
        results["timings"] = timings
    except pytest.skip.Exception:
        cluster.stop()
        raise
    except Exception as err:
        diagnostics = cluster.diagnostics()
        cluster.stop()
        raise AssertionError(f"{err!r}\n{diagnostics}") from err
    try:
        yield cluster, archive, results
    finally:
        phase("tests")
        cluster.stop()
        phase("teardown")
        print(f"cluster test timings (s): {timings}; teardown: {cluster.stop_seconds}")


@pytest.mark.parametrize("user", USERS)
def test_kernel_runs_inside_the_users_slurm_job(cluster_run, user):
    cluster, _archive, results = cluster_run
    result = results[user]
    assert result["user"] == user
    assert result["job"] == result["job_id"], "the kernel must run inside the job of this user's server"
    assert (result["job_id"], user, "RUNNING") in results["queue"]
    assert result["step"] is not None and result["step"] != "batch", "batchspawner runs the server as an srun step"


@pytest.mark.parametrize("user", USERS)
def test_kernel_runs_from_the_users_own_staged_cache(cluster_run, user):
    cluster, archive, results = cluster_run
    result = results[user]
    user_dir = cluster.node_local / f"kernelprov-{user}"
    prefix = Path(result["prefix"])
    assert result["tmpdir"] == str(cluster.node_local)
    assert prefix.parent == user_dir, f"{prefix} is not in {user}'s cache {user_dir}"
    assert result["kernelprov_env"] == str(prefix)
    assert Path(result["executable"]).is_relative_to(prefix)
    info = os.stat(user_dir)
    assert info.st_uid == pwd.getpwnam(user).pw_uid
    assert stat.S_IMODE(info.st_mode) == 0o700
    marker = json.loads((user_dir / f"{prefix.name}.json").read_text())
    assert marker["archive"] == str(archive)
    # The batch script's prologue (`kernelprov unpack &`) staged it; the kernel reused that copy.
    prewarmed = result["prewarmed"]
    assert prewarmed["prefix"] == str(prefix)
    assert marker["staged_at"] == prewarmed["staged_at"], "the kernel staged the env again"


@pytest.mark.parametrize("user, other", [USERS, USERS[::-1]])
def test_users_cannot_read_each_others_staged_env(cluster_run, user, other):
    cluster, _archive, results = cluster_run
    own = cluster.node_local / f"kernelprov-{user}"
    theirs = cluster.node_local / f"kernelprov-{other}"
    their_prefix = Path(results[other]["prefix"])
    assert as_user(user, ["ls", str(own)]).returncode == 0, "a user must be able to list their own cache"
    for argv in (["ls", str(theirs)], ["cat", str(their_prefix / "conda-meta" / "history")],
                 ["ls", str(their_prefix / "bin")]):
        denied = as_user(user, argv)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, (argv, denied)


def test_every_daemon_server_and_kernel_listens_on_loopback_only(cluster_run):
    *_, results = cluster_run
    listening = results["listening"]
    if listening is None:
        pytest.skip("`ss` (iproute2) is not installed: cannot list listening sockets")
    names = {name for _address, process in listening for name in re.findall(r'\("([^"]+)"', process)}
    # munged listens on its unix socket only; "node" is configurable-http-proxy, "batchspawner-si"
    # the single-user servers. The kernels' ("python") five channels are private IPC sockets
    # (kernelprov/jupyter/transport.py): the one loopback port each kernel still has is ipykernel's
    # IOPub pipe for forked subprocesses, hard-coded to TCP, whose messages must carry a random
    # per-process token (ipykernel/iostream.py) — on TCP transport a kernel listens on six.
    for expected in ("slurmctld", "slurmd", "srun", "node", "jupyterhub", "batchspawner-si"):
        assert expected in names, f"no listening socket of {expected} found: {listening}"
    kernel_ports = collections.Counter(pid for _address, process in listening
                                       for name, pid in re.findall(r'\("(python[^"]*)",pid=(\d+)', process))
    assert kernel_ports and max(kernel_ports.values()) == 1, f"a kernel listens on its channels over TCP: {listening}"
    exposed = [(address, process) for address, process in listening
               if not address.startswith(("127.0.0.1:", "[::1]:", "/"))]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_the_cluster_comes_up_quickly(cluster_run):
    *_, results = cluster_run
    total = sum(results["timings"].values())
    assert total < 240, f"bringing the cluster up took {total:.0f} s: {results['timings']}"
