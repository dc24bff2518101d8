"""Stage a squashfs image: check its baked mount point, copy it, mount it, point the mount point at it.

Called by :func:`.stage.ensure_staged` (and :mod:`.inventory`) for archives whose first bytes say
squashfs. An image was relocated at pack time to one path, its manifest's ``dest_prefix``: the
*baked mount point*. That path comes from a file anyone may have written, so it decides nothing
until :func:`image_slot` has checked it: absolute and normalised (no ``..``), a plain ``*.img``
name, directly inside one of this user's own image dirs (:func:`image_dirs`), which is opened
through a trusted chain. Only then is anything touched there, and only that one name.

The baked path is a symlink the user owns, pointing at ``<cache dir>/<key>/`` where the image is
mounted (or unsquashfs'ed); the key is a hash of the baked path, so lock, marker, copy and mount
agree for every archive packed for that path. It lives in a directory only the user can create
entries in: ``$XDG_RUNTIME_DIR/kernelprov`` (``/run/user/<uid>``) by default, so a neighbour's
``mkdir`` cannot block it; ``$KERNELPROV_IMAGE_ROOT/kernelprov-<user>`` where a site sets that,
and ``/tmp/kernelprov-<user>`` where neither exists. The marker is written last, as for trees.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArchiveError, CacheError
from . import cache, image, space
from .archive import check_unchanged, size_mismatch
from .extract import ProgressCallback
from .logs import get_logger
from .securedir import PrivateDir, private_dir_in, user_name

log = get_logger(__name__)

_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.img")


def runtime_dir() -> Path | None:
    """This user's runtime dir (``$XDG_RUNTIME_DIR``, else ``/run/user/<uid>``) if it is a real
    directory owned by the user and closed to others, else None."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR", ""), f"/run/user/{os.getuid()}"):
        if not candidate or not os.path.isabs(candidate):
            continue
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return Path(candidate)
    return None


def image_dirs() -> list[Path]:
    """Where this user's baked mount points may live, the one ``kernelprov pack`` uses first."""
    dirs = []
    if os.environ.get("KERNELPROV_IMAGE_ROOT"):
        dirs.append(Path(os.environ["KERNELPROV_IMAGE_ROOT"]) / f"kernelprov-{user_name()}")
    runtime = runtime_dir()
    if runtime is not None:
        dirs.append(runtime / "kernelprov")
    dirs.append(Path("/tmp") / f"kernelprov-{user_name()}")
    return dirs


def baked_mount_point(env_name: str) -> Path:
    """A fresh baked mount point for an image of ``env_name`` (called by ``kernelprov pack``).

    The random part gives every packed image its own mount point, so two images of the same file
    name never take each other's place."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", env_name).lstrip("._-+") or "env"
    return image_dirs()[0] / f"{name[:60]}.{secrets.token_hex(3)}.img"


@dataclass
class ImageSlot:
    """A checked baked mount point: its private dir (held open), name and cache key."""

    link_dir: PrivateDir
    name: str
    mount_point: Path
    key: str


def image_slot(archive: Path, manifest) -> ImageSlot:
    """Check the image's baked mount point before anything is done there; open its dir.

    Refuses (one sentence naming the archive) a missing, relative or unnormalised path, a name
    that is not ``*.img``, or a parent that is not exactly one of :func:`image_dirs`.
    """
    dest = getattr(manifest, "dest_prefix", None) if manifest is not None else None
    if not dest:
        raise ArchiveError(
            "The image has no manifest naming its mount point.",
            f"{archive} is a squashfs image without a kernelprov manifest naming its mount point; "
            "re-create it with `kernelprov pack --format squashfs`."
        )
    expected = image_dirs()
    mount_point = Path(dest) if isinstance(dest, str) else None
    if (mount_point is None or not dest.startswith("/") or os.path.normpath(dest) != dest or "/../" in f"{dest}/"
            or not _IMAGE_NAME.fullmatch(mount_point.name) or mount_point.parent not in expected):
        raise CacheError(
            "The image was packed for another user's mount point.",
            f"{archive} was packed to be mounted at {dest}, which is not a mount point in your private kernelprov directory "
            f"on this node ({expected[0]}); pack it yourself with `kernelprov pack --format squashfs`, or use .tar.zst."
        )
    try:
        link_dir = private_dir_in(mount_point.parent.parent, mount_point.parent.name, fallback=False,
                                  what="image mount point directory")
    except OSError as err:
        raise CacheError("The image's mount point cannot be made.",
                         f"Cannot create {mount_point.parent} for the image {archive}: {err.strerror}; use .tar.zst instead.") from err
    return ImageSlot(link_dir, mount_point.name, mount_point, cache.short_hash(f"image\0{mount_point}"))


def entry_matches(entry: cache.CacheEntry, archive: Path, st: os.stat_result, manifest) -> bool:
    """Does the image staged for this slot come from ``archive`` (this version), or hold the same
    bytes (a copy of it)? Anything else at the same mount point is another archive's env."""
    same_version = (entry.archive, entry.archive_size, entry.archive_mtime_ns) == (str(archive), st.st_size, st.st_mtime_ns)
    same_bytes = bool(entry.image_sha256) and entry.image_sha256 == getattr(manifest, "sha256", None)
    return same_version or same_bytes


