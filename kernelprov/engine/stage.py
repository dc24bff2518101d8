"""``ensure_staged(archive) -> StagedEnv``: the one entry point that turns an archive into a prefix.

Called by the provisioner (in a worker thread, at every kernel start), by ``run.sh`` through
``kernelprov unpack`` when no provisioner is in play, by ``kernelprov unpack`` for job prologues,
and by the REST API's pre-warm. It reads as the story of a start: open the user's private dir
through a chain of directories nobody else can change (:mod:`.securedir`); reuse a marked env (a
warm start is that walk, a ``stat`` and a marker read); otherwise take the archive's lock, look again,
clear what a killed stage left, stage (:mod:`.unpack` for tar/zip, :mod:`.image_stage` for
squashfs), and keep the cache within its budget (:mod:`.space`). Only a marked env is ever
reused, so a crash or kill at any point leaves nothing a later start would trust.

``run.sh`` pays for this module's imports at every kernel start, so it imports only what a warm
start runs (the private-dir chain, the marker, the lock, the lease); the stagers, format
detection, manifests and the budget are imported on the way to a stage, where their cost
disappears in the unpack's (``tests/test_warm_unpack.py`` keeps it so).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CacheError, KernelprovError
from . import cache, failures
from .archive import check_allowed, stat_archive
from .leases import write_lease
from .locks import LockTimeout, key_lock
from .logs import get_logger
from .records import ProgressFile

log = get_logger(__name__)

#: How long a start waits for another process that is staging the same archive.
DEFAULT_LOCK_TIMEOUT = 1800.0

#: ``progress(done, total)``: archive bytes read so far (the same as :data:`.streams.ProgressCallback`,
#: spelled out so that a warm start need not import the stream machinery).
ProgressCallback = Callable[[int, int], None]


class StagedEnv(cache.SlotRecord):
    """A published env ready to run kernels: returned by :func:`ensure_staged`."""

    __slots__ = ("prefix", "key", "archive", "extracted", "seconds", "lease")

    def __init__(self, prefix: Path, key: str, archive: Path, extracted: bool, seconds: float, lease: Path | None = None):
        self.prefix, self.key, self.archive = prefix, key, archive
        self.extracted = extracted  # True when this call unpacked it; False when it reused a staged copy
        self.seconds = seconds
        #: The lease taken for the caller (``lease=`` of :func:`ensure_staged`), else None
        self.lease = lease

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"


def ensure_staged(
    archive: Path | str,
    *,
    cache_root: Path | str | None = None,
    progress: ProgressCallback | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    max_bytes: int = 0,
    allowed_roots: list[str] | None = None,
    max_unpacked_bytes: int = 0,
    lease: str | None = None,
) -> StagedEnv:
    """Return the staged env for ``archive``, unpacking it into the user's cache if needed.

    Safe to call from many processes and threads at once: one extracts, the others wait on the
    archive's lock and then reuse its result. After a fresh unpack, least-recently-used envs that
    no kernel uses are evicted until the cache fits ``max_bytes`` (0: no budget). Archives outside
    ``allowed_roots`` (when given) are refused. An archive without a manifest may unpack to at most
    ``max_unpacked_bytes`` (0: automatic). With ``lease`` (a lease file name, ``"<pid>[.<tag>]"``)
    the env is leased for that process before it is handed out, under the key lock that eviction
    takes, so no Evict or clean can remove it before the kernel holds its own lease. Raises
    :class:`~kernelprov.errors.KernelprovError` subclasses whose message a researcher can act on.
    """
    started = time.monotonic()
    archive = Path(archive).expanduser().absolute()
    if allowed_roots:
        check_allowed(archive, allowed_roots)
    st = stat_archive(archive)
    root = Path(cache_root) if cache_root else cache.default_cache_root()
    with cache.user_cache_dir(root) as user_dir:
        version = cache.archive_key(archive, st)
        try:
            staged = _staged_and_leased(user_dir, archive, st, started, progress, lock_timeout, max_bytes,
                                        max_unpacked_bytes, lease)
        except KernelprovError as err:
            failures.record_failure(user_dir, version, str(err))  # the panel shows it until a stage works
            raise
        failures.clear_failure(user_dir, version)
        return staged


def _staged_and_leased(user_dir, archive: Path, st, started: float, progress: ProgressCallback | None,
                       lock_timeout: float, max_bytes: int, max_unpacked_bytes: int, lease: str | None) -> StagedEnv:
    """Find or stage the env, then lease it when asked; an eviction between the two stages again."""
    for _attempt in range(3):
        staged = _find_or_stage(user_dir, archive, st, started, progress, lock_timeout, max_bytes, max_unpacked_bytes)
        if lease is None:
            return staged
        taken = _take_lease(user_dir, staged, lease, lock_timeout)
        if taken is not None:
            staged.lease = taken
            return staged
    raise CacheError("The env was evicted while starting, three times.",
                     f"{archive} was evicted while a kernel was starting from it, three times; try again.")


def _take_lease(user_dir, staged: StagedEnv, name: str, lock_timeout: float) -> Path | None:
    """Lease ``staged`` for ``name`` under its key lock, if it is still published (else None:
    an eviction won the race, and the caller stages again)."""
    try:
        with key_lock(user_dir, staged.key, lock_timeout):
            if cache.read_marker(user_dir, staged.key) is None:
                return None
            return write_lease(staged.prefix, name)
    except LockTimeout:
        raise CacheError("Timed out waiting for the env's lock.",
                         f"Timed out after {lock_timeout:.0f} s waiting for the lock of {staged.prefix}; try again.") from None


def _find_or_stage(user_dir, archive: Path, st, started: float, progress: ProgressCallback | None,
                   lock_timeout: float, max_bytes: int, max_unpacked_bytes: int) -> StagedEnv:
    """One pass of :func:`ensure_staged` in the open user dir: reuse, or lock and stage."""
    key = cache.archive_key(archive, st)
    reused = _reuse(user_dir, key, archive, started)
    if reused is not None:
        return reused
    # Not reusable as a tree: from here on this start stages (or waits for one that does), and
    # imports what staging needs.
    from .formats import detect_format, is_image

    slot = image_manifest = None
    if is_image(detect_format(archive)):
        from .image_stage import image_slot
        from .manifest import read_manifest

        # An image's key is its checked baked mount point, which its lock and marker share.
        image_manifest = read_manifest(archive)
        slot = image_slot(archive, image_manifest)
        key = slot.key
        reused = _reuse(user_dir, key, archive, started, slot=slot, st=st, manifest=image_manifest)
        if reused is not None:
            return reused
    try:
        with key_lock(user_dir, key, lock_timeout):
            # another process may just have staged it
            reused = _reuse(user_dir, key, archive, started, slot=slot, st=st, manifest=image_manifest)
            if reused is not None:
                return reused
            if slot is None:
                cache.remove_unpublished(user_dir, key)
            # Every process of this user can follow the stage through <key>.progress while we
            # hold the lock (inventory.staging_progress); it goes when the stage ends either way.
            with ProgressFile(user_dir, key, st.st_size) as published:
                if slot is not None:
                    from .image_stage import stage_image

                    prefix = stage_image(archive, st, image_manifest, user_dir, slot, published.chain(progress))
                else:
                    from .unpack import stage_tree

                    prefix = stage_tree(archive, st, user_dir, key, published.chain(progress), max_unpacked_bytes)
    except LockTimeout:
        raise CacheError(
            "Another unpack of this archive took too long.",
            f"Timed out after {lock_timeout:.0f} s waiting for another process to unpack {archive}; try again, or run `kernelprov cache clean`.",
        ) from None
    finally:
        if slot is not None:
            slot.link_dir.close()
    seconds = time.monotonic() - started
    if max_bytes:
        from .space import enforce_budget

        enforce_budget(user_dir, max_bytes, keep=key)
    log.info("staged %s into %s in %.1f s", archive, prefix, seconds)
    return StagedEnv(prefix, key, archive, True, seconds)


def _reuse(user_dir, key: str, archive: Path, started: float, *, slot=None, st=None, manifest=None) -> StagedEnv | None:
    """The published env for ``key`` if it is usable as is (its use recorded), else None.

    For an image (``slot`` given) only the env of this archive, or of a byte-identical copy, and
    only while its baked mount point still points at a live mount."""
    entry = cache.read_marker(user_dir, key)
    if entry is None:
        return None
    if slot is not None:
        from .image_stage import entry_matches, still_usable

        if not (entry_matches(entry, archive, st, manifest) and still_usable(entry, slot, user_dir)):
            return None
    elif entry.mode == "mounted":
        return None  # an image's marker under a tree's key: never written by this version
    cache.touch(user_dir, key)
    return StagedEnv(entry.prefix, key, archive, False, time.monotonic() - started)
