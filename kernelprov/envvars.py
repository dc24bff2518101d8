"""kernelprov's settings as the environment gives them, without traitlets.

The defaults of :class:`kernelprov.config.KernelprovConfig` come from here, so there is one
reading of every ``KERNELPROV_*`` variable. The CLI's warm path (``kernelprov unpack``, which
``run.sh`` runs at every kernel start in clients without the provisioner) uses
:func:`stage_options` directly when :func:`site_config_may_configure` says no Jupyter config file
could change a kernelprov setting: importing traitlets and loading the config files took about
40 ms of a 100 ms warm start (issue 13). Nothing is read at import time.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

from .engine.cache import CACHE_ROOT_VARIABLES, default_cache_root
from .engine.stage import DEFAULT_LOCK_TIMEOUT  # the warm path imports stage anyway
from .errors import ConfigError

#: Jupyter config files read by the CLI too, so one site-wide file configures every entry point.
SITE_CONFIG_FILES = ("jupyter_config", "jupyter_server_config")
#: Every setting's name (and what loads another file): a config file that contains none of these
#: words cannot change a kernelprov setting, so the CLI need not load it with traitlets.
_SETTING_WORDS = ("kernelprov", "cache_dir", "lock_timeout", "cache_max_bytes", "max_unpacked_bytes",
                  "allowed_archive_roots", "load_subconfig")


def from_environment(variable: str, parse, expected: str):
    """The parsed value of ``variable``, None when unset; a :class:`ConfigError` naming the variable
    when it does not parse."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        return parse(text)
    except (ValueError, OverflowError):
        raise ConfigError(f"{variable}={text!r} is not {expected}; fix it or unset it.") from None


def cache_dir(variables=CACHE_ROOT_VARIABLES) -> str:
    """The cache root: the first of ``variables`` that is set, else /tmp; must be absolute."""
    root = str(default_cache_root(variables=variables))
    if not os.path.isabs(os.path.expanduser(root)):
        variable = next((name for name in variables if os.environ.get(name, "").strip()), "cache_dir")
        raise ConfigError(f"{variable}={root!r} is not an absolute path; set it to a node-local "
                          "directory such as /tmp or unset it.")
    return root


def lock_timeout() -> float:
    """``$KERNELPROV_LOCK_TIMEOUT``, else 1800 s."""
    value = from_environment("KERNELPROV_LOCK_TIMEOUT", float, "a positive number of seconds")
    if value is None:
        return DEFAULT_LOCK_TIMEOUT
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"KERNELPROV_LOCK_TIMEOUT={value!r} must be a positive number of seconds; "
                          "fix it or unset it (default 1800).")
    return value


def cache_max_bytes() -> int:
    """``$KERNELPROV_CACHE_MAX_BYTES``, else 0 (no budget)."""
    value = from_environment("KERNELPROV_CACHE_MAX_BYTES", lambda text: int(float(text)),
                             "a number of bytes (0: no budget)")
    if value is None:
        return 0
    if value < 0:
        raise ConfigError(f"KERNELPROV_CACHE_MAX_BYTES={value} must be 0 (no budget) or a positive "
                          "number of bytes; fix it or unset it.")
    return value


def max_unpacked_bytes() -> int:
    """``$KERNELPROV_MAX_UNPACKED_BYTES``, else 0 (automatic)."""
    value = from_environment("KERNELPROV_MAX_UNPACKED_BYTES", lambda text: int(float(text)),
                             "a number of bytes (0: automatic)")
    if value is not None and value < 0:
        raise ConfigError(f"KERNELPROV_MAX_UNPACKED_BYTES={value} must be 0 (automatic) or a positive number of bytes; fix it or unset it.")
    return value or 0


