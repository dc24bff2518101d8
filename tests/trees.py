"""A directory tree as comparable data, for tests that compare two stagings entry for entry."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def tree(root: Path, *, mtimes: bool = True) -> dict[str, tuple]:
    """Every entry under ``root``: (type, mode, bytes or link target, mtime of files or None).

    ``mtimes=False`` leaves file mtimes out (None), for trees staged at different times, whose
    relocated files carry the time of their rewrite."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", None, os.readlink(path), None)
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), None, None)
            else:
                assert stat.S_ISREG(st.st_mode), rel
                entries[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), Path(path).read_bytes(),
                                st.st_mtime_ns if mtimes else None)
    return entries
