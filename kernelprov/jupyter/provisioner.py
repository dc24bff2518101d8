"""``KernelprovProvisioner``: stage the packed env on node-local disk, then launch the kernel.

Registered under the ``jupyter_client.kernel_provisioners`` entry point group as
``kernelprov-provisioner``; a kernelspec selects it through ``metadata.kernel_provisioner``, whose
``config`` names the archive (and any non-default :class:`~kernelprov.config.KernelprovConfig`
setting). Everything else — ports, the connection file, the process — is ``LocalProvisioner``'s.
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import CaselessStrEnum, Instance, Unicode, default

from ..config import KernelprovConfig
from ..engine.leases import release_lease
from ..engine.stage import StagedEnv, ensure_staged
from ..errors import KernelprovError
from . import transport as transports

try:  # jupyter_server shows an HTTPError's message in JupyterLab; any other exception as "Unhandled error"
    from tornado.web import HTTPError as _ServerError
except ImportError:  # pragma: no cover - a client without tornado just sees a KernelprovError
    _ServerError = Exception  # type: ignore[assignment,misc]


#: Threads that run :func:`ensure_staged` for kernel starts, apart from the event loop's default
#: executor: a start can wait on another's unpack for minutes (its lock), and jupyter_server runs
#: its own blocking work (e.g. the async contents manager's file reads and saves) in the default
#: executor, which a few waiting starts would otherwise fill. Threads are made on demand.
_STAGING_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kernelprov-stage")


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

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Stage the env, then let LocalProvisioner build the launch command and environment.

        Called from ``KernelManager.pre_start_kernel()`` at every start and restart. Unpacking
        runs in a thread of kernelprov's own pool, so neither the server's event loop nor its
        default executor ever waits for it; a restart finds the env already staged and costs a
        ``stat``. A failure raises
        :class:`~kernelprov.errors.KernelprovError`, whose one-sentence message is what
        JupyterLab shows in its "Error Starting Kernel" dialog.
        """
        if not self.archive:
            raise KernelStartError(
                f"Kernel {self.kernel_spec.display_name!r} names no archive in its kernel_provisioner config; reinstall it with `kernelprov install`."
            )
        self.log.info("kernelprov: staging %s for kernel %s", self.archive, self.kernel_id)
        try:
            # Leased for this server process until the kernel is gone (cleanup): no Evict can fall
            # between staging and the kernel's own flock in run.sh.
            stage = functools.partial(ensure_staged, self.archive, lease=f"{os.getpid()}.{self.kernel_id}",
                                      **self.stage_options())
            self.staged_env = await asyncio.get_running_loop().run_in_executor(_STAGING_THREADS, stage)
        except KernelprovError as err:
            self.log.error("kernelprov: cannot start kernel %s: %s", self.kernel_id, err)
            raise KernelStartError(str(err)) from err
        staged = self.staged_env
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
            raise KernelStartError(str(err)) from err
        return await super().pre_launch(**kwargs)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager after the kernel process ended; a restart keeps the
        private socket dir (the connection file is reused), a final cleanup removes it."""
        await super().cleanup(restart=restart)
        if not restart:
            transports.remove_socket_dir(self._socket_dir)
            self._socket_dir = None
            if self.staged_env is not None:
                release_lease(self.staged_env.lease)
