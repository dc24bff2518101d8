"""What this user has staged on this node: find, list, evict, clean.

Called by ``kernelprov list`` / ``cache list`` / ``cache clean`` / ``doctor``, and by the panel's
server extension (every ``GET /kernelprov/envs`` describes each kernel through
:func:`find_staged`, :func:`staging_in_progress` and :func:`staging_progress`). Reading never writes: stale leases are only
counted as free here, and removed by the operations that change the cache (:func:`evict`,
:func:`clean`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CacheError, KernelprovError
from . import cache
from .formats import detect_format, is_image
from .logs import get_logger

log = get_logger(__name__)


def user_dirs(cache_root: Path | str | None = None) -> list[cache.PrivateDir]:
    """This user's cache dirs on this node (one: image mounts live there too since their mount
    points became symlinks into it)."""
    return [cache.user_cache_dir(Path(cache_root) if cache_root else cache.default_cache_root())]


def staged_entries(cache_root: Path | str | None = None) -> list[cache.CacheEntry]:
    """Every staged env of this user on this node, most recently used first (``kernelprov cache list``)."""
    found = [entry for user_dir in user_dirs(cache_root) for entry in cache.entries(user_dir)]
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def _key(archive: Path, st: os.stat_result):
    """``archive``'s cache key and, for an image, a check that an entry is really its env."""
    try:
        image = is_image(detect_format(archive))
    except (OSError, KernelprovError):
        image = False
    if not image:
        return cache.archive_key(archive, st), None
    from .image_stage import entry_matches, image_slot
    from .manifest import read_manifest

    try:
        manifest = read_manifest(archive)
        slot = image_slot(archive, manifest)
    except KernelprovError as err:
        log.debug("%s cannot be staged here: %s", archive, err)  # staging it says so in one sentence
        return None, None
    slot.link_dir.close()
    return slot.key, lambda entry: entry_matches(entry, archive, st, manifest)


def find_staged(archive: Path | str, *, cache_root: Path | str | None = None) -> cache.CacheEntry | None:
    """The staged copy of ``archive``'s current version (with its lease count), if this user has
    one on this node. Called by ``kernelprov list`` and the REST API; changes nothing."""
    archive = Path(archive).expanduser().absolute()
    try:
        st = os.stat(archive)
    except OSError:
        return None
    key, matches = _key(archive, st)
    if key is None:
        return None
    for user_dir in user_dirs(cache_root):
        entry = cache.read_marker(user_dir, key)
        if entry is not None and (matches is None or matches(entry)):
            entry.in_use = cache.count_leases(entry.prefix)
            return entry
    return None


def staging_in_progress(archive: Path | str, *, cache_root: Path | str | None = None) -> float | None:
    """When a process (a kernel start, a job prologue) began unpacking ``archive``'s current
    version on this node, or None. Called by the REST API so the panel shows "staging…" for
    stages it did not start itself; :func:`staging_progress` says how far it got."""
    progress = staging_progress(archive, cache_root=cache_root)
    return None if progress is None else progress["started_at"]


def staging_progress(archive: Path | str, *, cache_root: Path | str | None = None) -> dict | None:
    """How far a process of this user (a kernel start, ``kernelprov unpack`` in a job prologue,
    the panel's Stage now) has come unpacking ``archive``'s current version on this node:
    ``{"done": bytes, "total": bytes, "started_at": epoch seconds, "pid": int or None}``, or None
    when nobody is staging it.

    Called by the provisioner while a start waits for another's stage, and by the REST API. The
    stager's ``<key>.progress`` record (:class:`.cache.ProgressFile`) is trusted only while the
    archive's lock is held and its writer lives: a kill -9 leaves it behind. Changes nothing.
    """
    archive = Path(archive).expanduser().absolute()
    try:
        st = os.stat(archive)
        key, _matches = _key(archive, st)
    except OSError:
        return None
    if key is None:
        return None
    for user_dir in user_dirs(cache_root):
        with user_dir:
            record = cache.read_progress(user_dir, key)
            started = _mtimes(user_dir.glob(f".staging-{key}-*"))
            if record is None and not started:
                continue
            try:
                with cache.key_lock(user_dir, key, timeout=0):
                    continue  # nobody holds the lock: leftovers of a killed stage
            except cache.LockTimeout:
                pass
            if record is not None and _alive(record["pid"]):
                return record
            if started:  # a stage that has not reported yet (or could not write its record)
                return {"done": 0, "total": st.st_size, "started_at": min(started), "pid": None}
    return None


def _mtimes(paths) -> list[float]:
    """The mtimes of ``paths`` that still exist (a staging dir is renamed away when it publishes)."""
    found = []
    for path in paths:
        try:
            found.append(path.stat().st_mtime)
        except FileNotFoundError:
            continue
    return found


def _alive(pid: int) -> bool:
    """Is process ``pid`` still running (a record's writer may have been killed, and its lock
    since taken by an eviction)?"""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False  # gone, or its number reused by another user's process: not our writer
    return True


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


def _marker_dir(entry: cache.CacheEntry, cache_root) -> cache.PrivateDir:
    return next(d for d in user_dirs(cache_root) if cache.marker_path(d, entry.key).exists())


def clean(*, cache_root: Path | str | None = None) -> list[cache.CacheEntry]:
    """Evict every staged env of this user that no kernel uses and nobody is staging; return them.

    Called by ``kernelprov cache clean``; also removes stale leases and the leftovers of killed
    stages and evictions.
    """
    evicted = []
    for user_dir in user_dirs(cache_root):
        for entry in cache.entries(user_dir):
            cache.prune_leases(entry.prefix)
            gone = None if entry.in_use else cache.try_evict(user_dir, entry.key)
            if gone is None:
                log.info("keeping %s: in use by %s kernel(s) or being staged", entry.prefix, entry.in_use)
            else:
                evicted.append(gone)
        leftovers = {p.name.split("-")[1] for p in user_dir.glob(".staging-*-*")} | cache.unmarked_keys(user_dir)
        for leftover in leftovers:
            cache.try_evict(user_dir, leftover)
    return evicted
