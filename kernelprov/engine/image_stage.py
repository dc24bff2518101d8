"""Stage a squashfs image: copy it to local disk and mount it at its baked mount point.

Called by :func:`.stage.ensure_staged` for archives whose first bytes say squashfs. An image was
relocated at pack time to one mount point (its manifest's ``dest_prefix``), which must be a name
inside this user's private kernelprov dir (:func:`image_user_dir`). Where FUSE is unavailable the
image is unsquashfs'ed there instead. The marker is written last, as for trees.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ArchiveError, CacheError
from . import cache, image, space
from .archive import check_unchanged
from .extract import ProgressCallback

log = logging.getLogger(__name__)


def image_user_dir(archive: Path, manifest) -> Path:
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


def still_usable(entry: cache.CacheEntry) -> bool:
    """An image whose FUSE daemon died (job end, node cleanup) must be mounted again."""
    return entry.mode != "mounted" or image.is_alive(entry.prefix)


def stage_image(archive: Path, st: os.stat_result, manifest, user_dir: Path, key: str, progress: ProgressCallback | None) -> Path:
    """Copy the image to local disk and mount it at its baked mount point (or unsquashfs there).

    The caller holds the key's lock; returns the mount point."""
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
    space.ensure_space(archive, st, None, user_dir, key)
    copy = user_dir / f"{key}.squashfs"
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{key}-", dir=user_dir))
    try:
        digest = image.copy_image(archive, staging / "image.squashfs", progress)
        check_unchanged(archive, st)
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
        if space.is_disk_full(err):
            raise space.disk_full_error(user_dir, archive, err, doing="copying") from err
        raise CacheError(f"Staging the image {archive} into {user_dir} failed: {err}.") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    cache.write_marker(user_dir, key, archive=str(archive), archive_size=st.st_size, archive_mtime_ns=st.st_mtime_ns,
                       env_bytes=st.st_size, members=0, prefix=str(mount_point), mode=mode)
    log.info("image %s %s at %s", archive, mode, mount_point)
    return mount_point
