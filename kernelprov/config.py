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

from . import envvars
from .engine.cache import CACHE_ROOT_VARIABLES
# Defaults are read from the environment by plain functions, which the CLI's warm path also
# calls without traitlets; names kept here, where callers found them.
from .envvars import SITE_CONFIG_FILES  # noqa: F401


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
        return envvars.cache_dir(self.cache_dir_variables)

    @validate("cache_dir")
    def _validate_cache_dir(self, proposal) -> str:
        value = os.path.expanduser(proposal["value"])
        if not os.path.isabs(value):
            raise TraitError(f"cache_dir must be an absolute path, not {proposal['value']!r}")
        return value

    lock_timeout = Float(
        config=True,
        help="""Seconds a kernel start waits for another process that is unpacking the same
        archive before giving up; must be positive. Default: $KERNELPROV_LOCK_TIMEOUT, else 1800.""",
    )

    @default("lock_timeout")
    def _lock_timeout_default(self) -> float:
        return envvars.lock_timeout()

    @validate("lock_timeout")
    def _validate_lock_timeout(self, proposal) -> float:
        value = proposal["value"]
        if not value > 0 or value == float("inf"):
            raise TraitError("lock_timeout must be a positive, finite number of seconds")
        return value

    cache_max_bytes = Int(
        config=True,
        help="""Size budget of each user's cache on a node, in bytes: after a fresh unpack the
        least recently used environments that no running kernel uses are evicted until the cache
        fits. 0 means no budget; negative values are refused. Default: $KERNELPROV_CACHE_MAX_BYTES,
        else 0.""",
    )

    @default("cache_max_bytes")
    def _cache_max_bytes_default(self) -> int:
        return envvars.cache_max_bytes()

    @validate("cache_max_bytes")
    def _validate_cache_max_bytes(self, proposal) -> int:
        if proposal["value"] < 0:
            raise TraitError("cache_max_bytes must be 0 (no budget) or a positive number of bytes")
        return proposal["value"]

    max_unpacked_bytes = Int(
        config=True,
        help="""Most bytes an archive without a manifest may unpack to (an archive with one may write
        no more than it records); 0 means automatic: 25 times the archive's size, at least 256 MiB.
        Default: $KERNELPROV_MAX_UNPACKED_BYTES, else 0.""",
    )

    @default("max_unpacked_bytes")
    def _max_unpacked_bytes_default(self) -> int:
        return envvars.max_unpacked_bytes()

    @validate("max_unpacked_bytes")
    def _validate_max_unpacked_bytes(self, proposal) -> int:
        if proposal["value"] < 0:
            raise TraitError("max_unpacked_bytes must be 0 (automatic) or a positive number of bytes")
        return proposal["value"]

    allowed_archive_roots = List(
        Unicode(),
        config=True,
        help="""If set, kernels may only run from archives under these directories (e.g. the
        site's read-only software tree). Site policy: when it is set in a Jupyter config file or
        the environment, a kernel's own kernel.json can narrow it but never widen or clear it.
        Default: $KERNELPROV_ALLOWED_ARCHIVE_ROOTS (colon-separated), else no restriction.""",
    )

    @default("allowed_archive_roots")
    def _allowed_archive_roots_default(self) -> list[str]:
        return envvars.allowed_archive_roots()

    def site_allowed_roots(self) -> list[str]:
        """The site's allowed archive roots: from the Jupyter config files this object was given
        (any of its configurable classes' sections) or, failing that, the environment.

        Called by :meth:`stage_options`: a kernel's ``kernel_provisioner.config`` reaches the
        provisioner as constructor keywords, which would otherwise beat the site's config."""
        for cls in type(self).__mro__:
            section = self.config.get(cls.__name__) if cls.__name__ in self.config else None
            if section is not None and "allowed_archive_roots" in section:
                return list(section["allowed_archive_roots"])
        return envvars.allowed_archive_roots()

    def effective_allowed_roots(self) -> list[str]:
        """The roots staging enforces: the site's, unless this kernel's own list lies wholly
        inside them (a kernel may narrow site policy, never widen or clear it)."""
        site = self.site_allowed_roots()
        own = list(self.allowed_archive_roots)
        if not site:
            return own
        if own and all(any(_within(root, allowed) for allowed in site) for root in own):
            return own
        if own != site:
            self.log.warning("kernelprov: ignoring a kernel's allowed_archive_roots %s: the site allows only %s", own, site)
        return site

    def stage_options(self) -> dict:
        """Keyword arguments for :func:`kernelprov.engine.stage.ensure_staged` from these settings."""
        return {"cache_root": self.cache_dir, "lock_timeout": self.lock_timeout, "max_bytes": self.cache_max_bytes,
                "allowed_roots": self.effective_allowed_roots(), "max_unpacked_bytes": self.max_unpacked_bytes}


def _within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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
