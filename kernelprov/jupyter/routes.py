"""The REST API of the JupyterLab panel: ``/kernelprov/envs`` and ``/kernelprov/envs/<name>/stage``.

Registered by :func:`kernelprov.jupyter.serverext._load_jupyter_server_extension`. The handlers are thin:
they authenticate and authorize every request, accept kernel names only (never paths), run the
blocking work of :class:`~kernelprov.jupyter.environments.KernelprovEnvironments` in a pool of their own (not
the server's default executor, which a slow shared filesystem would otherwise fill), and turn
its :class:`~kernelprov.errors.KernelprovError` into an HTTP status in one place,
:meth:`KernelprovHandler.write_error`. Writes are XSRF-checked by jupyter_server's ``APIHandler``.

======  ==============================  ===================================================
GET     /kernelprov/envs                ``{"envs": [...], "cache_dir": ...}`` (200)
GET     /kernelprov/staging?name=N...   ``{"envs": {N: {"staging": ..., "staged": bool}}}``:
                                        the fast poll while something stages (200)
POST    /kernelprov/envs/<name>/stage   start a pre-warm; the env's description (202)
DELETE  /kernelprov/envs/<name>/stage   evict the staged copy; the env's description (200),
                                        404 when nothing is staged, 409 while in use
======  ==============================  ===================================================
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from http.client import responses
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..errors import ArchiveError, CacheError, KernelprovError, KernelspecError
from .environments import KernelprovEnvironments
from .events import event_logger_of
from .kernelspecs import KernelprovKernel, validate_name

#: Threads for the handlers' blocking work: reading kernel dirs and manifests on shared storage.
_PANEL_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kernelprov-panel")


async def _in_thread(function, *args):
    """Run ``function(*args)`` in the panel's pool and await it (the handlers' only way to block)."""
    return await asyncio.get_running_loop().run_in_executor(_PANEL_THREADS, functools.partial(function, *args))


#: The resource name an Authorizer sees for every request to this API ("read" or "write").
AUTH_RESOURCE = "kernelprov"
SETTINGS_KEY = "kernelprov_environments"

#: Domain errors → HTTP status, first match wins; any other KernelprovError is a 500.
ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (KernelspecError, 400),  # a bad kernel name
    (ArchiveError, 409),  # the archive is missing, unreadable or corrupt: fix it, then retry
    (CacheError, 409),  # in use, being staged, or the local disk cannot take it
)


def status_for(error: BaseException) -> int | None:
    """The HTTP status for a domain error, None for anything else (a bug: 500 with a traceback)."""
    for kind, status in ERROR_STATUS:
        if isinstance(error, kind):
            return status
    return 500 if isinstance(error, KernelprovError) else None


class KernelprovHandler(APIHandler):
    """Base of the panel's handlers: authorization resource, kernel lookup, error mapping."""

    auth_resource = AUTH_RESOURCE

    @property
    def environments(self) -> KernelprovEnvironments:
        """The server's one :class:`~kernelprov.jupyter.environments.KernelprovEnvironments`."""
        return self.settings[SETTINGS_KEY]

    async def kernel(self, name: str) -> KernelprovKernel:
        """The kernelprov kernel named in the URL: 400 for a name that is not one, 404 if unknown."""
        validate_name(name)
        kernel = await _in_thread(self.environments.find, name)
        if kernel is None:
            raise web.HTTPError(404, f"No kernelprov kernel named {name!r} on this server.")
        return kernel

    async def reply(self, kernel: KernelprovKernel, status: int = 200) -> None:
        """Finish with the kernel's current description, as one row of ``GET /kernelprov/envs``."""
        self.set_status(status)
        self.finish(json.dumps(await _in_thread(self.environments.describe, kernel)))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Domain errors become their status and a one-sentence ``message``; the rest as jupyter_server does."""
        error = kwargs.get("exc_info", (None, None, None))[1]
        status = status_for(error) if error is not None else None
        if status is None:
            super().write_error(status_code, **kwargs)
            return
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": str(error), "reason": responses.get(status)}))

    def log_exception(self, typ, value, tb) -> None:
        """A domain error is the user's to act on, not a server bug: one warning line, no traceback."""
        if value is not None and status_for(value) is not None:
            self.log.warning("kernelprov: %s %s: %s", self.request.method, self.request.path, value)
            return
        super().log_exception(typ, value, tb)


class EnvironmentsHandler(KernelprovHandler):
    """``/kernelprov/envs``: what the panel's table shows."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Called by the panel's poll (every 15 s; while something stages, ``/kernelprov/staging`` polls)."""
        envs = await _in_thread(self.environments.describe_all)
        self.finish(json.dumps({"envs": envs, "cache_dir": self.environments.cache_dir}))


class StagingHandler(KernelprovHandler):
    """``/kernelprov/staging``: only the staging state of the named kernels, for the fast poll."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Called by the panel about once a second while one of its rows stages."""
        names = self.get_arguments("name")[:200]
        for name in names:
            validate_name(name)
        states = await _in_thread(self.environments.staging_states, names)
        self.finish(json.dumps({"envs": states}))


class StageHandler(KernelprovHandler):
    """``/kernelprov/envs/<name>/stage``: pre-warm (POST) or evict (DELETE) one env on this node."""

    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        """Called by the panel's *Stage now*: start a pre-warm and answer at once (202)."""
        kernel = await self.kernel(name)
        await _in_thread(self.environments.start_staging, kernel, asyncio.get_running_loop(),
                         event_logger_of(self.serverapp))
        await self.reply(kernel, 202)

    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        """Called by the panel's *Evict*: remove the staged copy; 404 when there is none."""
        kernel = await self.kernel(name)
        evicted = await _in_thread(self.environments.evict, kernel)
        if evicted is None:
            raise web.HTTPError(404, f"{kernel.name} is not staged on this node.")
        await self.reply(kernel)


def setup_handlers(web_app: web.Application, environments: KernelprovEnvironments) -> None:
    """The one route table; called once by the extension loader."""
    web_app.settings[SETTINGS_KEY] = environments
    base_url = web_app.settings["base_url"]
    web_app.add_handlers(".*$", [
        (url_path_join(base_url, "kernelprov", "envs"), EnvironmentsHandler),
        (url_path_join(base_url, "kernelprov", "staging"), StagingHandler),
        (url_path_join(base_url, "kernelprov", "envs", "([^/]+)", "stage"), StageHandler),
    ])
