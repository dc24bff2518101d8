"""Room on the node-local disk: free-space checks, LRU eviction, the cache's size budget.

Called by the stagers (:mod:`.unpack`, :mod:`.image_stage`) before they write anything
(:func:`ensure_space`) and when a write runs out of room (:func:`disk_full_error`), and by
:func:`.stage.ensure_staged` after a fresh unpack (:func:`enforce_budget`). Only envs that no
kernel leases and nobody used in the last few minutes are ever evicted.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Callable

from ..errors import CacheError, human_size
from . import cache
from .logs import get_logger

log = get_logger(__name__)

#: The size budget never evicts an env used this recently: a kernel may be starting from it.
BUDGET_MIN_IDLE_SECONDS = 300.0
#: What every "no room" message tells the user to do.
_FREE_SPACE_HINT = "free space there (`kernelprov cache clean`) or set KERNELPROV_CACHE_DIR to a larger local directory"


__all__ = ["BUDGET_MIN_IDLE_SECONDS", "disk_full_error", "enforce_budget", "ensure_space", "evict_idle", "human_size",
           "is_disk_full"]  # human_size: errors' one helper, still reachable here


def evict_idle(user_dir: Path, *, keep: str, min_idle: float, enough: Callable[[], bool]) -> list[cache.CacheEntry]:
    """Evict least-recently-used, unleased envs (never ``keep``) until ``enough()`` holds."""
    evicted = []
    for entry in reversed(cache.entries(user_dir)):
        if enough():
            break
        if entry.key != keep and not entry.in_use:
            gone = cache.try_evict(user_dir, entry.key, min_idle=min_idle)
            if gone is not None:
                log.info("evicted %s (%s, last used %s)", gone.prefix, human_size(gone.env_bytes), time.ctime(gone.last_used))
                evicted.append(gone)
    return evicted


def enforce_budget(user_dir: Path, max_bytes: int, *, keep: str) -> list[cache.CacheEntry]:
    """Evict LRU envs that no kernel uses until this user's cache holds at most ``max_bytes``."""
    def fits() -> bool:
        return sum(e.env_bytes for e in cache.entries(user_dir)) <= max_bytes

    return evict_idle(user_dir, keep=keep, min_idle=BUDGET_MIN_IDLE_SECONDS, enough=fits)


def ensure_space(archive: Path, st: os.stat_result, manifest, user_dir: Path, key: str) -> None:
    """Fail before writing anything when the local disk cannot hold the env (bytes or inodes),
    after first evicting idle envs to make room. ``manifest`` None: the archive's size is the floor."""
    if manifest is not None and manifest.unpacked_bytes is not None:
        members = manifest.members or 0
        # File data plus, on average, half a 4 KiB block of slack per entry.
        needed_bytes, needed_inodes = manifest.unpacked_bytes + members * 2048, members
    else:
        needed_bytes, needed_inodes = st.st_size, 0  # unknown; an env is never smaller than its archive

    def enough() -> bool:
        vfs = os.statvfs(user_dir)
        return vfs.f_bavail * vfs.f_frsize >= needed_bytes and (not vfs.f_files or vfs.f_favail >= needed_inodes)

    if enough() or (evict_idle(user_dir, keep=key, min_idle=BUDGET_MIN_IDLE_SECONDS, enough=enough) and enough()):
        return
    vfs = os.statvfs(user_dir)
    raise CacheError(
        "The local disk has too little room.",
        f"Not enough space in {user_dir} to unpack {archive.name}: it needs about {human_size(needed_bytes)} and "
        f"{needed_inodes:,} files, but only {human_size(vfs.f_bavail * vfs.f_frsize)} and {vfs.f_favail:,} files are free; "
        f"{_FREE_SPACE_HINT}.",
    )


def is_disk_full(err: OSError) -> bool:
    """Did a write fail because the disk (or the user's quota) is full?"""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(user_dir: Path, archive: Path, err: OSError, *, doing: str = "unpacking", needed: int | None = None) -> CacheError:
    """The one message for a disk that filled up mid-stage; the caller has removed what it wrote."""
    return CacheError(
        "The local disk ran out of space.",
        f"The local disk at {user_dir} ran out of space while {doing} {archive.name}"
        + (f" (it needs about {human_size(needed)})" if needed else "")
        + f"; {_FREE_SPACE_HINT}.",
    )
