"""Write validated archive members under a private staging directory.

Used by :func:`kernelprov.engine.extract.extract` for every member of every format. Each member
is validated before anything is written (no absolute names, no ``..``, no links leaving the tree,
nothing written through a link or file, hard links only to regular files already written and
never chmod'ed; setuid/setgid bits dropped), directories are created once, and modes and mtimes
are set through the open file descriptor, so nothing is stat'ed twice. What an extraction may
write in all is bounded (:class:`UnpackLimits`), so a decompression bomb is refused before it
fills the node's disk.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import ArchiveError, human_size

#: Linux's limits on a whole path and on one of its components, in bytes.
_PATH_MAX, _NAME_MAX = 4095, 255

#: What one extraction may keep in memory to know what it wrote (:attr:`TreeWriter.dirs`,
#: ``symlinks``, :attr:`ExtractResult.files` — needed to refuse a member that replaces a
#: directory, is written through a link or file, or hard-links to anything but a file already
#: written, and to restore ``.py`` mtimes after relocation): every entry, explicit or a parent
#: directory made for one, costs its name's length plus :data:`BOOKKEEPING_PER_ENTRY` (CPython's
#: str and set/dict slot). A real env of 300,000 files needs ~60 MB of it (337,785 entries, 32 MB
#: of names); 128 MiB takes ~690,000 such files, and bounds a hostile archive of long or deeply
#: nested names, which would otherwise grow the stage's memory with the square of a name's depth.
MAX_BOOKKEEPING_BYTES = 128 << 20
BOOKKEEPING_PER_ENTRY = 96


@dataclass
class ExtractResult:
    """What :func:`extract` wrote: counts for the manifest check and the prefix records script."""

    format: str
    members: int = 0
    bytes_written: int = 0
    sha256: str = ""
    files: set[str] = field(default_factory=set)
    unpack_script: bytes | None = None


@dataclass(frozen=True)
class UnpackLimits:
    """How much one extraction may write, checked as each member arrives, before its data.

    Made by :func:`kernelprov.engine.extract.unpack_limits` from the archive's manifest or, when
    it has none, from a ceiling. ``max_bytes`` counts file data plus ``entry_cost`` per member (so
    a flood of empty entries is bounded too); ``recorded`` and ``remedy`` finish the refusal.
    """

    max_bytes: int | None = None
    max_members: int | None = None
    entry_cost: int = 0
    recorded: str = ""
    remedy: str = "re-create it with `kernelprov pack`"


@dataclass
class Member:
    """One archive entry, format-independent, after its name was normalised."""

    name: str
    kind: str  # "file", "dir", "symlink" or "hardlink"
    mode: int
    mtime: float
    link_target: str = ""
    size: int = 0


def normalise_member_name(name: str, archive: Path) -> str:
    """Return ``name`` relative to the env root, or raise if it could land outside it.

    Called for every member before anything is written, and by relocate.py for the paths named
    in the prefix records (which come from the archive too and are just as untrusted).
    """
    if (len(name) <= _NAME_MAX and name.isascii() and "/." not in name and "//" not in name and "\\" not in name
            and "\x00" not in name and not name.startswith(("/", ".")) and not name.endswith("/")):
        # Already normal, and no part can be too long: most members, checked in ~1 µs instead of ~10.
        return name
    if "\x00" in name or name.startswith("/") or name.startswith("\\"):
        raise ArchiveError(f"Refusing {archive}: member {shown(name)} has an absolute or invalid path.")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"Refusing {archive}: member {shown(name)} points outside the environment.")
    if too_long(name) or any(len(p.encode("utf-8", "surrogateescape")) > _NAME_MAX for p in parts):
        raise ArchiveError(f"Refusing {archive}: member {shown(name)} has a name longer than a file system allows.")
    return "/".join(parts)


def too_long(path: str) -> bool:
    """Is ``path`` longer than Linux allows a path (or a link target) to be?"""
    return len(path.encode("utf-8", "surrogateescape")) > _PATH_MAX


def shown(name: str) -> str:
    """``repr(name)`` for a message, cut short: a hostile name may be megabytes long."""
    return repr(name) if len(name) <= 200 else repr(name[:200]) + "..."


class TreeWriter:
    """Creates validated members under ``root``; tracks what exists to avoid redundant syscalls."""

    def __init__(self, root: Path, archive: Path, result: ExtractResult):
        self.root = str(root)
        self.archive = archive
        self.result = result
        self.dirs: dict[str, tuple[int, float]] = {"": (0o700, 0.0)}
        self.symlinks: set[str] = set()
        self.umask = _current_umask()
        self.limits = UnpackLimits()
        self.charged = 0  # bytes counted against limits.max_bytes so far
        self.bookkeeping = 0  # bytes counted against MAX_BOOKKEEPING_BYTES so far

    def _refuse(self, member: Member, why: str) -> ArchiveError:
        return ArchiveError(f"Refusing {self.archive}: member {shown(member.name)} {why}.")

    def _charge(self, member: Member) -> None:
        """Count ``member`` against the limits before anything of it is written."""
        if len(member.name) + len(self.root) >= _PATH_MAX and too_long(f"{self.root}/{member.name}"):
            # Legal in the archive, but not under this staging dir: say so, not ENAMETOOLONG.
            raise self._refuse(member, f"has a name too long to unpack under {self.root}")
        limits = self.limits
        self.charged += member.size + limits.entry_cost
        if (limits.max_members is not None and self.result.members > limits.max_members) or (
            limits.max_bytes is not None and self.charged > limits.max_bytes
        ):
            raise ArchiveError(f"Refusing {self.archive}: it unpacks to more than {limits.recorded}; {limits.remedy}.")
        self._keep(member.name)

    def _keep(self, name: str) -> None:
        """Count one entry that will be remembered (a member, or a parent directory made for one)."""
        self.bookkeeping += len(name) + BOOKKEEPING_PER_ENTRY
        if self.bookkeeping > MAX_BOOKKEEPING_BYTES:
            raise ArchiveError(
                f"Refusing {self.archive}: its {self.result.members:,}+ entries and their names need more than "
                f"{human_size(MAX_BOOKKEEPING_BYTES)} of memory to unpack safely (an environment of 300,000 files "
                "needs about 60 MB); if it is a genuine environment, split it into smaller ones.")

    def _ensure_parent(self, member: Member) -> str:
        parent = posixpath.dirname(member.name)
        missing = []
        probe = parent
        while probe not in self.dirs:
            if probe in self.symlinks or probe in self.result.files:
                raise self._refuse(member, "would be written through a link or file")
            missing.append(probe)
            probe = posixpath.dirname(probe)
        for directory in reversed(missing):
            # Made for the member, not by one: charged like one, or a single deep name would make
            # thousands of directories (and their names in memory) for the price of one entry.
            self.charged += self.limits.entry_cost
            if self.limits.max_bytes is not None and self.charged > self.limits.max_bytes:
                raise ArchiveError(f"Refusing {self.archive}: it unpacks to more than {self.limits.recorded}; "
                                   f"{self.limits.remedy}.")
            self._keep(directory)
            os.mkdir(os.path.join(self.root, directory), 0o700)
            self.dirs[directory] = (0o755, 0.0)
        return os.path.join(self.root, member.name)

    def _clear(self, member: Member, path: str) -> None:
        """Replace an earlier member of the same name (tar allows duplicates; the last wins)."""
        if member.name in self.dirs:
            raise self._refuse(member, "replaces a directory")
        if member.name in self.result.files or member.name in self.symlinks:
            os.unlink(path)
            self.result.files.discard(member.name)
            self.symlinks.discard(member.name)

    def add(self, member: Member, chunks: Iterable[bytes] | None) -> None:
        """Validate and write one member; called by :func:`.extract.extract` in archive order.
        Raises :class:`ArchiveError` for an unsafe member or one past :attr:`limits`."""
        if not member.name:
            return  # the archive root itself
        self.result.members += 1
        self._charge(member)
        path = self._ensure_parent(member)
        if member.kind == "dir":
            if member.name in self.result.files or member.name in self.symlinks:
                raise self._refuse(member, "replaces a file with a directory")
            if member.name not in self.dirs:
                os.mkdir(path, 0o700)
            self.dirs[member.name] = (member.mode, member.mtime)
            return
        self._clear(member, path)
        if member.kind == "symlink":
            self._check_link_target(member)
            os.symlink(member.link_target, path)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
            self.symlinks.add(member.name)
            return
        if member.kind == "hardlink":
            target = normalise_member_name(member.link_target, self.archive)
            if target not in self.result.files:
                raise self._refuse(member, "is a hard link to something that is not a file in it")
            os.link(os.path.join(self.root, target), path, follow_symlinks=False)
            self.result.files.add(member.name)
            return
        # The archive's own mode, read-only included, as GNU tar + conda-unpack leave it
        # (relocate.py makes a read-only file writable only while it rewrites it).
        mode = member.mode & 0o777
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            written = 0
            for chunk in chunks or ():
                if written + len(chunk) > member.size:
                    break  # more data than declared (and charged): refused below as corrupt
                written += _write_fully(fd, chunk)
            if mode & self.umask:
                os.fchmod(fd, mode)  # open() applied the umask; restore the archive's mode
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        if written != member.size:
            raise ArchiveError(
                f"{self.archive} is truncated or corrupt (member {shown(member.name)} does not hold the "
                f"{human_size(member.size)} it declares); re-copy it, or re-create it with `kernelprov pack`."
            )
        self.result.bytes_written += written
        self.result.files.add(member.name)

    def _check_link_target(self, member: Member) -> None:
        target = member.link_target
        if not target or target.startswith("/") or "\x00" in target or too_long(target):
            raise self._refuse(member, f"is a link to {shown(target)} outside the environment")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), target))
        if resolved == ".." or resolved.startswith("../"):
            raise self._refuse(member, f"is a link to {shown(target)} outside the environment")

    def finish(self) -> None:
        """Confirm no link chain escapes the tree, then set directory modes and mtimes last."""
        real_root = os.path.realpath(self.root)
        for name in self.symlinks:
            resolved = os.path.realpath(os.path.join(self.root, name))
            if resolved != real_root and not resolved.startswith(real_root + os.sep):
                raise ArchiveError(f"Refusing {self.archive}: member {shown(name)} is a link that resolves outside the environment.")
        # Deepest first, so setting a parent's mtime is not undone by touching its children.
        for name in sorted(self.dirs, key=lambda d: d.count("/"), reverse=True):
            if not name:
                continue
            mode, mtime = self.dirs[name]
            path = os.path.join(self.root, name)
            os.chmod(path, (mode & 0o777) | 0o700)
            if mtime:
                os.utime(path, (mtime, mtime))


def _write_fully(fd: int, chunk: bytes) -> int:
    """Write all of ``chunk``: a nearly full disk makes write() short before it raises ENOSPC."""
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]
    return len(chunk)


def _current_umask() -> int:
    """The process umask, read without os.umask(): setting it, even briefly, races other threads."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: always fchmod
