"""Damage an archive the way a bad copy or a failing disk does: in the middle, keeping its size."""

from __future__ import annotations

import bz2
import io
import lzma
import zipfile
import zlib
from pathlib import Path

import zstandard


def _damage_noticed_by_the_decompressor(data: bytes, fmt: str, upto: int) -> bool:
    """Does the format's own decompressor fail within ``data[:upto]``? (zip: its member CRCs.)
    Requiring the failure near the damage, not only at a final checksum, makes the decompressor's
    error, not the tar reader's view of garbage, the one a stage meets first."""
    if fmt == "zip":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return zf.testzip() is not None
        except (zipfile.BadZipFile, zlib.error):
            return True
    decompress = {"tar.gz": zlib.decompressobj(wbits=31).decompress, "tar.bz2": bz2.BZ2Decompressor().decompress,
                  "tar.xz": lzma.LZMADecompressor().decompress,
                  "tar.zst": zstandard.ZstdDecompressor().decompressobj().decompress}[fmt]
    try:
        decompress(data[:upto])
    except (zlib.error, OSError, lzma.LZMAError, zstandard.ZstdError):
        return True
    return False


def corrupt_mid_stream(archive: Path, fmt: str) -> int:
    """Overwrite 32 bytes past the middle of ``archive`` (same size) where the format's own
    decompressor notices at once; return the offset. Used by test_hostile_archives.py and test_server_errors.py."""
    raw = archive.read_bytes()
    for offset in range(len(raw) * 3 // 5, len(raw) - 64, 97):
        damaged = raw[:offset] + bytes(range(32)) + raw[offset + 32:]
        if _damage_noticed_by_the_decompressor(damaged, fmt, offset + 64 * 1024):
            archive.write_bytes(damaged)
            return offset
    raise AssertionError(f"no detectable corruption found in {archive}")
