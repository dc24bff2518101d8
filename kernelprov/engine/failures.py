"""The last failed stage of each archive version on this node, remembered across restarts.

Written by :func:`.stage.ensure_staged` when a stage fails (``<key>.failed`` in the user's private
cache dir, keyed like the env itself by the archive's path, size and mtime, so a changed archive
starts with a clean slate) and cleared when a stage of that version succeeds. Read by the panel
(:mod:`kernelprov.jupyter.environments`) so an env that failed shows its one sentence before the
next researcher clicks it, even after the Jupyter server restarted.

A failure record is a hint for the panel, never a gate: a start always tries again. Its content
is bounded and type-checked on read, because the file lives on a node others share.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from . import cache
from .logs import get_logger
from .records import read_record, write_record
from .securedir import PrivateDir

log = get_logger(__name__)

#: A record is one sentence and a time stamp: anything longer was not written by kernelprov.
_MAX_RECORD_BYTES = 8192
_MAX_MESSAGE_CHARS = 2000


def _name(key: str) -> str:
    return f"{key}.failed"


def record_failure(user_dir: PrivateDir, key: str, message: str) -> None:
    """Remember that staging ``key`` failed with ``message`` (called by ``ensure_staged``).

    A disk too full to hold it loses only the hint."""
    try:
        write_record(user_dir, _name(key), {"message": message[:_MAX_MESSAGE_CHARS], "at": time.time()})
    except OSError as err:
        log.debug("could not remember the failure of %s: %s", key, err)


def clear_failure(user_dir: PrivateDir, key: str) -> None:
    """Forget the failure of ``key`` (called by ``ensure_staged`` after a successful stage or reuse)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_name(key), dir_fd=user_dir.fd)


def read_failure(user_dir: PrivateDir, key: str) -> dict | None:
    """The remembered failure of ``key`` as ``{"message": str, "at": float}``, or None."""
    data = read_record(user_dir, _name(key), _MAX_RECORD_BYTES)
    if data is None or not isinstance(data.get("message"), str) \
            or not isinstance(data.get("at"), (int, float)) or isinstance(data.get("at"), bool):
        return None
    return {"message": data["message"][:_MAX_MESSAGE_CHARS], "at": float(data["at"])}


def last_failure(archive: Path | str, *, cache_root: Path | str | None = None) -> dict | None:
    """The last failed stage of ``archive``'s current version on this node, or None.

    Called by the panel's listing; reads one small file in the user's node-local cache dir and
    stats the archive (which the listing has done already)."""
    archive = Path(archive).expanduser().absolute()
    try:
        st = os.stat(archive)
    except OSError:
        return None
    root = Path(cache_root) if cache_root else cache.default_cache_root()
    with cache.user_cache_dir(root) as user_dir:
        return read_failure(user_dir, cache.archive_key(archive, st))
