"""A lean, strict reader for tar streams: headers parsed once, data handed out without copies.

Called by :mod:`kernelprov.archive` (extraction and manifest scans) in place of ``tarfile``.
Why hand-written: on a 14,000-file env, iterating with ``tarfile`` costs 0.96 s where
decompressing the same stream takes 0.15 s — its pure-Python parse of each header (and of the pax
header conda-pack writes before each member) was half of a cold unpack on tmpfs. This reader
parses only what extraction needs (POSIX ustar, pax ``x``/``g`` records, GNU ``L``/``K`` long
names, base-256 numbers) and is strict where ``tarfile`` is lenient: a bad checksum, a stream that
ends without its end-of-archive block, or truncated data raise instead of silently ending the
archive early (which is how conda-pack's corrupt hard-link entries and archives cut at a header
boundary slip through ``tarfile`` and GNU tar).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = 512
_CHUNK = 1 << 20
_FILE_TYPES = (b"0", b"\0", b"7")
_KINDS = {b"1": "hardlink", b"2": "symlink", b"5": "dir", b"3": "special", b"4": "special", b"6": "special"}
_POSIX_MAGIC = b"ustar\x0000"


class TarFormatError(ValueError):
    """The stream is not a valid tar archive (corrupt, truncated, or an unsupported feature)."""


@dataclass
class TarEntry:
    """One member: ``kind`` is "file", "dir", "symlink", "hardlink" or "special"."""

    name: str
    kind: str
    mode: int
    mtime: float
    size: int
    linkname: str


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        if field[0] == 0xFF:
            raise TarFormatError("negative number in a tar header")
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"invalid number {digits!r} in a tar header") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse "<length> <key>=<value>\\n" records."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("invalid pax header") from None
        record = data[space + 1 : pos + length - 1]
        key, sep, value = record.partition(b"=")
        if length <= 0 or not sep:
            raise TarFormatError("invalid pax header")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class TarStream:
    """Iterate a tar stream: ``for entry, chunks in TarStream(f).entries()``.

    ``chunks`` yields a regular file's data as memoryviews (valid until the next iteration);
    whatever the caller leaves unread is skipped.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._buf = b""
        self._pos = 0

    def _available(self, n: int) -> int:
        """Make at least ``n`` bytes readable if the stream has them; return how many are."""
        have = len(self._buf) - self._pos
        if have < n:
            parts = [self._buf[self._pos :]]
            while have < n:
                chunk = self._stream.read(max(n - have, _CHUNK))
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            self._buf, self._pos = b"".join(parts), 0
        return have

    def _take(self, n: int) -> bytes:
        if self._available(n) < n:
            raise TarFormatError("the data ends before the end-of-archive marker")
        start = self._pos
        self._pos += n
        return self._buf[start : self._pos]

    def _data(self, size: int) -> Iterator[memoryview]:
        remaining = size
        while remaining:
            have = self._available(min(remaining, _CHUNK))
            if not have:
                raise TarFormatError("the data ends before the end-of-archive marker")
            n = min(have, remaining)
            start = self._pos
            self._pos += n
            remaining -= n
            yield memoryview(self._buf)[start : start + n]

    def _skip_padding(self, size: int) -> None:
        if size % BLOCK:
            self._take(BLOCK - size % BLOCK)

    def entries(self) -> Iterator[tuple[TarEntry, Iterator[memoryview]]]:
        global_pax: dict[str, str] = {}
        pending: dict[str, str] = {}
        first = True
        while True:
            if self._available(BLOCK) == 0 and first:
                raise TarFormatError("the archive is empty")
            block = self._take(BLOCK)
            if block.count(0) == BLOCK:
                return  # end-of-archive marker
            first = False
            stored = _number(block[148:156])
            unsigned = sum(block) - sum(block[148:156]) + 8 * 32
            if stored != unsigned:
                raise TarFormatError("a tar header has a bad checksum")
            typeflag = block[156:157]
            size = _number(block[124:136])
            if typeflag in (b"x", b"g", b"L", b"K"):
                data = self._take(size)
                self._skip_padding(size)
                if typeflag == b"x":
                    pending.update(_pax_records(data))
                elif typeflag == b"g":
                    global_pax.update(_pax_records(data))
                else:
                    pending["path" if typeflag == b"L" else "linkpath"] = _text(data)
                continue
            name = _text(block[0:100])
            if block[257:265] == _POSIX_MAGIC and block[345] != 0:
                name = _text(block[345:500]) + "/" + name
            fields = {**global_pax, **pending}
            pending = {}
            if typeflag in _FILE_TYPES:
                kind = "file"
            elif typeflag in _KINDS:
                kind = _KINDS[typeflag]
            else:
                raise TarFormatError(f"member {fields.get('path', name)!r} uses an unsupported tar entry type {typeflag!r}")
            try:
                size = int(fields["size"]) if "size" in fields else size
                mtime = float(fields["mtime"]) if "mtime" in fields else float(_number(block[136:148]))
            except ValueError:
                raise TarFormatError("invalid pax size or mtime") from None
            entry = TarEntry(
                name=fields.get("path", name),
                kind=kind,
                mode=_number(block[100:108]) & 0o7777,
                mtime=mtime,
                size=size if kind == "file" else 0,
                linkname=fields.get("linkpath", _text(block[157:257])),
            )
            if kind != "file":
                yield entry, iter(())
                continue
            chunks = self._data(entry.size)
            yield entry, chunks
            for _ in chunks:  # whatever the caller did not read
                pass
            self._skip_padding(entry.size)
