"""The per-user cache on node-local disk: where it is, who owns it, and what it holds.

Called by :func:`.stage.ensure_staged` at every start (open the user's dir, find the marker, touch
it), by :mod:`.unpack` and :mod:`.image_stage` to publish, by :mod:`.space` and
:mod:`.inventory` to evict, and through them by ``kernelprov cache`` and the panel. Layout under the cache root (``$KERNELPROV_CACHE_DIR``, ``$SLURM_TMPDIR``,
``$TMPDIR`` or ``/tmp``)::

    kernelprov-<user>/            0700, owned by the user, never a symlink (or a private fallback,
                                  kernelprov-<user>.<random>, when another user squatted the name)
        <key>/                    a staged env (its prefix), or an image's mount point
        <key>.json                the marker: written last, only a marked env is ever reused
        <key>.lock                serialises staging and eviction of one env (:mod:`.locks`)
        <key>.leases/<pid>        one per running kernel, flock'ed by it: in use (:mod:`.leases`)
        <key>.squashfs            image mode only: the image copy mounted at <key>/
        <key>.progress            while <key> is being staged: bytes done of total (:mod:`.records`)
        <key>.failed              the last failed stage of that version, for the panel (:mod:`.failures`)
        .staging-<key>-<random>/  extraction in progress (removed on failure or by the next start)

A tree's key is a hash of its archive's path, size and mtime; an image's, of its baked mount
point (:mod:`.image_stage`), whose symlink points at ``<key>/``. Keys are short on purpose:
binary files can only be relocated to a prefix no longer than the original env's path.

The directory is verified and held open (:class:`.securedir.PrivateDir`); everything that changes
it — staging dirs, publishing, markers, locks, eviction — works relative to that descriptor.

A warm start imports this module, so it imports only what the warm start uses; what eviction
alone needs (:mod:`shutil`, :mod:`.image`'s mount checks) is imported where it is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import CacheError
# Leases, locks and records are their own modules; the names callers (inventory, the tests)
# always found here stay reachable here.
from .leases import LEASE_GRACE_SECONDS, count_leases, lease_dir, prune_leases  # noqa: F401
from .locks import KeyLock, LockTimeout, key_lock  # noqa: F401
from .logs import get_logger
from .records import progress_name, read_progress  # noqa: F401
from .securedir import PrivateDir, as_private, open_private_dir, private_dir_in, remove_tree, user_name  # noqa: F401

# The key's sha256 without hashlib: importing hashlib loads OpenSSL (~4 ms of a ~60 ms warm start
# that run.sh pays at every kernel start); CPython's builtin sha256 gives the same digest.
try:
    from _sha2 import sha256 as _sha256  # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256 as _sha256  # CPython <= 3.11
    except ImportError:  # pragma: no cover - an interpreter without the builtin
        from hashlib import sha256 as _sha256

log = get_logger(__name__)

CACHE_ROOT_VARIABLES = ("KERNELPROV_CACHE_DIR", "SLURM_TMPDIR", "TMPDIR")
MARKER_VERSION = 1
_KEY_LENGTH = 12


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


def user_cache_dir(root: Path) -> PrivateDir:
    """Return this user's private cache directory under ``root``, creating it ``0700``, held open.

    Called at the start of every stage and by ``kernelprov cache``. The root and every directory
    above it must be changeable by nobody but the user and root (sticky ones such as ``/tmp``
    excepted); a ``kernelprov-<user>`` that another user created first, or a symlink planted
    there, is refused with a warning and the user's unguessable private fallback is used instead
    (:func:`.securedir.private_dir_in`).
    """
    try:
        return private_dir_in(Path(root), f"kernelprov-{user_name()}", fallback=True)
    except CacheError:
        raise
    except OSError as err:
        raise CacheError(f"Cannot create a kernelprov cache in {root}: {err.strerror}; set KERNELPROV_CACHE_DIR to a writable local directory.") from err


def unmarked_keys(user_dir: Path) -> set[str]:
    """Keys whose env dir or image copy is still in ``user_dir`` but whose marker is gone.

    An eviction removes the marker first, so one killed mid-delete (or a full disk while deleting)
    leaves such a tree: never trusted, but also never reused, so ``kernelprov cache clean`` sweeps
    it. Staging dirs of killed stages are found separately (``.staging-<key>-*``).
    """
    keys = set()
    for path in Path(user_dir).iterdir():
        key = path.name.removesuffix(".squashfs").removesuffix(".leases").removesuffix(".progress")
        if len(key) == _KEY_LENGTH and all(c in "0123456789abcdef" for c in key) and not marker_path(user_dir, key).exists():
            keys.add(key)
    return keys


def archive_key(archive: Path, st: os.stat_result) -> str:
    """Identify one version of an archive: its real path, size and mtime (no read of its bytes)."""
    return short_hash(f"{os.path.realpath(archive)}\0{st.st_size}\0{st.st_mtime_ns}")


def short_hash(identity: str) -> str:
    """A cache key: the first hex digits of ``identity``'s sha256."""
    return _sha256(identity.encode()).hexdigest()[:_KEY_LENGTH]


