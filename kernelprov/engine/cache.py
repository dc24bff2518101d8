"""The per-user cache on node-local disk: where it is, who owns it, and what it holds.

Called by :mod:`kernelprov.stage` to find a safe place to unpack, and by ``kernelprov cache`` to
list and clean it. Layout under the cache root (``$KERNELPROV_CACHE_DIR``, ``$SLURM_TMPDIR``,
``$TMPDIR`` or ``/tmp``)::

    kernelprov-<user>/            0700, owned by the user, never a symlink
        <key>/                    a staged env (its prefix); key = hash of archive path+size+mtime
        <key>.json                the marker: written last, only a marked env is ever reused
        <key>.lock                serialises staging and eviction of one env across processes
        <key>.leases/<random>     one per running kernel, flock'ed by it: the env is in use
        <key>.squashfs            image mode only: the image copy mounted at its baked mount point
        .staging-<key>-<random>/  extraction in progress (removed on failure or by the next start)

Keys are short on purpose: binary files can only be relocated to a prefix no longer than the
original env's path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pwd
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from filelock import FileLock, Timeout

from ..errors import CacheError
from .formats import strip_suffix
from .image import clear_mount_point

log = logging.getLogger(__name__)

CACHE_ROOT_VARIABLES = ("KERNELPROV_CACHE_DIR", "SLURM_TMPDIR", "TMPDIR")
MARKER_VERSION = 1
_KEY_LENGTH = 12
_FALLBACK_ATTEMPTS = 5
#: A lease file not named by a PID (older run.sh) counts as held this long even if unlocked.
LEASE_GRACE_SECONDS = 60.0


def default_cache_root(environ: Mapping[str, str] | None = None, variables: Sequence[str] = CACHE_ROOT_VARIABLES) -> Path:
    """Pick the cache root: ``$KERNELPROV_CACHE_DIR``, ``$SLURM_TMPDIR``, ``$TMPDIR``, then ``/tmp``.

    Called by the traitlets default of ``KernelprovConfig.cache_dir`` and by the stage engine when
    no root is configured; reads the environment at call time, never at import time.
    """
    environ = os.environ if environ is None else environ
    for name in variables:
        value = environ.get(name, "").strip()
        if value:
            return Path(value).expanduser()
    return Path("/tmp")


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _usable(path: Path) -> str | None:
    """Why ``path`` must not be used as our per-user dir, or None when it is safe."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return "is owned by another user"
    if st.st_mode & 0o077:
        return "is accessible to other users"
    return None


def user_cache_dir(root: Path) -> Path:
    """Return this user's private cache directory under ``root``, creating it ``0700``.

    Called at the start of every stage and by ``kernelprov cache``. ``os.mkdir`` never follows a
    symlink at the final component, and the result is re-checked with ``lstat``: a directory that
    another user created first (or a symlink planted there) is refused with a warning, and the
    next candidate name is tried, so a squatter cannot take over or block our kernels.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"Cannot create the kernelprov cache root {root}: {err.strerror}; set KERNELPROV_CACHE_DIR to a writable local directory.") from err
    base = f"kernelprov-{_user_name()}"
    for attempt in range(_FALLBACK_ATTEMPTS):
        candidate = root / (base if attempt == 0 else f"{base}.{attempt}")
        try:
            os.mkdir(candidate, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise CacheError(f"Cannot create a kernelprov cache in {root}: {err.strerror}; set KERNELPROV_CACHE_DIR to a writable local directory.") from err
        problem = _usable(candidate)
        if problem is None:
            return candidate
        log.warning("kernelprov cache directory %s %s; not using it", candidate, problem)
    raise CacheError(f"No safe kernelprov cache directory could be made in {root}; set KERNELPROV_CACHE_DIR to a private local directory.")


def unmarked_keys(user_dir: Path) -> set[str]:
    """Keys whose env dir or image copy is still in ``user_dir`` but whose marker is gone.

    An eviction removes the marker first, so one killed mid-delete (or a full disk while deleting)
    leaves such a tree: never trusted, but also never reused, so ``kernelprov cache clean`` sweeps
    it. Staging dirs of killed stages are found separately (``.staging-<key>-*``).
    """
    keys = set()
    for path in user_dir.iterdir():
        key = path.name.removesuffix(".squashfs").removesuffix(".leases")
        if len(key) == _KEY_LENGTH and all(c in "0123456789abcdef" for c in key) and not marker_path(user_dir, key).exists():
            keys.add(key)
    return keys


def archive_key(archive: Path, st: os.stat_result) -> str:
    """Identify one version of an archive: its real path, size and mtime (no read of its bytes)."""
    identity = f"{os.path.realpath(archive)}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:_KEY_LENGTH]


@dataclass
class CacheEntry:
    """One staged env as recorded by its marker; returned by :func:`read_marker` and :func:`entries`."""

    key: str
    prefix: Path
    archive: str
    archive_size: int
    archive_mtime_ns: int
    env_bytes: int
    members: int
    staged_at: float
    last_used: float
    in_use: int = 0  # running kernels holding a lease; filled in by entries() and count_leases()
    mode: str = "extracted"  # or "mounted": a squashfs image under squashfuse

    @property
    def name(self) -> str:
        """A readable name: the archive's file name without its archive suffixes."""
        return strip_suffix(os.path.basename(self.archive))


