"""Rewrite the recorded prefix placeholders of an unpacked env: the job of ``conda-unpack``.

Called by :func:`kernelprov.stage.ensure_staged` after extraction, while the env still sits in its
staging directory. conda-pack embeds its prefix records (path, placeholder, mode) in the archive's
``bin/conda-unpack`` script as a Python literal; we read that literal with :func:`ast.literal_eval`
(never executing the script) and rewrite the files in this process. That saves starting a second
interpreter from a half-made env, works even when the env's python cannot run on its own yet, and
lets us write the *final* prefix before the env is published by rename.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from pathlib import Path

from .treewriter import normalise_member_name
from ..errors import RelocateError

log = logging.getLogger(__name__)

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

    ``root`` is where the env sits now (its staging dir); ``new_prefix`` is where it will be
    published. Only regular files that the extraction itself wrote (``files``) are touched, so a
    malicious record cannot make us write outside the env or through a link. File mtimes are kept
    so Python's ``.pyc`` checks stay valid. Returns the number of files changed.
    """
    new_bytes = new_prefix.encode()
    changed = 0
    for path, placeholder, mode in records:
        name = normalise_member_name(path, archive)
        if name not in files:
            log.debug("prefix record %s names no extracted file; skipped", path)
            continue
        full = os.path.join(root, name)
        with open(full, "rb") as f:
            data = f.read()
        old = placeholder.encode()
        if mode == "text":
            new_data = data.replace(old, new_bytes)
        else:
            new_data = _binary_replace(data, old, new_bytes, name, new_prefix, placeholder)
        if new_data == data:
            continue
        st = os.stat(full)
        with open(full, "r+b") as f:
            f.write(new_data)
            f.truncate()
        os.utime(full, ns=(st.st_atime_ns, st.st_mtime_ns))
        changed += 1
    log.debug("relocated %s of %s recorded files to %s", changed, len(records), new_prefix)
    return changed


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
