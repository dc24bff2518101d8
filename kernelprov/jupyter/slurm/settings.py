"""The settings of :class:`.provisioner.KernelprovSlurmProvisioner`: sbatch resources, timeouts, paths.

A traitlets mixin, so the settings stay apart from the kernel's lifecycle. They are read under the
provisioner's own name — ``c.KernelprovSlurmProvisioner.partition = "gpu"`` in a server's config,
or ``kernel_provisioner.config`` in ``kernel.json`` (what ``kernelprov install --slurm`` writes,
which wins) — and each default comes from its ``KERNELPROV_SLURM_*`` variable, read when the
provisioner is made (never at import time).
"""

from __future__ import annotations

import os
import shlex
import sys

from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Float, HasTraits, List, Unicode, default


def _env_default(name: str, fallback: str = "") -> str:
    return os.environ.get(name, fallback)


class SlurmSettings(HasTraits):
    """Every ``config=True`` setting of a Slurm kernel, with its environment-variable default."""

    archive = Unicode(config=True, help="""Path of the conda-pack archive the kernel runs from, on a filesystem
        the compute nodes mount (written into kernel.json by `kernelprov install --slurm`).""")
    partition = Unicode(config=True, help="Slurm partition (sbatch --partition). Default: $KERNELPROV_SLURM_PARTITION, else Slurm's default.")
    account = Unicode(config=True, help="Slurm account (sbatch --account). Default: $KERNELPROV_SLURM_ACCOUNT, else the user's default.")
    time_limit = Unicode(config=True, help="""Job time limit in any sbatch --time format ("8:00:00", "1-0").
        Default: $KERNELPROV_SLURM_TIME, else the partition's default.""")
    cpus = Unicode(config=True, help="CPUs for the kernel (sbatch --cpus-per-task). Default: $KERNELPROV_SLURM_CPUS, else Slurm's (1).")
    memory = Unicode(config=True, help="Memory (sbatch --mem, e.g. 8G). Default: $KERNELPROV_SLURM_MEM, else the partition's default.")
    gres = Unicode(config=True, help="Generic resources, e.g. gpu:1 (sbatch --gres). Default: $KERNELPROV_SLURM_GRES, else none.")
    extra_sbatch_options = List(Unicode(), config=True, help="""More sbatch options, one per item
        (e.g. ["--qos=interactive", "--constraint=ib"]). Default: $KERNELPROV_SLURM_OPTIONS, split as a shell would.""")
    launch_timeout = Float(config=True, help="""Seconds a kernel start waits for its job to start and the
        kernel to report its ports (queue wait included) before the job is cancelled and the start
        fails. Default: $KERNELPROV_SLURM_LAUNCH_TIMEOUT, else 300.""")
    poll_interval = Float(config=True, help="""Seconds between looks at a running kernel's job (Jupyter
        asks whether the kernel lives every few seconds; slurmctld is asked at most this often).
        Default: $KERNELPROV_SLURM_POLL_INTERVAL, else 10.""")
    connection_dir = Unicode(config=True, help="""Directory on a filesystem both the server and the
        compute nodes mount, private to the user, where each kernel gets its 0700 exchange dir
        (connection file, job log). Default: $KERNELPROV_SLURM_CONNECTION_DIR, else the Jupyter
        runtime dir (~/.local/share/jupyter/runtime).""")
    node_cache_dir = Unicode(config=True, help="""The cache root on the compute nodes (their local disk),
        passed to the job as KERNELPROV_CACHE_DIR. Default: $KERNELPROV_SLURM_NODE_CACHE_DIR, else
        none: the job's own $SLURM_TMPDIR/$TMPDIR, else /tmp, on the node.""")
    stager = Unicode(config=True, help="""The Python with kernelprov installed that the job runs the
        launcher and run.sh's stager with (written into kernel.json by `kernelprov install`);
        it must be executable on the compute nodes. Default: this server's Python.""")
    slurm_bin_dir = Unicode(config=True, help="""Directory of sbatch/squeue/scontrol/scancel (and sacct, when
        the site keeps accounting). Default: $KERNELPROV_SLURM_BIN_DIR, else PATH.""")
    restart_grace = Float(config=True, help="""Seconds the job waits, after its kernel exits, for the server to
        ask for a restart in the same job (Jupyter's restarter asks within a few seconds); then the job
        ends. Default: $KERNELPROV_SLURM_RESTART_GRACE, else 30.""")

    def sbatch_options(self, log_file: str, cwd: str | None, kernel_name: str) -> list[str]:
        """These settings as ``sbatch`` options, for the provisioner's every submission (a restart
        that would give different ones gets a new job)."""
        options = [f"--job-name=kernelprov-{kernel_name}", "--export=NONE", "--nodes=1", "--ntasks=1",
                   f"--output={log_file}", f"--chdir={cwd or os.path.expanduser('~')}"]
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--time", self.time_limit),
                            ("--cpus-per-task", self.cpus), ("--mem", self.memory), ("--gres", self.gres)):
            if value:
                options.append(f"{flag}={value}")
        return options + list(self.extra_sbatch_options)

    @default("partition")
    def _partition_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_PARTITION")

    @default("account")
    def _account_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_ACCOUNT")

    @default("time_limit")
    def _time_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_TIME")

    @default("cpus")
    def _cpus_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_CPUS")

    @default("memory")
    def _memory_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_MEM")

    @default("gres")
    def _gres_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_GRES")

    @default("extra_sbatch_options")
    def _extra_default(self) -> list[str]:
        return shlex.split(_env_default("KERNELPROV_SLURM_OPTIONS"))

    @default("launch_timeout")
    def _launch_timeout_default(self) -> float:
        return float(_env_default("KERNELPROV_SLURM_LAUNCH_TIMEOUT", "300"))

    @default("poll_interval")
    def _poll_interval_default(self) -> float:
        return float(_env_default("KERNELPROV_SLURM_POLL_INTERVAL", "10"))

    @default("connection_dir")
    def _connection_dir_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_CONNECTION_DIR") or jupyter_runtime_dir()

    @default("node_cache_dir")
    def _node_cache_dir_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_NODE_CACHE_DIR")

    @default("stager")
    def _stager_default(self) -> str:
        return sys.executable

    @default("slurm_bin_dir")
    def _slurm_bin_dir_default(self) -> str:
        return _env_default("KERNELPROV_SLURM_BIN_DIR")

    @default("restart_grace")
    def _restart_grace_default(self) -> float:
        return float(_env_default("KERNELPROV_SLURM_RESTART_GRACE", "30"))
