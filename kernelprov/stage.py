"""``ensure_staged(archive) -> StagedEnv``: the one entry point that turns an archive into a prefix.

Called by the provisioner (in a worker thread, at every kernel start), by ``run.sh`` through
``kernelprov unpack`` when no provisioner is in play, by ``kernelprov unpack`` for job prologues,
and by the REST API's pre-warm. A warm start is two ``stat`` calls and a marker read; a cold start
takes the archive's lock, extracts into a private staging dir, relocates there to the final path,
renames into place, and writes the marker last. Only a marked env is ever reused, so a crash or
kill at any point leaves nothing a later start would trust.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from . import archive as archive_io
from . import cache
from .errors import ArchiveError, CacheError
from .manifest import read_manifest
from .relocate import read_prefix_records, relocate

log = logging.getLogger(__name__)

#: How long a start waits for another process that is staging the same archive.
DEFAULT_LOCK_TIMEOUT = 1800.0


@dataclass
class StagedEnv:
    """A published env ready to run kernels: returned by :func:`ensure_staged`."""

    prefix: Path
    key: str
    archive: Path
    extracted: bool  # True when this call unpacked it; False when it reused a staged copy
    seconds: float

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"


def _stat_archive(archive: Path) -> os.stat_result:
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


def ensure_staged(
    archive: Path | str,
    *,
    cache_root: Path | str | None = None,
    progress: archive_io.ProgressCallback | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> StagedEnv:
    """Return the staged env for ``archive``, unpacking it into the user's cache if needed.

    Safe to call from many processes and threads at once: one extracts, the others wait on the
    archive's lock and then reuse its result. Raises :class:`~kernelprov.errors.KernelprovError`
    subclasses whose message a researcher can act on.
    """
    started = time.monotonic()
    archive = Path(archive).expanduser().absolute()
    st = _stat_archive(archive)
    root = Path(cache_root) if cache_root else cache.default_cache_root()
    user_dir = cache.user_cache_dir(root)
    key = cache.archive_key(archive, st)

    if cache.read_marker(user_dir, key) is not None:
        cache.touch(user_dir, key)
        return StagedEnv(user_dir / key, key, archive, False, time.monotonic() - started)

    lock = FileLock(str(user_dir / f"{key}.lock"), timeout=lock_timeout)
    try:
        with lock:
            if cache.read_marker(user_dir, key) is not None:  # another process just staged it
                cache.touch(user_dir, key)
                return StagedEnv(user_dir / key, key, archive, False, time.monotonic() - started)
            cache.remove_unpublished(user_dir, key)
            _stage_locked(archive, st, user_dir, key, progress)
    except Timeout:
        raise CacheError(
            f"Timed out after {lock_timeout:.0f} s waiting for another process to unpack {archive}; try again, or run `kernelprov cache clean`."
        ) from None
    seconds = time.monotonic() - started
    log.info("staged %s into %s in %.1f s", archive, user_dir / key, seconds)
    return StagedEnv(user_dir / key, key, archive, True, seconds)


def _stage_locked(archive: Path, st: os.stat_result, user_dir: Path, key: str, progress) -> None:
    """Extract, verify, relocate and publish one archive; the caller holds the key's lock."""
    manifest = read_manifest(archive)
    if manifest is not None and manifest.size != st.st_size:
        raise ArchiveError(
            f"{archive} is {st.st_size} bytes but its manifest records {manifest.size}; it may be incomplete or "
            "still being copied — wait for the copy to finish or re-create it with `kernelprov pack`."
        )
    if manifest is None:
        log.warning("%s has no manifest; extracting it without an integrity check", archive)
    final = user_dir / key
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{key}-", dir=user_dir))
    try:
        result = archive_io.extract(archive, staging, progress=progress)
        _check_unchanged(archive, st)
        if manifest is not None:
            if result.sha256 != manifest.sha256:
                raise ArchiveError(f"{archive} does not match its manifest's sha256 (corrupt or replaced); re-create it with `kernelprov pack`.")
            if manifest.members is not None and result.members != manifest.members:
                raise ArchiveError(
                    f"{archive} holds {result.members} entries but its manifest records {manifest.members}; re-create it with `kernelprov pack`."
                )
        if result.unpack_script is not None:
            records = read_prefix_records(result.unpack_script, archive)
            relocate(staging, str(final), records, files=result.files, archive=archive)
        else:
            log.warning("%s has no bin/conda-unpack; using it without relocation", archive)
        os.chmod(staging, 0o755)
        os.rename(staging, final)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(
                f"The local disk at {user_dir} ran out of space while unpacking {archive} ({st.st_size} bytes compressed); "
                "free space there or set KERNELPROV_CACHE_DIR to a larger local directory."
            ) from err
        raise CacheError(f"Unpacking {archive} into {user_dir} failed: {err}.") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    cache.write_marker(
        user_dir,
        key,
        archive=str(archive),
        archive_size=st.st_size,
        archive_mtime_ns=st.st_mtime_ns,
        env_bytes=result.bytes_written,
        members=result.members,
    )


def _check_unchanged(archive: Path, before: os.stat_result) -> None:
    """Fail if the archive was replaced or rewritten while we were reading it."""
    try:
        after = os.stat(archive)
    except OSError as err:
        raise ArchiveError(f"The environment archive {archive} disappeared while it was being unpacked; try again.") from err
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
        raise ArchiveError(f"The environment archive {archive} changed while it was being unpacked; try again once it is complete.")


def find_staged(archive: Path | str, *, cache_root: Path | str | None = None) -> cache.CacheEntry | None:
    """The staged copy of ``archive``'s current version, if this user has one on this node.

    Called by ``kernelprov list`` and the REST API to show state without staging anything.
    """
    archive = Path(archive).expanduser().absolute()
    try:
        st = os.stat(archive)
    except OSError:
        return None
    user_dir = cache.user_cache_dir(Path(cache_root) if cache_root else cache.default_cache_root())
    return cache.read_marker(user_dir, cache.archive_key(archive, st))


def clean(*, cache_root: Path | str | None = None) -> list[cache.CacheEntry]:
    """Evict every staged env of this user that nobody is staging right now; return the evicted.

    Called by ``kernelprov cache clean``. A key whose lock is held (a stage in progress) is skipped.
    """
    user_dir = cache.user_cache_dir(Path(cache_root) if cache_root else cache.default_cache_root())
    evicted = []
    keys = {entry.key: entry for entry in cache.entries(user_dir)}
    keys.update({p.name.split("-")[1]: None for p in user_dir.glob(".staging-*-*")})
    for key, entry in keys.items():
        try:
            with FileLock(str(user_dir / f"{key}.lock"), timeout=0):
                cache.remove_unpublished(user_dir, key)
                if entry is not None:
                    cache.remove_entry(user_dir, key)
                    evicted.append(entry)
        except Timeout:
            log.info("skipping %s: it is being staged right now", key)
    return evicted
