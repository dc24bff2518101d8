"""``StatCache``: values computed from files, recomputed only when a file's stat changed.

Used by :class:`kernelprov.jupyter.environments.KernelprovEnvironments` for kernel.json files,
manifests and archives' first bytes. The panel polls; kernel dirs and archives live on the shared
filesystem that kernelprov exists to spare, so each poll costs one ``stat`` per file instead of a
read and a parse.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import KernelprovError


class StatCache:
    """Values computed from files, recomputed only when a file's size, mtime or inode changed.

    Thread-safe: the REST handlers call the panel's domain object from a small pool.
    """

    def __init__(self) -> None:
        self._values: dict[str, tuple[tuple[int, int, int], Any]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path | str, load: Callable[[str], Any], st: os.stat_result | None = None) -> Any:
        """``load(path)``'s value, from the cache while the file is unchanged; raises ``OSError``
        from the stat. A ``KernelprovError`` raised by ``load`` is cached and raised again, so a
        broken file is not re-read at every poll either.

        Called by the panel's listing on every poll; ``st`` is a stat the caller already made."""
        path = os.fspath(path)
        st = os.stat(path) if st is None else st
        identity = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            cached = self._values.get(path)
        if cached is not None and cached[0] == identity:
            value = cached[1]
        else:
            try:
                value = load(path)
            except KernelprovError as err:
                value = err
            with self._lock:
                self._values[path] = (identity, value)
        if isinstance(value, KernelprovError):
            raise value
        return value
