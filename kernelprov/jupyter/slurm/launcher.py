"""Inside the Slurm job, on the compute node: find the node's address and supervise the kernel there.

Run by the batch script :class:`.provisioner.KernelprovSlurmProvisioner` submits, as
``<stager python> -I -m kernelprov.jupyter.slurm.launcher EXCHANGE_DIR RUN_SH RESTART_GRACE``
(the batch script ``exec``\\ s it, so this process *is* the batch step's shell). It

1. finds the address the Jupyter server reaches this node by: the job's node's ``NodeAddr`` as
   slurmctld knows it (``scontrol show node``: the address Slurm itself uses), resolved, else this
   host's name resolved; writes ``node.json`` (node, address, job, pid: nothing secret);
2. runs kernel *generation* 0, then any later one the provisioner asks for: for generation N it
   writes ``connection-N.json`` — the provisioner's ``connection.json`` (session key, no ports)
   plus the node's address — and starts the kernel's own ``run.sh -f connection-N.json`` as a
   child in its own process group. run.sh stages the env through the same engine into this
   user's cache on the node's local disk and execs ipykernel, which binds ports it picks and
   writes them into that file. A file named for generation N only ever holds generation N's
   ports, so the provisioner never mistakes a previous kernel's ports for the new one's;
3. forwards the signals it gets (the provisioner's ``scancel --batch --signal=INT`` for an
   interrupt, TERM, HUP, USR1, ...) to the kernel's process group — the kernel and its children,
   as a local kernel's interrupt reaches them. A TERM is followed by a KILL of that group when
   the kernel is still there after :data:`KILL_AFTER` seconds (``kill`` must be quick);
4. records each generation in ``status.json`` (``starting``, ``running`` with the kernel's pid,
   ``exited`` with its exit status): the provisioner's ``poll`` reads it to learn that the
   kernel died while the job lives on;
5. when the kernel has exited, waits up to RESTART_GRACE seconds for ``restart.json`` asking for
   generation N+1 (written by the provisioner's ``cleanup(restart=True)``) and starts it; without
   one the job ends with the kernel's exit status. A TERM while waiting ends the job at once, and
   so does the exit of a kernel that never wrote its ports (its start failed: say so at once).

Every file here is written 0600 from its creation and replaced atomically, in the 0700 exchange
dir the provisioner made. The key is never on a command line, in the environment or in the batch
script.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

#: Signals passed on to the kernel's process group (SIGKILL and SIGSTOP cannot be caught).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGXCPU)
#: Seconds between a TERM to the kernel and the KILL of its process group.
KILL_AFTER = 3.0
#: How often the launcher looks for a restart request while it waits for one.
REQUEST_POLL = 0.2


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


def batch_script(title: str, exports: dict[str, str], stager: str, exchange_dir: str, run_sh: str,
                 restart_grace: float) -> str:
    """The batch script the provisioner submits (on sbatch's stdin): ``exports``, then ``exec``
    this launcher, so that its process is the batch step's shell, which ``scancel --batch
    --signal`` reaches. Nothing secret is in it."""
    import shlex

    lines = ["#!/bin/bash", f"# {title}"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in exports.items() if name.isidentifier()]
    lines.append(" ".join(["exec", shlex.quote(stager), "-I", "-m", "kernelprov.jupyter.slurm.launcher",
                           shlex.quote(exchange_dir), shlex.quote(run_sh), f"{restart_grace:g}"]))
    return "\n".join(lines) + "\n"


def write_private_json(path: str, data: dict) -> None:
    """Replace ``path`` by ``data`` as JSON, mode 0600 from its creation, atomically (a reader
    never sees half a file). The provisioner writes its restart requests with it too."""
    temporary = f"{path}.{os.getpid()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(data, out)
    os.replace(temporary, path)


def read_json(path: str) -> dict | None:
    """``path``'s JSON object, or None when it is missing or not (yet) a whole JSON object."""
    try:
        with open(path) as source:
            data = json.load(source)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def connection_file_of(exchange_dir: str, generation: int) -> str:
    """Generation ``generation``'s connection file (ipykernel writes its ports there)."""
    return os.path.join(exchange_dir, f"connection-{generation}.json")


class Supervisor:
    """Runs the kernel's generations one after the other; see the module's docstring."""

    def __init__(self, exchange_dir: str, run_sh: str, restart_grace: float):
        self.exchange_dir, self.run_sh, self.restart_grace = exchange_dir, run_sh, restart_grace
        self.child: subprocess.Popen | None = None
        self.terminated = False  # a TERM arrived while no kernel ran: the job is being ended
        self.kill_at: float | None = None

    def forward(self, signum: int, _frame: object) -> None:
        """Signal handler: pass the signal to the kernel's process group."""
        child = self.child
        if child is None or child.returncode is not None:
            if signum == signal.SIGTERM:
                self.terminated = True
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            return
        if signum == signal.SIGTERM and self.kill_at is None:
            self.kill_at = time.monotonic() + KILL_AFTER

    def status(self, generation: int, state: str, **fields: object) -> None:
        """Tell the provisioner where generation ``generation`` is (``status.json``)."""
        write_private_json(os.path.join(self.exchange_dir, "status.json"),
                           {"generation": generation, "state": state, "job_id": os.environ.get("SLURM_JOB_ID"),
                            "at": time.time(), **fields})

    def run_generation(self, generation: int, template: dict) -> int:
        """Start kernel generation ``generation`` and wait for it to exit; return its exit status."""
        connection_file = connection_file_of(self.exchange_dir, generation)
        write_private_json(connection_file, template)
        self.status(generation, "starting")
        self.kill_at = None
        # Its own process group: an interrupt reaches the kernel and its children, not this launcher.
        self.child = subprocess.Popen([self.run_sh, "-f", connection_file], process_group=0)
        self.status(generation, "running", pid=self.child.pid)
        while True:
            try:
                code = self.child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self.kill_at is not None and time.monotonic() >= self.kill_at:
                    try:
                        os.killpg(self.child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.kill_at = None
        status = code if code >= 0 else 128 - code
        self.status(generation, "exited", pid=self.child.pid, exit_code=status)
        print(f"kernelprov: kernel generation {generation} exited with status {status}", file=sys.stderr, flush=True)
        self.child = None
        return status

    def wait_for_request(self, generation: int) -> int | None:
        """The generation the provisioner asks for next (above ``generation``), or None when no
        request came within the grace period or the job is being ended."""
        deadline = time.monotonic() + self.restart_grace
        path = os.path.join(self.exchange_dir, "restart.json")
        while not self.terminated:
            request = read_json(path)
            wanted = request.get("generation") if request else None
            if isinstance(wanted, int) and wanted > generation:
                return wanted
            if time.monotonic() >= deadline:
                return None
            time.sleep(REQUEST_POLL)
        return None

    def run(self, template: dict) -> int:
        """Generations until one exits with no restart requested; return its exit status."""
        generation = 0
        while True:
            status = self.run_generation(generation, template)
            # A kernel that never wrote its ports never started: its start fails, nobody restarts it.
            reported = (read_json(connection_file_of(self.exchange_dir, generation)) or {}).get("shell_port")
            following = self.wait_for_request(generation) if reported else None
            try:
                os.unlink(connection_file_of(self.exchange_dir, generation))
            except OSError:
                pass
            if following is None:
                self.status(generation, "ended", exit_code=status)
                return status
            print(f"kernelprov: restarting the kernel in this job (generation {following})", file=sys.stderr, flush=True)
            generation = following


def main(argv: list[str] | None = None) -> None:
    """``launcher EXCHANGE_DIR RUN_SH RESTART_GRACE``: exits with the last kernel's status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        raise SystemExit("usage: python -m kernelprov.jupyter.slurm.launcher EXCHANGE_DIR RUN_SH RESTART_GRACE")
    exchange_dir, run_sh, grace = args
    supervisor = Supervisor(exchange_dir, run_sh, float(grace))
    for signum in FORWARDED:
        signal.signal(signum, supervisor.forward)
    address = node_address(os.environ.get("SLURMD_NODENAME"))
    info = {"node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "hostname": socket.gethostname(),
            "address": address, "job_id": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid()}
    template = read_json(os.path.join(exchange_dir, "connection.json"))
    if template is None:
        raise SystemExit(f"kernelprov: no connection file in {exchange_dir}")
    template["ip"] = address
    write_private_json(os.path.join(exchange_dir, "node.json"), info)
    print(f"kernelprov: starting the kernel on {info['node']} ({address}), job {info['job_id']}", file=sys.stderr,
          flush=True)
    sys.exit(supervisor.run(template))


if __name__ == "__main__":
    main()