def still_usable(entry: cache.CacheEntry, slot: ImageSlot, user_dir: PrivateDir) -> bool:
    """A published image is reused only while its mount point still points at it (a runtime dir
    is emptied at logout) and, when mounted, its FUSE daemon answers (it dies at job end)."""
    target = user_dir.path / entry.key
    try:
        if os.readlink(slot.name, dir_fd=slot.link_dir.fd) != str(target):
            return False
    except OSError:
        return False
    return entry.mode != "mounted" or image.is_alive(target)


def stage_image(archive: Path, st: os.stat_result, manifest, user_dir: PrivateDir, slot: ImageSlot,
                progress: ProgressCallback | None) -> Path:
    """Copy the image to local disk, mount it (or unsquashfs it) at ``<user_dir>/<key>``, check its
    members, mark it, and point its baked mount point there. The caller holds the key's lock."""
    key = slot.key
    if manifest.size != st.st_size:
        raise size_mismatch(archive, st.st_size, manifest.size, "re-create it with `kernelprov pack`.")
    entry = cache.read_marker(user_dir, key)
    if entry is not None and entry_matches(entry, archive, st, manifest) and (
            entry.mode != "mounted" or image.is_alive(user_dir / key)):
        point_at(slot, user_dir / key)  # only the symlink was lost (a runtime dir emptied at logout)
        return slot.mount_point
    _make_room_at(slot, user_dir, archive, st, manifest)
    space.ensure_space(archive, st, None, user_dir, key)
    staging = cache.make_staging(user_dir, key)
    copy_name, mode = f"{key}.squashfs", None
    try:
        digest = image.copy_image(archive, staging / "image.squashfs", progress)
        check_unchanged(archive, st)
        if manifest.sha256 and digest != manifest.sha256:
            raise ArchiveError("The archive fails its manifest's check.",
                               f"{archive} does not match its manifest's sha256 (corrupt or replaced); re-create it with `kernelprov pack`.")
        os.rename(f"{staging.name}/image.squashfs", copy_name, src_dir_fd=user_dir.fd, dst_dir_fd=user_dir.fd)
        os.mkdir(key, 0o755, dir_fd=user_dir.fd)
        if image.mount(user_dir / copy_name, user_dir / key):
            mode = "mounted"
            image.check_tree(user_dir / key, archive, writable=False)
        else:
            os.rmdir(key, dir_fd=user_dir.fd)
            image.extract_image(user_dir / copy_name, staging / "env", archive)
            image.check_tree(staging / "env", archive, writable=True)
            os.chmod(staging / "env", 0o755)
            cache.publish(user_dir, f"{staging.name}/env", key)
            os.unlink(copy_name, dir_fd=user_dir.fd)
            mode = "extracted"
        cache.write_marker(user_dir, key, archive=str(archive), archive_size=st.st_size, archive_mtime_ns=st.st_mtime_ns,
                           env_bytes=st.st_size, members=0, prefix=str(slot.mount_point), mode=mode,
                           image_sha256=manifest.sha256)
        point_at(slot, user_dir / key)
    except BaseException as err:
        for name in (f"{key}.json", key, copy_name):
            cache.remove_name(user_dir, name)
        if isinstance(err, OSError):
            if space.is_disk_full(err):
                raise space.disk_full_error(user_dir, archive, err, doing="copying") from err
            raise CacheError("Staging the image failed.", f"Staging the image {archive} into {user_dir} failed: {err}.") from err
        raise
    finally:
        cache.remove_name(user_dir, staging.name)
    log.info("image %s %s at %s (%s)", archive, mode, slot.mount_point, user_dir / key)
    return slot.mount_point


def _make_room_at(slot: ImageSlot, user_dir: PrivateDir, archive: Path, st, manifest) -> None:
    """Clear this slot for ``archive``: a dead or stale env of it, or another archive's env that
    nobody uses or used lately (one in use is never replaced: the start is refused)."""
    entry = cache.read_marker(user_dir, slot.key)
    if entry is not None and not entry_matches(entry, archive, st, manifest):
        in_use = cache.count_leases(slot.mount_point)
        if in_use or time.time() - entry.last_used < space.BUDGET_MIN_IDLE_SECONDS:
            raise CacheError(
                "The image's mount point serves another image.",
                f"{slot.mount_point} already serves another image ({entry.archive}), "
                + (f"used by {in_use} running kernel(s)" if in_use else "used in the last few minutes")
                + f"; shut those kernels down and evict it, or re-create {archive.name} with `kernelprov pack`."
            )
    if entry is not None:
        cache.remove_entry(user_dir, slot.key)
    cache.remove_unpublished(user_dir, slot.key)
    _clear_link(slot)


def _clear_link(slot: ImageSlot) -> None:
    """Remove whatever stands at the baked mount point's name in its private dir: a symlink (never
    followed), or a mount point dir of the older layout (unmounted first)."""
    cache.remove_name(slot.link_dir, slot.name)


def point_at(slot: ImageSlot, target: Path) -> None:
    """Make the baked mount point a symlink to ``target``, replacing the old one atomically."""
    try:
        if not stat.S_ISLNK(os.stat(slot.name, dir_fd=slot.link_dir.fd, follow_symlinks=False).st_mode):
            _clear_link(slot)
    except FileNotFoundError:
        pass
    tmp = f".{slot.name}.{secrets.token_hex(4)}"
    os.symlink(str(target), tmp, dir_fd=slot.link_dir.fd)
    try:
        os.replace(tmp, slot.name, src_dir_fd=slot.link_dir.fd, dst_dir_fd=slot.link_dir.fd)
    except OSError:
        os.unlink(tmp, dir_fd=slot.link_dir.fd)
        raise
