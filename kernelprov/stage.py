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

from filelock import Timeout

from . import archive as archive_io
from . import cache, image
from .errors import ArchiveError, CacheError
from .manifest import read_manifest
from .relocate import read_prefix_records, relocate

log = logging.getLogger(__name__)

#: How long a start waits for another process that is staging the same archive.
DEFAULT_LOCK_TIMEOUT = 1800.0
#: The size budget never evicts an env used this recently: a kernel may be starting from it.
BUDGET_MIN_IDLE_SECONDS = 300.0


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


def check_allowed(archive: Path, allowed_roots: list[str]) -> None:
    """Site policy: only archives under the admin's allowed roots may run (symlinks resolved).

    Called at every start by :func:`ensure_staged` and by ``kernelprov doctor``.
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


def ensure_staged(
    archive: Path | str,
    *,
    cache_root: Path | str | None = None,
    progress: archive_io.ProgressCallback | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    max_bytes: int = 0,
    allowed_roots: list[str] | None = None,
) -> StagedEnv:
    """Return the staged env for ``archive``, unpacking it into the user's cache if needed.

    Safe to call from many processes and threads at once: one extracts, the others wait on the
    archive's lock and then reuse its result. After a fresh unpack, least-recently-used envs that
    no kernel uses are evicted until the cache fits ``max_bytes`` (0: no budget). Archives outside
    ``allowed_roots`` (when given) are refused. Raises
    :class:`~kernelprov.errors.KernelprovError` subclasses whose message a researcher can act on.
    """
    started = time.monotonic()
    archive = Path(archive).expanduser().absolute()
    if allowed_roots:
        check_allowed(archive, allowed_roots)
    st = _stat_archive(archive)
    root = Path(cache_root) if cache_root else cache.default_cache_root()
    user_dir = cache.user_cache_dir(root)
    key = cache.archive_key(archive, st)

    reused = _reuse(user_dir, key, archive, started)
    if reused is not None:
        return reused

    image_manifest = None
    if archive_io.detect_format(archive) == "squashfs":
        # Image mode keeps its marker beside the image's baked mount point, not in cache_root.
        image_manifest = read_manifest(archive)
        user_dir = _image_user_dir(archive, image_manifest)
        reused = _reuse(user_dir, key, archive, started)
        if reused is not None:
            return reused
    try:
        with cache.key_lock(user_dir, key, lock_timeout):
            reused = _reuse(user_dir, key, archive, started)  # another process may just have staged it
            if reused is not None:
                return reused
            cache.remove_unpublished(user_dir, key)
            if image_manifest is not None:
                prefix = _stage_image_locked(archive, st, image_manifest, user_dir, key, progress)
            else:
                prefix = user_dir / key
                _stage_locked(archive, st, user_dir, key, progress)
    except Timeout:
        raise CacheError(
            f"Timed out after {lock_timeout:.0f} s waiting for another process to unpack {archive}; try again, or run `kernelprov cache clean`."
        ) from None
    seconds = time.monotonic() - started
    log.info("staged %s into %s in %.1f s", archive, prefix, seconds)
    if max_bytes:
        enforce_budget(user_dir, max_bytes, keep=key)
    return StagedEnv(prefix, key, archive, True, seconds)


def _reuse(user_dir: Path, key: str, archive: Path, started: float) -> StagedEnv | None:
    """The published env for ``key`` if it is usable as is (its use recorded), else None."""
    entry = cache.read_marker(user_dir, key)
    if entry is None or not _still_usable(entry):
        return None
    cache.touch(user_dir, key)
    return StagedEnv(entry.prefix, key, archive, False, time.monotonic() - started)


def _evict_idle(user_dir: Path, *, keep: str, min_idle: float, enough) -> list[cache.CacheEntry]:
    """Evict least-recently-used, unleased envs (never ``keep``) until ``enough()`` holds."""
    evicted = []
    for entry in reversed(cache.entries(user_dir)):
        if enough():
            break
        if entry.key != keep and not entry.in_use:
            gone = cache.try_evict(user_dir, entry.key, min_idle=min_idle)
            if gone is not None:
                log.info("evicted %s (%s bytes, last used %s)", gone.prefix, gone.env_bytes, time.ctime(gone.last_used))
                evicted.append(gone)
    return evicted


def enforce_budget(user_dir: Path, max_bytes: int, *, keep: str) -> list[cache.CacheEntry]:
    """Evict LRU envs that no kernel uses until this user's cache holds at most ``max_bytes``."""
    def fits() -> bool:
        return sum(e.env_bytes for e in cache.entries(user_dir)) <= max_bytes

    return _evict_idle(user_dir, keep=keep, min_idle=BUDGET_MIN_IDLE_SECONDS, enough=fits)


