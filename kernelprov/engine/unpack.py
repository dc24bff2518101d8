"""Stage a tar or zip archive: extract into a private dir, verify, relocate, publish.

Called by :func:`.stage.ensure_staged` with the archive's key lock held. The env is extracted into
a ``.staging-<key>-*`` dir beside its final place, checked against the manifest, relocated there
to the final path, renamed into place, and only then marked: a crash or kill at any point leaves
nothing that a later start would trust (:func:`.cache.remove_unpublished` clears it).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ArchiveError, CacheError
from . import cache, space
from .archive import check_unchanged, not_a_conda_env, size_mismatch
from .extract import ProgressCallback, extract, unpack_limits
from .logs import get_logger
from .manifest import read_manifest
from .relocate import read_prefix_records, relocate

log = get_logger(__name__)


def stage_tree(archive: Path, st: os.stat_result, user_dir: Path, key: str, progress: ProgressCallback | None,
               max_unpacked_bytes: int = 0) -> Path:
    """Extract, verify, relocate and publish one archive at ``user_dir/key``; return that prefix.

    What the extraction may write is bounded by the manifest, or by ``max_unpacked_bytes`` when
    there is none (0: automatic, see :func:`.extract.unpack_limits`).
    """
    manifest = read_manifest(archive)
    if manifest is not None and manifest.size != st.st_size:
        raise size_mismatch(archive, st.st_size, manifest.size, "it may be incomplete or still being copied — wait for "
                            "the copy to finish or re-create it with `kernelprov pack`.")
    if manifest is None:
        log.warning("%s has no manifest; extracting it without an integrity check", archive)
    space.ensure_space(archive, st, manifest, user_dir, key)
    final = user_dir / key
    user_dir = cache.as_private(user_dir)
    staging = cache.make_staging(user_dir, key)
    try:
        limits = unpack_limits(st.st_size, manifest, ceiling=max_unpacked_bytes)
        result = extract(archive, staging, progress=progress, limits=limits)
        check_unchanged(archive, st)
        if manifest is not None:
            if result.sha256 != manifest.sha256:
                raise ArchiveError("The archive fails its manifest's check.",
                                   f"{archive} does not match its manifest's sha256 (corrupt or replaced); re-create it with `kernelprov pack`.")
            if manifest.members is not None and result.members != manifest.members:
                raise ArchiveError(
                    "The archive fails its manifest's check.",
                    f"{archive} holds {result.members:,} entries but its manifest records {manifest.members:,}; re-create it with `kernelprov pack`.",
                )
        if result.unpack_script is not None:
            records = read_prefix_records(result.unpack_script, archive)
            relocate(staging, str(final), records, files=result.files, archive=archive)
        else:
            log.warning("%s has no bin/conda-unpack; using it without relocation", archive)
        if not _has_python(user_dir, staging.name):
            raise not_a_conda_env(archive)
        os.chmod(staging.name, 0o755, dir_fd=user_dir.fd)
        cache.publish(user_dir, staging.name, key)  # through the dir's fd: no path swap can redirect it
        cache.write_marker(user_dir, key, archive=str(archive), archive_size=st.st_size, archive_mtime_ns=st.st_mtime_ns,
                           env_bytes=result.bytes_written, members=result.members)
    except BaseException as err:
        # Nothing half-made stays: the staging dir, or the published env whose marker could not
        # be written (complete but unmarked, so no start would trust it; it would only fill the
        # disk). The caller holds the key's lock, so ``key`` here is ours.
        for name in (staging.name, key, f"{key}.json.tmp"):
            cache.remove_name(user_dir, name)
        if not isinstance(err, OSError):
            raise
        if space.is_disk_full(err):
            needed = manifest.unpacked_bytes if manifest is not None else None
            raise space.disk_full_error(user_dir, archive, err, needed=needed) from err
        raise CacheError("Unpacking failed.", f"Unpacking {archive} into {user_dir} failed: {err}.") from err
    return final


def _has_python(user_dir, name: str) -> bool:
    """Does the staged tree ``name`` hold a ``bin/python`` (file or link) — is it a runnable env?"""
    try:
        os.stat(f"{name}/bin/python", dir_fd=user_dir.fd, follow_symlinks=False)
    except OSError:
        return False
    return True
