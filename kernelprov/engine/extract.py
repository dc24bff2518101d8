"""Read conda-pack archives safely and stream their members onto local disk.

Called by :mod:`.unpack` (at a cold kernel start) to turn an archive into a directory tree
(:func:`extract`), and at pack/install time to describe one for its manifest (:func:`scan`). The
format is detected from the file's first bytes (:mod:`.formats`), never trusted from its name;
tar streams are parsed by :mod:`.tarstream`, the bytes under it flow through :mod:`.streams`, and
every member is validated and written by :mod:`.treewriter`.

Why a hand-written extractor rather than ``tarfile.extractall``: the standard library's
extraction filters are missing from some interpreters users run (Debian's 3.11.2) and had bypasses
fixed only in recent patch releases; and extraction is the hot path of a cold kernel start, so
directories are created once, mtimes and modes are set through the open file descriptor, and
nothing is stat'ed twice.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from ..errors import ArchiveError
from .formats import detect_format, is_image
from .streams import CHUNK, HashingReader, ProgressCallback, ReadAhead, decompressor, is_decompression_error
from .tarstream import TarEntry, TarFormatError, TarStream
from .treewriter import ExtractResult, Member, TreeWriter, normalise_member_name

log = logging.getLogger(__name__)

#: The archive member whose bytes hold conda-pack's prefix records (see relocate.py).
UNPACK_SCRIPT = "bin/conda-unpack"

__all__ = ["ExtractResult", "ProgressCallback", "ScanResult", "UNPACK_SCRIPT", "extract", "normalise_member_name", "scan"]


def _second_opinion(entry: TarEntry, dest: str, archive: Path) -> None:
    """Also ask the standard library's ``data`` filter where this interpreter has one (3.12+, 3.11.4+).

    Our own checks come first and are complete on their own; this is defence in depth, applied
    to link members, where escapes live. Not to every file: the filter resolves ``realpath`` per
    member (~18 lstat calls each), which doubled a cold start, and a regular file can only land
    outside through a link, which we never write through (O_NOFOLLOW, parents checked).
    """
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return
    info = tarfile.TarInfo(entry.name)
    info.type = tarfile.SYMTYPE if entry.kind == "symlink" else tarfile.LNKTYPE
    info.linkname, info.mode = entry.linkname, entry.mode
    try:
        data_filter(info, dest)
    except tarfile.FilterError as err:
        raise ArchiveError(f"Refusing {archive}: member {entry.name!r} is unsafe ({err}).") from err


def _tar_members(stream: BinaryIO, archive: Path, dest: str) -> Iterator[tuple[Member, Iterable[bytes] | None]]:
    for entry, chunks in TarStream(stream).entries():
        name = normalise_member_name(entry.name, archive)
        if entry.kind == "special":
            raise ArchiveError(f"Refusing {archive}: member {entry.name!r} is a device, FIFO or other special file.")
        if entry.kind in ("symlink", "hardlink"):
            _second_opinion(entry, dest, archive)
        yield Member(name, entry.kind, entry.mode, entry.mtime, entry.linkname, entry.size), chunks


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterator[tuple[Member, Iterable[bytes] | None]]:
    for info in zf.infolist():
        name = normalise_member_name(info.filename, archive)
        unix_mode = info.external_attr >> 16
        mtime = time.mktime(info.date_time + (0, 0, -1))
        if info.is_dir():
            member = Member(name, "dir", unix_mode or 0o755, mtime)
            yield member, None
        elif stat.S_ISLNK(unix_mode):
            target = zf.read(info).decode("utf-8", "surrogateescape")
            yield Member(name, "symlink", 0o777, mtime, target), None
        elif stat.S_IFMT(unix_mode) not in (0, stat.S_IFREG):  # many zip writers leave the type unset
            raise ArchiveError(f"Refusing {archive}: member {info.filename!r} is a device, FIFO or other special file.")
        else:
            with zf.open(info) as data:
                chunks = iter(lambda: data.read(CHUNK), b"")
                yield Member(name, "file", unix_mode or 0o644, mtime, size=info.file_size), chunks


def _write_all(members: Iterator[tuple[Member, Iterable[bytes] | None]], writer: TreeWriter) -> None:
    """Write every member, keeping conda-pack's unpack script in memory for relocate.py."""
    for member, chunks in members:
        if member.name == UNPACK_SCRIPT and member.kind == "file" and chunks is not None:
            content = b"".join(chunks)
            writer.result.unpack_script = content
            chunks = (content,)
        writer.add(member, chunks)


