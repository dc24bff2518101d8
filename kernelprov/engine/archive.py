"""The archive file as a source: is it there and readable, may it run here, did it change under us.

Called by :func:`.stage.ensure_staged` at every start (:func:`stat_archive`, :func:`check_allowed`),
by the stagers in :mod:`.unpack` and :mod:`.image_stage` after reading it
(:func:`check_unchanged`), and by ``kernelprov doctor``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ArchiveError


def stat_archive(archive: Path) -> os.stat_result:
    """``os.stat`` of the archive, or the one sentence that says why it cannot be used."""
    try:
        st = os.stat(archive)
    except FileNotFoundError:
        raise ArchiveError(
            f"The environment archive {archive} does not exist; check the path, or reinstall the kernel with `kernelprov install`."
        ) from None
    except OSError as err:
        raise ArchiveError(f"Cannot read the environment archive {archive}: {err.strerror}.") from err
    if not os.access(archive, os.R_OK):
        raise ArchiveError(f"The environment archive {archive} is not readable by you; ask its owner to make it readable (chmod a+r).")
    if not archive.is_file():
        raise ArchiveError(f"{archive} is not a file; point the kernel at a conda-pack archive.")
    return st


def check_allowed(archive: Path, allowed_roots: list[str]) -> None:
    """Site policy: only archives under the admin's allowed roots may run (symlinks resolved).

    Called at every start by :func:`.stage.ensure_staged` and by ``kernelprov doctor``.
    """
    real = os.path.realpath(archive)
    for root in allowed_roots:
        real_root = os.path.realpath(os.path.expanduser(root))
        if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
            return
    raise ArchiveError(
        f"{archive} is outside the archive locations this site allows ({', '.join(allowed_roots)}); "
        "ask your admin, or use an environment from those locations."
    )


def check_unchanged(archive: Path, before: os.stat_result) -> None:
    """Fail if the archive was replaced or rewritten while we were reading it."""
    try:
        after = os.stat(archive)
    except OSError as err:
        raise ArchiveError(f"The environment archive {archive} disappeared while it was being unpacked; try again.") from err
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
        raise ArchiveError(f"The environment archive {archive} changed while it was being unpacked; try again once it is complete.")


def not_a_conda_env(archive: Path) -> ArchiveError:
    """The one sentence for an archive that holds no conda env (no ``conda-meta/`` or no
    ``bin/python``): a kernel from it can never start. Raised by ``install``, after staging, and
    shown by ``doctor`` and the panel (from the manifest's ``conda_env``)."""
    return ArchiveError(
        f"{archive} is not a conda-pack environment (it has no bin/python or no conda-meta/); "
        "pack the env with `kernelprov pack` or conda-pack and install that archive."
    )
