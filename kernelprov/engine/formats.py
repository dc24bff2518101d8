"""The one table of archive formats kernelprov knows: names, file suffixes, magic bytes.

Read by everything that names, detects or offers a format — extraction (:mod:`.extract`), packing
(:mod:`.pack` and the CLI's ``--format`` choices), the cache's readable names
(:class:`.cache.CacheEntry`), and the panel — so they cannot disagree. A file's format is always
detected from its first bytes (:func:`detect_format`); a name only suggests the format to *write*
(:func:`format_from_name`) or gives a readable env name (:func:`strip_suffix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ArchiveError


@dataclass(frozen=True)
class ArchiveFormat:
    """One format: its name (as conda-pack spells it), its file suffixes (the first is the one
    kernelprov writes), the magic bytes that identify it, and how a kernel start uses it."""

    name: str
    suffixes: tuple[str, ...]
    magic: tuple[bytes, ...]
    #: "tree": streamed into a directory; "image": copied and mounted (squashfs)
    staging: str = "tree"


#: Every format, in the order the CLI offers them (the default first).
FORMATS: tuple[ArchiveFormat, ...] = (
    # A zstd frame, or the skippable frame (pzstd's) that kernelprov's multi-frame writer puts
    # before each frame to hold its size (engine.pack.MultiFrameZstdWriter).
    ArchiveFormat("tar.zst", (".tar.zst", ".tzst"), (b"\x28\xb5\x2f\xfd", b"\x50\x2a\x4d\x18")),
    ArchiveFormat("tar.gz", (".tar.gz", ".tgz"), (b"\x1f\x8b",)),
    ArchiveFormat("tar.bz2", (".tar.bz2", ".tbz2"), (b"BZh",)),
    ArchiveFormat("tar.xz", (".tar.xz", ".txz"), (b"\xfd7zXZ\x00",)),
    ArchiveFormat("tar", (".tar",), ()),  # recognised by "ustar" at offset 257
    ArchiveFormat("zip", (".zip",), (b"PK\x03\x04", b"PK\x05\x06")),
    ArchiveFormat("squashfs", (".squashfs", ".sqsh"), (b"hsqs",), staging="image"),
)
BY_NAME = {fmt.name: fmt for fmt in FORMATS}
DEFAULT_FORMAT = "tar.zst"
#: Format names, for ``--format`` choices and error messages.
FORMAT_NAMES: tuple[str, ...] = tuple(fmt.name for fmt in FORMATS)

_USTAR_OFFSET = 257


def detect_format(path: Path) -> str:
    """Name the archive format of ``path`` from its first bytes.

    Called by the stage engine before extracting, by ``kernelprov doctor`` and by the panel to
    describe an archive without a manifest. Raises :class:`ArchiveError` for anything that is not
    a known format, or a file that cannot be read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        raise ArchiveError(f"Cannot read the environment archive {path}: {err.strerror}.") from err
    for fmt in FORMATS:
        if any(head.startswith(magic) for magic in fmt.magic):
            return fmt.name
    if head[_USTAR_OFFSET:_USTAR_OFFSET + 5] == b"ustar":
        return "tar"
    expected = ", ".join(fmt.suffixes[0] for fmt in FORMATS)
    raise ArchiveError(f"{path} is not a conda-pack archive (expected {expected}); re-create it with `kernelprov pack`.")


def format_from_name(path: Path | str) -> str | None:
    """The format a file name asks for (``env.tgz`` -> ``tar.gz``), or None.

    Called by ``kernelprov pack`` to choose what to write from ``-o``; never used to decide how to
    read a file.
    """
    name = Path(path).name
    for fmt in FORMATS:
        if name.endswith(fmt.suffixes):
            return fmt.name
    return None


def strip_suffix(file_name: str) -> str:
    """``myenv.tar.zst`` -> ``myenv``: a readable env name from an archive's file name."""
    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            if file_name.endswith(suffix) and len(file_name) > len(suffix):
                return file_name[: -len(suffix)]
    return file_name


def archive_file_name(env_name: str, fmt: str = DEFAULT_FORMAT) -> str:
    """The file name kernelprov gives an archive of ``env_name`` in format ``fmt``."""
    return f"{env_name}{BY_NAME[fmt].suffixes[0]}"


def is_image(fmt: str) -> bool:
    """Is ``fmt`` staged as a mounted image rather than extracted into a tree?"""
    return BY_NAME[fmt].staging == "image"