def _ensure_space(archive: Path, st: os.stat_result, manifest, user_dir: Path, key: str) -> None:
    """Fail before writing anything when the local disk cannot hold the env (bytes or inodes),
    after first evicting idle envs to make room."""
    if manifest is not None and manifest.unpacked_bytes is not None:
        members = manifest.members or 0
        # File data plus, on average, half a 4 KiB block of slack per entry.
        needed_bytes, needed_inodes = manifest.unpacked_bytes + members * 2048, members
    else:
        needed_bytes, needed_inodes = st.st_size, 0  # unknown; an env is never smaller than its archive

    def enough() -> bool:
        vfs = os.statvfs(user_dir)
        return vfs.f_bavail * vfs.f_frsize >= needed_bytes and (not vfs.f_files or vfs.f_favail >= needed_inodes)

    if enough() or (_evict_idle(user_dir, keep=key, min_idle=BUDGET_MIN_IDLE_SECONDS, enough=enough) and enough()):
        return
    vfs = os.statvfs(user_dir)
    raise CacheError(
        f"Not enough space in {user_dir} to unpack {archive.name}: it needs about {_mb(needed_bytes)} and "
        f"{needed_inodes} files, but only {_mb(vfs.f_bavail * vfs.f_frsize)} and {vfs.f_favail} files are free; "
        "free space there (`kernelprov cache clean`) or set KERNELPROV_CACHE_DIR to a larger local directory."
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


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
    _ensure_space(archive, st, manifest, user_dir, key)
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
            needed = manifest.unpacked_bytes if manifest is not None and manifest.unpacked_bytes else None
            raise CacheError(
                f"The local disk at {user_dir} ran out of space while unpacking {archive.name}"
                + (f" (it needs about {_mb(needed)})" if needed else "")
                + "; free space there (`kernelprov cache clean`) or set KERNELPROV_CACHE_DIR to a larger local directory."
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


def _image_user_dir(archive: Path, manifest) -> Path:
    """The private dir holding an image's mount point; the image must have been packed for it."""
    if manifest is None or not manifest.dest_prefix:
        raise ArchiveError(
            f"{archive} is a squashfs image without a kernelprov manifest naming its mount point; "
            "re-create it with `kernelprov pack --format squashfs`."
        )
    mount_point = Path(manifest.dest_prefix)
    user_dir = cache.user_cache_dir(mount_point.parent.parent)
    if mount_point.parent != user_dir:
        raise CacheError(
            f"{archive} was packed to be mounted at {mount_point}, which is not your private kernelprov directory "
            f"on this node ({user_dir}); pack it yourself with `kernelprov pack --format squashfs`, or use .tar.zst."
        )
    return user_dir


def _still_usable(entry: cache.CacheEntry) -> bool:
    """An image whose FUSE daemon died (job end, node cleanup) must be mounted again."""
    return entry.mode != "mounted" or image.is_alive(entry.prefix)


def _stage_image_locked(archive: Path, st: os.stat_result, manifest, user_dir: Path, key: str, progress) -> Path:
    """Copy the image to local disk and mount it at its baked mount point (or unsquashfs there)."""
    mount_point = Path(manifest.dest_prefix)
    if manifest.size != st.st_size:
        raise ArchiveError(f"{archive} is {st.st_size} bytes but its manifest records {manifest.size}; re-create it with `kernelprov pack`.")
    # An older version of the same env may still sit at the mount point.
    for entry in cache.entries(user_dir):
        if entry.prefix == mount_point and entry.key != key:
            if entry.in_use:
                raise CacheError(
                    f"An older version of {archive.name} is mounted at {mount_point} and used by {entry.in_use} running "
                    "kernel(s); shut them down, then start this kernel again."
                )
            cache.remove_entry(user_dir, entry.key)
    image.clear_mount_point(mount_point)  # stale leftovers: no marker vouches for them
    _ensure_space(archive, st, None, user_dir, key)
    copy = user_dir / f"{key}.squashfs"
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{key}-", dir=user_dir))
    try:
        digest = image.copy_image(archive, staging / "image.squashfs", progress)
        _check_unchanged(archive, st)
        if manifest.sha256 and digest != manifest.sha256:
            raise ArchiveError(f"{archive} does not match its manifest's sha256 (corrupt or replaced); re-create it with `kernelprov pack`.")
        os.rename(staging / "image.squashfs", copy)
        if image.mount(copy, mount_point):
            mode = "mounted"
        else:
            image.extract_image(copy, staging / "env", archive)
            os.rename(staging / "env", mount_point)
            copy.unlink()
            mode = "extracted"
    except OSError as err:
        copy.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"The local disk at {user_dir} ran out of space while copying {archive.name}; free space there.") from err
        raise CacheError(f"Staging the image {archive} into {user_dir} failed: {err}.") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    cache.write_marker(user_dir, key, archive=str(archive), archive_size=st.st_size, archive_mtime_ns=st.st_mtime_ns,
                       env_bytes=st.st_size, members=0, prefix=str(mount_point), mode=mode)
    log.info("image %s %s at %s", archive, mode, mount_point)
    return mount_point


def _check_unchanged(archive: Path, before: os.stat_result) -> None:
    """Fail if the archive was replaced or rewritten while we were reading it."""
    try:
        after = os.stat(archive)
    except OSError as err:
        raise ArchiveError(f"The environment archive {archive} disappeared while it was being unpacked; try again.") from err
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
        raise ArchiveError(f"The environment archive {archive} changed while it was being unpacked; try again once it is complete.")


def user_dirs(cache_root: Path | str | None = None) -> list[Path]:
    """This user's cache dirs on this node: under the cache root, and the one holding image mounts."""
    dirs = [cache.user_cache_dir(Path(cache_root) if cache_root else cache.default_cache_root())]
    image_dir = cache.user_cache_dir(image.image_root())
    return dirs if image_dir in dirs else dirs + [image_dir]


def staged_entries(cache_root: Path | str | None = None) -> list[cache.CacheEntry]:
    """Every staged env of this user on this node, most recently used first (``kernelprov cache list``)."""
    found = [entry for user_dir in user_dirs(cache_root) for entry in cache.entries(user_dir)]
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def find_staged(archive: Path | str, *, cache_root: Path | str | None = None) -> cache.CacheEntry | None:
    """The staged copy of ``archive``'s current version (with its lease count), if this user has
    one on this node. Called by ``kernelprov list`` and the REST API; stages nothing."""
    archive = Path(archive).expanduser().absolute()
    try:
        st = os.stat(archive)
    except OSError:
        return None
    key = cache.archive_key(archive, st)
    for user_dir in user_dirs(cache_root):
        entry = cache.read_marker(user_dir, key)
        if entry is not None:
            entry.in_use = cache.count_leases(entry.prefix)
            return entry
    return None


def staging_in_progress(archive: Path | str, *, cache_root: Path | str | None = None) -> float | None:
    """When a process (a kernel start, a job prologue) began unpacking ``archive``'s current
    version on this node, or None. Called by the REST API so the panel shows "staging…" for
    stages it did not start itself."""
    archive = Path(archive).expanduser().absolute()
    try:
        key = cache.archive_key(archive, os.stat(archive))
    except OSError:
        return None
    for user_dir in user_dirs(cache_root):
        started = [p.stat().st_mtime for p in user_dir.glob(f".staging-{key}-*")]
        if not started:
            continue
        try:
            with cache.key_lock(user_dir, key, timeout=0):
                return None  # nobody holds the lock: leftovers of a killed stage
        except Timeout:
            return min(started)
    return None


def evict(archive: Path | str, *, cache_root: Path | str | None = None) -> cache.CacheEntry:
    """Remove the staged copy of ``archive``; refuse while a kernel uses it.

    Called by the panel's Evict action (through the REST API).
    """
    entry = find_staged(archive, cache_root=cache_root)
    if entry is None:
        raise CacheError(f"{Path(archive).name} is not staged on this node.")
    if entry.in_use:
        raise CacheError(
            f"{entry.name} is in use by {entry.in_use} running kernel(s); shut them down before evicting it."
        )
    gone = cache.try_evict(_marker_dir(entry, cache_root), entry.key)
    if gone is None:
        raise CacheError(f"{entry.name} is being staged or just started a kernel; try again in a moment.")
    return gone


def _marker_dir(entry: cache.CacheEntry, cache_root) -> Path:
    return next(d for d in user_dirs(cache_root) if cache.marker_path(d, entry.key).exists())


def clean(*, cache_root: Path | str | None = None) -> list[cache.CacheEntry]:
    """Evict every staged env of this user that no kernel uses and nobody is staging; return them.

    Called by ``kernelprov cache clean``; also removes leftovers of killed stages and evictions.
    """
    evicted = []
    for user_dir in user_dirs(cache_root):
        for entry in cache.entries(user_dir):
            gone = None if entry.in_use else cache.try_evict(user_dir, entry.key)
            if gone is None:
                log.info("keeping %s: in use by %s kernel(s) or being staged", entry.prefix, entry.in_use)
            else:
                evicted.append(gone)
        leftovers = {p.name.split("-")[1] for p in user_dir.glob(".staging-*-*")} | cache.unmarked_keys(user_dir)
        for leftover in leftovers:
            cache.try_evict(user_dir, leftover)
    return evicted
