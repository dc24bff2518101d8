"""Slurm kernels for real: two compute nodes, two unix users, plain ``jupyter server`` outside Slurm.

The admin installs a global Slurm kernel (``kernelprov install NAME --archive FILE --slurm
--partition P --cpus 2 --time T``). Each of two real users runs a normal ``jupyter server`` on
this machine, outside any allocation, and starts that kernel through its REST API: the
``kernelprov-slurm-provisioner`` submits a job, which lands on its own compute node (each kernel
asks for both CPUs of a node), stages the env there, and runs code over the kernel's websocket.
Asserted: the kernel runs inside its user's job on a compute node, bound to that node's address,
from the env staged in that user's cache on that node's local disk (and on no other node); the
session key is in no command line and no batch script; interrupt works; a restart keeps the
job (a fresh kernel in it) unless the job is gone, then it submits a new one; a kernel that dies
is restarted in its job, a job that is cancelled is resubmitted; shutdown cancels the job; a server that stops leaves no job behind; a start that cannot get a node shows
"Pending: Resources" and fails at its launch timeout with the job cancelled.

The nodes are :mod:`tests.cluster.nodes`: each slurmd in its own UTS and mount namespace, with
its own hostname, loopback address and local disk. Needs root, Debian's slurm-wlm, munge and the
shared venv /opt/kernelprov-ci/venv (``bash .ci/setup``); skips with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from .cluster.harness import (CI_ROOT, VENV, ClusterUnavailable, create_user, execute, free_port, http, machine_lock,
                              run, start_daemon, tail, wait_for)
from .cluster.nodes import PARTITION, NodeCluster, unshare_available

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
USERS = ["kpci-carol", "kpci-dave"]
KERNEL = "kpsl-demo"

PROBE = """
import json, os, pwd, socket, sys
print("KPSL " + json.dumps({
    "user": pwd.getpwuid(os.getuid()).pw_name,
    "hostname": socket.gethostname(),
    "prefix": sys.prefix,
    "executable": sys.executable,
    "job": os.environ.get("SLURM_JOB_ID"),
    "node": os.environ.get("SLURMD_NODENAME"),
    "kernelprov_env": os.environ.get("KERNELPROV_ENV"),
    "pid": os.getpid(),
}))
"""


class Server:
    """One user's ``jupyter server``, started as that user (setpriv execs: its PID is the server's)."""

    def __init__(self, cluster: NodeCluster, user: str):
        self.user, self.port, self.token = user, free_port(), secrets.token_hex(16)
        entry = pwd.getpwnam(user)
        self.home = Path(entry.pw_dir)
        env = {"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": str(self.home), "USER": user, "LOGNAME": user,
               "LANG": "C.UTF-8", "SLURM_CONF": str(cluster.slurm_conf), "JUPYTER_PATH": str(cluster.jupyter_path),
               "JUPYTER_TOKEN": self.token,
               # Site settings for Slurm kernels (README "Kernels on compute nodes"): the nodes' local disk.
               "KERNELPROV_SLURM_NODE_CACHE_DIR": str(cluster.node_local), "KERNELPROV_SLURM_POLL_INTERVAL": "2"}
        argv = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--",
                f"{VENV}/bin/jupyter", "server", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                "--ServerApp.open_browser=False", f"--ServerApp.root_dir={self.home}"]
        self.daemon = start_daemon(f"server-{user}", argv, env, cluster.logs / f"server-{user}.log", cwd=self.home)
        cluster.daemons.append(self.daemon)

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 180):
        return http(method, f"http://127.0.0.1:{self.port}/api{path}", self.token, body, timeout=timeout)

    def wait_ready(self) -> None:
        def answers():
            if not self.daemon.running():
                raise ClusterUnavailable(f"{self.user}'s jupyter server exited:\n{tail(self.daemon.log)}")
            try:
                return self.api("GET", "/status", timeout=5)[0] == 200
            except OSError:
                return False

        wait_for(answers, 90, f"{self.user}'s jupyter server")

    def ws(self, kernel_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels"

    def probe(self, kernel_id: str) -> dict:
        output = execute(self.ws(kernel_id), self.token, PROBE)
        line = next(line for line in output.splitlines() if line.startswith("KPSL "))
        return json.loads(line[len("KPSL "):])


def _require_prerequisites() -> None:
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "unshare", "setpriv", "useradd"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed; run `bash .ci/setup`")
    why = unshare_available()
    if why:
        pytest.skip(f"cannot make a second compute node here: {why}")
    check = subprocess.run(["bash", ".ci/setup.d/30-cluster.sh", "--check"], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "KERNELPROV_CI_LOCK_HELD": "1"})
    if check.returncode != 0:
        pytest.skip(f"the shared cluster venv is not ready: {(check.stdout + check.stderr).strip()}")


def _user_jobs(cluster: NodeCluster, user: str) -> dict[str, dict[str, str]]:
    return {job: info for job, info in cluster.squeue_jobs().items() if info["user"] == user}


def _active_jobs(cluster: NodeCluster, user: str) -> list[str]:
    """The user's jobs that are pending or running."""
    return [job for job, info in _user_jobs(cluster, user).items() if info["state"] in ("PENDING", "RUNNING")]