class SlotRecord:
    """Equality and repr from ``__slots__``, as a dataclass gives them: the base of the engine's
    records that every warm start makes (:class:`CacheEntry`, :class:`.stage.StagedEnv`), where
    importing :mod:`dataclasses` (and building the class) cost more than everything else the
    start does. Mutable, so unhashable, as those dataclasses were."""

    __slots__ = ()
    __hash__ = None

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in self.__slots__)})"


class CacheEntry(SlotRecord):
    """One staged env as recorded by its marker; returned by :func:`read_marker` and :func:`entries`."""

    __slots__ = ("key", "prefix", "archive", "archive_size", "archive_mtime_ns", "env_bytes", "members", "staged_at",
                 "last_used", "in_use", "mode", "image_sha256")
    def __init__(self, key: str, prefix: Path, archive: str, archive_size: int, archive_mtime_ns: int, env_bytes: int,
                 members: int, staged_at: float, last_used: float, in_use: int = 0, mode: str = "extracted",
                 image_sha256: str | None = None):
        self.key, self.prefix, self.archive = key, prefix, archive
        self.archive_size, self.archive_mtime_ns = archive_size, archive_mtime_ns
        self.env_bytes, self.members, self.staged_at, self.last_used = env_bytes, members, staged_at, last_used
        self.in_use = in_use  # running kernels holding a lease; filled in by entries() and count_leases()
        self.mode = mode  # or "mounted": a squashfs image under squashfuse
        self.image_sha256 = image_sha256  # image mode: which image the baked mount point serves

    @property
    def name(self) -> str:
        """A readable name: the archive's file name without its archive suffixes."""
        from .formats import strip_suffix  # formats builds its table with dataclasses: not on the warm path

        return strip_suffix(os.path.basename(self.archive))


def marker_path(user_dir: Path, key: str) -> Path:
    """Where ``key``'s marker lives (for reading; writers go through the directory's fd)."""
    return Path(user_dir) / f"{key}.json"


def read_marker(user_dir: Path, key: str) -> CacheEntry | None:
    """Return the entry for ``key`` if its env was published completely, else None.

    A marker dated in the future (the clock was stepped back) counts as used now, never later.
    """
    path = marker_path(user_dir, key)
    try:
        with open(path) as f:
            data = json.load(f)
        last_used = min(os.stat(path).st_mtime, time.time())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != MARKER_VERSION:
        return None
    prefix = Path(data.get("prefix") or Path(user_dir) / key)
    # The env itself is always <user dir>/<key> (an image's baked prefix is a symlink to it, which
    # a wiped runtime dir may have lost); a dead mount is remounted, not forgotten.
    # (Never stat a mount here: a hung FUSE daemon would hang the caller.)
    if data.get("mode") != "mounted" and not os.path.isdir(Path(user_dir) / key):
        return None
    try:
        return CacheEntry(
            key=key, prefix=prefix, archive=data["archive"], archive_size=data["archive_size"],
            archive_mtime_ns=data["archive_mtime_ns"], env_bytes=data["env_bytes"], members=data["members"],
            staged_at=data["staged_at"], last_used=last_used, mode=data.get("mode", "extracted"),
            image_sha256=data.get("image_sha256"),
        )
    except KeyError:
        return None


def make_staging(user_dir: PrivateDir, key: str) -> Path:
    """Create a fresh ``.staging-<key>-<random>`` dir (``0700``) in ``user_dir``; return its path."""
    import secrets  # a cold stage only

    for _attempt in range(8):
        name = f".staging-{key}-{secrets.token_hex(6)}"
        try:
            os.mkdir(name, 0o700, dir_fd=user_dir.fd)
            return user_dir.path / name
        except FileExistsError:
            continue
    raise CacheError(f"Cannot create a staging directory in {user_dir}.")


def publish(user_dir: PrivateDir, staged_name: str, key: str) -> Path:
    """Rename ``staged_name`` (inside ``user_dir``) to ``key``, through the directory's fd."""
    os.rename(staged_name, key, src_dir_fd=user_dir.fd, dst_dir_fd=user_dir.fd)
    return user_dir.path / key


def write_marker(user_dir: PrivateDir, key: str, **fields) -> None:
    """Publish ``key``: written atomically, and only after its env dir was renamed into place."""
    user_dir = as_private(user_dir)
    tmp = f"{key}.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=user_dir.fd)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": MARKER_VERSION, "staged_at": time.time(), **fields}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, f"{key}.json", src_dir_fd=user_dir.fd, dst_dir_fd=user_dir.fd)