def marker_path(user_dir: Path, key: str) -> Path:
    return user_dir / f"{key}.json"


def read_marker(user_dir: Path, key: str) -> CacheEntry | None:
    """Return the entry for ``key`` if its env was published completely, else None."""
    path = marker_path(user_dir, key)
    try:
        with open(path) as f:
            data = json.load(f)
        last_used = os.stat(path).st_mtime
    except (OSError, ValueError):
        return None
    prefix = Path(data.get("prefix") or user_dir / key)
    if data.get("version") != MARKER_VERSION:
        return None
    if not os.path.isdir(prefix) and data.get("mode") != "mounted":  # a dead mount is remounted, not forgotten
        return None
    return CacheEntry(
        key=key,
        prefix=prefix,
        archive=data["archive"],
        archive_size=data["archive_size"],
        archive_mtime_ns=data["archive_mtime_ns"],
        env_bytes=data["env_bytes"],
        members=data["members"],
        staged_at=data["staged_at"],
        last_used=last_used,
        mode=data.get("mode", "extracted"),
    )


def write_marker(user_dir: Path, key: str, **fields) -> None:
    """Publish ``key``: written atomically, and only after its env dir was renamed into place."""
    path = marker_path(user_dir, key)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": MARKER_VERSION, "staged_at": time.time(), **fields}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def touch(user_dir: Path, key: str) -> None:
    """Record a use of ``key``: the marker's mtime is its last-used time (for eviction)."""
    try:
        os.utime(marker_path(user_dir, key))
    except OSError as err:
        log.debug("could not record use of %s: %s", key, err)


def entries(user_dir: Path) -> list[CacheEntry]:
    """Every published env in ``user_dir`` with its lease count, most recently used first."""
    found = []
    for path in user_dir.glob("*.json"):
        entry = read_marker(user_dir, path.stem)
        if entry is not None:
            entry.in_use = count_leases(entry.prefix)
            found.append(entry)
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def key_lock(user_dir: Path, key: str, timeout: float) -> FileLock:
    """The lock that serialises staging and eviction of ``key`` across processes on this node."""
    return FileLock(str(user_dir / f"{key}.lock"), timeout=timeout)


def lease_dir(prefix: Path) -> Path:
    """Where kernels running from ``prefix`` hold their leases (run.sh: ``$KERNELPROV_ENV.leases``)."""
    return Path(f"{prefix}.leases")


