"""``KernelprovSlurmProvisioner``: the kernel runs in a Slurm job on a compute node.

Registered under ``jupyter_client.kernel_provisioners`` as ``kernelprov-slurm-provisioner``;
``kernelprov install NAME --archive FILE --slurm [--partition P --time T --cpus N --mem M --gres G
--account A]`` writes a kernelspec that selects it. The Jupyter server stays where it is (a login
or service node); at each kernel start the provisioner

1. makes a private exchange directory (0700, under the user's Jupyter runtime dir on the shared
   filesystem, or ``connection_dir``) and writes the connection file there, 0600, holding the
   server's session key and no ports;
2. submits a batch job with ``sbatch`` (the script on stdin; ``--export=NONE`` so the server's
   environment — its tokens — stays out of the job) that runs :mod:`.launcher` on the node, which
   execs the kernel's ``run.sh``: the env is staged on *that node's* local disk in the user's
   cache, and ipykernel binds ports it picks there and writes them into the connection file;
3. follows the job with ``scontrol show job`` while it waits in the queue — logging its state and
   reason ("Pending: Resources") and exposing them through :func:`slurm_job_state` — until the
   connection file has the kernel's ports, or ``launch_timeout`` passes, after which the job is
   cancelled and the start fails saying so.

Interrupts and signals go through ``scancel --signal --full`` (the batch script's process *is*
the kernel: every step up to ipykernel is an ``exec``); ``terminate``/``kill`` and a final
``cleanup`` cancel the job. A restart submits a new job (with the same session key, so open
clients keep signing their messages correctly). Jobs still known at interpreter exit are cancelled.
Every Slurm command runs in this module's own threads, never on the server's event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Float, List, Unicode, default

from ...errors import KernelprovError
from ..events import emit_staging, event_logger_of
from ..provisioner import KernelStartError
from . import jobs

#: Slurm commands of every Slurm kernel of this server: short, but slurmctld may be slow to answer.
_SLURM_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kernelprov-slurm")
_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")

#: The Slurm kernels of this server process, by kernel id (for :func:`slurm_job_state` and exit).
_RUNNING: dict[str, "KernelprovSlurmProvisioner"] = {}


def slurm_jobs_of(resource_dir: str | os.PathLike) -> list[dict]:
    """The Slurm jobs of this server's running kernels of the kernelspec in ``resource_dir``,
    each as :func:`slurm_job_state` describes it plus its ``kernel_id``; called by the panel's
    listing (:mod:`kernelprov.jupyter.environments`), from any thread (it only reads)."""
    wanted = os.path.realpath(resource_dir)
    found = []
    for kernel_id, provisioner in list(_RUNNING.items()):
        spec_dir = getattr(provisioner.kernel_spec, "resource_dir", None)
        if spec_dir and os.path.realpath(spec_dir) == wanted:
            state = slurm_job_state(kernel_id)
            if state is not None:
                found.append({"kernel_id": kernel_id, **state})
    return found


def slurm_job_state(kernel_id: str) -> dict | None:
    """The Slurm job of a running Slurm kernel, or None when ``kernel_id`` is not one.

    For the panel (and any REST handler): returns ``{"job_id", "state", "reason", "node",
    "description", "submitted_at", "seen_at"}`` — ``state`` is Slurm's (``PENDING``, ``RUNNING``,
    ...), ``description`` the one line to show ("Pending: Resources", "Running on n1"). It reads
    the provisioner's last look at the job (refreshed about every second while the kernel starts,
    at every ``poll`` after), so it is cheap and never blocks: call it from the event loop."""
    provisioner = _RUNNING.get(kernel_id)
    if provisioner is None or provisioner.job_id is None:
        return None
    seen = provisioner.last_state
    return {
        "job_id": provisioner.job_id,
        "state": seen.state if seen else "SUBMITTED",
        "reason": seen.reason if seen else "",
        "node": (seen.node if seen else "") or provisioner.node,
        "description": seen.describe() if seen else "Submitted",
        "submitted_at": provisioner.submitted_at,
        "seen_at": seen.seen_at if seen else None,
    }


@atexit.register
def _cancel_leftover_jobs() -> None:
    """A server that exits without shutting its kernels down leaves no job behind."""
    by_bin_dir: dict[str, list[str]] = {}
    for provisioner in list(_RUNNING.values()):
        if provisioner.job_id:
            by_bin_dir.setdefault(provisioner.slurm_bin_dir, []).append(provisioner.job_id)
    for bin_dir, job_ids in by_bin_dir.items():
        jobs.cancel_quietly(job_ids, bin_dir=bin_dir)


def _env_default(name: str, fallback: str = "") -> str:
    return os.environ.get(name, fallback)


class KernelprovSlurmProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs a kernelprov kernel as a Slurm batch job; the env is staged on the compute node."""

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
    slurm_bin_dir = Unicode(config=True, help="Directory of sbatch/scontrol/scancel. Default: $KERNELPROV_SLURM_BIN_DIR, else PATH.")

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

    job_id: str | None = None
    node: str = ""
    submitted_at: float | None = None
    last_state: jobs.JobState | None = None
    _exchange_dir: str | None = None
    _exit_code: int | None = None
    #: The server asked this kernel to stop (shutdown, terminate, kill): its job's end is expected.
    _stopping: bool = False

    # --- where jobs come from ----------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        """A job was submitted for this kernel and not cleaned up yet."""
        return self.job_id is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called from ``KernelManager.pre_start_kernel()`` at every start and restart: checks the
        kernelspec and lets the base class apply the kernelspec's ``env``. Nothing is staged
        here: staging happens on the compute node, inside the job."""
        if not self.archive:
            raise KernelStartError(f"{self.kernel_spec.display_name} names no environment archive; reinstall it "
                                   "with `kernelprov install NAME --archive FILE --slurm`.")
        self.parent.transport = "tcp"  # the server reaches the node over the network
        kwargs = await super().pre_launch(**kwargs)
        kwargs["cmd"] = list(self.kernel_spec.argv)
        return kwargs

    def _batch_script(self, connection_file: str, env: dict[str, str]) -> str:
        run_sh = self.kernel_spec.argv[0]
        exports = {
            # --export=NONE gives the job no environment: the few variables a kernel needs.
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            **{name: env[name] for name in ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "SLURM_CONF") if env.get(name)},
            # The kernelspec's own env stanza (already substituted by pre_launch).
            **{name: env[name] for name in (self.kernel_spec.env or {}) if name in env},
        }
        if self.node_cache_dir:
            exports["KERNELPROV_CACHE_DIR"] = self.node_cache_dir
        lines = ["#!/bin/bash",
                 f"# kernelprov Slurm kernel {self.kernel_spec.display_name!r} ({self.kernel_id})"]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in exports.items() if name.isidentifier()]
        lines.append(" ".join(["exec", shlex.quote(self.stager), "-I", "-m", "kernelprov.jupyter.slurm.launcher",
                               shlex.quote(connection_file), shlex.quote(run_sh)]))
        return "\n".join(lines) + "\n"

    def _sbatch_options(self, log_file: str, cwd: str | None) -> list[str]:
        options = [f"--job-name=kernelprov-{self.parent.kernel_name or 'kernel'}", "--export=NONE", "--nodes=1",
                   "--ntasks=1", f"--output={log_file}", f"--chdir={cwd or os.path.expanduser('~')}"]
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--time", self.time_limit),
                            ("--cpus-per-task", self.cpus), ("--mem", self.memory), ("--gres", self.gres)):
            if value:
                options.append(f"{flag}={value}")
        return options + list(self.extra_sbatch_options)

    def _write_connection_file(self) -> str:
        """The exchange dir (0700) and its connection file (0600): the session key, no ports yet."""
        parent = self.connection_dir
        os.makedirs(parent, mode=0o700, exist_ok=True)
        self._exchange_dir = tempfile.mkdtemp(prefix=f"kernelprov-slurm-{self.kernel_id}-", dir=parent)
        session = self.parent.session
        connection = {"key": session.key.decode(), "signature_scheme": session.signature_scheme, "transport": "tcp",
                      "kernel_name": self.parent.kernel_name or "", **{port: 0 for port in _PORTS}}
        path = os.path.join(self._exchange_dir, "connection.json")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump(connection, out)
        return path

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called from ``KernelManager.launch_kernel()``: submit the job and wait until the kernel
        on the node has written its ports (or the job ends, or ``launch_timeout`` passes)."""
        loop = asyncio.get_running_loop()
        connection_file = self._write_connection_file()
        script = self._batch_script(connection_file, kwargs.get("env") or {})
        options = self._sbatch_options(os.path.join(self._exchange_dir, "job.log"), kwargs.get("cwd"))
        try:
            self.job_id = await loop.run_in_executor(
                _SLURM_THREADS, functools.partial(jobs.submit, script, options, bin_dir=self.slurm_bin_dir))
        except KernelprovError as err:
            self._remove_exchange_dir()
            raise KernelStartError(f"{self.kernel_spec.display_name} could not be submitted to Slurm: {err}") from err
        self.submitted_at, self.last_state, self.node, self._exit_code = time.time(), None, "", None
        self._stopping = False
        _RUNNING[self.kernel_id] = self
        self.log.info("kernelprov: kernel %s submitted as Slurm job %s (%s)", self.kernel_id, self.job_id, " ".join(options))
        began = time.monotonic()
        try:
            self.connection_info = await self._wait_for_kernel(connection_file)
        except BaseException as err:
            # A start that failed gets no cleanup() from the kernel manager: no job, no dir left.
            if self.last_state is None or self.last_state.active:
                await self._cancel()
            self._forget()
            self._announce("failed", seconds=time.monotonic() - began, message=str(err))
            raise
        self._announce("finished", seconds=time.monotonic() - began)
        return self.connection_info

    def _announce(self, action: str, **fields: Any) -> None:
        """One event of this kernel's start on the server's bus (queued, finished, failed)."""
        emit_staging(event_logger_of(self.parent), action, archive=self.archive, kernel_id=self.kernel_id,
                     kernel_name=os.path.basename(self.kernel_spec.resource_dir or "") or None,
                     display_name=self.kernel_spec.display_name, **fields)

    async def _wait_for_kernel(self, connection_file: str) -> KernelConnectionInfo:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.launch_timeout
        shown = None
        while True:
            state = await self._refresh_state()
            if state is None or not state.active:
                raise KernelStartError(self._ended_message(state, "before the kernel started"))
            if state.describe() != shown:
                shown = state.describe()
                self.log.info("kernelprov: kernel %s, Slurm job %s: %s", self.kernel_id, self.job_id, shown)
                # On the event bus too: JupyterLab's status bar says "Pending: Resources", not a spinner.
                self._announce("queued", message=f"{shown} (job {self.job_id})")
            if state.state == "RUNNING":
                info = await loop.run_in_executor(_SLURM_THREADS, _read_ports, connection_file)
                if info is not None:
                    self.node = state.node
                    self.log.info("kernelprov: kernel %s runs on %s (%s), Slurm job %s", self.kernel_id, state.node,
                                  info["ip"], self.job_id)
                    return info
            if time.monotonic() > deadline:
                await self._cancel()
                self.last_state = jobs.JobState(self.job_id, "CANCELLED", "launch timeout", state.node)
                waited = "waited in the queue" if state.state == "PENDING" else "did not report its kernel"
                raise KernelStartError(
                    f"{self.kernel_spec.display_name} did not start: its Slurm job {self.job_id} {waited} for "
                    f"{self.launch_timeout:.0f} s ({state.describe()}) and was cancelled. Try again later, ask for "
                    "fewer resources, or raise c.KernelprovSlurmProvisioner.launch_timeout.")
            await asyncio.sleep(1.0)

    def _ended_message(self, state: jobs.JobState | None, when: str) -> str:
        what = state.describe() if state is not None else "gone from the queue"
        if state is not None and state.exit_code:
            what += f", exit code {state.exit_code}"
        log_file = os.path.join(self._exchange_dir or "", "job.log")
        last = _tail(log_file)
        detail = f" Its last output: {last}" if last else ""
        return f"{self.kernel_spec.display_name}'s Slurm job {self.job_id} ended {when} ({what}).{detail}"

    # --- following the job -------------------------------------------------------------------

    async def _refresh_state(self) -> jobs.JobState | None:
        loop = asyncio.get_running_loop()
        job_id = self.job_id
        state = await loop.run_in_executor(_SLURM_THREADS, functools.partial(jobs.job_state, job_id, bin_dir=self.slurm_bin_dir))
        if state is None and self.last_state is not None:
            # Purged from slurmctld's memory: it ended; keep what was last seen.
            state = jobs.JobState(job_id, "COMPLETED" if self.last_state.active else self.last_state.state,
                                  self.last_state.reason, self.last_state.node, self.last_state.exit_code)
        if state is not None:
            self.last_state = state
        return state

    async def poll(self) -> int | None:
        """Called from ``KernelManager.is_alive()`` (the restarter, every few seconds): None while
        the job waits or runs, else its exit code. Asks slurmctld at most every ``poll_interval``."""
        if self.job_id is None:
            return self._exit_code if self._exit_code is not None else 0
        seen = self.last_state
        if seen is None or time.time() - seen.seen_at >= self.poll_interval:
            try:
                seen = await self._refresh_state()
            except KernelprovError as err:  # slurmctld slow or down: do not declare the kernel dead
                self.log.warning("kernelprov: cannot look at Slurm job %s: %s", self.job_id, err)
                return None
        if seen is not None and seen.active:
            return None
        self._exit_code = (seen.exit_code if seen is not None and seen.exit_code is not None else 1)
        if not self._stopping:
            self._stopping = True  # said once; the restarter takes it from here
            self.log.error("kernelprov: %s", self._ended_message(seen, "while the kernel ran"))
        return self._exit_code

    async def wait(self) -> int | None:
        """Called from ``KernelManager.finish_shutdown()``: wait until the job has ended."""
        while self.job_id is not None:
            try:
                state = await self._refresh_state()
            except KernelprovError as err:
                self.log.warning("kernelprov: cannot look at Slurm job %s: %s", self.job_id, err)
                state = self.last_state
            if state is None or not state.active:
                self._exit_code = state.exit_code if state is not None and state.exit_code is not None else 0
                return self._exit_code
            await asyncio.sleep(0.5)
        return self._exit_code

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """A job takes a moment to end after its kernel exits (slurmstepd, slurmctld)."""
        return max(recommended, 10.0)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        """A start may wait in the queue; the restarter counts from when it ends."""
        return max(recommended, 30.0)

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Called from ``KernelManager.request_shutdown()``: the job's end is expected now."""
        self._stopping = True

    async def send_signal(self, signum: int) -> None:
        """Called from ``KernelManager.signal_kernel()`` (SIGINT for an interrupt): ``scancel
        --signal --full``, to the batch script's processes, i.e. the kernel and its children."""
        if self.job_id is None:
            return
        if signum == 0:
            await self.poll()
            return
        name = signal.Signals(signum).name.removeprefix("SIG")
        await self._scancel(signal_name=name, full=True)

    async def terminate(self, restart: bool = False) -> None:
        """Called from ``KernelManager.finish_shutdown()`` when the kernel did not exit on request:
        SIGTERM to the kernel."""
        self._stopping = True
        await self._scancel(signal_name="TERM", full=True)

    async def kill(self, restart: bool = False) -> None:
        """Called from ``KernelManager.kill_kernel()``: cancel the job."""
        self._stopping = True
        await self._cancel()

    async def _scancel(self, signal_name: str | None = None, full: bool = False) -> None:
        if self.job_id is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(_SLURM_THREADS, functools.partial(
                jobs.cancel, self.job_id, signal=signal_name, full=full, bin_dir=self.slurm_bin_dir))
        except KernelprovError as err:
            self.log.warning("kernelprov: scancel of Slurm job %s failed: %s", self.job_id, err)

    async def _cancel(self) -> None:
        await self._scancel()
        self.log.info("kernelprov: cancelled Slurm job %s of kernel %s", self.job_id, self.kernel_id)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager after the kernel ended (and before a restart submits a new
        job): cancels the job if it still waits or runs, removes the exchange dir."""
        if self.job_id is not None:
            state = self.last_state
            if state is None or state.active:
                await self._cancel()
            self.log.info("kernelprov: Slurm job %s of kernel %s is done", self.job_id, self.kernel_id)
        self._forget()

    def _forget(self) -> None:
        """This kernel has no job any more: off the registry, its exchange dir removed."""
        _RUNNING.pop(self.kernel_id, None)
        self.job_id = None
        self._remove_exchange_dir()

    def _remove_exchange_dir(self) -> None:
        if self._exchange_dir is not None:
            shutil.rmtree(self._exchange_dir, ignore_errors=True)
            self._exchange_dir = None

    async def get_provisioner_info(self) -> dict[str, Any]:
        """For servers that persist kernels: the job this kernel runs in."""
        info = await super().get_provisioner_info()
        info.update(job_id=self.job_id, node=self.node, exchange_dir=self._exchange_dir)
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """The inverse of :meth:`get_provisioner_info`."""
        await super().load_provisioner_info(provisioner_info)
        self.job_id, self.node = provisioner_info.get("job_id"), provisioner_info.get("node", "")
        self._exchange_dir = provisioner_info.get("exchange_dir")
        if self.job_id:
            _RUNNING[self.kernel_id] = self


def _read_ports(connection_file: str) -> KernelConnectionInfo | None:
    """The connection file once the kernel on the node wrote its ports into it, else None."""
    try:
        with open(connection_file) as source:
            info = json.load(source)
    except (OSError, ValueError):
        return None  # not there yet, or being replaced
    if not info.get("ip") or not all(isinstance(info.get(port), int) and info[port] > 0 for port in _PORTS):
        return None
    info["key"] = info["key"].encode()
    return info


def _tail(path: str, limit: int = 300) -> str:
    try:
        with open(path, errors="replace") as source:
            text = source.read()[-4000:]
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-limit:]