def touch(user_dir: PrivateDir | Path, key: str) -> None:
    """Record a use of ``key``: the marker's mtime is its last-used time (for eviction)."""
    try:
        if isinstance(user_dir, PrivateDir):
            os.utime(f"{key}.json", dir_fd=user_dir.fd, follow_symlinks=False)
        else:
            os.utime(marker_path(user_dir, key), follow_symlinks=False)
    except OSError as err:
        log.debug("could not record use of %s: %s", key, err)


def entries(user_dir: Path) -> list[CacheEntry]:
    """Every published env in ``user_dir`` with its lease count, most recently used first."""
    found = []
    for path in Path(user_dir).glob("*.json"):
        entry = read_marker(user_dir, path.stem)
        if entry is not None:
            entry.in_use = count_leases(entry.prefix)
            found.append(entry)
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def try_evict(user_dir: PrivateDir | Path, key: str, *, min_idle: float = 0.0) -> CacheEntry | None:
    """Evict ``key`` unless it is in use, being staged, or was used less than ``min_idle`` s ago.

    Returns the evicted entry, or None when it was kept. Called by explicit eviction (CLI,
    panel) and by the size budget; the key's lock is taken so no start can hand it out meanwhile.
    A marker dated in the future (clock stepped back) is re-dated to now, so it ages from here.
    """
    user_dir = as_private(user_dir)
    try:
        with key_lock(user_dir, key, timeout=0):
            entry = read_marker(user_dir, key)
            if entry is None:
                remove_unpublished(user_dir, key)
                return None
            _undo_future_date(user_dir, key)
            entry.in_use = count_leases(entry.prefix)
            if entry.in_use or time.time() - entry.last_used < min_idle:
                return None
            remove_entry(user_dir, key)
            return entry
    except LockTimeout:
        log.info("not evicting %s: it is being staged right now", key)
        return None


def _undo_future_date(user_dir: PrivateDir, key: str) -> None:
    try:
        if os.stat(f"{key}.json", dir_fd=user_dir.fd, follow_symlinks=False).st_mtime > time.time() + 1:
            log.info("the marker of %s is dated in the future (clock stepped back); dating it now", key)
            os.utime(f"{key}.json", dir_fd=user_dir.fd, follow_symlinks=False)
    except OSError as err:
        log.debug("could not check the date of %s: %s", key, err)


def remove_unpublished(user_dir: PrivateDir | Path, key: str) -> None:
    """Delete leftovers of ``key`` that no marker vouches for (a killed or failed stage).

    Called with the key's lock held, so no other process is staging it right now.
    """
    user_dir = as_private(user_dir)
    for leftover in Path(user_dir).glob(f".staging-{key}-*"):
        log.info("removing leftover staging directory %s", leftover)
        remove_name(user_dir, leftover.name)
    for name in (progress_name(key), f"{progress_name(key)}.tmp"):  # a killed stage's last progress
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=user_dir.fd)
    if read_marker(user_dir, key) is not None:
        return
    for name in (key, f"{key}.leases", f"{key}.squashfs"):
        if remove_name(user_dir, name):
            log.info("removing unpublished %s", user_dir / name)


def remove_name(user_dir: PrivateDir, name: str) -> bool:
    """Remove the entry ``name`` of ``user_dir`` (a file, a symlink, a tree, a mount point) through
    the directory's fd, never following a symlink. Returns whether something was there."""
    if not name or "/" in name or name in (".", ".."):
        raise CacheError(f"Refusing to remove {name!r} from {user_dir}: not a plain name.")
    from .image import detach_mount, is_mounted  # eviction only: image imports subprocess

    path = user_dir.path / name
    if is_mounted(path):
        detach_mount(path)
    try:
        st = os.stat(name, dir_fd=user_dir.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        remove_tree(user_dir.fd, name)
    else:
        os.unlink(name, dir_fd=user_dir.fd)
    return True


def remove_entry(user_dir: PrivateDir | Path, key: str) -> None:
    """Evict a staged env: the marker goes first so that nothing trusts a half-deleted tree.

    Everything it removes is inside ``user_dir``, reached through its fd; for an image, also the
    mount point's symlink (only while it still points here) and its leases, in the private dir
    that holds it.
    """
    user_dir = as_private(user_dir)
    entry = read_marker(user_dir, key)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{key}.json", dir_fd=user_dir.fd)
    for name in (key, f"{key}.leases", f"{key}.squashfs"):
        remove_name(user_dir, name)
    if entry is not None and entry.prefix != user_dir.path / key:
        _remove_image_link(entry.prefix, user_dir.path / key)


def _remove_image_link(link: Path, target: Path) -> None:
    """Remove an image's baked mount point (a symlink to ``target``) and its lease dir."""
    try:
        link_dir = open_private_dir(link.parent, what="image mount point directory")
    except (CacheError, OSError) as err:
        log.warning("not removing %s: %s", link, err)
        return
    with link_dir:
        try:
            if os.readlink(link.name, dir_fd=link_dir.fd) == str(target):
                os.unlink(link.name, dir_fd=link_dir.fd)
        except OSError:
            pass
        remove_name(link_dir, f"{link.name}.leases")