def _interrupt_during_sleep(server: Server, kernel_id: str) -> dict:
    """Run ``time.sleep(120)``, interrupt it through the REST API; return the execute_reply."""
    import websocket

    connection = websocket.create_connection(server.ws(kernel_id), header=[f"Authorization: token {server.token}"],
                                             timeout=60)
    try:
        msg_id = uuid.uuid4().hex
        connection.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "kpsl", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": "import time\nprint('sleeping', flush=True)\ntime.sleep(120)", "silent": False,
                        "store_history": False, "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        interrupted_at = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = json.loads(connection.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["header"]["msg_type"], message["content"]
            if kind == "stream" and "sleeping" in content.get("text", "") and interrupted_at is None:
                status, _ = server.api("POST", f"/kernels/{kernel_id}/interrupt")
                assert status == 204, status
                interrupted_at = time.monotonic()
            if kind == "execute_reply":
                return {**content, "seconds_after_interrupt": time.monotonic() - (interrupted_at or time.monotonic())}
        raise TimeoutError("no execute_reply within 60 s")
    finally:
        connection.close()


@pytest.fixture(scope="module")
def slurm_run(runnable_archive):
    """Two nodes, two users' servers, one Slurm kernel each (started at once); torn down after."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test runs Slurm daemons and adds unix users: it needs root")
    if not CI_ROOT.is_dir():
        pytest.skip(f"{CI_ROOT} does not exist; run `bash .ci/setup`")
    with machine_lock(timeout=300):
        _require_prerequisites()
        cluster = NodeCluster.make_nodes(USERS, node_count=2)
        try:
            yield from _slurm_run(cluster, runnable_archive)
        finally:
            cluster.stop()


def _slurm_run(cluster: NodeCluster, runnable_archive):
    archive = cluster.base / "archives" / runnable_archive.name
    for source in (runnable_archive, Path(f"{runnable_archive}.manifest.json")):
        shutil.copy2(source, archive.parent / source.name)
        (archive.parent / source.name).chmod(0o444)
    install = [f"{VENV}/bin/kernelprov", "install", KERNEL, "--archive", str(archive), "--kernels-dir",
               str(cluster.kernels_dir), "--display-name", "Python (Slurm demo)",
               "--slurm", "--partition", PARTITION, "--cpus", "2", "--time", "00:30:00"]
    subprocess.run(install, check=True, capture_output=True, text=True)
    for user in USERS:
        create_user(user)
    try:
        cluster.start_munge()
        cluster.start_slurm()
    except (ClusterUnavailable, TimeoutError) as err:
        pytest.skip(f"Slurm cannot start two nodes on this machine: {err}")
    servers = {user: Server(cluster, user) for user in USERS}
    try:
        for server in servers.values():
            server.wait_ready()
        started: dict[str, object] = {}

        def start(user: str) -> None:  # both POSTs at once: each waits for its job
            started[user] = servers[user].api("POST", "/kernels", {"name": KERNEL})

        threads = [threading.Thread(target=start, args=(user,)) for user in USERS]
        clock = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(200)
        results = {"start_seconds": round(time.monotonic() - clock, 1)}
        for user in USERS:
            status, kernel = started[user]
            assert status == 201, (user, status, kernel)
            results[user] = {"kernel_id": kernel["id"], **servers[user].probe(kernel["id"]),
                             "jobs": _user_jobs(cluster, user)}
    except Exception as err:
        raise AssertionError(f"{err!r}\n{cluster.diagnostics()}\n" + "\n".join(
            f"--- {s.user}\n{tail(s.daemon.log, 60)}" for s in servers.values())) from err
    yield cluster, servers, archive, results


def _staged_prefixes(cluster: NodeCluster, user: str) -> dict[str, list[str]]:
    """Per node, the published envs in ``user``'s cache on that node's local disk."""
    found = {}
    for node in cluster.nodes:
        user_dir = node.disk / f"kernelprov-{user}"
        found[node.name] = sorted(str(cluster.node_local / user_dir.name / marker.stem)
                                  for marker in user_dir.glob("*.json") if marker.with_suffix("").is_dir())
    return found


def test_each_kernel_runs_in_its_users_job_on_its_own_compute_node(slurm_run):
    cluster, _servers, _archive, results = slurm_run
    nodes = set()
    for user in USERS:
        result = results[user]
        assert result["user"] == user
        assert list(result["jobs"]) == [result["job"]], f"{user}'s kernel is not inside {user}'s one job: {result}"
        job = result["jobs"][result["job"]]
        assert job["state"] == "RUNNING" and job["node"] == result["node"]
        assert result["hostname"] == result["node"], "the kernel runs on the compute node (its own hostname)"
        nodes.add(result["node"])
    assert nodes == {node.name for node in cluster.nodes}, f"two kernels of 2 CPUs each must use both nodes: {results}"


def test_the_panel_shows_each_slurm_kernels_job_node_and_state(slurm_run):
    """What the Environments panel lists for a Slurm kernel: its job id, node and state."""
    _cluster, servers, _archive, results = slurm_run
    for user in USERS:
        status, body = http("GET", f"http://127.0.0.1:{servers[user].port}/kernelprov/envs", servers[user].token)
        assert status == 200, body
        env = next(env for env in body["envs"] if env["name"] == KERNEL)
        jobs = {job["kernel_id"]: job for job in env["slurm_jobs"]}
        job = jobs[results[user]["kernel_id"]]
        assert (job["job_id"], job["node"], job["state"]) == (results[user]["job"], results[user]["node"], "RUNNING")
        assert job["description"].startswith("Running")


def test_the_panel_in_a_browser_shows_the_slurm_job_node_and_state(slurm_run):
    """The same, as a researcher sees it: JupyterLab on the user's own server (chromium, driven by
    Playwright), the Environments panel's row of the Slurm kernel, expanded: "Slurm job N: Running
    on NODE" for the running kernel."""
    from concurrent.futures import ThreadPoolExecutor

    from .test_panel import CHROMIUM_FLAGS, TIMEOUT_MS, _chromium, _expand, _open_panel, _row

    _cluster, servers, _archive, results = slurm_run
    user = USERS[0]
    server, job, node = servers[user], results[user]["job"], results[user]["node"]
    chromium = _chromium()

    def look() -> tuple[str, str]:
        # Playwright's sync API wants a thread without an asyncio loop (pytest-jupyter owns this one's).
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(TIMEOUT_MS)
                expect.set_options(timeout=TIMEOUT_MS)
                page.goto(f"http://127.0.0.1:{server.port}/lab?reset&token={server.token}")
                page.locator("#jp-main-dock-panel").wait_for()
                row = _row(_open_panel(page), KERNEL)
                details = _expand(row)
                shown = details.locator(".jp-kernelprov-slurmJob").first
                expect(shown).to_contain_text(f"Slurm job {job}: Running on {node}")
                return shown.inner_text()
            finally:
                browser.close()

    with ThreadPoolExecutor(1) as thread:
        job_line = thread.submit(look).result(timeout=300)
    assert job_line.strip() == f"Slurm job {job}: Running on {node}", job_line


