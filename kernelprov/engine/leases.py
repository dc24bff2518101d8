"""Leases: which envs running kernels use, so that eviction never removes one in use.

Written by ``run.sh`` (one file per kernel in ``<prefix>.leases/``, named by its PID, which the
``exec`` hands to the kernel, and ``flock``'ed on a descriptor the kernel inherits); read by
:mod:`.cache` (eviction), :mod:`.inventory` and the panel (``in use by N kernels``). A lease is
held while its flock is held. An unlocked one (between run.sh opening and locking it, or on a
node without ``flock``) counts only while the process it names is alive *and* is the process that
wrote it: a PID reused by an unrelated process, which started after the lease was written, does
not keep a dead kernel's env forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

#: A lease file not named by a PID (older run.sh) counts as held this long even if unlocked.
LEASE_GRACE_SECONDS = 60.0
#: /proc/stat's boot time is whole seconds: allow that much before calling a PID reused.
_START_TIME_SLACK = 1.0


def lease_dir(prefix: Path) -> Path:
    """Where kernels running from ``prefix`` hold their leases (run.sh: ``$KERNELPROV_ENV.leases``)."""
    return Path(f"{prefix}.leases")


def count_leases(prefix: Path) -> int:
    """How many kernels hold a lease on the env at ``prefix``. Reads only: stale lease files are
    not counted, and left for :func:`prune_leases`."""
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
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        path = lease_dir(prefix) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
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
            yield path, _holder_alive(name, os.fstat(fd).st_mtime)
        finally:
            os.close(fd)


def _holder_alive(name: str, written: float) -> bool:
    """For an unlocked lease file written at ``written``: is the process that wrote it running?"""
    pid_text = name.split(".", 1)[0]  # run.sh: "<pid>"; a provisioner: "<pid>.<kernel id>"
    if not pid_text.isdigit():
        return time.time() - written < LEASE_GRACE_SECONDS
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, just not ours to signal
    started = process_start_time(pid)
    return started is None or started <= written + _START_TIME_SLACK


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def write_lease(prefix: Path, name: str) -> Path:
    """Create the lease file ``name`` (``"<pid>"`` or ``"<pid>.<tag>"``) for the env at ``prefix``.

    Called by :func:`.stage.ensure_staged` under the env's key lock when its caller asks for a
    lease (the provisioner for its kernel; ``kernelprov unpack --lease PID`` for run.sh), so no
    eviction can fall between handing out the env and the kernel taking its own flock. The lease
    counts while that PID lives (and is the process that was running when it was written)."""
    directory = lease_dir(prefix)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    os.utime(path)
    return path


def release_lease(path: Path | None) -> None:
    """Remove a lease written by :func:`write_lease` (its kernel is gone for good)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
