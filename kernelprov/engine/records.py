"""Small JSON records beside the envs in the user's dir, written atomically and read without trust.

Two kinds live here: ``<key>.progress``, how far a running stage has come (:class:`ProgressFile`,
written by :func:`.stage.ensure_staged`, read by :func:`.inventory.staging_progress` for the panel
and ``kernelprov cache list``), and the reader/writer that :mod:`.failures` uses for
``<key>.failed``. Both are hints, never gates: nothing decides whether to reuse or remove an env
from them. They are still read as untrusted input (through the dir's fd, no links, regular files
only, bounded size, every field type-checked): a killed writer, a bug or another kernelprov
version may have left anything there, and a listing must not fail on it.

Markers (``<key>.json``, which *are* trusted) are :mod:`.cache`'s, not this module's.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable

from .logs import get_logger
from .securedir import PrivateDir

log = get_logger(__name__)

#: A stage rewrites its ``<key>.progress`` at most this often (the read-ahead thread reports more).
PROGRESS_INTERVAL_SECONDS = 0.5
#: A progress record is four numbers: anything longer was not written by kernelprov.
_MAX_PROGRESS_BYTES = 4096


def write_record(user_dir: PrivateDir, name: str, record: dict) -> None:
    """Replace the small JSON file ``name`` in the user's dir atomically, through its fd (a
    ``.tmp`` beside it, renamed over). Used for the progress and failure records; raises OSError."""
    tmp = f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=user_dir.fd)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, name, src_dir_fd=user_dir.fd, dst_dir_fd=user_dir.fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=user_dir.fd)
        raise


def read_record(user_dir: PrivateDir, name: str, limit: int) -> dict | None:
    """The JSON object in ``name`` in the user's dir, read without trusting it: through the dir's
    fd, never following a link, only a regular file of at most ``limit`` bytes; None otherwise.
    The caller checks the fields' types."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=user_dir.fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > limit:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def progress_name(key: str) -> str:
    """The name of ``key``'s progress record in the user's dir."""
    return f"{key}.progress"


class ProgressFile:
    """``<key>.progress``: how far the stage of ``key`` has come, for every process of this user.

    Opened by :func:`.stage.ensure_staged` with the key's lock held, around the unpack or image
    copy; :meth:`report` is its progress callback (thread-safe: tar formats call it from the
    read-ahead thread). The record — ``{"done", "total", "started_at", "pid"}`` — is written
    atomically through the user dir's fd, at most every :data:`PROGRESS_INTERVAL_SECONDS`, and
    removed when the stage ends, whether it worked or not. A kill -9 leaves it behind, so readers
    trust it only while the key's lock is held (:func:`.inventory.staging_progress`); the next
    stage of that key removes it first (:func:`.cache.remove_unpublished`). A record that cannot
    be written (a full disk) only loses the hint.
    """

    def __init__(self, user_dir: PrivateDir, key: str, total: int):
        import threading  # only a stage gets here; the warm path never imports threading

        self.user_dir, self.key, self.total = user_dir, key, total
        self.started_at = time.time()
        self._guard = threading.Lock()
        self._written_at = 0.0
        self._written_done = -1
        self._closed = False

    def __enter__(self) -> ProgressFile:
        self.report(0, self.total)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def report(self, done: int, total: int) -> None:
        """Record that ``done`` of ``total`` archive bytes were read; rate-limited, never raises."""
        with self._guard:
            now = time.monotonic()
            finished_now = done >= total and self._written_done < total
            if self._closed or (now - self._written_at < PROGRESS_INTERVAL_SECONDS and not finished_now):
                return
            self._written_at, self._written_done = now, done
            self._write({"done": int(done), "total": int(total), "started_at": self.started_at, "pid": os.getpid()})

    def chain(self, progress: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """A callback that records the progress here, then passes it on to ``progress``."""
        if progress is None:
            return self.report

        def both(done: int, total: int) -> None:
            self.report(done, total)
            progress(done, total)

        return both

    def _write(self, record: dict) -> None:
        try:
            write_record(self.user_dir, progress_name(self.key), record)
        except OSError as err:
            log.debug("could not record the progress of %s: %s", self.key, err)

    def close(self) -> None:
        """Remove the record (the stage ended); later reports are ignored."""
        with self._guard:
            self._closed = True
            for name in (progress_name(self.key), f"{progress_name(self.key)}.tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.user_dir.fd)


def read_progress(user_dir: PrivateDir, key: str) -> dict | None:
    """``key``'s progress record as ``{"done", "total", "started_at", "pid"}``, or None.

    Read without trusting the file: through the dir's fd, never following a link, only a regular
    file, at most a few kB, and every field type-checked. Says nothing about whether the stage is
    still alive; :func:`.inventory.staging_progress` checks the lock for that.
    """
    record = read_record(user_dir, progress_name(key), _MAX_PROGRESS_BYTES)
    if record is None:
        return None
    done, total, started_at, pid = (record.get(name) for name in ("done", "total", "started_at", "pid"))
    counts_ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (done, total))
    pid_ok = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
    time_ok = isinstance(started_at, (int, float)) and not isinstance(started_at, bool) and started_at > 0
    if not (counts_ok and pid_ok and time_ok):
        return None
    return {"done": min(done, total), "total": total, "started_at": float(started_at), "pid": pid}