def test_each_kernel_runs_from_its_users_env_staged_on_that_nodes_local_disk(slurm_run):
    cluster, _servers, archive, results = slurm_run
    for user in USERS:
        result = results[user]
        prefix = Path(result["prefix"])
        assert prefix.parent == cluster.node_local / f"kernelprov-{user}"
        assert result["kernelprov_env"] == str(prefix) and Path(result["executable"]).is_relative_to(prefix)
        staged = _staged_prefixes(cluster, user)
        assert staged[result["node"]] == [str(prefix)], staged
        assert all(not found for node, found in staged.items() if node != result["node"]), \
            f"{user}'s env was staged on a node its kernel does not run on: {staged}"
        assert not (cluster.node_local / f"kernelprov-{user}").exists(), "staged on the server's disk, not the node's"
        node = cluster.node(result["node"])
        user_dir = node.disk / f"kernelprov-{user}"
        info = os.stat(user_dir)
        assert info.st_uid == pwd.getpwnam(user).pw_uid and stat.S_IMODE(info.st_mode) == 0o700
        marker = json.loads((user_dir / f"{prefix.name}.json").read_text())
        assert marker["archive"] == str(archive)


def test_the_kernel_listens_on_its_nodes_address_and_the_key_stays_private(slurm_run):
    cluster, servers, _archive, results = slurm_run
    for user in USERS:
        result = results[user]
        node = cluster.node(result["node"])
        connection_file = servers[user].home / ".local/share/jupyter/runtime" / f"kernel-{result['kernel_id']}.json"
        connection = json.loads(connection_file.read_text())
        assert connection["ip"] == node.address and connection["transport"] == "tcp"
        assert stat.S_IMODE(os.stat(connection_file).st_mode) == 0o600
        listening = run(["ss", "-Hltnp"]).stdout
        kernel_sockets = [line.split()[3] for line in listening.splitlines() if f"pid={result['pid']}," in line]
        for port in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
            assert f"{node.address}:{connection[port]}" in kernel_sockets, (port, kernel_sockets)
        key = connection["key"]
        assert len(key) >= 32
        script = run(["scontrol", "write", "batch_script", result["job"], "-"], env=cluster.env()).stdout
        assert "kernelprov.jupyter.slurm.launcher" in script and key not in script
        for pid in run(["pgrep", "-u", user]).stdout.split():
            try:
                assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
                assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
            except FileNotFoundError:
                continue
        exchange = [path for path in connection_file.parent.glob(f"kernelprov-slurm-{result['kernel_id']}-*")]
        # 0700 (jupyter_core may add the sticky bit, against /tmp cleaners): only the user gets in.
        assert len(exchange) == 1 and stat.S_IMODE(os.stat(exchange[0]).st_mode) & 0o777 == 0o700, exchange


