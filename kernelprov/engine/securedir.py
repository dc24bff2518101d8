"""Private directories reached without trusting a path: the cache root's chain and the per-user dir.

Called by :func:`.cache.user_cache_dir` (every stage, every ``kernelprov cache`` command) and by
:mod:`.image_stage` for the directory holding image mount points. A directory is only trusted
when nobody but its user and root can change it or any directory above it (a sticky directory
such as ``/tmp`` counts as safe: others may add names there, but cannot rename or remove ours).
It is then opened one component at a time from ``/`` with ``O_NOFOLLOW`` and held open as a
:class:`PrivateDir`, so that later steps (staging, publishing, marking, evicting) work relative
to that descriptor and no path swapped in afterwards can redirect them.

When another user squatted ``kernelprov-<user>``, a private fallback with an unpredictable name
(``kernelprov-<user>.<8 hex digits>``) is made beside it. It is found again by its owner: only
the user can create a directory that the user owns, so neither a guessed nor a flood of decoy
names can capture or exhaust it.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from pathlib import Path

from ..errors import CacheError
from .logs import get_logger

log = get_logger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FALLBACK_HEX = 8  # short: every character of the prefix must fit into relocated binaries
_ADVICE = "set KERNELPROV_CACHE_DIR to a directory on a local disk that only you (or root) can change"


class PrivateDir(os.PathLike):
    """A directory verified to be ours and private, held open by ``fd``.

    Returned by :func:`.cache.user_cache_dir` and :func:`open_private_dir`. It behaves like its
    :class:`~pathlib.Path` for reading (``/``, ``glob``, ``name``...); writers use :attr:`fd`.
    """

    def __init__(self, path: Path, fd: int):
        self.path = Path(path)
        self.fd = fd

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"PrivateDir({str(self.path)!r}, fd={self.fd})"

    def __truediv__(self, name) -> Path:
        return self.path / name

    def __eq__(self, other) -> bool:
        if isinstance(other, (PrivateDir, os.PathLike, str)):
            return os.fspath(self) == os.fspath(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self.path))

    def __getattr__(self, name):
        if name in ("path", "fd"):
            raise AttributeError(name)
        return getattr(self.path, name)

    def close(self) -> None:
        """Release the descriptor (also done when the object is garbage collected)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> PrivateDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "fd", -1) >= 0:
            self.close()


def user_name() -> str:
    """This process's user name (its uid where the passwd database does not know it)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _group_is_private(gid: int) -> bool:
    """Is ``gid`` root's group, or this user's own private group with nobody else in it?"""
    if gid == 0:
        return True
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == os.getgid() and group.gr_name == user_name() and set(group.gr_mem) <= {user_name()}


def _untrusted(st: os.stat_result) -> str | None:
    """Why another user could change the directory ``st`` describes, or None."""
    if st.st_uid not in (0, os.getuid()):
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        return f"is owned by another user ({owner})"
    if st.st_mode & stat.S_ISVTX:
        return None  # others may add entries, but never rename or remove ours
    if st.st_mode & stat.S_IWOTH:
        return "can be written by every user"
    if st.st_mode & stat.S_IWGRP and not _group_is_private(st.st_gid):
        return "can be written by other members of its group"
    return None


def open_trusted_dir(path: Path | str, *, create: bool, what: str = "kernelprov cache root") -> tuple[Path, int]:
    """Open ``path`` (its real path) from ``/``, one component at a time, refusing symlinks and any
    directory another user could change; create missing components ``0755`` when ``create``.

    Returns the real path and an open descriptor; the caller closes it. Raises
    :class:`CacheError` naming the first untrusted directory.
    """
    real = Path(os.path.realpath(path))
    fd = os.open("/", _DIR_FLAGS)
    current = Path("/")
    try:
        for part in real.parts[1:]:
            problem = _untrusted(os.fstat(fd))
            if problem:
                raise CacheError(f"The {what} {real} is unsafe: {current} {problem}, so they could replace your environments; {_ADVICE}.")
            current = current / part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CacheError(f"The {what} {real} is unsafe: {current} changed into a symbolic link or file while it was opened; {_ADVICE}.") from err
                raise
            os.close(fd)
            fd = child
        problem = _untrusted(os.fstat(fd))
        if problem:
            raise CacheError(f"The {what} {real} is unsafe: it {problem}, so they could replace your environments; {_ADVICE}.")
        return real, fd
    except BaseException:
        os.close(fd)
        raise


def _private_problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return "is owned by another user"
    if st.st_mode & 0o077:
        return "is accessible to other users"
    return None


def open_private_child(parent_fd: int, name: str, *, create: bool) -> tuple[int | None, str | None]:
    """Open (making it ``0700`` when ``create``) the directory ``name`` in ``parent_fd``.

    Returns ``(fd, None)`` when it is a real directory owned by us and closed to others, else
    ``(None, why not)``; never follows a symlink.
    """
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None, "does not exist"
    problem = _private_problem(st)
    if problem:
        return None, problem
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as err:
        return None, f"cannot be opened ({err.strerror})"
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or _private_problem(opened):
        os.close(fd)
        return None, "was replaced while it was opened"
    return fd, None


def open_private_dir(path: Path | str, *, what: str = "kernelprov directory") -> PrivateDir:
    """Open an existing private directory of ours by path, through a trusted chain.

    Called for directories recorded by kernelprov itself (a marker's prefix, a test's
    ``prefix.parent``) before anything in them is changed.
    """
    path = Path(os.path.realpath(path))
    parent_path, parent_fd = open_trusted_dir(path.parent, create=False, what=what)
    try:
        fd, problem = open_private_child(parent_fd, path.name, create=False)
    finally:
        os.close(parent_fd)
    if fd is None:
        raise CacheError(f"The {what} {path} {problem}; {_ADVICE}.")
    return PrivateDir(parent_path / path.name, fd)


def as_private(user_dir: PrivateDir | Path | str) -> PrivateDir:
    """``user_dir`` held open: a :class:`PrivateDir` as is, a path opened and verified first
    (:func:`open_private_dir`). Called by everything in :mod:`.cache` and :mod:`.locks` that
    changes the user's dir, so callers may pass either."""
    return user_dir if isinstance(user_dir, PrivateDir) else open_private_dir(user_dir)


