"""``<key>.lock``: the per-env lock that serialises staging, leasing and eviction across processes.

Taken by :func:`.stage.ensure_staged` around a stage and around handing out a lease, by
:func:`.cache.try_evict` (with ``timeout`` 0: an env being staged is never evicted) and by
:func:`.inventory.staging_progress` (held by someone means "a stage is alive"). It is a plain
``flock`` on a file opened through the verified user dir's descriptor, so it costs one ``open``
and one ``flock`` on a warm start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from ..errors import CacheError
from .securedir import PrivateDir, as_private

#: How often a waiting start retries a held lock.
_LOCK_POLL_SECONDS = 0.05
#: errnos of a filesystem that has no working file locks (NFS without lockd, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class LockTimeout(Exception):
    """Raised by :class:`KeyLock` when the lock stayed held by another process for ``timeout`` s."""


class KeyLock:
    """An exclusive ``flock`` on ``<key>.lock`` in the user's dir, opened through its fd.

    Written by hand rather than with ``filelock``: that library opens its lock file by path, and
    everything in the user's dir is opened relative to the verified directory descriptor, so that
    no path swap can redirect it (issue 11, point 6).

    Serialises staging and eviction of one env across processes and threads (each use opens its
    own descriptor). ``timeout`` 0 tries once. A filesystem without locks is refused in one
    sentence rather than waited on.
    """

    def __init__(self, user_dir: PrivateDir | Path, key: str, timeout: float):
        self.user_dir, self.key, self.timeout = as_private(user_dir), key, timeout
        self._fd = -1

    def __enter__(self) -> KeyLock:
        fd = os.open(f"{self.key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.user_dir.fd)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK) and time.monotonic() < deadline:
                    time.sleep(_LOCK_POLL_SECONDS)
                    continue
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise LockTimeout(self.key) from None
                if err.errno in _NO_LOCKS:
                    raise CacheError(
                        f"The kernelprov cache {self.user_dir} is on a filesystem without file locks ({err.strerror}), which "
                        "kernelprov needs to stage safely; set KERNELPROV_CACHE_DIR to a directory on a local disk."
                    ) from err
                raise
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # closing the only descriptor releases the flock


def key_lock(user_dir: PrivateDir | Path, key: str, timeout: float) -> KeyLock:
    """The lock that serialises staging and eviction of ``key`` across processes on this node."""
    return KeyLock(user_dir, key, timeout)