def test_interrupt_reaches_the_kernel_on_the_node(slurm_run):
    _cluster, servers, _archive, results = slurm_run
    user = USERS[0]
    reply = _interrupt_during_sleep(servers[user], results[user]["kernel_id"])
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert reply["seconds_after_interrupt"] < 20
    assert servers[user].probe(results[user]["kernel_id"])["job"] == results[user]["job"], "interrupt kept the job"


def _listening_ports(pid: int) -> list[str]:
    return [line.split()[3] for line in run(["ss", "-Hltnp"]).stdout.splitlines() if f"pid={pid}," in line]


def test_restart_keeps_the_job_and_node_and_starts_a_fresh_kernel(slurm_run):
    """A user's restart (graceful: shutdown_request, then wait) reuses the running job: same job,
    same node, same staged env (not staged again), a new kernel process without the old one's
    variables, on the ports the connection file now names; execute and interrupt work after it."""
    cluster, servers, _archive, results = slurm_run
    user = USERS[0]
    server, before = servers[user], results[user]
    marker = cluster.node(before["node"]).disk / f"kernelprov-{user}" / f"{Path(before['prefix']).name}.json"
    staged_at = json.loads(marker.read_text())["staged_at"]
    execute(server.ws(before["kernel_id"]), server.token, "kpsl_left_behind = 42")
    status, _ = server.api("POST", f"/kernels/{before['kernel_id']}/restart")
    assert status == 200, status
    after = server.probe(before["kernel_id"])
    assert (after["job"], after["node"]) == (before["job"], before["node"]), f"a restart keeps its job: {after}"
    assert after["pid"] != before["pid"], "a restart starts a new kernel process"
    assert list(_user_jobs(cluster, user)) == [before["job"]], "no second job"
    fresh = execute(server.ws(before["kernel_id"]), server.token, "print('KPSL_FRESH', 'kpsl_left_behind' in dir())")
    assert "KPSL_FRESH False" in fresh, f"the restarted kernel still has the old kernel's variables: {fresh}"
    assert after["prefix"] == before["prefix"]
    assert json.loads(marker.read_text())["staged_at"] == staged_at, "the restart staged the env again"
    connection_file = server.home / ".local/share/jupyter/runtime" / f"kernel-{before['kernel_id']}.json"
    connection = json.loads(connection_file.read_text())
    listening = _listening_ports(after["pid"])
    assert all(f"{connection['ip']}:{connection[port]}" in listening for port in
               ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")), (connection, listening)
    reply = _interrupt_during_sleep(server, before["kernel_id"])
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert reply["seconds_after_interrupt"] < 20
    state = http("GET", f"http://127.0.0.1:{server.port}/kernelprov/envs", server.token)[1]
    job = next(job for env in state["envs"] if env["name"] == KERNEL for job in env["slurm_jobs"])
    assert (job["job_id"], job["generation"]) == (before["job"], 1), job
    results[user].update(pid=after["pid"])


def test_restart_after_the_job_was_cancelled_submits_a_new_job(slurm_run):
    """The job is cancelled from outside (scancel): a restart cannot reuse it and submits a new one."""
    cluster, servers, _archive, results = slurm_run
    user = USERS[0]
    server, before = servers[user], results[user]
    run(["scancel", before["job"]], env=cluster.env())
    status, _ = server.api("POST", f"/kernels/{before['kernel_id']}/restart")
    assert status == 200, status
    after = wait_for(lambda: _probe_changed(server, before["kernel_id"], "job", before["job"]), 120,
                     "the kernel to run in a new job")
    assert after["prefix"] == before["prefix"] and after["user"] == user
    active = _active_jobs(cluster, user)
    assert active == [after["job"]], f"the cancelled job is not the kernel's any more: {active}"
    assert "KPSL_WORKS 2" in execute(server.ws(before["kernel_id"]), server.token, "print('KPSL_WORKS', 1 + 1)")
    results[user].update(job=after["job"], node=after["node"], pid=after["pid"])


def test_restart_near_the_jobs_time_limit_submits_a_new_job(slurm_run):
    """A job with less than MIN_TIME_LEFT_TO_REUSE left (an admin shortened it) is not reused: the
    restart submits a new job and cancels the old one, so the kernel is not killed minutes later."""
    from kernelprov.jupyter.slurm.jobs import parse_time_left
    from kernelprov.jupyter.slurm.provisioner import MIN_TIME_LEFT_TO_REUSE

    cluster, servers, _archive, results = slurm_run
    user = USERS[0]
    server, before = servers[user], results[user]
    elapsed = parse_time_left(run(["squeue", "-h", "-j", before["job"], "-o", "%M"], env=cluster.env()).stdout.strip())
    minutes = math.ceil(elapsed / 60) + int(MIN_TIME_LEFT_TO_REUSE // 60) - 2  # 2-3 minutes left
    run(["scontrol", "update", f"JobId={before['job']}", f"TimeLimit={minutes}"], env=cluster.env())
    status, _ = server.api("POST", f"/kernels/{before['kernel_id']}/restart")
    assert status == 200, status
    after = wait_for(lambda: _probe_changed(server, before["kernel_id"], "job", before["job"]), 120,
                     "the kernel to run in a new job")
    wait_for(lambda: _active_jobs(cluster, user) == [after["job"]], 60, "the old job to be cancelled")
    assert "KPSL_WORKS 2" in execute(server.ws(before["kernel_id"]), server.token, "print('KPSL_WORKS', 1 + 1)")
    results[user].update(job=after["job"], node=after["node"], pid=after["pid"])


def test_a_start_that_finds_no_free_node_shows_pending_and_times_out(slurm_run, tmp_path, monkeypatch):
    """Both nodes are busy (each runs a 2-CPU kernel): a third start waits as Pending: Resources,
    which slurm_job_state reports, and fails at its launch timeout with its job cancelled."""
    cluster, _servers, _archive, _results = slurm_run
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    from kernelprov.jupyter.provisioner import KernelStartError
    from kernelprov.jupyter.slurm.provisioner import slurm_job_state

    monkeypatch.setenv("SLURM_CONF", str(cluster.slurm_conf))
    monkeypatch.setenv("PATH", "/usr/bin:/bin:" + os.environ["PATH"])
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("KERNELPROV_SLURM_LAUNCH_TIMEOUT", "10")
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(cluster.kernels_dir)]))
    seen: list[dict] = []

    async def start_and_watch():
        starting = asyncio.ensure_future(km.start_kernel())
        while not starting.done():
            state = slurm_job_state(km.kernel_id) if km.kernel_id else None
            if state:
                seen.append(state)
            await asyncio.sleep(0.5)
        return starting.exception()

    error = asyncio.run(start_and_watch())
    assert isinstance(error, KernelStartError), error
    assert "waited in the queue for 10 s (Pending: Resources) and was cancelled" in str(error), str(error)
    assert any(state["state"] == "PENDING" and state["reason"] == "Resources" and
               state["description"] == "Pending: Resources" for state in seen), seen
    job_id = seen[-1]["job_id"]
    state = run(["scontrol", "show", "job", "-o", job_id], env=cluster.env(), check=False).stdout
    assert "JobState=CANCELLED" in state or not state, state
    assert slurm_job_state(km.kernel_id) is None


