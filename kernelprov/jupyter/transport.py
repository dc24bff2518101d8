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
import tempfile
from typing import Any

from ..engine.securedir import open_trusted_dir
from ..errors import ConfigError, KernelprovError

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
    """Where private socket dirs are made: ``$XDG_RUNTIME_DIR`` (the user's private tmpfs, removed
    at logout), else ``/tmp``, whichever first is reached through directories nobody else can
    change (:func:`~kernelprov.engine.securedir.open_trusted_dir`; a sticky ``/tmp`` is fine).
    ``$TMPDIR`` is not used: another user may have made it, and could swap our dir before the
    kernel binds its sockets there."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR", ""), "/tmp"):
        if not os.path.isabs(candidate) or len(candidate) > _MAX_SOCKET_BASE - 30:
            continue
        try:
            real, fd = open_trusted_dir(candidate, create=False, what="socket directory")
        except (KernelprovError, OSError):
            continue
        os.close(fd)
        return str(real)
    raise ConfigError("Neither $XDG_RUNTIME_DIR nor /tmp is a directory only you and root can change; "
                      "ask your admin, or set KERNELPROV_KERNEL_TRANSPORT=curve.")


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