def allowed_archive_roots() -> list[str]:
    """``$KERNELPROV_ALLOWED_ARCHIVE_ROOTS`` (colon-separated absolute paths), else []."""
    roots = [p for p in os.environ.get("KERNELPROV_ALLOWED_ARCHIVE_ROOTS", "").split(os.pathsep) if p]
    for root in roots:
        if not os.path.isabs(root):
            raise ConfigError(f"KERNELPROV_ALLOWED_ARCHIVE_ROOTS names {root!r}, which is not an absolute path; fix it.")
    return roots


def stage_options(cache_dir_override: str | None = None) -> dict:
    """What ``KernelprovConfig(config=<no site config>).stage_options()`` returns, read from the
    environment alone. Called by the CLI's warm path after :func:`site_config_may_configure`."""
    return {"cache_root": os.path.expanduser(cache_dir_override) if cache_dir_override else cache_dir(),
            "lock_timeout": lock_timeout(), "max_bytes": cache_max_bytes(),
            "allowed_roots": allowed_archive_roots(), "max_unpacked_bytes": max_unpacked_bytes()}


def config_dirs_to_check() -> set[str]:
    """Every directory ``jupyter_core.paths.jupyter_config_path()`` could list here — a superset,
    in no order — without importing jupyter_core.

    Why by hand: importing ``jupyter_core.paths`` (platformdirs, tempfile) cost ~8 ms of the warm
    ``kernelprov unpack`` that ``run.sh`` pays at every kernel start, and only the *set* matters to
    :func:`site_config_may_configure`: a directory too many costs one ``stat``, and any config
    file that names kernelprov sends the CLI to the full traitlets loader, which reads
    jupyter_core's own list in its own order. Where jupyter_core's rules are more than these
    (platformdirs locations, a non-Linux system path, JUPYTER_NO_CONFIG), it is asked itself;
    ``tests/test_warm_unpack.py`` checks the superset under each variable that changes the list."""
    env = os.environ
    if "jupyter_core.paths" in sys.modules or env.get("JUPYTER_NO_CONFIG") or env.get("JUPYTER_PLATFORM_DIRS") \
            or not sys.platform.startswith("linux"):  # loaded already, or rules beyond these: ask it
        from jupyter_core.paths import jupyter_config_path

        return set(jupyter_config_path())
    return config_dirs_by_rule()


def config_dirs_by_rule() -> set[str]:
    """jupyter_core's config dirs on Linux, by its rules (see :func:`config_dirs_to_check`)."""
    env = os.environ
    dirs = {p.rstrip(os.sep) for p in env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep) if p}
    dirs.add(env.get("JUPYTER_CONFIG_DIR") or os.path.join(os.path.realpath(os.path.expanduser("~")), ".jupyter"))
    if site.ENABLE_USER_SITE:
        userbase = site.getuserbase() if hasattr(site, "getuserbase") else site.USER_BASE
        if userbase:
            dirs.add(os.path.join(userbase, "etc", "jupyter"))
    dirs.update((os.path.join(sys.prefix, "etc", "jupyter"), "/usr/local/etc/jupyter", "/etc/jupyter"))
    return dirs


def site_config_files() -> list[Path]:
    """The Jupyter config files the CLI reads (``jupyter_config`` and ``jupyter_server_config``,
    ``.json`` and ``.py``) that exist in :func:`config_dirs_to_check`, in no particular order."""
    found = []
    for directory in sorted(config_dirs_to_check()):
        for base in SITE_CONFIG_FILES:
            for suffix in (".json", ".py"):
                path = Path(directory) / f"{base}{suffix}"
                if path.is_file():
                    found.append(path)
    return found


def site_config_may_configure() -> bool:
    """Could a Jupyter config file on the path change a kernelprov setting?

    True when any of them names a setting, a ``Kernelprov…`` class or ``load_subconfig``, or
    cannot be read (the full loader then reports it); False lets the CLI skip traitlets."""
    for path in site_config_files():
        try:
            text = path.read_text(errors="replace").lower()
        except OSError:
            return True
        if any(word in text for word in _SETTING_WORDS):
            return True
    return False