def test_shutdown_cancels_the_job(slurm_run):
    cluster, servers, _archive, results = slurm_run
    user = USERS[0]
    assert _user_jobs(cluster, user)
    status, _ = servers[user].api("DELETE", f"/kernels/{results[user]['kernel_id']}")
    assert status == 204, status
    wait_for(lambda: not _user_jobs(cluster, user) or all(
        job["state"] in ("COMPLETED", "CANCELLED") for job in _user_jobs(cluster, user).values()), 30,
        f"{user}'s job to end after the kernel's shutdown")
    exchange = list((servers[user].home / ".local/share/jupyter/runtime").glob("kernelprov-slurm-*"))
    assert not exchange, f"the exchange dir is left behind: {exchange}"


def test_a_stage_that_fails_on_the_node_says_why(slurm_run):
    """The archive is cut short after install: the job stages on the node, fails, and the start's
    error carries the engine's sentence from the job's output."""
    cluster, servers, archive, _results = slurm_run
    broken = archive.with_name("broken.tar.zst")
    shutil.copy2(archive, broken)
    shutil.copy2(f"{archive}.manifest.json", f"{broken}.manifest.json")
    for path in (broken, Path(f"{broken}.manifest.json")):
        path.chmod(0o644)
    subprocess.run([f"{VENV}/bin/kernelprov", "install", "kpsl-broken", "--archive", str(broken), "--kernels-dir",
                    str(cluster.kernels_dir), "--slurm", "--cpus", "1"], check=True, capture_output=True, text=True)
    with open(broken, "r+b") as out:
        out.truncate(broken.stat().st_size // 2)
    status, body = servers[USERS[0]].api("POST", "/kernels", {"name": "kpsl-broken"})
    assert status == 500, (status, body)
    message = body["message"]
    # Slurm may still be tidying the job up (COMPLETING) when the provisioner looks: either state says it failed.
    assert re.search(r"ended before the kernel started \((Failed|Completing): NonZeroExitCode", message), message
    assert "but its manifest records" in message, message  # the engine's sentence, from the node
    assert not _active_jobs(cluster, USERS[0])


def _exit_the_kernel(server: Server, kernel_id: str) -> None:
    import websocket

    connection = websocket.create_connection(server.ws(kernel_id), header=[f"Authorization: token {server.token}"])
    connection.send(json.dumps({
        "header": {"msg_id": uuid.uuid4().hex, "username": "kpsl", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": "import os; os._exit(3)", "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
    connection.close()


def test_a_kernel_that_dies_is_reported_and_restarted_in_its_job(slurm_run):
    """The kernel exits (os._exit(3)); its job lives on: Jupyter's restarter starts a new kernel
    in the same job, on the same node."""
    cluster, servers, _archive, results = slurm_run
    user = USERS[1]
    server, kernel_id, job = servers[user], results[user]["kernel_id"], results[user]["job"]
    _exit_the_kernel(server, kernel_id)
    expected = f"kernel {kernel_id} exited with status 3 in its Slurm job {job}"
    wait_for(lambda: expected in server.daemon.log.read_text(), 60, "the server to report the dead kernel")
    # The new kernel has new ports: a websocket opened before it reported them would talk to the old ones.
    back = f"kernel {kernel_id} runs on {results[user]['node']} ("
    wait_for(lambda: any(back in line and "restart 1 in the job" in line for line in
                         server.daemon.log.read_text().splitlines()), 60, "the kernel to come back")
    after = wait_for(lambda: _probe_changed(server, kernel_id, "pid", results[user]["pid"]), 60, "the new kernel to answer")
    assert (after["job"], after["node"]) == (job, results[user]["node"]), f"not restarted in its job: {after}"
    assert list(_user_jobs(cluster, user)) == [job]
    results[user].update(pid=after["pid"])


def test_a_kernel_whose_job_is_cancelled_is_reported_and_resubmitted(slurm_run):
    cluster, servers, _archive, results = slurm_run
    user = USERS[1]
    server, kernel_id, job = servers[user], results[user]["kernel_id"], results[user]["job"]
    run(["scancel", job], env=cluster.env())
    expected = f"Slurm job {job} ended while the kernel ran"
    wait_for(lambda: expected in server.daemon.log.read_text(), 60, "the server to report the ended job")
    # jupyter_server's restarter brings the kernel back: in a new job, from the same staged env.
    after = wait_for(lambda: _probe_changed(server, kernel_id, "job", job), 120, "the kernel to come back in a new job")
    assert after["prefix"] == results[user]["prefix"] and after["user"] == user
    active = [j for j, info in _user_jobs(cluster, user).items() if info["state"] == "RUNNING"]
    assert active == [after["job"]]


def _probe_changed(server: Server, kernel_id: str, field: str, old) -> dict | None:
    """The kernel's probe once its ``field`` ("pid", "job") differs from ``old``, else None."""
    try:
        found = server.probe(kernel_id)
    except (OSError, TimeoutError, AssertionError, StopIteration, ValueError) as err:
        print(f"probe: {err!r}")
        return None
    return found if found[field] != old else None



def test_a_stopped_server_leaves_no_job_behind(slurm_run):
    cluster, servers, _archive, _results = slurm_run
    user = USERS[1]
    assert [job["state"] for job in _user_jobs(cluster, user).values()] == ["RUNNING"]
    server = servers[user]
    server.daemon.process.send_signal(signal.SIGTERM)
    server.daemon.process.wait(60)
    wait_for(lambda: not _user_jobs(cluster, user) or all(
        job["state"] in ("COMPLETED", "CANCELLED") for job in _user_jobs(cluster, user).values()), 30,
        f"{user}'s job to end after its server stopped")

