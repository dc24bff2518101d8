"""``KernelprovProvisioner``: stage the packed env on node-local disk, then launch the kernel.

Registered under the ``jupyter_client.kernel_provisioners`` entry point group as
``kernelprov-provisioner``; a kernelspec selects it through ``metadata.kernel_provisioner``, whose
``config`` names the archive (and any non-default :class:`~kernelprov.config.KernelprovConfig`
setting). Everything else — ports, the connection file, the process — is ``LocalProvisioner``'s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import CaselessStrEnum, Instance, Unicode, default

from ..config import KernelprovConfig
from ..engine.inventory import staging_progress
from ..engine.leases import release_lease
from ..engine.stage import StagedEnv, ensure_staged
from ..errors import ArchiveError, KernelprovError, RelocateError
from . import transport as transports
from .events import PROGRESS_INTERVAL_SECONDS, StagingEvents, event_logger_of

try:  # jupyter_server shows an HTTPError's message in JupyterLab; any other exception as "Unhandled error"
    from tornado.web import HTTPError as _ServerError
except ImportError:  # pragma: no cover - a client without tornado just sees a KernelprovError
    _ServerError = Exception  # type: ignore[assignment,misc]


log = logging.getLogger(__name__)

#: Threads that run :func:`ensure_staged` for kernel starts, apart from the event loop's default
#: executor: a start can wait on another's unpack for minutes (its lock), and jupyter_server runs
#: its own blocking work (e.g. the async contents manager's file reads and saves) in the default
#: executor, which a few waiting starts would otherwise fill. Threads are made on demand.
_STAGING_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kernelprov-stage")
#: Threads for the short reads around a start (an archive's stat, another stage's progress
#: record), never queued behind starts that wait minutes for a lock.
_QUICK_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kernelprov-quick")


def _archive_identity(archive: str) -> tuple | None:
    """What a changed archive changes (None: it is gone); a failure is remembered against it."""
    try:
        st = os.stat(archive)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _progress_of_others(archive: str, cache_root) -> dict | None:
    """:func:`staging_progress`, for a start to relay: a cache it cannot read now only loses the
    report (the stage itself says what is wrong with the cache)."""
    try:
        return staging_progress(archive, cache_root=cache_root)
    except (KernelprovError, OSError) as err:
        log.debug("kernelprov: no progress of %s to relay: %s", archive, err)
        return None


#: JupyterLab's "Error Starting Kernel" dialog shows the message on one monospace line, cut at
#: its width: the lead sentence says what failed within this many characters.
LEAD_LIMIT = 80


def start_error_message(display_name: str, err: KernelprovError, failed: str = "could not be unpacked") -> str:
    """A failed start's message as JupyterLab's dialog shows it: a lead naming the kernel by its
    display name and saying what failed ("Python (demo) could not be unpacked: the archive is
    damaged."), then the engine's message, with the paths and what to do. An error without a
    lead (or whose lead would run too long) gets a plain one ("Python (demo) could not be
    unpacked.")."""
    lead = err.lead
    if lead:
        clause = lead.rstrip(".")
        sentence = f"{display_name} {failed}: {clause[:1].lower()}{clause[1:]}."
        if len(sentence) < LEAD_LIMIT:
            return f"{sentence} {err}"
    return f"{display_name} {failed}. {err}"


class KernelStartError(KernelprovError, _ServerError):  # type: ignore[misc,valid-type]
    """A kernel start that failed for a reason the researcher can act on.

    Also a ``tornado.web.HTTPError`` when tornado is installed, so that jupyter_server puts this
    message — not "Unhandled error" — into the ``POST /api/sessions`` reply that JupyterLab's
    "Error Starting Kernel" dialog displays.
    """

    def __init__(self, message: str):
        if _ServerError is Exception:
            super().__init__(message)
        else:
            _ServerError.__init__(self, 500, message, reason="Error Starting Kernel")
        self.message = message

    def __str__(self) -> str:
        return self.message


class KernelprovProvisioner(KernelprovConfig, LocalProvisioner):  # type: ignore[misc]
    """A LocalProvisioner whose kernels run from a conda-pack archive staged on local disk."""

    archive = Unicode(
        config=True,
        help="""Path of the conda-pack archive this kernel runs from (written into kernel.json by
        `kernelprov install`). There is no environment variable for it: it belongs to the kernel.""",
    )

    staged_env = Instance(StagedEnv, allow_none=True, help="The env this provisioner launched from, once staged.")

    kernel_transport = CaselessStrEnum(
        transports.TRANSPORTS,
        config=True,
        help="""How the server and the kernel talk: "ipc" (unix sockets in a private 0700 dir: no
        other user of the node can reach the kernel), "curve" (TCP encrypted with CurveZMQ;
        needs ipykernel >= 7.4 in the env) or "tcp" (plain loopback TCP, reachable by every user
        of the node). Default: $KERNELPROV_KERNEL_TRANSPORT, else "ipc".""",
    )

    @default("kernel_transport")
    def _kernel_transport_default(self) -> str:
        return transports.transport_from_environment()

    _socket_dir: str | None = None
    #: The archive's identity and the message of this kernel's last stage that failed because of
    #: the archive itself: a restart of an unchanged archive fails with it at once.
    _archive_failure: tuple[tuple | None, str] | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Stage the env, then let LocalProvisioner build the launch command and environment.

        Called from ``KernelManager.pre_start_kernel()`` at every start and restart. Unpacking
        runs in a thread of kernelprov's own pool, so neither the server's event loop nor its
        default executor ever waits for it; a restart finds the env already staged and costs a
        ``stat``. Under jupyter_server, the staging is reported on the event bus
        (:mod:`.events`: started, progress, finished or failed). A failure raises
        :class:`KernelStartError`, whose message is what JupyterLab shows in its "Error Starting
        Kernel" dialog. A restart of an archive that failed and has not changed since fails with
        the same message without reading it again, and a failed restart declares the kernel dead
        (:meth:`_give_up_restarting`).
        """
        if not self.archive:
            raise KernelStartError(
                f"{self.kernel_spec.display_name} names no environment archive. Its kernel.json has no archive in "
                "its kernel_provisioner config; reinstall it with `kernelprov install`."
            )
        loop = asyncio.get_running_loop()
        events = StagingEvents(event_logger_of(self.parent), self.archive, loop=loop, kernel_id=self.kernel_id,
                               kernel_name=getattr(self.parent, "kernel_name", None) or None,
                               display_name=self.kernel_spec.display_name)
        if self._archive_failure is not None:
            identity, message = self._archive_failure
            if await loop.run_in_executor(_QUICK_THREADS, _archive_identity, self.archive) == identity:
                self.log.warning("kernelprov: not staging %s again for kernel %s: it failed and has not changed since",
                                 self.archive, self.kernel_id)
                events.failed(message)
                self._give_up_restarting()
                raise KernelStartError(message)
            self._archive_failure = None
        self.log.info("kernelprov: staging %s for kernel %s", self.archive, self.kernel_id)
        events.started()
        try:
            self.staged_env = await self._stage(loop, events)
        except KernelprovError as err:
            message = start_error_message(self.kernel_spec.display_name, err)
            self.log.error("kernelprov: cannot start kernel %s: %s", self.kernel_id, message)
            events.failed(message)
            if isinstance(err, (ArchiveError, RelocateError)):
                self._archive_failure = (await loop.run_in_executor(_QUICK_THREADS, _archive_identity, self.archive), message)
            self._give_up_restarting()
            raise KernelStartError(message) from err
        staged = self.staged_env
        events.finished(staged.seconds, staged.extracted)
        self.log.info(
            "kernelprov: %s %s in %.2f s", "unpacked" if staged.extracted else "reusing", staged.prefix, staged.seconds
        )
        env = dict(kwargs.get("env") or os.environ)
        prefix = str(staged.prefix)
        env.update(
            KERNELPROV_ENV=prefix,
            KERNELPROV_ARCHIVE=str(staged.archive),
            KERNELPROV_LEASE=str(staged.lease or ""),  # run.sh flocks this one lease: one kernel, one lease
            CONDA_PREFIX=prefix,
            PATH=os.pathsep.join([os.path.join(prefix, "bin"), env.get("PATH", os.defpath)]),
        )
        kwargs["env"] = env
        try:
            self._socket_dir = transports.prepare(self.parent, self.kernel_transport, self._socket_dir, kwargs)
        except KernelprovError as err:
            raise KernelStartError(start_error_message(self.kernel_spec.display_name, err, "could not be started")) from err
        return await super().pre_launch(**kwargs)

    async def _stage(self, loop: asyncio.AbstractEventLoop, events: StagingEvents) -> StagedEnv:
        """Run :func:`ensure_staged` in a staging thread; meanwhile, every second without news
        from it, report the progress of whoever holds the archive's lock (another kernel start,
        a job prologue's ``kernelprov unpack``, the panel's Stage now) from its progress record."""
        # Leased for this server process until the kernel is gone (cleanup): no Evict can fall
        # between staging and the kernel's own flock in run.sh.
        options = self.stage_options()
        progress = events.progress_from_thread if events.enabled else None
        stage = functools.partial(ensure_staged, self.archive, lease=f"{os.getpid()}.{self.kernel_id}",
                                  progress=progress, **options)
        staging = loop.run_in_executor(_STAGING_THREADS, stage)
        if not events.enabled:
            return await staging
        watch = functools.partial(_progress_of_others, self.archive, options["cache_root"])
        while not (await asyncio.wait({staging}, timeout=PROGRESS_INTERVAL_SECONDS))[0]:
            if time.monotonic() - events.last_report < PROGRESS_INTERVAL_SECONDS:
                continue
            seen = await loop.run_in_executor(_QUICK_THREADS, watch)
            if seen is not None and not staging.done():
                events.progress(seen["done"], seen["total"], elapsed=max(time.time() - seen["started_at"], 0.0))
        return staging.result()

    def _give_up_restarting(self) -> None:
        """After a failed restart, tell the server and the browser that the kernel is dead.

        jupyter_client's restart stops the restarter before ``pre_launch`` and only a launched
        kernel starts it again, so a restart that fails here is tried once — and then the kernel
        would stay listed, without a process, "restarting" for ever. The restarter's "dead"
        callbacks (jupyter_server drops the kernel; its websocket tells JupyterLab) fire once the
        failure has reached the caller. A first start has no restarter yet: nothing to do."""
        restarter = getattr(self.parent, "_restarter", None)
        fire = getattr(restarter, "_fire_callbacks", None)
        if fire is None:
            return
        self.parent.stop_restarter()
        asyncio.get_running_loop().call_soon(fire, "dead")

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager after the kernel process ended; a restart keeps the
        private socket dir (the connection file is reused), a final cleanup removes it."""
        await super().cleanup(restart=restart)
        if not restart:
            transports.remove_socket_dir(self._socket_dir)
            self._socket_dir = None
            if self.staged_env is not None:
                release_lease(self.staged_env.lease)
