"""Guarantee: a kernelprov kernel started through the provisioner listens on private IPC sockets
(a fresh 0700 dir), so no other user of the node can reach it, and ipykernel's "running over TCP
without encryption" warning never reaches the user; ``curve`` encrypts TCP instead. Real kernels
from the real runnable archive, and a real second unix user trying to connect."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelprov.cli.app import main

from .kernel_client import evaluate

WARNING = "running over TCP without encryption"
OTHER_USER = "kpmallory"


@pytest.fixture
def kernel(kernel_environ, runnable_archive, capsys) -> str:
    assert main(["install", "demo", "--archive", str(runnable_archive)]) == 0
    capsys.readouterr()
    return "demo"


async def _start(name: str, stderr_path: Path, **provisioner_config) -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name=name)
    if provisioner_config:
        km.kernel_spec.metadata["kernel_provisioner"]["config"].update(provisioner_config)
    # Left open: a restart relaunches with the same arguments. Closed by the garbage collector.
    stderr = open(stderr_path, "w")  # noqa: SIM115
    await km.start_kernel(stderr=stderr)
    km._test_stderr = stderr
    return km


def _other_user_connects(socket_path: str) -> str:
    """Try to connect to ``socket_path`` as another unix user; return what happened."""
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
                   capture_output=True)
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1]); print('connected')\n"
            "except PermissionError: print('denied')\nexcept OSError as e: print(type(e).__name__)\n")
    result = subprocess.run(["runuser", "-u", OTHER_USER, "--", "/usr/bin/python3", "-c", code, socket_path],
                            capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or result.stderr.strip()


async def test_the_default_transport_is_private_ipc(kernel, tmp_path):
    km = await _start(kernel, tmp_path / "stderr.txt")
    try:
        info = km.get_connection_info()
        assert info["transport"] == "ipc"
        socket_dir = os.path.dirname(info["ip"])
        st = os.lstat(socket_dir)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        assert (await evaluate(km, "x = 6 * 7", {"x": "x"}))["x"] == 42
        shell_socket = f"{info['ip']}-{info['shell_port']}"
        assert stat.S_ISSOCK(os.lstat(shell_socket).st_mode)
        if os.geteuid() == 0 and shutil.which("runuser") and os.path.exists("/usr/bin/python3"):
            assert _other_user_connects(shell_socket) == "denied"
        await km.restart_kernel(now=True)
        assert km.get_connection_info()["ip"] == info["ip"]  # a restart keeps its sockets' dir
        assert (await evaluate(km, "y = 1", {"y": "y"}))["y"] == 1
    finally:
        await km.shutdown_kernel(now=True)
        km._test_stderr.close()
    assert not os.path.exists(socket_dir), "shutdown must remove the private socket dir"
    assert WARNING not in (tmp_path / "stderr.txt").read_text()


async def test_curve_encrypts_tcp(kernel, tmp_path):
    km = await _start(kernel, tmp_path / "stderr.txt", kernel_transport="curve")
    try:
        info = km.get_connection_info()
        assert info["transport"] == "tcp" and info.get("curve_publickey")
        connection = json.loads(Path(km.connection_file).read_text())
        assert connection["curve_secretkey"] and stat.S_IMODE(os.stat(km.connection_file).st_mode) == 0o600
        assert (await evaluate(km, "x = 2 ** 10", {"x": "x"}))["x"] == 1024
    finally:
        await km.shutdown_kernel(now=True)
        km._test_stderr.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    # The client's sockets are Curve sockets: the execute above could not have worked unless the
    # kernel had taken the keys too (it logs that at INFO only).
    assert WARNING not in stderr


async def test_plain_tcp_remains_available_and_is_what_ipykernel_warns_about(kernel, tmp_path):
    km = await _start(kernel, tmp_path / "stderr.txt", kernel_transport="tcp")
    try:
        assert km.get_connection_info()["transport"] == "tcp"
        assert (await evaluate(km, "x = 1", {"x": "x"}))["x"] == 1
    finally:
        await km.shutdown_kernel(now=True)
        km._test_stderr.close()
    assert WARNING in (tmp_path / "stderr.txt").read_text()


def test_a_bad_transport_setting_is_refused_in_one_sentence(monkeypatch):
    from kernelprov.errors import ConfigError
    from kernelprov.jupyter.transport import transport_from_environment

    monkeypatch.setenv("KERNELPROV_KERNEL_TRANSPORT", "carrier-pigeon")
    with pytest.raises(ConfigError, match="KERNELPROV_KERNEL_TRANSPORT='carrier-pigeon' is not one of ipc, curve, tcp"):
        transport_from_environment()


def test_sockets_never_go_under_a_directory_another_user_controls(tmp_path, monkeypatch):
    # TMPDIR=/tmp/$USER made first by a neighbour: they could swap our socket dir before the
    # kernel binds there, and sit between the server and the kernel. Sockets go to /tmp instead.
    import pwd

    from kernelprov.jupyter.transport import socket_parent

    hostile = tmp_path / "made-by-a-neighbour"
    hostile.mkdir()
    os.chown(hostile, pwd.getpwnam("nobody").pw_uid, -1)
    writable = tmp_path / "open-to-all"
    writable.mkdir()
    os.chmod(writable, 0o777)
    monkeypatch.setenv("TMPDIR", str(hostile))
    for runtime in (str(hostile), str(writable)):
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        assert socket_parent() == "/tmp"
