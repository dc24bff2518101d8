"""A Slurm cluster of several compute nodes on this one machine, for tests/test_slurm.py.

Debian's slurm-wlm is built without ``--enable-multiple-slurmd``, so each ``slurmd`` is made a
host of its own instead: it runs in its own UTS and mount namespaces (``unshare``) with its own
hostname (``kpsl-n1``, ``kpsl-n2``), its own loopback address (127.0.0.2, 127.0.0.3 — all of
127/8 is loopback on Linux, so no network namespace or veth pair is needed) and its own
node-local disk: a directory of the run bind-mounted, inside that node's mount namespace only,
over the one path every node calls its local disk (:attr:`NodeCluster.node_local`). A job's
processes inherit their slurmd's namespaces, so a kernel on ``kpsl-n1`` sees n1's local disk
and nobody else's; root looks into a node's disk from outside through
``/proc/<slurmd pid>/root``.

Everything else (munged, users, teardown by PID) is :mod:`.harness`'s.
"""

from __future__ import annotations

import socket
import string
from dataclasses import dataclass, field
from pathlib import Path

from .harness import HERE, ClusterUnavailable, Cluster, Daemon, free_port, run, tail, wait_for

PARTITION = "kpsl"


@dataclass
class Node:
    """One compute node: its Slurm name, hostname, address, its local disk's backing dir."""

    name: str
    address: str
    disk: Path
    daemon: Daemon | None = None

    def view(self, path: Path | str) -> Path:
        """``path`` as this node's processes see it (its mount namespace, seen through /proc)."""
        assert self.daemon is not None and self.daemon.running(), f"{self.name}'s slurmd is not running"
        return Path(f"/proc/{self.daemon.process.pid}/root") / Path(path).relative_to("/")


@dataclass
class NodeCluster(Cluster):
    """:class:`~.harness.Cluster` with ``node_count`` slurmd nodes, each a host of its own."""

    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def make_nodes(cls, users: list[str], node_count: int = 2) -> "NodeCluster":
        base = Cluster.make(users).base
        cluster = cls(base, users)
        for index in range(1, node_count + 1):
            disk = base / "disks" / f"n{index}"
            disk.mkdir(parents=True)
            disk.chmod(0o1777)  # like /tmp: each user's kernelprov cache is made in it
            cluster.nodes.append(Node(f"kpsl-n{index}", f"127.0.0.{index + 1}", disk))
        return cluster

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def write_slurm_conf(self) -> None:
        detected = run(["slurmd", "-C"]).stdout.splitlines()[0].split()
        layout = [word for word in detected if not word.startswith(("NodeName=", "UpTime="))]
        lines = [" ".join([f"NodeName={node.name}", f"NodeAddr={node.address}", f"NodeHostname={node.name}",
                           f"Port={free_port()}", *layout, "State=UNKNOWN"]) for node in self.nodes]
        (self.base / "slurm" / "slurmctld").mkdir(exist_ok=True)
        for node in self.nodes:
            (self.base / "slurm" / f"slurmd-{node.name}").mkdir(exist_ok=True)
        text = string.Template((HERE / "slurm-nodes.conf.in").read_text()).substitute(
            hostname=socket.gethostname(), slurmctld_port=free_port(), slurmd_port=free_port(),
            munge_socket=self.munge_socket, state=self.base / "slurm", logs=self.logs, node_lines="\n".join(lines),
            node_names=",".join(node.name for node in self.nodes), partition=PARTITION)
        self.slurm_conf.write_text(text)
        self.slurm_conf.chmod(0o644)

    def start_slurm(self) -> None:
        self.write_slurm_conf()
        conf = str(self.slurm_conf)
        ctld = self._start("slurmctld.out", ["slurmctld", "-D", "-f", conf])
        for node in self.nodes:
            # The node's own hostname (resolving to its address: slurmd binds to it), its local
            # disk, then slurmd itself (exec: the PID stays the daemon's).
            hosts = self.base / "slurm" / f"hosts-{node.name}"
            hosts.write_text(f"{node.address} {node.name}\n" + Path("/etc/hosts").read_text())
            hosts.chmod(0o644)
            script = ('set -e; mount --bind "$1" "$2"; mount --bind "$3" /etc/hosts; '
                      'hostname "$4"; exec slurmd -D -f "$5" -N "$4"')
            node.daemon = self._start(f"slurmd-{node.name}.out", [
                "unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/sh", "-c", script, "node",
                str(node.disk), str(self.node_local), str(hosts), node.name, conf])

        def nodes_idle():
            self._check_running(ctld)
            for node in self.nodes:
                self._check_running(node.daemon)
            states = run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(), check=False).stdout.split()
            return dict(zip(states[::2], states[1::2])) == {node.name: "idle" for node in self.nodes}

        try:
            wait_for(nodes_idle, 60, "both Slurm nodes to become idle", interval=0.5)
        except TimeoutError as err:
            logs = "\n".join(f"{log.name}:\n{tail(log)}" for log in sorted(self.logs.glob("slurm*")))
            raise ClusterUnavailable(f"{err}\n{logs}") from None

    def stop(self) -> None:
        # Cluster.stop stops daemons by the names it knows; the node daemons are stopped here first.
        ctld = next((d for d in self.daemons if d.name == "slurmctld.out"), None)
        if ctld is not None and ctld.running():
            for user in self.users:
                run(["scancel", "--user", user], env=self.env(), check=False)
            try:
                wait_for(lambda: not self.squeue(), 30, "the test users' jobs to end")
            except TimeoutError:
                pass
        known = {"jupyterhub", "proxy", "slurmd.out", "slurmctld.out", "munged"}
        for daemon in self.daemons:  # the nodes' slurmd and anything else the test started (servers)
            if daemon.name not in known:
                daemon.stop()
        super().stop()

    def squeue_jobs(self) -> dict[str, dict[str, str]]:
        """Every job in the queue: id -> {user, state, node, reason}."""
        out = run(["squeue", "-h", "-o", "%i|%u|%T|%N|%r"], env=self.env(), check=False).stdout
        jobs = {}
        for line in out.splitlines():
            job, user, state, node, reason = line.split("|")
            jobs[job] = {"user": user, "state": state, "node": node, "reason": reason}
        return jobs


def unshare_available() -> str | None:
    """Why nodes cannot be made here (None: they can)."""
    probe = run(["unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/true"], check=False)
    if probe.returncode != 0:
        return f"unshare --mount --uts failed: {probe.stderr.strip()}"
    return None
