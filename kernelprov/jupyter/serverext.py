"""The jupyter_server extension loader: one :class:`KernelprovEnvironments`, one route table.

jupyter_server finds it through ``kernelprov._jupyter_server_extension_points()`` once
``jupyter-config/jupyter_server_config.d/kernelprov.json`` (installed with the package) enables
the ``kernelprov`` extension. The domain object lives in :mod:`.environments`, the handlers and
route table in :mod:`.routes`, the staging events' schema in :mod:`.events`; this module only
wires them to the server.
"""

from __future__ import annotations

from traitlets.config import LoggingConfigurable

from .environments import KernelprovEnvironments
from .events import STAGING_SCHEMA_ID, event_logger_of, register_staging_schema
from .routes import setup_handlers


def _load_jupyter_server_extension(serverapp: LoggingConfigurable) -> None:
    """Called by jupyter_server once at start-up: register the panel's REST API and the staging
    events' schema (so ``/api/events/subscribe`` knows it before the first kernel starts)."""
    event_logger = event_logger_of(serverapp)
    register_staging_schema(event_logger)
    ksm = serverapp.kernel_spec_manager
    kernel_dirs = [str(d) for d in getattr(ksm, "kernel_dirs", None) or []]
    allowed = set(getattr(ksm, "allowed_kernelspecs", None) or ())
    environments = KernelprovEnvironments(parent=serverapp, kernel_dirs=kernel_dirs, allowed_kernelspecs=allowed)
    setup_handlers(serverapp.web_app, environments)
    serverapp.log.info("kernelprov: environments panel API at %skernelprov/envs (cache %s)%s",
                       serverapp.web_app.settings.get("base_url", "/"), environments.cache_dir,
                       f"; staging events as {STAGING_SCHEMA_ID}" if event_logger is not None else "")