def count_leases(prefix: Path) -> int:
    """How many kernels hold a lease on the env at ``prefix``. Reads only: stale lease files are
    not counted, and left for :func:`prune_leases`.

    run.sh writes one lease file per kernel, named by its PID (which ``exec`` hands to the
    kernel), and holds an exclusive ``flock`` on it that the kernel inherits. A lease counts while
    its lock is held or its process is alive (between run.sh opening and locking it, or on a node
    without ``flock``); once the process is gone it is stale at once.
    """
    return sum(held for _path, held in _leases(prefix))


def prune_leases(prefix: Path) -> int:
    """Remove the stale lease files of the env at ``prefix``; return how many leases are held.

    Called by ``kernelprov cache clean`` (the cache's writers), never by listings.
    """
    held = 0
    for path, is_held in _leases(prefix):
        if is_held:
            held += 1
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return held


def _leases(prefix: Path):
    """Yield (lease file, held?) for every lease file of ``prefix``; a probe lock is released at once."""
    try:
        names = os.listdir(lease_dir(prefix))
    except FileNotFoundError:
        return
    for name in names:
        path = lease_dir(prefix) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            yield path, True
            continue
        else:
            yield path, _lease_holder_alive(name, os.fstat(fd).st_mtime)
        finally:
            os.close(fd)


def _lease_holder_alive(name: str, mtime: float) -> bool:
    """For an unlocked lease file: is the process it names still running?"""
    if not name.isdigit():
        return time.time() - mtime < LEASE_GRACE_SECONDS
    try:
        os.kill(int(name), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, just not ours to signal
    return True


def try_evict(user_dir: Path, key: str, *, min_idle: float = 0.0) -> CacheEntry | None:
    """Evict ``key`` unless it is in use, being staged, or was used less than ``min_idle`` s ago.

    Returns the evicted entry, or None when it was kept. Called by explicit eviction (CLI,
    panel) and by the size budget; the key's lock is taken so no start can hand it out meanwhile.
    """
    try:
        with key_lock(user_dir, key, timeout=0):
            entry = read_marker(user_dir, key)
            if entry is None:
                remove_unpublished(user_dir, key)
                return None
            entry.in_use = count_leases(entry.prefix)
            if entry.in_use or time.time() - entry.last_used < min_idle:
                return None
            remove_entry(user_dir, key)
            return entry
    except Timeout:
        log.info("not evicting %s: it is being staged right now", key)
        return None


def remove_unpublished(user_dir: Path, key: str) -> None:
    """Delete leftovers of ``key`` that no marker vouches for (a killed or failed stage).

    Called with the key's lock held, so no other process is staging it right now.
    """
    for leftover in user_dir.glob(f".staging-{key}-*"):
        log.info("removing leftover staging directory %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if read_marker(user_dir, key) is not None:
        return
    env_dir = user_dir / key
    if os.path.lexists(env_dir):
        log.info("removing unpublished environment %s", env_dir)
        if os.path.islink(env_dir) or not env_dir.is_dir():
            os.unlink(env_dir)
        else:
            shutil.rmtree(env_dir, ignore_errors=True)
    shutil.rmtree(lease_dir(env_dir), ignore_errors=True)
    image_copy = user_dir / f"{key}.squashfs"
    if os.path.lexists(image_copy):
        log.info("removing unpublished image copy %s", image_copy)
        os.unlink(image_copy)


def remove_entry(user_dir: Path, key: str) -> None:
    """Evict a staged env: the marker goes first so that nothing trusts a half-deleted tree."""
    entry = read_marker(user_dir, key)
    prefix = entry.prefix if entry is not None else user_dir / key
    try:
        os.unlink(marker_path(user_dir, key))
    except FileNotFoundError:
        pass
    if entry is not None and entry.mode == "mounted":
        clear_mount_point(prefix)
    else:
        shutil.rmtree(prefix, ignore_errors=True)
    shutil.rmtree(lease_dir(prefix), ignore_errors=True)
    image_copy = user_dir / f"{key}.squashfs"
    if image_copy.exists():
        image_copy.unlink()
