"""Zero-copy image mode, the mechanics: copy a squashfs image, mount it, check it, unmount it.

Called by :mod:`.image_stage` (which decides where) and by :mod:`.cache` (which evicts). A
squashfs image is read-only, so it is relocated at pack time instead: its manifest's
``dest_prefix`` names its baked mount point. At kernel start the image is copied to local disk
(one sequential file copy, hashed on the way) and mounted with ``squashfuse_ll`` or
``squashfuse`` (FUSE, unprivileged, ``nosuid,nodev``); where FUSE is unavailable it is extracted
with ``unsquashfs`` instead. Either way its members obey the rules of tar extraction
(:func:`check_tree`). Every FUSE helper runs with a timeout and every probe of a mount runs in a
worker thread, so a hung FUSE daemon can never hang a kernel start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

from ..errors import ArchiveError, CacheError
from .logs import get_logger
from .streams import ProgressCallback

log = get_logger(__name__)

_CHUNK = 4 << 20
#: How long squashfuse may take to mount, and fusermount to unmount (a mount takes ~5 ms).
FUSE_TIMEOUT = 30.0
#: How long a mount may take to answer ``statvfs`` before it counts as hung (dead).
PROBE_TIMEOUT = 5.0


def copy_image(source: Path, target: Path, progress: ProgressCallback | None) -> str:
    """Copy the image sequentially to local disk; return its sha256 (checked against the manifest)."""
    digest = hashlib.sha256()
    total = os.path.getsize(source)
    done = 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def _squashfuse() -> str | None:
    """The squashfuse binary to mount with: ``squashfuse_ll`` (same package) where present.

    The low-level variant lets the kernel cache lookups and attributes; measured on the benchmark
    env, a kernel start plus ``import numpy, pandas`` from the mount took 0.52 s instead of 0.87 s.
    """
    return shutil.which("squashfuse_ll") or shutil.which("squashfuse")


def _fusermount() -> str | None:
    """The helper that unmounts a FUSE mount without privileges (fuse3's name first)."""
    return shutil.which("fusermount3") or shutil.which("fusermount")


def fuse_available() -> bool:
    """Can this process mount with squashfuse (binary, /dev/fuse and a fusermount helper)?"""
    return bool(_squashfuse()) and os.path.exists("/dev/fuse") and bool(_fusermount() or os.geteuid() == 0)


def _run(command: list[str], what: str) -> subprocess.CompletedProcess | None:
    """Run a FUSE helper with :data:`FUSE_TIMEOUT`; None (logged) if it did not finish in time."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=FUSE_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        log.warning("%s did not finish within %.0f s while %s; giving up on it", command[0], FUSE_TIMEOUT, what)
        return None


def mount(image: Path, mount_point: Path) -> bool:
    """Mount ``image`` read-only at the existing empty dir ``mount_point``; False (logged) if FUSE
    did not work here (or hung), so the caller extracts instead."""
    if not fuse_available():
        return False
    binary = _squashfuse()
    result = _run([binary, "-o", "nosuid,nodev", str(image), str(mount_point)], f"mounting {image}")
    if result is None or result.returncode != 0 or not is_alive(mount_point):
        detach_mount(mount_point)
        log.warning("%s could not mount %s (%s); extracting it instead", binary, image,
                    result.stderr.strip() if result is not None else "timed out")
        return False
    return True


def _mount_points() -> set[str]:
    """Every mount point of this mount namespace, read from the kernel (never from the mounts)."""
    with open("/proc/self/mounts") as f:
        points = {line.split()[1] for line in f if len(line.split()) > 1}
    # /proc/self/mounts escapes blanks, tabs, newlines and backslashes as octal.
    return {p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\") for p in points}


def is_mounted(path: Path) -> bool:
    """Is something mounted at ``path``? Asks the kernel's table, so a hung mount cannot block it."""
    return str(path) in _mount_points()


def _answers(path: Path) -> bool:
    """Does ``statvfs`` on the mount answer within :data:`PROBE_TIMEOUT`? (In a daemon thread: a
    hung daemon leaves that thread blocked, never the caller.)"""
    answer: list[bool] = []

    def probe():
        try:
            os.statvfs(path)
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=probe, name="kernelprov-mount-probe", daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT)
    if worker.is_alive():
        log.warning("the FUSE mount at %s did not answer within %.0f s; treating it as dead", path, PROBE_TIMEOUT)
        return False
    return answer[0]