def extract(archive: Path, dest: Path, *, progress: ProgressCallback | None = None) -> ExtractResult:
    """Extract ``archive`` into the empty directory ``dest`` and return what was written.

    Called by :func:`kernelprov.engine.unpack.stage_tree` with a private staging directory; on any
    exception the caller removes ``dest``. Raises :class:`ArchiveError` for unsafe, corrupt or
    unreadable archives; other ``OSError`` (a full disk) propagate for the caller to explain.
    """
    fmt = detect_format(archive)
    if is_image(fmt):
        raise ArchiveError(f"{archive} is a squashfs image, which this kernelprov cannot unpack yet; pack the env as .tar.zst.")
    result = ExtractResult(format=fmt)
    writer = TreeWriter(dest, archive, result)
    try:
        raw_file = open(archive, "rb")
    except OSError as err:
        raise ArchiveError(f"Cannot read the environment archive {archive}: {err.strerror}.") from err
    with raw_file:
        size = os.fstat(raw_file.fileno()).st_size
        reader = HashingReader(raw_file, size, progress)
        try:
            if fmt == "zip":
                # zip needs random access, so the hash costs a second sequential read here.
                with zipfile.ZipFile(raw_file) as zf:
                    _write_all(_zip_members(zf, archive), writer)
                restore_source_mtimes(dest, result.files)
                raw_file.seek(0)
                reader.drain()
            else:
                with ReadAhead(decompressor(fmt, reader)) as stream:
                    _write_all(_tar_members(stream, archive, str(dest)), writer)
                reader.drain()
        except (TarFormatError, zipfile.BadZipFile, EOFError, ValueError) as err:
            raise ArchiveError(f"{archive} is truncated or corrupt ({err}); re-create it with `kernelprov pack`.") from err
        except OSError as err:
            if is_decompression_error(err):
                raise ArchiveError(f"{archive} is truncated or corrupt ({err}); re-create it with `kernelprov pack`.") from err
            raise
        writer.finish()
    result.sha256 = reader.sha256.hexdigest()
    log.debug("extracted %s members (%s bytes) from %s", result.members, result.bytes_written, archive)
    return result


def restore_source_mtimes(root: Path, files: set[str]) -> int:
    """Give each ``.py`` file back the exact mtime its ``__pycache__`` bytecode was compiled from.

    Called by :func:`extract` after unpacking a zip, whose timestamps have 2-second resolution
    (and no sub-second part): without this every odd-second source looks newer than its .pyc, so
    the first kernel recompiles its imports (measured: +0.55 s on the benchmark env). Only a
    timestamp-based .pyc whose recorded source size matches and whose recorded mtime lies in the
    same 2-second slot as the extracted file is trusted, so a .pyc that was stale in the packed
    env stays stale. Returns how many sources were adjusted.
    """
    adjusted = 0
    for name in files:
        if not name.endswith(".pyc") or "/__pycache__/" not in f"/{name}":
            continue
        cache_dir, pyc = posixpath.split(name)
        source = posixpath.join(posixpath.dirname(cache_dir), pyc.split(".", 1)[0] + ".py")
        if source not in files:
            continue
        try:
            with open(os.path.join(root, name), "rb") as f:
                header = f.read(16)
            source_path = os.path.join(root, source)
            st = os.lstat(source_path)
        except OSError:
            continue
        if len(header) < 16 or int.from_bytes(header[4:8], "little") != 0:
            continue  # not a timestamp-based pyc (hash-based ones need no mtime)
        recorded_mtime = int.from_bytes(header[8:12], "little")
        recorded_size = int.from_bytes(header[12:16], "little")
        if recorded_size != st.st_size & 0xFFFFFFFF or not 0 < recorded_mtime - int(st.st_mtime) < 2:
            continue
        os.utime(source_path, (recorded_mtime, recorded_mtime), follow_symlinks=False)
        adjusted += 1
    return adjusted


@dataclass
class ScanResult:
    """What :func:`scan` learned about an archive, for its manifest."""

    format: str
    size: int
    sha256: str
    members: int | None
    unpacked_bytes: int | None


def scan(archive: Path, *, progress: ProgressCallback | None = None) -> ScanResult:
    """Hash ``archive`` and count its members and unpacked bytes, in one streaming read.

    Called at pack/install time (never at kernel start) to write the manifest that every later
    extraction is checked against; the member count matches :attr:`ExtractResult.members`.
    """
    fmt = detect_format(archive)
    members = unpacked = 0
    with open(archive, "rb") as raw_file:
        size = os.fstat(raw_file.fileno()).st_size
        reader = HashingReader(raw_file, size, progress)
        try:
            if fmt == "zip":
                with zipfile.ZipFile(raw_file) as zf:
                    for info in zf.infolist():
                        if normalise_member_name(info.filename, archive):
                            members += 1
                            unpacked += info.file_size
                raw_file.seek(0)
            elif not is_image(fmt):
                with ReadAhead(decompressor(fmt, reader)) as stream:
                    for entry, _chunks in TarStream(stream).entries():
                        if normalise_member_name(entry.name, archive):
                            members += 1
                            unpacked += entry.size
            reader.drain()
        except (TarFormatError, zipfile.BadZipFile, EOFError, ValueError) as err:
            raise ArchiveError(f"{archive} is truncated or corrupt ({err}); re-create it with `kernelprov pack`.") from err
    return ScanResult(fmt, size, reader.sha256.hexdigest(), members if not is_image(fmt) else None,
                      unpacked if not is_image(fmt) else None)
