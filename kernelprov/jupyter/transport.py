"""How a kernelprov kernel and its Jupyter server talk: private IPC sockets by default.

On a compute node shared by many users, a kernel on TCP loopback can be reached by any of them;
only the connection file's HMAC key stands between them and the kernel, and everything (code,
outputs) crosses in plain text — which is why ipykernel warns at every start. The provisioner
therefore chooses, per kernel, before ``LocalProvisioner`` writes the connection file:

``ipc`` (default)
    ZeroMQ IPC: unix sockets inside a fresh directory made by :func:`tempfile.mkdtemp` (mode
    0700, an unpredictable name, so nobody can squat it or connect). Any ipykernel supports it;
    it works wherever the server and the kernel share a node, which is the local provisioner's
    case. Measured cost at start: none (``benchmarks/transport.py``).
``curve``
    TCP with CurveZMQ keys provisioned by jupyter_client (``transport_encryption='required'``):
    encrypted and authenticated, for a server that must reach the kernel over TCP. The kernel's
    ipykernel must be 7.4 or newer, or the start hangs until its timeout.
``tcp``
    plain TCP, jupyter_client's default, for clients that need TCP ports.

Called by :class:`.provisioner.KernelprovProvisioner` in ``pre_launch`` and ``cleanup``.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Any

from ..errors import ConfigError

TRANSPORTS = ("ipc", "curve", "tcp")
DEFAULT_TRANSPORT = "ipc"
#: Room for ZeroMQ's ``-<port>`` suffix under the unix-socket path limit (108 bytes on Linux).
_MAX_SOCKET_BASE = 90


def transport_from_environment() -> str:
    """``$KERNELPROV_KERNEL_TRANSPORT`` checked against :data:`TRANSPORTS`, else the default."""
    value = os.environ.get("KERNELPROV_KERNEL_TRANSPORT", "").strip().lower()
    if not value:
        return DEFAULT_TRANSPORT
    if value not in TRANSPORTS:
        raise ConfigError(f"KERNELPROV_KERNEL_TRANSPORT={value!r} is not one of {', '.join(TRANSPORTS)}; fix it or unset it.")
    return value


def socket_parent() -> str:
    """Where private socket dirs are made: ``$XDG_RUNTIME_DIR`` when it is the user's own private
    dir (a tmpfs that logind removes at logout), else ``/tmp`` (sticky: nobody can move our dir)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        try:
            st = os.lstat(runtime)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            if len(runtime) < _MAX_SOCKET_BASE - 30:
                return runtime
    return tempfile.gettempdir() if len(tempfile.gettempdir()) < _MAX_SOCKET_BASE - 30 else "/tmp"


def prepare(km: Any, transport: str, socket_dir: str | None, launch_kwargs: dict) -> str | None:
    """Set ``km``'s transport for ``transport`` before the connection file is written; return the
    private socket dir in use (the one given, on a restart, or a new one for ``ipc``).

    Keeps an existing choice on restarts: the connection file (ports, paths, key) is reused.
    """
    if transport == "ipc":
        if socket_dir is None or not os.path.isdir(socket_dir):
            socket_dir = tempfile.mkdtemp(prefix="kernelprov-", dir=socket_parent())
        if km.transport != "ipc" or not str(km.ip).startswith(socket_dir + os.sep):
            km.cache_ports = False
            km.transport = "ipc"
            km.ip = os.path.join(socket_dir, "kernel")
        return socket_dir
    if transport == "curve":
        km.transport_encryption = "required"
        launch_kwargs["transport_encryption"] = "required"
    return socket_dir


def remove_socket_dir(socket_dir: str | None) -> None:
    """Remove a dir made by :func:`prepare` once its kernel is gone for good (not on restart)."""
    if socket_dir:
        shutil.rmtree(socket_dir, ignore_errors=True)