def is_alive(mount_point: Path) -> bool:
    """Is ``mount_point`` a mount whose FUSE daemon still answers?

    Called by the stage engine before it reuses a mounted image. Being in the mount table is not
    enough: a mount whose daemon was killed (job end) stays there; ``statvfs`` is never cached and
    fails with ENOTCONN, or never returns from a stopped daemon.
    """
    return is_mounted(mount_point) and _answers(mount_point)


def detach_mount(mount_point: Path) -> None:
    """Unmount ``mount_point`` if mounted: cleanly when its daemon answers, lazily otherwise.

    Called on eviction and before a dead mount is replaced; raises :class:`CacheError` when a
    live mount is busy (a process still uses it).
    """
    if not is_mounted(mount_point):
        return
    helper = _fusermount()
    if _answers(mount_point):
        result = _run([helper, "-u", str(mount_point)] if helper else ["umount", str(mount_point)], f"unmounting {mount_point}")
        if result is not None and result.returncode == 0:
            return
        if result is not None and "busy" in result.stderr.lower():
            raise CacheError(f"Cannot unmount {mount_point}: {result.stderr.strip()}; is a process still using it?")
    # Dead or hung daemon: detach lazily, which needs no answer from it.
    result = _run([helper, "-u", "-z", str(mount_point)] if helper else ["umount", "-l", str(mount_point)], f"detaching {mount_point}")
    if is_mounted(mount_point):
        detail = result.stderr.strip() if result is not None else "timed out"
        raise CacheError(f"Cannot unmount {mount_point}: {detail}; unmount it with `fusermount -u -z {mount_point}`.")


def extract_image(image: Path, target: Path, archive: Path) -> None:
    """Fallback where FUSE is unavailable: unpack the image to ``target`` with unsquashfs."""
    if not shutil.which("unsquashfs"):
        raise ArchiveError(
            f"{archive} is a squashfs image, but neither squashfuse (FUSE) nor unsquashfs works on this node; "
            "install squashfs-tools, or pack the env as .tar.zst."
        )
    result = subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-no-xattrs", "-d", str(target), str(image)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ArchiveError(f"{archive} could not be unpacked ({result.stderr.strip()[:200]}); re-create it with `kernelprov pack`.")


def check_tree(root: Path, archive: Path, *, writable: bool) -> int:
    """Apply tar extraction's member rules to an unpacked or mounted image; return its entries.

    Called by :mod:`.image_stage` before an image is published. Device files, FIFOs and sockets,
    and symlinks that are absolute or resolve outside the tree (also as a chain) are refused
    with one sentence naming the member. In a ``writable`` (extracted) tree, setuid/setgid bits
    are dropped and, when unsquashfs ran as root, ownership is given back to us; a mount is
    ``nosuid`` already.
    """
    real_root = os.path.realpath(root)
    entries = 0
    me = (os.geteuid(), os.getegid())
    pending = [real_root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as it:
            for entry in it:
                entries += 1
                name = os.path.relpath(entry.path, real_root)
                if entry.is_symlink():
                    _check_link(entry.path, name, real_root, archive)
                    if writable and os.geteuid() == 0:
                        os.lchown(entry.path, *me)
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif not entry.is_file(follow_symlinks=False):
                    raise ArchiveError(f"Refusing {archive}: member {name!r} is a device file, FIFO or socket; "
                                       "re-create it with `kernelprov pack`.")
                if writable:
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_uid, st.st_gid) != me and os.geteuid() == 0:
                        os.lchown(entry.path, *me)
                    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                        os.chmod(entry.path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID) & 0o7777)
    return entries


def _check_link(path: str, name: str, real_root: str, archive: Path) -> None:
    target = os.readlink(path)
    # Only a target with ".." can climb: resolving just those keeps every chain inside, at the
    # cost of a few realpath calls instead of one per link (an env has thousands).
    climbs = ".." in target.split("/")
    resolved = os.path.realpath(path) if climbs else real_root
    if target.startswith("/") or (resolved != real_root and not resolved.startswith(real_root + os.sep)):
        raise ArchiveError(f"Refusing {archive}: member {name!r} is a link to {target!r} outside the environment; "
                           "re-create it with `kernelprov pack`.")
