"""Pack a conda environment with conda-pack and write its manifest sidecar.

Called by ``kernelprov pack`` and ``kernelprov install``. The archive is written under a temporary
name beside its destination and renamed into place only when complete, so a half-written archive
never sits where a kernel would read it; its manifest (sha256, size, python version, conda and
pip package counts) is written next to it for the stage engine to verify against. ``.tar.zst`` is written by conda-pack's own packer (what goes
in, what is rewritten, ``conda-unpack``) into kernelprov's compressor: multi-threaded zstd in
independent frames (:class:`MultiFrameZstdWriter`), where conda-pack writes one frame at level 9 on
one thread. For an archive
made elsewhere (``install --archive``), the python version and package counts are read from the
``conda-meta/`` records inside it, streamed once and never extracted.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import os
import re
import struct
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Iterable

from ..errors import ArchiveError, PackError
from .formats import DEFAULT_FORMAT, FORMAT_NAMES, detect_format, format_from_name, is_image, strip_suffix
from .image_stage import baked_mount_point
from .logs import get_logger
from .manifest import Manifest, manifest_for, read_manifest, write_manifest
from .streams import HashingReader, ReadAhead, decompression_error_types, decompressor
from .tarstream import TarFormatError, TarStream
from .treewriter import normalise_member_name

log = get_logger(__name__)

#: What ``kernelprov pack`` writes: every format of the table, all of which conda-pack can write.
PACK_FORMATS = FORMAT_NAMES
#: zstd level of ``.tar.zst``, chosen by measurement (benchmarks/pack_speed.py, issue 13): on the
#: 23k-file bench env, in 8 MiB frames on 2 threads, level 3 packs 0.87x the size of conda-pack's
#: default tar.gz; level 4 saves 1.5 % more for ~30 % more CPU, level 5 4 % more for 2x.
ZSTD_LEVEL = 3
#: Uncompressed bytes per independent zstd frame: large enough to cost <1 % of ratio against one
#: frame, small enough that every core has frames to decompress (or compress) at once.
ZSTD_FRAME_BYTES = 8 << 20
#: pzstd's skippable frame before each frame, holding that frame's compressed size, so a reader
#: can find every frame without decompressing (``pzstd -d -p N``); every zstd reader skips it.
_SKIPPABLE_MAGIC = 0x184D2A50


def pack_env(
    output: Path,
    *,
    name: str | None = None,
    prefix: Path | None = None,
    fmt: str | None = None,
    force: bool = False,
    verbose: bool = False,
) -> Manifest:
    """Pack the env given by conda ``name`` or ``prefix`` into ``output``; return its manifest.

    The env name is resolved by conda-pack itself (``conda info --json``), exactly as
    ``conda pack -n NAME`` would. The archive is made readable per the umask (conda-pack creates
    it 0600), because archives are usually meant for kernels other users start too.
    """
    import conda_pack  # deferred: importing it is slow and only pack/install need it

    if (name is None) == (prefix is None):
        raise PackError("Give either a conda environment name or --env-prefix PATH, not both or neither.")
    output = Path(output).expanduser().absolute()
    fmt = fmt or format_from_name(output) or DEFAULT_FORMAT
    if fmt not in PACK_FORMATS:
        raise PackError(f"Unsupported archive format {fmt!r}; choose one of {', '.join(PACK_FORMATS)}.")
    if output.exists() and not force:
        raise PackError(f"{output} already exists; pass --force to overwrite it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        env = conda_pack.CondaEnv.from_name(name) if name else conda_pack.CondaEnv.from_prefix(str(prefix))
    except conda_pack.CondaPackException as err:
        detail, hint = _first_line(err), ""
        if name:
            hint = " Is conda on your PATH? Or give the env by path with --env-prefix."
        elif _no_env_at(err):
            detail, hint = detail.rstrip("."), ("; point --env-prefix at a conda env (a directory with conda-meta/), "
                                                "or use an existing archive: `kernelprov install NAME --archive FILE`.")
        raise PackError(f"conda-pack cannot read the environment: {detail}{hint}") from err
    dest_prefix = None
    if fmt == "squashfs":
        # Read-only images are relocated at pack time, to a fresh mount point of the packing user
        # (a symlink in a directory only they can write; see image_stage).
        dest_prefix = str(baked_mount_point(strip_suffix(output.name)))
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    os.close(fd)
    try:
        if fmt == "tar.zst":
            _pack_tar_zst(env, Path(tmp), verbose)
        else:
            env.pack(output=tmp, format=fmt, force=True, verbose=verbose, dest_prefix=dest_prefix)
        os.chmod(tmp, 0o644)
        manifest = manifest_for(
            Path(tmp),
            python_version=_python_version(Path(env.prefix)),
            packages=len(glob.glob(os.path.join(env.prefix, "conda-meta", "*.json"))),
            pip_packages=count_pip_distributions((f.target, f.is_conda) for f in env.files),
            source_prefix=env.prefix,
            dest_prefix=dest_prefix,
        )
        os.replace(tmp, output)
    except conda_pack.CondaPackException as err:
        raise PackError(f"conda-pack failed: {_first_line(err)}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    write_manifest(output, manifest)
    log.info("packed %s into %s (%s bytes)", env.prefix, output, manifest.size)
    return manifest


def _pack_tar_zst(env, path: Path, verbose: bool) -> None:
    """Write ``env`` as ``.tar.zst`` at ``path``: conda-pack's ``CondaEnv.pack`` for format
    ``tar`` — its packer decides every member and rewrite and adds ``conda-unpack`` — with the
    tar stream going into a :class:`MultiFrameZstdWriter` instead of conda-pack's one-thread,
    one-frame level-9 writer (and straight to ``path``, not through a temporary file in /tmp)."""
    from conda_pack._progress import progressbar
    from conda_pack.core import Packer
    from conda_pack.formats import archive

    history = Path(env.prefix) / "conda-meta" / "history"
    mtime = history.lstat().st_mtime if history.exists() else None  # as CondaEnv.pack sets it
    with open(path, "wb") as out, MultiFrameZstdWriter(out) as frames:
        with archive(frames, str(path), "", "tar", mtime=mtime) as tar:
            packer = Packer(env.prefix, tar, None, None)
            with progressbar(env.files, enabled=verbose) as files:
                for file in files:
                    packer.add(file)
            packer.finish()


class MultiFrameZstdWriter(io.RawIOBase):
    """A write-only file that zstd-compresses what it is given as independent frames, in parallel.

    Every :data:`ZSTD_FRAME_BYTES` of input become one frame (with its content size and a
    checksum), compressed in a pool of ``threads`` (default: the CPUs this process may use;
    zstandard releases the GIL) and written in order, each behind pzstd's skippable frame that
    holds its compressed size. Any zstd reader reads the result as one stream (kernelprov's
    extractor, ``zstd -d``, conda-pack's ``tarfile`` + zstandard); ``pzstd -d`` and a frame-aware
    reader decompress frames on several cores. At most ``2 * threads`` frames are in flight, so
    memory stays bounded (about ``4 * threads * frame_bytes``) whatever the archive's size.
    """

    def __init__(self, out, *, level: int = ZSTD_LEVEL, frame_bytes: int = ZSTD_FRAME_BYTES, threads: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        import zstandard

        self._out = out
        self._level = level
        self._frame_bytes = frame_bytes
        self._threads = threads or len(os.sched_getaffinity(0))
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="kernelprov-zstd")
        self._pending: collections.deque = collections.deque()
        self._buffer = bytearray()
        self._local = threading.local()
        self._zstandard = zstandard
        self.written = 0  # uncompressed bytes taken
        self.frames = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        """Uncompressed bytes written so far (``tarfile`` asks at its start)."""
        return self.written

    def write(self, data) -> int:
        size = len(data)
        self._buffer += data
        self.written += size
        while len(self._buffer) >= self._frame_bytes:
            self._submit(bytes(self._buffer[:self._frame_bytes]))
            del self._buffer[:self._frame_bytes]
        return size

    def _compress(self, chunk: bytes) -> bytes:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:  # one per worker thread: a ZstdCompressor is not thread-safe
            compressor = self._local.compressor = self._zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True)
        frame = compressor.compress(chunk)
        return struct.pack("<III", _SKIPPABLE_MAGIC, 4, len(frame)) + frame

    def _submit(self, chunk: bytes) -> None:
        self._pending.append(self._pool.submit(self._compress, chunk))
        self.frames += 1
        while len(self._pending) > 2 * self._threads:
            self._out.write(self._pending.popleft().result())

    def close(self) -> None:
        """Compress what is left and write every frame; the underlying file stays open."""
        if self.closed:
            return
        try:
            if self._buffer or not self.frames:
                self._submit(bytes(self._buffer))  # an empty input is still one (empty) frame
                self._buffer.clear()
            while self._pending:
                self._out.write(self._pending.popleft().result())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            super().close()


def describe_archive(archive: Path) -> Manifest:
    """Write a manifest for an archive made elsewhere (``install --archive``) if it has none.

    Reads the archive at install time, so every later kernel start can verify it: a scan (hash,
    members), then, for a conda env, its ``conda-meta/`` records for the python version and
    package counts that a manifest written by :func:`pack_env` holds.
    """
    archive = Path(archive)
    existing = read_manifest(archive)
    if existing is not None:
        return existing
    manifest = manifest_for(archive)
    if manifest.conda_env:
        manifest = dataclasses.replace(manifest, **conda_meta_details(archive))
    if os.access(archive.parent, os.W_OK):
        write_manifest(archive, manifest)
    else:
        log.warning("cannot write a manifest beside %s; kernels will start without an integrity check", archive)
    return manifest


#: A distribution's metadata in site-packages: the ``<name>.dist-info`` dir pip writes, or the
#: ``<name>.egg-info`` dir or file of older installers.
_DISTRIBUTION = re.compile(r"(lib/python[^/]+/site-packages/[^/]+\.(?:dist|egg)-info)(?:/|$)")
#: The most of one ``conda-meta/*.json`` record kept in memory (with its parse, ~10x that) when
#: reading it from an archive: the largest packages' records (thousands of files) take a few MB.
MAX_CONDA_RECORD_BYTES = 32 << 20
#: A python version as conda records it ("3.11.7"), and nothing a hostile record could put there.
_VERSION = re.compile(r"[0-9A-Za-z.+_-]{1,64}")


def count_pip_distributions(paths: Iterable[tuple[str, bool]]) -> int:
    """How many distributions in ``lib/python*/site-packages`` no conda record owns.

    ``paths`` are an env's files relative to its prefix, each with whether a conda record lists
    it (conda-pack's managed files); a ``*.dist-info``/``*.egg-info`` with no managed file is one
    that pip (or another installer conda does not know) put there. Called by :func:`pack_env`
    with conda-pack's file list and by :func:`conda_meta_details` with an archive's members.
    """
    unmanaged, managed = set(), set()
    for path, is_conda in paths:
        match = _DISTRIBUTION.match(path)
        if match:
            (managed if is_conda else unmanaged).add(match.group(1))
    return len(unmanaged - managed)


@dataclasses.dataclass
class _CondaMeta:
    """What :func:`conda_meta_details` collects while streaming an archive (names only, never data)."""

    records: int = 0
    python_version: str | None = None
    owned: set = dataclasses.field(default_factory=set)  # distribution dirs a conda record lists
    present: set = dataclasses.field(default_factory=set)  # distribution dirs among the archive's members
    complete: bool = True  # False: a record could not be read, so ownership is not known

    def add_member(self, name: str) -> None:
        match = _DISTRIBUTION.match(name)
        if match:
            self.present.add(match.group(1))

    def add_record(self, name: str, data: bytes | None) -> None:
        self.records += 1
        try:
            record = json.loads(data) if data is not None else None
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            log.info("cannot read the conda record %s; not counting pip packages", name)
            self.complete = False
            return
        version = record.get("version")
        if record.get("name") == "python" and isinstance(version, str) and _VERSION.fullmatch(version):
            self.python_version = version
        files = record.get("files")
        for path in files if isinstance(files, list) else ():
            if isinstance(path, str):
                match = _DISTRIBUTION.match(path)
                if match:
                    self.owned.add(match.group(1))


def _is_conda_record(name: str) -> bool:
    """``conda-meta/<record>.json``, as ``pack_env`` counts them (not in a subdirectory)."""
    return name.startswith("conda-meta/") and name.endswith(".json") and name.count("/") == 1


def conda_meta_details(archive: Path) -> dict:
    """Python version, conda and pip package counts read from the ``conda-meta/`` records inside
    ``archive``, as :func:`pack_env` records them for envs it packs itself.

    Called by :func:`describe_archive` (``install --archive``) once, when it writes a manifest;
    the archive is streamed, never extracted, and at most :data:`MAX_CONDA_RECORD_BYTES` of one
    record is held. Details that cannot be read are left out (the manifest says "not known").
    """
    fmt = detect_format(archive)
    if is_image(fmt):
        return {}
    found = _CondaMeta()
    try:
        if fmt == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = normalise_member_name(info.filename, archive)
                    found.add_member(name)
                    if _is_conda_record(name) and not info.is_dir():
                        with zf.open(info) as data:
                            content = data.read(MAX_CONDA_RECORD_BYTES + 1)
                        found.add_record(name, content if len(content) <= MAX_CONDA_RECORD_BYTES else None)
        else:
            # Through HashingReader as scan() reads it: a failing read is one ArchiveError (the hash is unused).
            with open(archive, "rb") as raw, ReadAhead(decompressor(fmt, HashingReader(raw, 0, None, archive))) as stream:
                for entry, chunks in TarStream(stream).entries():
                    name = normalise_member_name(entry.name, archive)
                    found.add_member(name)
                    if _is_conda_record(name) and entry.kind == "file":
                        content = b"".join(chunks) if entry.size <= MAX_CONDA_RECORD_BYTES else None
                        found.add_record(name, content)
    except (ArchiveError, TarFormatError, zipfile.BadZipFile, OSError, ValueError, OverflowError,
            *decompression_error_types()) as err:
        # scan() has just read the whole archive; a failure now is not worth failing the install.
        log.warning("cannot read the conda records in %s: %s", archive, err)
        return {}
    if not found.records:
        return {}
    return {"python_version": found.python_version, "packages": found.records,
            "pip_packages": len(found.present - found.owned) if found.complete else None}


def _no_env_at(err: Exception) -> bool:
    """Does conda-pack's error say the path given is no conda env (or does not exist)?"""
    text = str(err)
    return "is not a conda environment" in text or "doesn't exist" in text


def _python_version(prefix: Path) -> str | None:
    for record in glob.glob(os.path.join(prefix, "conda-meta", "python-[0-9]*.json")):
        try:
            with open(record) as f:
                return json.load(f).get("version")
        except (OSError, ValueError):
            continue
    return None


def _first_line(err: Exception) -> str:
    """conda-pack's messages run over many lines and end with a raw dump; keep the first sentence."""
    text = str(err).strip().split(" The full error is below")[0].splitlines()
    return text[0] if text else type(err).__name__
