"""A one-node Slurm cluster with JupyterHub, started and stopped by tests/test_cluster.py.

Every daemon (munged, slurmctld, slurmd, configurable-http-proxy, JupyterHub) runs in the
foreground as a child of the test, listens on 127.0.0.1 only, writes its log under the run's
directory, and is stopped by its PID. Unix users made here are removed again, with their processes
(each ended by its PID).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).parent
CI_ROOT = Path(os.environ.get("KERNELPROV_CI_ROOT", "/opt/kernelprov-ci"))
VENV = CI_ROOT / "venv"
NODE_NAME = "kpci-node"
PARTITION = "kpci"
USER_PREFIX = "kpci-"
DAEMON_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


LOCK_FILE = CI_ROOT / "cluster.lock"


@contextlib.contextmanager
def machine_lock(timeout: float) -> Iterator[None]:
    """Hold the machine-wide cluster-test lock (``.ci/setup.d/30-cluster.sh`` takes it too).

    Two runs at once would share the test users and the shared venv; the second one waits.
    """
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another cluster test held {LOCK_FILE} for {timeout:.0f} s") from None
                time.sleep(1)
        yield
    finally:
        os.close(fd)  # releases the lock


class ClusterUnavailable(Exception):
    """The cluster could not be brought up on this machine (the test skips, with this reason)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something true; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"({err.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Daemon:
    """One foreground daemon started by the test; ``stop`` ends it by its PID."""

    name: str
    process: subprocess.Popen
    log: Path

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if not self.running():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_daemon(name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Daemon:
    """Start ``argv`` in its own session with stdout and stderr appended to ``log``."""
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Daemon(name, process, log)


def run(argv: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a short command and capture its output (text)."""
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``user`` (never raises on failure: callers check the result)."""
    return run(["/usr/sbin/runuser", "-u", user, "--", *argv], env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, check=False)


# --- unix users ------------------------------------------------------------------------------

def _end_processes_of(user: str) -> None:
    """End every process of a test user, each by its PID (userdel refuses while any runs)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = run(["pgrep", "-u", user], check=False).stdout.split()
        for pid in found:
            _kill(int(pid), sig)
        if not found:
            return
        time.sleep(1)


def remove_user(user: str) -> None:
    """Delete a test user, its processes and its home directory, if it exists."""
    assert user.startswith(USER_PREFIX), user  # never touch an account this harness did not make
    try:
        pwd.getpwnam(user)
    except KeyError:
        return
    _end_processes_of(user)
    run(["userdel", "--remove", "--force", user], check=False)


def create_user(user: str) -> pwd.struct_passwd:
    """Make a fresh unix user with a home directory (removing a leftover of a killed run first)."""
    remove_user(user)
    run(["useradd", "--create-home", "--shell", "/bin/bash", "--comment", "kernelprov cluster test", user])
    return pwd.getpwnam(user)


# --- HTTP ------------------------------------------------------------------------------------

def http(method: str, url: str, token: str, body: dict | None = None, timeout: float = 120) -> tuple[int, object]:
    """One JSON request with a JupyterHub token; returns (status, decoded body or None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def execute(ws_url: str, token: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a kernel over its websocket (Jupyter's JSON protocol); return its stdout.

    Raises AssertionError with the traceback if the code fails.
    """
    import websocket  # websocket-client, a jupyter_server dependency

    connection = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        connection.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "kernelprov-ci", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        stdout, replied, idle = [], None, False
        deadline = time.monotonic() + timeout
        while not (replied and idle):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to execute_request within {timeout} s")
            message = json.loads(connection.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["header"]["msg_type"], message["content"]
            if kind == "stream" and content.get("name") == "stdout":
                stdout.append(content["text"])
            elif kind == "error":
                raise AssertionError("kernel raised:\n" + "\n".join(content.get("traceback", [])))
            elif kind == "execute_reply":
                replied = content
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
        assert replied["status"] == "ok", replied
        return "".join(stdout)
    finally:
        connection.close()


# --- the cluster -----------------------------------------------------------------------------

@dataclass
class Cluster:
    """Paths, ports and daemons of one run. ``start_*`` in order; ``stop`` undoes everything."""

    base: Path
    users: list[str]
    daemons: list[Daemon] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    proxy_port: int = field(default_factory=free_port)
    proxy_api_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)

    @classmethod
    def make(cls, users: list[str]) -> "Cluster":
        base = Path(tempfile.mkdtemp(prefix="kpci-", dir="/tmp"))
        base.chmod(0o755)  # test users must reach the munge socket, archives and kernels
        cluster = cls(base, users)
        for name in ("logs", "munge", "slurm", "hub", "archives", "jupyter/kernels"):
            (base / name).mkdir(parents=True, mode=0o755)
        # Shared by every user like /tmp: each user's kernelprov cache is made here.
        cluster.node_local.mkdir()
        cluster.node_local.chmod(0o1777)
        return cluster

    # paths
    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def node_local(self) -> Path:
        return self.base / "node-local"

    @property
    def jupyter_path(self) -> Path:
        return self.base / "jupyter"

    @property
    def kernels_dir(self) -> Path:
        return self.jupyter_path / "kernels"

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munge.socket"

    @property
    def slurm_conf(self) -> Path:
        return self.base / "slurm" / "slurm.conf"

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for the daemons and the Slurm commands."""
        return {"PATH": DAEMON_PATH, "LANG": "C.UTF-8", "HOME": "/root", "SLURM_CONF": str(self.slurm_conf), **extra}

    # daemons
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Daemon:
        daemon = start_daemon(name, argv, env or self.env(), self.logs / f"{name}.log", cwd=cwd)
        self.daemons.append(daemon)
        return daemon

    def _check_running(self, daemon: Daemon) -> None:
        if not daemon.running():
            raise ClusterUnavailable(f"{daemon.name} exited with {daemon.process.returncode}:\n{tail(daemon.log)}")

    def start_munge(self) -> None:
        key = self.base / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        state = self.base / "munge"
        daemon = self._start("munged", ["munged", "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
                                        f"--pid-file={state}/munged.pid", f"--seed-file={state}/munged.seed",
                                        f"--log-file={self.logs}/munged.log"])

        def works():
            self._check_running(daemon)
            return self.munge_socket.exists() and run(["munge", "-n", "-S", str(self.munge_socket)], check=False).returncode == 0

        wait_for(works, 20, "munged")

    def write_slurm_conf(self) -> None:
        # `slurmd -C` prints this node's real layout; a NodeName line that disagrees drains it.
        detected = run(["slurmd", "-C"]).stdout.splitlines()[0].split()
        layout = [word for word in detected if not word.startswith("NodeName=")]
        node_line = " ".join([f"NodeName={NODE_NAME}", "NodeAddr=127.0.0.1", f"NodeHostname={socket.gethostname()}", *layout])
        for name in ("slurmctld", "slurmd"):
            (self.base / "slurm" / name).mkdir(exist_ok=True)
        text = string.Template((HERE / "slurm.conf.in").read_text()).substitute(
            hostname=socket.gethostname(), slurmctld_port=free_port(), slurmd_port=free_port(),
            munge_socket=self.munge_socket, state=self.base / "slurm", logs=self.logs, node_line=node_line,
            node_name=NODE_NAME)
        self.slurm_conf.write_text(text)
        self.slurm_conf.chmod(0o644)

    def start_slurm(self) -> None:
        self.write_slurm_conf()
        conf = str(self.slurm_conf)
        ctld = self._start("slurmctld.out", ["slurmctld", "-D", "-f", conf])
        slurmd = self._start("slurmd.out", ["slurmd", "-D", "-f", conf, "-N", NODE_NAME])

        def node_idle():
            self._check_running(ctld)
            self._check_running(slurmd)
            state = run(["sinfo", "-h", "-n", NODE_NAME, "-o", "%T"], env=self.env(), check=False).stdout.strip()
            return state == "idle"

        try:
            wait_for(node_idle, 45, "the Slurm node to become idle", interval=0.5)
        except TimeoutError as err:
            raise ClusterUnavailable(f"{err}\nslurmctld:\n{tail(self.logs / 'slurmctld.log')}\n"
                                     f"slurmd:\n{tail(self.logs / 'slurmd.log')}") from None

    def start_proxy(self) -> None:
        env = self.env(CONFIGPROXY_AUTH_TOKEN=self.token)
        daemon = self._start("proxy", ["configurable-http-proxy", "--ip", "127.0.0.1", "--port", str(self.proxy_port),
                                       "--api-ip", "127.0.0.1", "--api-port", str(self.proxy_api_port),
                                       "--error-target", f"http://127.0.0.1:{self.hub_port}/hub/error"], env=env)

        def listening():
            self._check_running(daemon)
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.proxy_api_port)) == 0

        wait_for(listening, 30, "configurable-http-proxy")

    def start_hub(self, archive: Path) -> None:
        settings = {
            "venv": str(VENV), "proxy_port": self.proxy_port, "proxy_api_port": self.proxy_api_port,
            "hub_port": self.hub_port, "state": str(self.base / "hub"), "token": self.token,
            "partition": PARTITION, "archive": str(archive), "jupyter_path": str(self.jupyter_path),
            "node_local": str(self.node_local), "slurm_conf": str(self.slurm_conf),
        }
        settings_file = self.base / "hub" / "settings.json"
        settings_file.write_text(json.dumps(settings, indent=1))
        settings_file.chmod(0o600)  # it holds the service token
        env = self.env(CONFIGPROXY_AUTH_TOKEN=self.token, KERNELPROV_CI_HUB_SETTINGS=str(settings_file))
        daemon = self._start("jupyterhub", [f"{VENV}/bin/jupyterhub", "-f", str(HERE / "jupyterhub_config.py")],
                             env=env, cwd=self.base / "hub")

        def answers():
            self._check_running(daemon)
            try:
                return self.hub("GET", "/")[0] == 200
            except OSError:
                return False

        wait_for(answers, 60, "JupyterHub's REST API")

    # REST
    def hub(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        """Call the Hub's REST API (``/hub/api`` + ``path``) with the admin service token."""
        return http(method, f"{self.public_url}/hub/api{path}", self.token, body)

    def server(self, user: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        """Call a user's Jupyter server REST API (``/user/<name>/api`` + ``path``) through the proxy."""
        return http(method, f"{self.public_url}/user/{user}/api{path}", self.token, body)

    def kernel_ws_url(self, user: str, kernel_id: str) -> str:
        return f"ws://127.0.0.1:{self.proxy_port}/user/{user}/api/kernels/{kernel_id}/channels"

    def squeue(self) -> list[tuple[str, str, str]]:
        """(job id, user, state) of every job in the queue."""
        out = run(["squeue", "-h", "-o", "%i %u %T"], env=self.env(), check=False).stdout
        return [tuple(line.split()) for line in out.splitlines() if line.strip()]

    def listening_sockets(self) -> list[tuple[str, str]] | None:
        """(local address, process) of every listening TCP/UDP socket of the cluster's processes:
        the daemons, every process of the test users (servers, kernels, srun) and our slurmstepds.
        None when ``ss`` is not installed."""
        if shutil.which("ss", path=DAEMON_PATH) is None:
            return None
        pids = {str(daemon.process.pid) for daemon in self.daemons if daemon.running()}
        for user in self.users:
            pids.update(run(["pgrep", "-u", user], check=False).stdout.split())
        pids.update(self._our_stepds())
        found = []
        for line in run(["ss", "-Hltunp"]).stdout.splitlines():
            fields = line.split()
            owners = set(re.findall(r"pid=(\d+)", line))
            if owners & pids:
                found.append((fields[4], fields[-1]))
        return found

    # teardown
    def diagnostics(self) -> str:
        """The tails of every log, for a failure message."""
        parts = [f"--- {log.name}\n{tail(log)}" for log in sorted(self.logs.glob("*.log"))]
        for user in self.users:
            try:
                home = Path(pwd.getpwnam(user).pw_dir)
            except KeyError:
                continue
            parts += [f"--- {log}\n{tail(log)}" for log in sorted(home.glob("jupyterhub_slurmspawner_*.log"))]
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs, stop every daemon by its PID, remove the users and the run's files.

        The jobs are cancelled through Slurm directly (the hub's own clean-up is off in
        jupyterhub_config.py: it would stop the servers one by one, polling each for seconds).
        """
        by_name = {daemon.name: daemon for daemon in self.daemons}
        self.stop_seconds = {}
        clock = time.monotonic()

        def lap(name: str) -> None:
            nonlocal clock
            self.stop_seconds[name] = round(time.monotonic() - clock, 1)
            clock = time.monotonic()

        ctld = by_name.get("slurmctld.out")
        if ctld is not None and ctld.running():
            for user in self.users:
                run(["scancel", "--user", user], env=self.env(), check=False)
            try:
                wait_for(lambda: not self.squeue(), 30, "the test users' jobs to end")
            except TimeoutError:
                pass
        lap("jobs")
        for name in ("jupyterhub", "proxy", "slurmd.out", "slurmctld.out", "munged"):
            if name in by_name:
                by_name[name].stop()
        lap("daemons")
        self._stop_stepds()
        for user in self.users:
            remove_user(user)
        lap("users")
        shutil.rmtree(self.base, ignore_errors=True)
        lap("files")

    def _stop_stepds(self) -> None:
        """slurmstepd detaches from slurmd; end any of ours still running (their command line names our conf)."""
        for pid in self._our_stepds():
            _kill(int(pid), signal.SIGKILL)

    def _our_stepds(self) -> list[str]:
        ours = []
        for pid in run(["pgrep", "-x", "slurmstepd"], check=False).stdout.split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if f"SLURM_CONF={self.slurm_conf}".encode() in environ:
                ours.append(pid)
        return ours
