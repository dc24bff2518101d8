"""Inside the Slurm job, on the compute node: find the node's address and start the kernel there.

Run by the batch script :class:`.provisioner.KernelprovSlurmProvisioner` submits, as
``<stager python> -I -m kernelprov.jupyter.slurm.launcher CONNECTION_FILE RUN_SH``. It

1. finds the address the Jupyter server reaches this node by: the job's node's ``NodeAddr`` as
   slurmctld knows it (``scontrol show node``: the address Slurm itself uses), resolved, else this
   host's name resolved;
2. writes that address into the connection file (ipykernel takes its ``ip`` from the file, over
   any ``--ip``) and ``node.json`` beside it (node, address, job, pid: nothing secret);
3. replaces itself (``exec``, so Slurm's signals reach the kernel) by the kernel's own ``run.sh -f
   CONNECTION_FILE``: run.sh stages the env through the same engine into this user's cache on the
   node's local disk and execs ipykernel, which binds ports it chooses here and writes them into
   the connection file.

The connection file was written by the provisioner, mode 0600 in a 0700 directory, with the
session key and no ports; every rewrite keeps it 0600. The key is never on a command line, in the
environment or in the batch script.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys


def node_address(node_name: str | None) -> str:
    """The IPv4 address of this compute node as the rest of the cluster reaches it."""
    candidates = []
    if node_name:
        try:
            out = subprocess.run(["scontrol", "show", "node", "--oneliner", node_name], capture_output=True,
                                 text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        match = re.search(r"\bNodeAddr=(\S+)", out)
        if match:
            candidates.append(match.group(1))
    candidates.append(socket.gethostname())
    for name in candidates:
        try:
            return socket.gethostbyname(name)
        except OSError:
            continue
    raise SystemExit(f"kernelprov: cannot find this node's address (tried {', '.join(candidates)})")


def main(argv: list[str] | None = None) -> None:
    """``launcher CONNECTION_FILE RUN_SH``: never returns (execs run.sh)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m kernelprov.jupyter.slurm.launcher CONNECTION_FILE RUN_SH")
    connection_file, run_sh = args
    address = node_address(os.environ.get("SLURMD_NODENAME"))
    info = {"node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "hostname": socket.gethostname(),
            "address": address, "job_id": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid()}
    with open(connection_file) as source:
        connection = json.load(source)
    connection["ip"] = address
    write_private_json(connection_file, connection)
    write_private_json(os.path.join(os.path.dirname(connection_file), "node.json"), info)
    print(f"kernelprov: starting the kernel on {info['node']} ({address}), job {info['job_id']}", file=sys.stderr, flush=True)
    os.execv(run_sh, [run_sh, "-f", connection_file])


def write_private_json(path: str, data: dict) -> None:
    """Replace ``path`` by ``data`` as JSON, mode 0600 from its creation, atomically (a reader
    never sees half a file)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(data, out)
    os.replace(temporary, path)


if __name__ == "__main__":
    main()
