"""Read conda-pack archives safely and stream their members onto local disk.

Called by :mod:`.unpack` (at a cold kernel start) to turn an archive into a directory tree
(:func:`extract`), and at pack/install time to describe one for its manifest (:func:`scan`). The
format is detected from the file's first bytes (:mod:`.formats`), never trusted from its name;
tar streams are parsed by :mod:`.tarstream`, the bytes under it flow through :mod:`.streams`, and
every member is validated and written by :mod:`.treewriter`.

Every failure to read the archive — a decompressor's report of damaged data, a truncated stream,
an unsafe or oversized header — becomes one :class:`ArchiveError` sentence that names the archive
and what to do; the decompressors' own texts (``ZstdError``, ``IsalError``...) go to the log only.
What one extraction may write is bounded (:func:`unpack_limits`): by the manifest when there is
one, by a ceiling derived from the archive's size otherwise.

Why a hand-written extractor rather than ``tarfile.extractall``: the standard library's
extraction filters are missing from some interpreters users run (Debian's 3.11.2) and had bypasses
fixed only in recent patch releases; and extraction is the hot path of a cold kernel start, so
directories are created once, mtimes and modes are set through the open file descriptor, and
nothing is stat'ed twice.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from ..errors import ArchiveError, human_size
from .formats import detect_format, is_image
from .logs import get_logger
from .streams import (CHUNK, HashingReader, ProgressCallback, ReadAhead, decompression_error_types, decompressor,
                      is_decompression_error)
from .tarstream import TarEntry, TarFormatError, TarStream, TarUnsafeError
from .treewriter import ExtractResult, Member, TreeWriter, UnpackLimits, normalise_member_name, too_long

log = get_logger(__name__)

#: The archive member whose bytes hold conda-pack's prefix records (see relocate.py).
UNPACK_SCRIPT = "bin/conda-unpack"
#: The most of that script kept in memory. Its records take ~150 bytes per file with a prefix
#: (16 MiB: ~110,000 files, more than any env records), and relocate.py's ast.parse of it costs
#: ~45 times its size, so this also caps that parse at ~700 MB.
MAX_UNPACK_SCRIPT_BYTES = 16 << 20
#: Without a manifest an archive may unpack to this many times its own size (conda envs compress
#: 3-7x; a decompression bomb, thousands of times) ...
UNPACKED_RATIO_CEILING = 25
#: ... but always to this much, so that a small genuine env is never refused.
UNPACKED_FLOOR_CEILING = 256 << 20
#: What each member costs against that ceiling besides its data (its tar header), so that a
#: flood of empty entries, which would exhaust inodes and memory, is bounded too.
ENTRY_COST = 512
#: What reading a damaged archive raises besides the decompressors' own errors (OSError: gzip and
#: bz2 report damage as one without an errno; those with an errno are the local disk's).
_STREAM_ERRORS = (TarFormatError, zipfile.BadZipFile, EOFError, ValueError, OverflowError, NotImplementedError, OSError)
#: The lead of every message that refuses an archive's content.
_UNSAFE = "The archive holds something unsafe."
#: How each format's damage is named in messages.
_CODECS = {"tar.gz": "gzip", "tar.bz2": "bzip2", "tar.xz": "xz", "tar.zst": "zstd", "tar": "tar", "zip": "zip"}

__all__ = ["ExtractResult", "ProgressCallback", "ScanResult", "UNPACK_SCRIPT", "UnpackLimits", "extract",
           "normalise_member_name", "scan", "unpack_limits"]


def unpack_limits(archive_size: int, manifest=None, *, ceiling: int = 0) -> UnpackLimits:
    """How much extracting an archive of ``archive_size`` bytes may write.

    Called by :func:`kernelprov.engine.unpack.stage_tree` before every extraction. With a
    ``manifest`` (anything with ``unpacked_bytes`` and ``members``), the archive may write no more
    than it records: the free-space check was made against those numbers, and an archive that
    writes more is not the one the manifest describes. Without one, ``ceiling`` bytes (0: the
    automatic :data:`UNPACKED_RATIO_CEILING` times the archive's size, at least
    :data:`UNPACKED_FLOOR_CEILING`), each entry counting :data:`ENTRY_COST` bytes besides its data.
    """
    recorded_bytes = getattr(manifest, "unpacked_bytes", None)
    recorded_members = getattr(manifest, "members", None)
    if isinstance(recorded_bytes, int) and recorded_bytes >= 0:
        members = recorded_members if isinstance(recorded_members, int) and recorded_members >= 0 else None
        entries = f" in {members:,} entries" if members is not None else ""
        return UnpackLimits(
            max_bytes=recorded_bytes, max_members=members, recorded=f"its manifest records ({human_size(recorded_bytes)}{entries})",
            remedy="it is damaged or not the archive its manifest describes — re-create it with `kernelprov pack`",
        )
    limit = ceiling if ceiling > 0 else max(archive_size * UNPACKED_RATIO_CEILING, UNPACKED_FLOOR_CEILING)
    return UnpackLimits(
        max_bytes=limit, entry_cost=ENTRY_COST,
        recorded=f"{human_size(limit)}, the most kernelprov unpacks from a {human_size(archive_size)} archive without a manifest",
        remedy="if it is a genuine environment, record its real size with `kernelprov install --archive` "
        "(which writes its manifest), or re-create it with `kernelprov pack`",
    )


def damaged_archive_error(archive: Path, fmt: str, err: BaseException) -> ArchiveError | None:
    """The one sentence for an archive whose bytes cannot be read as ``fmt``, or None when
    ``err`` says nothing about the archive (a full local disk, which the caller explains).

    Called by :func:`extract` and :func:`scan` for every exception out of the stream; the
    library's own text is logged for the admin, never shown to the researcher.
    """
    codec = _CODECS.get(fmt, fmt)
    if isinstance(err, TarUnsafeError):
        return ArchiveError(_UNSAFE, f"Refusing {archive}: {err}; re-create it with `kernelprov pack`.")
    if isinstance(err, TarFormatError):
        reason = str(err)
    elif isinstance(err, zipfile.BadZipFile):
        reason = "its zip directory or a member's checksum is damaged"
    elif isinstance(err, NotImplementedError):  # zipfile: a compression method it cannot inflate
        return ArchiveError("The archive uses an unsupported zip compression.",
                            f"Refusing {archive}: a member uses a zip compression method kernelprov cannot read; "
                            "re-create it with `kernelprov pack`.")
    elif isinstance(err, EOFError):
        reason = f"its {codec} data ends early"
    elif is_decompression_error(err):
        reason = f"its {codec} data is damaged"
    elif isinstance(err, (ValueError, OverflowError)):
        reason = "a member has an invalid field"
    else:
        return None
    log.debug("cannot read %s as %s: %r", archive, fmt, err)
    return ArchiveError("The archive is damaged.",
                        f"{archive} is truncated or corrupt ({reason}); re-copy it, or re-create it with `kernelprov pack`.")


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
        raise ArchiveError(_UNSAFE, f"Refusing {archive}: member {entry.name!r} is unsafe ({err}).") from err


def _tar_members(stream: BinaryIO, archive: Path, dest: str) -> Iterator[tuple[Member, Iterable[bytes] | None]]:
    for entry, chunks in TarStream(stream).entries():
        name = normalise_member_name(entry.name, archive)
        if entry.kind == "special":
            raise ArchiveError(_UNSAFE, f"Refusing {archive}: member {entry.name!r} is a device, FIFO or other special file.")
        if entry.kind in ("symlink", "hardlink"):
            _second_opinion(entry, dest, archive)
        yield Member(name, entry.kind, entry.mode, entry.mtime, entry.linkname, entry.size), chunks


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterator[tuple[Member, Iterable[bytes] | None]]:
    for info in zf.infolist():
        name = normalise_member_name(info.filename, archive)
        if info.flag_bits & 0x1:
            raise ArchiveError("The archive is encrypted.",
                               f"Refusing {archive}: member {info.filename!r} is encrypted; re-create it with `kernelprov pack`.")
        unix_mode = info.external_attr >> 16
        mtime = time.mktime(info.date_time + (0, 0, -1))
        if info.is_dir():
            member = Member(name, "dir", unix_mode or 0o755, mtime)
            yield member, None
        elif stat.S_ISLNK(unix_mode):
            with zf.open(info) as data:  # a link target is a path: never read more than a path can be
                target = data.read(4097).decode("utf-8", "surrogateescape")
            if too_long(target):
                raise ArchiveError(_UNSAFE, f"Refusing {archive}: member {info.filename!r} is a link whose target is longer "
                                   "than a path can be; re-create it with `kernelprov pack`.")
            yield Member(name, "symlink", 0o777, mtime, target), None
        elif stat.S_IFMT(unix_mode) not in (0, stat.S_IFREG):  # many zip writers leave the type unset
            raise ArchiveError(_UNSAFE, f"Refusing {archive}: member {info.filename!r} is a device, FIFO or other special file.")
        else:
            with zf.open(info) as data:
                chunks = iter(lambda: data.read(CHUNK), b"")
                yield Member(name, "file", unix_mode or 0o644, mtime, size=info.file_size), chunks


def _write_all(members: Iterator[tuple[Member, Iterable[bytes] | None]], writer: TreeWriter) -> None:
    """Write every member, keeping conda-pack's unpack script in memory for relocate.py
    (at most :data:`MAX_UNPACK_SCRIPT_BYTES` of it: the archive says how long it is)."""
    for member, chunks in members:
        if member.name == UNPACK_SCRIPT and member.kind == "file" and chunks is not None:
            if member.size > MAX_UNPACK_SCRIPT_BYTES:
                raise ArchiveError(
                    _UNSAFE,
                    f"Refusing {writer.archive}: its {UNPACK_SCRIPT} is {human_size(member.size)}, more than the "
                    f"{human_size(MAX_UNPACK_SCRIPT_BYTES)} any conda-pack env needs; re-create it with `kernelprov pack`.",
                )
            content = b"".join(chunks)
            writer.result.unpack_script = content
            chunks = (content,)
        writer.add(member, chunks)


def extract(archive: Path, dest: Path, *, progress: ProgressCallback | None = None,
            limits: UnpackLimits | None = None) -> ExtractResult:
    """Extract ``archive`` into the empty directory ``dest`` and return what was written.

    Called by :func:`kernelprov.engine.unpack.stage_tree` with a private staging directory and
    the :func:`unpack_limits` of the archive (None: the automatic ceiling); on any exception the
    caller removes ``dest``. Raises :class:`ArchiveError` for unsafe, corrupt, oversized or
    unreadable archives; other ``OSError`` (a full disk) propagate for the caller to explain.
    """
    fmt = detect_format(archive)
    if is_image(fmt):
        raise ArchiveError("The archive is an image this kernelprov cannot unpack.",
                           f"{archive} is a squashfs image, which this kernelprov cannot unpack yet; pack the env as .tar.zst.")
    result = ExtractResult(format=fmt)
    writer = TreeWriter(dest, archive, result)
    try:
        raw_file = open(archive, "rb")
    except OSError as err:
        raise ArchiveError("The archive cannot be read.", f"Cannot read the environment archive {archive}: {err.strerror}.") from err
    with raw_file:
        size = os.fstat(raw_file.fileno()).st_size
        writer.limits = limits if limits is not None else unpack_limits(size)
        reader = HashingReader(raw_file, size, progress, archive)
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
        except _STREAM_ERRORS + decompression_error_types() as err:
            damaged = damaged_archive_error(archive, fmt, err)  # None: not the archive's fault (a full disk)
            if damaged is None:
                raise
            raise damaged from err
        writer.finish()
    result.sha256 = reader.sha256.hexdigest()
    log.debug("extracted %s members (%s) from %s", result.members, human_size(result.bytes_written), archive)
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
    #: Does it look like a conda-pack env (``conda-meta/`` and a ``bin/python``)? None: not listed
    #: (squashfs images are not opened at scan time).
    conda_env: bool | None = None


#: What makes an archive a runnable conda env: :func:`scan` looks for both among the members.
PYTHON_MEMBER, CONDA_META_DIR = "bin/python", "conda-meta/"


def scan(archive: Path, *, progress: ProgressCallback | None = None) -> ScanResult:
    """Hash ``archive`` and count its members and unpacked bytes, in one streaming read.

    Called at pack/install time (never at kernel start) to write the manifest that every later
    extraction is checked against; the member count matches :attr:`ExtractResult.members`.
    """
    fmt = detect_format(archive)
    members = unpacked = 0
    has_python = has_conda_meta = False
    with open(archive, "rb") as raw_file:
        size = os.fstat(raw_file.fileno()).st_size
        reader = HashingReader(raw_file, size, progress, archive)
        try:
            if fmt == "zip":
                with zipfile.ZipFile(raw_file) as zf:
                    for info in zf.infolist():
                        name = normalise_member_name(info.filename, archive)
                        if name:
                            members += 1
                            unpacked += info.file_size
                            has_python = has_python or name == PYTHON_MEMBER
                            has_conda_meta = has_conda_meta or name.startswith(CONDA_META_DIR)
                raw_file.seek(0)
            elif not is_image(fmt):
                with ReadAhead(decompressor(fmt, reader)) as stream:
                    for entry, _chunks in TarStream(stream).entries():
                        name = normalise_member_name(entry.name, archive)
                        if name:
                            members += 1
                            unpacked += entry.size
                            has_python = has_python or name == PYTHON_MEMBER
                            has_conda_meta = has_conda_meta or name.startswith(CONDA_META_DIR)
            reader.drain()
        except _STREAM_ERRORS + decompression_error_types() as err:
            damaged = damaged_archive_error(archive, fmt, err)  # None: not the archive's fault (a full disk)
            if damaged is None:
                raise
            raise damaged from err
    listed = not is_image(fmt)
    return ScanResult(fmt, size, reader.sha256.hexdigest(), members if listed else None,
                      unpacked if listed else None, (has_python and has_conda_meta) if listed else None)
