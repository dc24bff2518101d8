"""Settings shared by the provisioner, the ``kernelprov`` CLI and the server routes.

:class:`KernelprovConfig` is a traitlets mixin (the gateway_provisioners pattern): the provisioner
and the CLI both inherit it, so ``c.KernelprovConfig.cache_dir = ...`` in a Jupyter config file
applies everywhere, and ``kernelprov install`` can write non-default values into a kernel's
``kernel_provisioner.config``. Every default is read from its environment variable when first
used, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from traitlets import Float, Int, List, TraitError, Unicode, default, validate
from traitlets.config import Config, LoggingConfigurable

from .engine.cache import CACHE_ROOT_VARIABLES, default_cache_root
from .engine.stage import DEFAULT_LOCK_TIMEOUT

#: Jupyter config files read by the CLI too, so one site-wide file configures every entry point.
SITE_CONFIG_FILES = ("jupyter_config", "jupyter_server_config")


class KernelprovConfig(LoggingConfigurable):
    """Where and how packed environments are staged on this node."""

    cache_dir_variables = List(
        Unicode(),
        default_value=list(CACHE_ROOT_VARIABLES),
        config=True,
        help="""Environment variables tried in order for the cache root when cache_dir is not set,
        e.g. ["KERNELPROV_CACHE_DIR", "LOCAL_SCRATCH", "TMPDIR"]; /tmp when none is set.""",
    )

    cache_dir = Unicode(
        config=True,
        help="""Node-local directory under which each user's private kernelprov cache is made.
        Default: the first of cache_dir_variables that is set ($KERNELPROV_CACHE_DIR,
        $SLURM_TMPDIR, $TMPDIR), else /tmp.""",
    )

    @default("cache_dir")
    def _cache_dir_default(self) -> str:
        return str(default_cache_root(variables=self.cache_dir_variables))

    @validate("cache_dir")
    def _validate_cache_dir(self, proposal) -> str:
        value = os.path.expanduser(proposal["value"])
        if not os.path.isabs(value):
            raise TraitError(f"cache_dir must be an absolute path, not {proposal['value']!r}")
        return value

    lock_timeout = Float(
        config=True,
        help="""Seconds a kernel start waits for another process that is unpacking the same
        archive before giving up. Default: $KERNELPROV_LOCK_TIMEOUT, else 1800.""",
    )

    @default("lock_timeout")
    def _lock_timeout_default(self) -> float:
        value = os.environ.get("KERNELPROV_LOCK_TIMEOUT", "")
        try:
            return float(value) if value else DEFAULT_LOCK_TIMEOUT
        except ValueError:
            self.log.warning("Ignoring KERNELPROV_LOCK_TIMEOUT=%r: not a number", value)
            return DEFAULT_LOCK_TIMEOUT

    cache_max_bytes = Int(
        config=True,
        help="""Size budget of each user's cache on a node, in bytes: after a fresh unpack the
        least recently used environments that no running kernel uses are evicted until the cache
        fits. 0 means no budget. Default: $KERNELPROV_CACHE_MAX_BYTES, else 0.""",
    )

    @default("cache_max_bytes")
    def _cache_max_bytes_default(self) -> int:
        value = os.environ.get("KERNELPROV_CACHE_MAX_BYTES", "")
        try:
            return int(float(value)) if value else 0
        except ValueError:
            self.log.warning("Ignoring KERNELPROV_CACHE_MAX_BYTES=%r: not a number of bytes", value)
            return 0

    @validate("cache_max_bytes")
    def _validate_cache_max_bytes(self, proposal) -> int:
        if proposal["value"] < 0:
            raise TraitError("cache_max_bytes must be 0 (no budget) or a positive number of bytes")
        return proposal["value"]

    allowed_archive_roots = List(
        Unicode(),
        config=True,
        help="""If set, kernels may only run from archives under these directories (e.g. the
        site's read-only software tree). Default: $KERNELPROV_ALLOWED_ARCHIVE_ROOTS
        (colon-separated), else no restriction.""",
    )

    @default("allowed_archive_roots")
    def _allowed_archive_roots_default(self) -> list[str]:
        return [p for p in os.environ.get("KERNELPROV_ALLOWED_ARCHIVE_ROOTS", "").split(os.pathsep) if p]

    def stage_options(self) -> dict:
        """Keyword arguments for :func:`kernelprov.engine.stage.ensure_staged` from these settings."""
        return {"cache_root": self.cache_dir, "lock_timeout": self.lock_timeout, "max_bytes": self.cache_max_bytes,
                "allowed_roots": self.allowed_archive_roots}

    @validate("lock_timeout")
    def _validate_lock_timeout(self, proposal) -> float:
        if proposal["value"] <= 0:
            raise TraitError("lock_timeout must be positive")
        return proposal["value"]


def load_site_config() -> Config:
    """The Jupyter config files on the config path (``jupyter_config.{json,py}`` and
    ``jupyter_server_config.{json,py}``), lowest priority first, merged.

    Called by the CLI — and so by run.sh and job prologues — which has no server to load them;
    the provisioner and the server extension get the same settings from the server itself.
    """
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config.loader import ConfigFileNotFound, JSONFileConfigLoader, PyFileConfigLoader

    merged = Config()
    for directory in reversed(jupyter_config_path()):
        for base in SITE_CONFIG_FILES:
            for loader_class, suffix in ((JSONFileConfigLoader, ".json"), (PyFileConfigLoader, ".py")):
                if not (Path(directory) / f"{base}{suffix}").is_file():
                    continue
                try:
                    merged.merge(loader_class(f"{base}{suffix}", path=directory).load_config())
                except ConfigFileNotFound:
                    continue
    return merged