def private_dir_in(root: Path | str, base: str, *, fallback: bool, what: str = "kernelprov cache root") -> PrivateDir:
    """The private directory ``base`` under the trusted ``root`` (created ``0700``).

    When ``base`` is squatted (another owner, a symlink, open to others) and ``fallback`` holds, the
    user's fallback ``base.<random>`` there is used, or made; without ``fallback`` that is an error.
    """
    root_path, root_fd = open_trusted_dir(root, create=True, what=what)
    try:
        fd, problem = open_private_child(root_fd, base, create=True)
        if fd is not None:
            return PrivateDir(root_path / base, fd)
        log.warning("kernelprov cache directory %s %s; not using it", root_path / base, problem)
        if not fallback:
            raise CacheError(
                f"{root_path / base} {problem}, so kernelprov cannot use it; ask the node's admin to remove it, or {_ADVICE}."
            )
        return _fallback(root_path, root_fd, base)
    finally:
        os.close(root_fd)


def _fallback(root_path: Path, root_fd: int, base: str) -> PrivateDir:
    """Find this user's fallback dir under the root by ownership, or make one with a random name."""
    import secrets  # only a squatted cache name gets here; a warm start should not pay for the import

    found = _own_fallbacks(root_fd, base)
    if not found:
        for _attempt in range(8):
            name = f"{base}.{secrets.token_hex(_FALLBACK_HEX // 2)}"
            try:
                os.mkdir(name, 0o700, dir_fd=root_fd)
                break
            except FileExistsError:
                continue
        # Two first starts racing both make one; both then settle on the same (smallest) name.
        found = _own_fallbacks(root_fd, base)
        for extra in found[1:]:
            try:
                os.rmdir(extra, dir_fd=root_fd)  # only if still empty: never another start's work
            except OSError:
                pass
    for name in found:
        fd, _problem = open_private_child(root_fd, name, create=False)
        if fd is not None:
            log.info("using the private fallback cache directory %s", root_path / name)
            return PrivateDir(root_path / name, fd)
    raise CacheError(f"No private kernelprov cache directory could be made in {root_path}; {_ADVICE}.")


def _own_fallbacks(root_fd: int, base: str) -> list[str]:
    """Names ``base.<hex>`` under the root that are directories owned by us and closed to others."""
    names = []
    with os.scandir(root_fd) as it:
        for entry in it:
            suffix = entry.name[len(base) + 1:]
            if not (entry.name.startswith(base + ".") and len(suffix) == _FALLBACK_HEX
                    and all(c in "0123456789abcdef" for c in suffix)):
                continue
            try:
                st = os.stat(entry.name, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if _private_problem(st) is None:
                names.append(entry.name)
    return sorted(names)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove the directory ``name`` of ``dir_fd`` and everything under it, never following a
    symlink, holding one directory fd at a time, without recursion.

    Called by :func:`.cache.remove_name` for every tree the engine removes (a refused or failed
    stage's staging dir, an evicted env). Why not ``shutil.rmtree``: on CPython < 3.12 it recurses
    once per directory level, and an archive may nest 2,000 directories (a 4,095-byte name of
    one-letter parts), so its cleanup died of ``RecursionError`` and left the half-made tree behind.
    Each directory is listed once; the names still to visit are kept per level (bounded by the
    tree's directory count, which the extraction's bookkeeping bound limits). What cannot be
    removed is logged and left; the caller's own check says whether the name is gone."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    # One level per open directory: [its name in its parent, the subdirectories still to visit].
    levels: list[tuple[str, list[str]]] = [(name, _empty_files_of(fd))]
    while True:
        pending = levels[-1][1]
        if pending:
            child = pending.pop()
            try:
                child_fd = os.open(child, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                log.warning("could not remove %s: %s", child, err.strerror)
                continue
            os.close(fd)
            fd = child_fd
            levels.append((child, _empty_files_of(fd)))
            continue
        done, _ = levels.pop()
        if not levels:
            os.close(fd)
            _rmdir(done, dir_fd)
            return
        parent_fd = os.open("..", _DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = parent_fd
        _rmdir(done, fd)


def _empty_files_of(fd: int) -> list[str]:
    """Unlink every non-directory in the open directory ``fd``; return its subdirectories' names."""
    subdirs = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except OSError as err:
                log.warning("could not remove %s: %s", entry.name, err.strerror)
    return subdirs


def _rmdir(name: str, dir_fd: int) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as err:
        log.warning("could not remove %s: %s", name, err.strerror)
