"""``KernelprovSlurmProvisioner``: the kernel runs in a Slurm job on a compute node.

Registered under ``jupyter_client.kernel_provisioners`` as ``kernelprov-slurm-provisioner``;
``kernelprov install NAME --archive FILE --slurm [--partition P ...]`` writes a kernelspec that
selects it (its settings: :mod:`.settings`). The server stays on its login or service node. A start
makes a private exchange dir (:mod:`.exchange`) holding the session key and no ports, submits a
batch job (``sbatch``, script on stdin, ``--export=NONE``) that runs :mod:`.launcher` on the node —
which stages the env on *that node's* disk through ``run.sh`` and supervises the kernel — and
follows the job (:mod:`.jobs`), showing its state and reason ("Pending: Resources"), until the
kernel wrote its ports or ``launch_timeout`` passes (the job is then cancelled and the start fails
saying so).

A restart keeps the job when it can: ``cleanup(restart=True)`` (a user's restart and the
restarter's alike) asks the launcher for the next kernel generation if the job still runs, the
last kernel exited and the time limit is not near, and ``launch_kernel`` waits for that
generation's ports; otherwise the job is cancelled and a new one submitted, with the same session
key, so open clients keep signing their messages correctly. Signals go to the launcher
(``scancel --batch --signal``), which passes them to the kernel's process group; shutdown cancels
the job, as does interpreter exit for jobs still known. Every Slurm command runs in this module's
threads, never on the server's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from ...errors import KernelprovError
from ..events import emit_staging, event_logger_of
from ..provisioner import KernelStartError
from . import exchange, jobs
from .launcher import batch_script
from .registry import RUNNING, slurm_job_state, slurm_jobs_of
from .settings import SlurmSettings

__all__ = ["KernelprovSlurmProvisioner", "slurm_job_state", "slurm_jobs_of"]

#: Slurm commands of every Slurm kernel of this server: short, but slurmctld may be slow to answer.
_SLURM_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kernelprov-slurm")
#: A restart keeps a job only with at least this many seconds left before its time limit.
MIN_TIME_LEFT_TO_REUSE = 300.0


class _JobEnded(KernelStartError):
    """The job ended before the kernel generation a start waits for reported its ports."""


class KernelprovSlurmProvisioner(SlurmSettings, KernelProvisionerBase):  # type: ignore[misc]
    """Runs a kernelprov kernel as a Slurm batch job; the env is staged on the compute node."""

    job_id: str | None = None
    node: str = ""
    submitted_at: float | None = None
    last_state: jobs.JobState | None = None
    #: The kernel generation in the job that this provisioner runs or waits for (0: the first).
    generation: int = 0
    _exchange_dir: str | None = None
    _exit_code: int | None = None
    #: The server asked this kernel to stop (shutdown, terminate, kill): its end is expected.
    _stopping: bool = False
    #: What the job was submitted with (batch script, sbatch options): a restart that would
    #: submit anything else gets a new job.
    _submitted_with: tuple[str, tuple[str, ...]] | None = None
    #: ``cleanup(restart=True)`` asked the job for ``generation``; ``launch_kernel`` waits for it.
    _reuse_requested: bool = False

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

    def _batch_script(self, env: dict[str, str]) -> str:
        """The job's script (:func:`.launcher.batch_script`) with the few variables a kernel needs:
        ``--export=NONE`` gives the job no environment of the server's."""
        exports = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            **{name: env[name] for name in ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "SLURM_CONF") if env.get(name)},
            # The kernelspec's own env stanza (already substituted by pre_launch).
            **{name: env[name] for name in (self.kernel_spec.env or {}) if name in env},
        }
        if self.node_cache_dir:
            exports["KERNELPROV_CACHE_DIR"] = self.node_cache_dir
        return batch_script(f"kernelprov Slurm kernel {self.kernel_spec.display_name!r} ({self.kernel_id})", exports,
                            self.stager, self._exchange_dir or "", self.kernel_spec.argv[0], self.restart_grace)

    async def _in_thread(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking Slurm command or shared-filesystem read off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_SLURM_THREADS, functools.partial(function, *args, **kwargs))

    # --- starts: a new job, or the next kernel generation in the job ---------------------------

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called from ``KernelManager.launch_kernel()`` at every start and restart. On a restart
        that :meth:`cleanup` prepared, waits for the job's next kernel generation; else (or when
        the job ended meanwhile) submits a job and waits until the kernel on the node has written
        its ports (or the job ends, or ``launch_timeout`` passes)."""
        env, cwd = kwargs.get("env") or {}, kwargs.get("cwd")
        if self._reuse_requested and self.job_id is not None:
            self._reuse_requested = False
            if self._submission(env, cwd) == self._submitted_with:
                began = time.monotonic()
                try:
                    return await self._started(await self._wait_for_kernel(reusing=True), began)
                except _JobEnded as err:
                    self.log.warning("kernelprov: %s; submitting a new job", err)
            else:
                self.log.info("kernelprov: kernel %s restarts with other launch arguments: a new Slurm job",
                              self.kernel_id)
            await self._end_job()
        return await self._submit(env, cwd)

    def _submission(self, env: dict[str, str], cwd: str | None) -> tuple[str, tuple[str, ...]]:
        log_file = os.path.join(self._exchange_dir or "", "job.log")
        return self._batch_script(env), tuple(self.sbatch_options(log_file, cwd, self.parent.kernel_name or "kernel"))

    async def _submit(self, env: dict[str, str], cwd: str | None) -> KernelConnectionInfo:
        session = self.parent.session
        self._exchange_dir = await self._in_thread(exchange.make_exchange_dir, self.connection_dir, self.kernel_id, {
            "key": session.key.decode(), "signature_scheme": session.signature_scheme, "transport": "tcp",
            "kernel_name": self.parent.kernel_name or ""})
        script, options = self._submitted_with = self._submission(env, cwd)
        try:
            self.job_id = await self._in_thread(jobs.submit, script, list(options), bin_dir=self.slurm_bin_dir)
        except KernelprovError as err:
            self._remove_exchange_dir()
            raise KernelStartError(f"{self.kernel_spec.display_name} could not be submitted to Slurm: {err}") from err
        self.submitted_at, self.last_state, self.node, self.generation = time.time(), None, "", 0
        RUNNING[self.kernel_id] = self
        self.log.info("kernelprov: kernel %s submitted as Slurm job %s (%s)", self.kernel_id, self.job_id, " ".join(options))
        began = time.monotonic()
        try:
            info = await self._wait_for_kernel(reusing=False)
        except BaseException as err:
            # A start that failed gets no cleanup() from the kernel manager: no job, no dir left.
            await self._end_job()
            self._announce("failed", seconds=time.monotonic() - began, message=str(err))
            raise
        return await self._started(info, began)

    async def _started(self, info: KernelConnectionInfo, began: float) -> KernelConnectionInfo:
        self.connection_info, self._exit_code, self._stopping = info, None, False
        self._announce("finished", seconds=time.monotonic() - began)
        return info

    def _announce(self, action: str, **fields: Any) -> None:
        """One event of this kernel's start on the server's bus (queued, finished, failed)."""
        emit_staging(event_logger_of(self.parent), action, archive=self.archive, kernel_id=self.kernel_id,
                     kernel_name=os.path.basename(self.kernel_spec.resource_dir or "") or None,
                     display_name=self.kernel_spec.display_name, **fields)

    async def _wait_for_kernel(self, reusing: bool) -> KernelConnectionInfo:
        """Until generation :attr:`generation` wrote its ports; raises :class:`_JobEnded` if the
        job ends first, :class:`KernelStartError` (job cancelled) at ``launch_timeout``."""
        deadline = time.monotonic() + self.launch_timeout
        shown = None
        while True:
            state = await self._refresh_state()
            if state is None or not state.active:
                raise _JobEnded(self._ended_message(state, "before the kernel " + ("restarted" if reusing else "started")))
            if state.describe() != shown and not reusing:
                shown = state.describe()
                self.log.info("kernelprov: kernel %s, Slurm job %s: %s", self.kernel_id, self.job_id, shown)
                # On the event bus too: JupyterLab's status bar says "Pending: Resources", not a spinner.
                self._announce("queued", message=f"{shown} (job {self.job_id})")
            if state.state == "RUNNING":
                info = await self._in_thread(exchange.read_ports, self._exchange_dir, self.generation)
                if info is not None:
                    self.node = state.node
                    self.log.info("kernelprov: kernel %s runs on %s (%s), Slurm job %s%s", self.kernel_id, state.node,
                                  info["ip"], self.job_id, f", restart {self.generation} in the job" if reusing else "")
                    return info
            if time.monotonic() > deadline:
                await self._scancel()
                self.last_state = jobs.JobState(self.job_id, "CANCELLED", "launch timeout", state.node)
                waited = "waited in the queue" if state.state == "PENDING" else "did not report its kernel"
                raise KernelStartError(
                    f"{self.kernel_spec.display_name} did not start: its Slurm job {self.job_id} {waited} for "
                    f"{self.launch_timeout:.0f} s ({state.describe()}) and was cancelled. Try again later, ask for "
                    "fewer resources, or raise c.KernelprovSlurmProvisioner.launch_timeout.")
            await asyncio.sleep(0.5 if reusing else 1.0)

    def _ended_message(self, state: jobs.JobState | None, when: str) -> str:
        what = state.describe() if state is not None else "gone from the queue"
        if state is not None and state.exit_code:
            what += f", exit code {state.exit_code}"
        last = exchange.tail(os.path.join(self._exchange_dir or "", "job.log"))
        detail = f" Its last output: {last}" if last else ""
        return f"{self.kernel_spec.display_name}'s Slurm job {self.job_id} ended {when} ({what}).{detail}"

    # --- following the job and its kernel -----------------------------------------------------

    async def _refresh_state(self) -> jobs.JobState | None:
        job_id = self.job_id
        state = await self._in_thread(jobs.job_state, job_id, bin_dir=self.slurm_bin_dir)
        if state is None and self.last_state is not None:
            # Forgotten by Slurm (no accounting): it ended; keep what was last seen.
            state = jobs.JobState(job_id, "COMPLETED" if self.last_state.active else self.last_state.state,
                                  self.last_state.reason, self.last_state.node, self.last_state.exit_code)
        if state is not None:
            self.last_state = state
        return state

    async def _kernel_exit(self) -> int | None:
        """The exit status of generation :attr:`generation` if the launcher saw it exit, else None."""
        status = await self._in_thread(exchange.read_status, self._exchange_dir) if self._exchange_dir else None
        if status and status.get("generation") == self.generation and status.get("state") in ("exited", "ended"):
            code = status.get("exit_code")
            return code if isinstance(code, int) else 1
        return None

    async def poll(self) -> int | None:
        """Called from ``KernelManager.is_alive()`` (the restarter, every few seconds; shutdown,
        every 0.1 s): None while the kernel runs, else its exit code. The kernel ended when the
        launcher says so (``status.json``, a file read) or its job ended; slurmctld is asked at
        most every ``poll_interval``."""
        if self.job_id is None:
            return self._exit_code if self._exit_code is not None else 0
        exited = await self._kernel_exit()
        if exited is not None:
            if not self._stopping:
                self._stopping = True  # said once; the restarter takes it from here
                # Did the kernel die alone, or with its job (scancel, time limit, node failure)?
                # The user needs to know which: one takes a restart in the job, the other a new job.
                try:
                    state = await self._refresh_state()
                except KernelprovError:
                    state = self.last_state
                if state is not None and state.state != "RUNNING":
                    self.log.error("kernelprov: %s", self._ended_message(state, "while the kernel ran"))
                else:
                    self.log.error("kernelprov: kernel %s exited with status %s in its Slurm job %s on %s",
                                   self.kernel_id, exited, self.job_id, self.node or "its node")
            self._exit_code = exited
            return exited
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
            self._stopping = True
            self.log.error("kernelprov: %s", self._ended_message(seen, "while the kernel ran"))
        return self._exit_code

    async def wait(self) -> int | None:
        """Called from ``KernelManager.finish_shutdown()``/``kill_kernel()`` once ``poll`` said the
        kernel ended: waits until the kernel has exited (the job may live on for a restart)."""
        while self.job_id is not None:
            exited = await self._kernel_exit()
            if exited is not None:
                self._exit_code = exited
                return exited
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

    # --- signals and stops ----------------------------------------------------------------------

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Called from ``KernelManager.request_shutdown()``: the kernel's end is expected now."""
        self._stopping = True

    async def send_signal(self, signum: int) -> None:
        """Called from ``KernelManager.signal_kernel()`` (SIGINT for an interrupt): ``scancel
        --batch --signal`` to the launcher, which passes it to the kernel's process group.
        SIGKILL and SIGSTOP, which it cannot catch, go to every process of the batch step."""
        if self.job_id is None:
            return
        if signum == 0:
            await self.poll()
            return
        name = signal.Signals(signum).name.removeprefix("SIG")
        uncatchable = signum in (signal.SIGKILL, signal.SIGSTOP)
        await self._scancel(signal_name=name, batch=not uncatchable, full=uncatchable)

    async def terminate(self, restart: bool = False) -> None:
        """Called from ``KernelManager.finish_shutdown()`` when the kernel did not exit on request:
        SIGTERM to the kernel (the launcher kills its process group a few seconds later)."""
        self._stopping = True
        await self._scancel(signal_name="TERM", batch=True)

    async def kill(self, restart: bool = False) -> None:
        """Called from ``KernelManager.kill_kernel()`` — for a restart too, with ``restart`` False
        (``shutdown_kernel(now=True)``): stops the kernel as :meth:`terminate` does, unless it
        already exited; the job's fate is :meth:`cleanup`'s."""
        self._stopping = True
        if self.job_id is not None and await self._kernel_exit() is None:
            await self._scancel(signal_name="TERM", batch=True)

    async def _scancel(self, signal_name: str | None = None, batch: bool = False, full: bool = False) -> None:
        if self.job_id is None:
            return
        try:
            await self._in_thread(jobs.cancel, self.job_id, signal=signal_name, batch=batch, full=full,
                                  bin_dir=self.slurm_bin_dir)
        except KernelprovError as err:
            self.log.warning("kernelprov: scancel of Slurm job %s failed: %s", self.job_id, err)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager after the kernel ended, last in every shutdown and restart.
        For a restart, keeps the job when :meth:`_reusable` and asks its launcher for the next
        kernel generation; otherwise cancels the job if it still waits or runs and removes the
        exchange dir."""
        if self.job_id is not None and restart and await self._reusable():
            self.generation += 1
            await self._in_thread(exchange.request_restart, self._exchange_dir, self.generation)
            self._reuse_requested = True
            self.log.info("kernelprov: kernel %s restarts in its Slurm job %s on %s (restart %s in the job)",
                          self.kernel_id, self.job_id, self.node, self.generation)
            return
        await self._end_job()

    async def _reusable(self) -> bool:
        """The job still runs, its kernel has exited, and its time limit is not near."""
        if await self._kernel_exit() is None:
            self.log.info("kernelprov: kernel %s did not exit in Slurm job %s: restarting in a new job",
                          self.kernel_id, self.job_id)
            return False
        try:
            state = await self._refresh_state()
        except KernelprovError as err:
            self.log.warning("kernelprov: cannot look at Slurm job %s: %s", self.job_id, err)
            return False
        if state is None or state.state != "RUNNING":
            return False
        if state.time_left is not None and state.time_left < MIN_TIME_LEFT_TO_REUSE:
            self.log.info("kernelprov: Slurm job %s reaches its time limit in %.0f s: restarting in a new job",
                          self.job_id, state.time_left)
            return False
        return True

    async def _end_job(self) -> None:
        """Cancel the job if it may still wait or run; off the registry, exchange dir removed."""
        if self.job_id is not None:
            state = self.last_state
            if state is None or state.active:
                await self._scancel()
                self.log.info("kernelprov: cancelled Slurm job %s of kernel %s", self.job_id, self.kernel_id)
            self.log.info("kernelprov: Slurm job %s of kernel %s is done", self.job_id, self.kernel_id)
        RUNNING.pop(self.kernel_id, None)
        self.job_id, self._reuse_requested = None, False
        self._remove_exchange_dir()

    def _remove_exchange_dir(self) -> None:
        if self._exchange_dir is not None:
            shutil.rmtree(self._exchange_dir, ignore_errors=True)
            self._exchange_dir = None

    # --- persisted kernels ----------------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """For servers that persist kernels: the job this kernel runs in."""
        info = await super().get_provisioner_info()
        info.update(job_id=self.job_id, node=self.node, exchange_dir=self._exchange_dir, generation=self.generation)
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """The inverse of :meth:`get_provisioner_info`."""
        await super().load_provisioner_info(provisioner_info)
        self.job_id, self.node = provisioner_info.get("job_id"), provisioner_info.get("node", "")
        self._exchange_dir = provisioner_info.get("exchange_dir")
        self.generation = int(provisioner_info.get("generation") or 0)
        if self.job_id:
            RUNNING[self.kernel_id] = self
