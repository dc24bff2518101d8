"""Rewrite the recorded prefix placeholders of an unpacked env: the job of ``conda-unpack``.

Called by :func:`kernelprov.engine.unpack.stage_tree` after extraction, while the env still sits in
its staging directory. conda-pack embeds its prefix records (path, placeholder, mode) in the archive's
``bin/conda-unpack`` script as a Python literal; we read that literal with :func:`ast.literal_eval`
(never executing the script) and rewrite the files in this process. That saves starting a second
interpreter from a half-made env, works even when the env's python cannot run on its own yet, and
lets us write the *final* prefix before the env is published by rename.

The tree it leaves is the one GNU tar plus the archive's own ``conda-unpack`` leave (bytes, link
targets, modes; rewritten files newer, others keeping their mtime), with one deliberate exception:
an unchecked hash-based ``.pyc`` of a rewritten source is removed (see
:func:`drop_unchecked_bytecode`). ``tests/test_relocate.py`` compares the two trees entry by entry.
"""

from __future__ import annotations

import ast
import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Callable

from .logs import get_logger
from .treewriter import normalise_member_name
from ..errors import RelocateError

log = get_logger(__name__)

PrefixRecord = tuple[str, str, str]  # (path relative to the prefix, placeholder, "text"|"binary")


def read_prefix_records(unpack_script: bytes, archive: Path) -> list[PrefixRecord]:
    """Return the ``_prefix_records`` list embedded in conda-pack's ``conda-unpack`` script.

    Called once per extraction with the script's bytes captured while streaming the archive.
    """
    try:
        tree = ast.parse(unpack_script)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise RelocateError(f"{archive} has an unreadable bin/conda-unpack ({err}); re-create it with `kernelprov pack`.") from err
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_prefix_records" for t in node.targets
        ):
            try:
                records = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # untrusted input
                break
            if all(_is_record(r) for r in records):
                return [tuple(r) for r in records]
            break
    raise RelocateError(f"{archive} has no readable prefix records in bin/conda-unpack; re-create it with `kernelprov pack`.")


def _is_record(record: object) -> bool:
    return (
        isinstance(record, (tuple, list))
        and len(record) == 3
        and all(isinstance(part, str) for part in record)
        and record[2] in ("text", "binary")
    )


def relocate(root: Path, new_prefix: str, records: list[PrefixRecord], *, files: set[str], archive: Path) -> int:
    """Replace each record's placeholder with ``new_prefix`` in the files under ``root``.

    Called by :func:`kernelprov.engine.unpack.stage_tree` after extraction: ``root`` is where the
    env sits now (its staging dir), ``new_prefix`` where it will be published. Only regular files
    that the extraction itself wrote (``files``) are touched, so a malicious record cannot make us
    write outside the env or through a link. The result equals what the archive's own
    ``conda-unpack`` makes: the same bytes, each file keeps its mode (read-only ones included), and
    a file that changed gets a new mtime, so Python sees its ``.pyc`` is stale and recompiles just
    that source; every other file keeps its mtime and its bytecode stays valid. Returns the number
    of files changed.
    """
    new_bytes = new_prefix.encode()
    rewritten = []
    for path, placeholder, mode in records:
        name = normalise_member_name(path, archive)
        if name not in files:
            log.debug("prefix record %s names no extracted file; skipped", path)
            continue
        old = placeholder.encode()
        if mode == "text":
            changed = _rewrite_in_place(os.path.join(root, name), lambda data: data.replace(old, new_bytes))
        else:
            changed = _rewrite_in_place(
                os.path.join(root, name), lambda data: _binary_replace(data, old, new_bytes, name, new_prefix, placeholder)
            )
        if changed:
            rewritten.append(name)
    dropped = drop_unchecked_bytecode(root, rewritten, files)
    log.debug("relocated %s of %s recorded files to %s (%s unchecked .pyc dropped)", len(rewritten), len(records), new_prefix, dropped)
    return len(rewritten)


def _rewrite_in_place(path: str, transform: Callable[[bytes], bytes]) -> bool:
    """Rewrite one file through ``transform``, in place as ``conda-unpack`` does (hard links keep
    sharing it); return whether it changed.

    A file the archive made read-only for its owner is made writable only while it is rewritten
    and gets its exact mode back, whoever runs this (root ignores the mode bits, others do not).
    The new mtime is the write's own ("now"), moved one second past the old one when both fall
    in the same second: a timestamp ``.pyc`` records whole seconds, and an equal-length prefix
    keeps the size, so an unchanged second would leave the old bytecode "valid".
    """
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return False
    mode = stat.S_IMODE(st.st_mode)
    needs_access = mode & 0o600 != 0o600
    if needs_access:
        os.chmod(path, mode | 0o600)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "r+b") as f:
            data = f.read()
            new_data = transform(data)
            if new_data == data:
                return False
            f.seek(0)
            f.write(new_data)
            f.truncate()
            f.flush()
            written = os.fstat(fd)
            if written.st_mtime_ns // 10**9 == st.st_mtime_ns // 10**9:
                os.utime(fd, ns=(written.st_atime_ns, (st.st_mtime_ns // 10**9 + 1) * 10**9))
        return True
    finally:
        if needs_access:
            os.chmod(path, mode)


def drop_unchecked_bytecode(root: Path, rewritten: list[str], files: set[str]) -> int:
    """Remove the unchecked hash-based ``.pyc`` of each rewritten ``.py`` source; return how many.

    Called by :func:`relocate`. A timestamp ``.pyc`` goes stale through the source's new mtime
    and a checked hash-based one through its new bytes, but Python never validates an
    *unchecked* one (PEP 552), so it would run the unrelocated code forever. (conda-unpack leaves
    it; this is the one place kernelprov's tree differs.) Only files the extraction wrote under
    the source's ``__pycache__`` are looked at, so this costs nothing for an env without them.
    """
    dropped = 0
    for source in rewritten:
        if not source.endswith(".py"):
            continue
        folder, base = posixpath.split(source)
        cache_dir = posixpath.join(folder, "__pycache__")
        stem = base[:-3] + "."
        try:
            names = os.listdir(os.path.join(root, cache_dir))
        except OSError:
            continue
        for pyc in names:
            name = f"{cache_dir}/{pyc}"
            if not (pyc.startswith(stem) and pyc.endswith(".pyc") and name in files):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    header = f.read(8)
            except OSError:
                continue
            flags = int.from_bytes(header[4:8], "little") if len(header) == 8 else 0
            if flags & 0b11 == 0b01:  # hash-based, check_source off
                os.unlink(path)
                dropped += 1
    return dropped


def _binary_replace(data: bytes, old: bytes, new: bytes, name: str, new_prefix: str, placeholder: str) -> bytes:
    """Replace C strings holding ``old`` and pad with NULs so that every offset stays the same."""
    if len(new) > len(old):
        raise RelocateError(
            f"The cache path {new_prefix} is longer than the environment's original prefix "
            f"{placeholder} ({len(new)} > {len(old)} characters), which binary file {name} cannot hold; "
            "set KERNELPROV_CACHE_DIR to a shorter directory."
        )

    def pad(match: re.Match) -> bytes:
        text = match.group()
        return text.replace(old, new) + b"\0" * ((len(old) - len(new)) * text.count(old))

    return re.sub(re.escape(old) + b"([^\0]*?)\0", pad, data)
