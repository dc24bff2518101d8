"""The archive file as a source: is it there and readable, may it run here, did it change under us.

Called by :func:`.stage.ensure_staged` at every start (:func:`stat_archive`, :func:`check_allowed`),
by the stagers in :mod:`.unpack` and :mod:`.image_stage` after reading it
(:func:`check_unchanged`), and by ``kernelprov doctor``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ArchiveError, human_size


def stat_archive(archive: Path) -> os.stat_result:
    """``os.stat`` of the archive, or the one sentence that says why it cannot be used."""
    try:
        st = os.stat(archive)
    except FileNotFoundError:
        raise ArchiveError(
            "The archive is missing.",
            f"The environment archive {archive} does not exist; check the path, or reinstall the kernel with `kernelprov install`.",
        ) from None
    except OSError as err:
        raise ArchiveError("The archive cannot be read.", f"Cannot read the environment archive {archive}: {err.strerror}.") from err
    if not os.access(archive, os.R_OK):
        raise ArchiveError("The archive is not readable by you.",
                           f"The environment archive {archive} is not readable by you; ask its owner to make it readable (chmod a+r).")
    if not archive.is_file():
        raise ArchiveError("The archive is not a file.", f"{archive} is not a file; point the kernel at a conda-pack archive.")
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
        "The archive is not in a place this site allows.",
        f"{archive} is outside the archive locations this site allows ({', '.join(allowed_roots)}); "
        "ask your admin, or use an environment from those locations.",
    )


def check_unchanged(archive: Path, before: os.stat_result) -> None:
    """Fail if the archive was replaced or rewritten while we were reading it."""
    try:
        after = os.stat(archive)
    except OSError as err:
        raise ArchiveError("The archive vanished while being unpacked.",
                           f"The environment archive {archive} disappeared while it was being unpacked; try again.") from err
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
        raise ArchiveError("The archive changed while being unpacked.",
                           f"The environment archive {archive} changed while it was being unpacked; try again once it is complete.")


def size_mismatch(archive: Path, actual: int, recorded: int, advice: str) -> ArchiveError:
    """The one message for an archive whose size is not the one its manifest records (a copy
    still under way, or cut short), in sizes a researcher reads — their difference when both
    round to the same figure."""
    shown, expected = human_size(actual), human_size(recorded)
    if shown == expected:
        shown = f"{human_size(abs(recorded - actual))} {'smaller' if actual < recorded else 'larger'} than"
        comparison = f"{archive} is {shown} its manifest records ({expected})"
    else:
        comparison = f"{archive} is {shown} but its manifest records {expected}"
    return ArchiveError("The archive is incomplete." if actual < recorded else "The archive does not match its manifest.",
                        f"{comparison}; {advice}")


def not_a_conda_env(archive: Path) -> ArchiveError:
    """The one sentence for an archive that holds no conda env (no ``conda-meta/`` or no
    ``bin/python``): a kernel from it can never start. Raised by ``install``, after staging, and
    shown by ``doctor`` and the panel (from the manifest's ``conda_env``)."""
    return ArchiveError(
        "The archive holds no conda environment.",
        f"{archive} is not a conda-pack environment (it has no bin/python or no conda-meta/); "
        "pack the env with `kernelprov pack` or conda-pack and install that archive.",
    )
