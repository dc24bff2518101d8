"""The exchange dir: the files a Slurm kernel's server and its job share, and nothing else.

One 0700 directory per kernel (in ``connection_dir``, on a filesystem both mount), made by
:func:`make_exchange_dir` when the provisioner submits the job; every file in it is 0600 from its
creation and replaced atomically (:func:`~.launcher.write_private_json`):

``connection.json``     by the provisioner: the session key, no ports (the launcher's template)
``connection-N.json``   by the launcher for kernel generation N (template + node address), then by
                        that generation's ipykernel with its ports
``node.json``           by the launcher: node, address, job id, launcher pid
``status.json``         by the launcher: generation N is ``starting``, ``running`` or ``exited``
``restart.json``        by the provisioner: "start generation N+1 in this job" (:func:`request_restart`)
``job.log``             the job's output (sbatch ``--output``)

Called by :class:`.provisioner.KernelprovSlurmProvisioner`, from its threads (the filesystem
may be a slow network one): plain blocking functions.
"""

from __future__ import annotations

import json
import os
import tempfile

from jupyter_client.connect import KernelConnectionInfo

from .launcher import connection_file_of, read_json, write_private_json

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def make_exchange_dir(parent: str, kernel_id: str, connection: dict) -> str:
    """A fresh 0700 exchange dir in ``parent`` with ``connection.json`` (0600, ports 0) in it."""
    os.makedirs(parent, mode=0o700, exist_ok=True)
    exchange_dir = tempfile.mkdtemp(prefix=f"kernelprov-slurm-{kernel_id}-", dir=parent)
    descriptor = os.open(os.path.join(exchange_dir, "connection.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump({**connection, **{port: 0 for port in PORTS}}, out)
    return exchange_dir


def read_ports(exchange_dir: str, generation: int) -> KernelConnectionInfo | None:
    """Generation ``generation``'s connection info once its ipykernel wrote its ports, else None.
    Only that generation's kernel ever writes that file: a previous kernel's ports are never read."""
    info = read_json(connection_file_of(exchange_dir, generation))
    if info is None or not info.get("ip") or not all(isinstance(info.get(port), int) and info[port] > 0 for port in PORTS):
        return None
    info["key"] = info["key"].encode()
    return info


def read_status(exchange_dir: str) -> dict | None:
    """What the launcher last said about its kernel (``status.json``), or None."""
    return read_json(os.path.join(exchange_dir, "status.json"))


def request_restart(exchange_dir: str, generation: int) -> None:
    """Ask the job's launcher to start kernel generation ``generation`` once the current one exits."""
    write_private_json(os.path.join(exchange_dir, "restart.json"), {"generation": generation})


def tail(path: str, limit: int = 300) -> str:
    """The last lines of the job's output, on one line, for an error message."""
    try:
        with open(path, errors="replace") as source:
            text = source.read()[-4000:]
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-limit:]
