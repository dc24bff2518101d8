"""Guarantee: a malicious, corrupt or truncated archive is refused before anything lands outside
its staging dir, names the offending member and archive, and leaves nothing a later start trusts.

Every escape is aimed, by a relative path computed from where the staging dir really is (or by
an absolute one), at the directory ``outside`` that the checks watch; ``test_each_escape_lands_
outside_without_kernelprovs_checks`` proves the aim by extracting the same archives with
``tarfile`` and no filter. The user's cache dir and the cache root are checked too. Damaged
data is tried in every compressed format, with and without a manifest.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import zstandard

from kernelprov.engine import cache
from kernelprov.errors import ArchiveError, KernelprovError
from kernelprov.engine.inventory import find_staged
from kernelprov.engine.stage import ensure_staged

from .archive_damage import corrupt_mid_stream
from .conftest import TAR_FORMATS

#: Names the attacks below give what they try to plant.
ATTACK_NAMES = ("escaped", "planted", "pwned")
#: How kernelprov's messages name each format's compression.
CODECS = {"tar.gz": "gzip", "tar.bz2": "bzip2", "tar.xz": "xz", "tar.zst": "zstd", "zip": "zip"}
#: What a decompressor's own error text looks like; none of it may reach a researcher.
RAW_ERROR_TEXTS = ("Error", "Errno", "error -", "CRC", "Invalid data stream", "decompress")


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x\n", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = mode, 1_600_000_000
    return info, data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o777
    return info, None


@pytest.fixture
def outside(tmp_path) -> Path:
    """The directory next to the cache that every escape below aims at; it holds one victim file
    (``victim``, mode 0600) and must stay exactly as it is."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "victim").write_bytes(b"/opt/old\n")
    os.chmod(target / "victim", 0o600)
    return target


def _up(cache_root: Path, outside: Path) -> str:
    """``outside`` relative to a staging dir of this user's cache (``../../../outside`` today)."""
    return os.path.relpath(outside, cache.user_cache_dir(cache_root) / ".staging-key-random")


def _state(directory: Path) -> dict[str, tuple]:
    return {str(p.relative_to(directory)): (os.lstat(p).st_mode, os.lstat(p).st_nlink, p.read_bytes() if p.is_file() else b"")
            for p in directory.rglob("*")}


def _assert_refused(archive: Path, cache_root: Path, outside: Path, *, member: str) -> None:
    before = _state(outside)
    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)
    message = str(raised.value)
    assert str(archive) in message and repr(member) in message, message
    assert "\n" not in message
    _assert_untouched(cache_root, outside, before)
    assert find_staged(archive) is None
    assert _read_ahead_threads() == [], "a refused archive must not leave its decompression thread running"


def _assert_untouched(cache_root: Path, outside: Path, before: dict) -> None:
    """``outside`` as it was; nothing planted in the cache root or the user's dir; no staging left."""
    assert _state(outside) == before
    user_dir = cache.user_cache_dir(cache_root)
    assert os.listdir(cache_root) == [user_dir.name]
    planted = [p for p in cache_root.rglob("*") if any(name in p.name for name in ATTACK_NAMES)]
    assert planted == [], "nothing may land in the cache root or the user's cache dir"
    assert not list(user_dir.glob(".staging-*")), "the staging dir must be removed"


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kernelprov-read-ahead"]


#: Each escape as (members, offender), written with ``{up}`` (``outside`` relative to the staging
#: dir) and ``{abs}`` (its absolute path); links are followed by a file written through them.
ESCAPES = {
    "dotdot": ([("file", "bin/ok", ""), ("file", "{up}/escaped", "")], "{up}/escaped"),
    "nested-dotdot": ([("file", "lib/ok", ""), ("file", "lib/../{up}/escaped", "")], "lib/../{up}/escaped"),
    "absolute": ([("file", "{abs}/escaped", "")], "{abs}/escaped"),
    "symlink-absolute": ([("symlink", "lib/out", "{abs}"), ("file", "lib/out/planted", "")], "lib/out"),
    "symlink-escaping": ([("symlink", "lib/up", "../{up}"), ("file", "lib/up/planted", "")], "lib/up"),
    "hardlink-absolute": ([("hardlink", "lib/victim", "{abs}/victim")], "lib/victim"),
    "hardlink-escaping": ([("hardlink", "lib/victim", "{up}/victim")], "lib/victim"),
}
_TYPES = {"file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}


def _escape(name: str, up: str, outside: Path) -> tuple[list, str]:
    members, offender = ESCAPES[name]
    def aim(text: str) -> str:
        return text.format(up=up, abs=outside)
    built = [_file(aim(n)) if kind == "file" else _special(aim(n), _TYPES[kind], aim(t)) for kind, n, t in members]
    return built, aim(offender)


@pytest.mark.parametrize("name", ESCAPES)
def test_escapes_are_refused(name, tmp_path, cache_root, outside):
    members, offender = _escape(name, _up(cache_root, outside), outside)
    archive = _tar(tmp_path / "evil.tar.gz", members)
    _assert_refused(archive, cache_root, outside, member=offender)


@pytest.mark.parametrize("name", ESCAPES)
def test_each_escape_lands_outside_without_kernelprovs_checks(name, tmp_path, outside):
    """The escapes above can fail: ``tarfile`` with no filter, extracting from the staging dir's
    depth, writes into ``outside`` (or hard-links its victim file)."""
    dest = tmp_path / "cache" / "kernelprov-u" / ".staging-key-random"
    dest.mkdir(parents=True)
    members, _ = _escape(name, os.path.relpath(outside, dest), outside)
    archive = _tar(tmp_path / "evil.tar.gz", members)
    before = _state(outside)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="fully_trusted")
    assert _state(outside) != before


@pytest.mark.parametrize("members, offender", [
    ([_special("lib/missing", tarfile.LNKTYPE, "lib/nothing")], "lib/missing"),
    ([_special("dev/null", tarfile.CHRTYPE)], "dev/null"),
    ([_special("dev/sda", tarfile.BLKTYPE)], "dev/sda"),
    ([_special("tmp/pipe", tarfile.FIFOTYPE)], "tmp/pipe"),
], ids=["hardlink-dangling", "char-device", "block-device", "fifo"])
def test_unsafe_members_are_refused(members, offender, tmp_path, cache_root, outside):
    archive = _tar(tmp_path / "evil.tar.gz", members)
    _assert_refused(archive, cache_root, outside, member=offender)


def test_a_refusal_early_in_a_big_archive_stops_the_read_ahead(tmp_path, cache_root, outside):
    # 24 MiB of incompressible data after the offending member: the decompression thread runs
    # ahead, fills its queue and blocks; the refusal must stop and join that thread.
    big = _file("lib/big.bin", os.urandom(24 << 20))
    offender = f"{_up(cache_root, outside)}/escaped"
    archive = _tar(tmp_path / "evil.tar", [_file("lib/ok"), _file(offender), big], mode="w")
    compressed = tmp_path / "evil.tar.zst"
    compressed.write_bytes(zstandard.ZstdCompressor(level=1).compress(archive.read_bytes()))
    _assert_refused(compressed, cache_root, outside, member=offender)


def test_symlink_then_write_through_it_is_refused(tmp_path, cache_root, outside):
    # A link that stays inside (so it passes on its own), then a file written "through" it.
    archive = _tar(tmp_path / "evil.tar.gz", [_special("lib", tarfile.SYMTYPE, "."), _file("lib/planted")])
    _assert_refused(archive, cache_root, outside, member="lib/planted")


def test_a_link_chain_that_escapes_is_refused(tmp_path, cache_root, outside):
    # Each link looks inside on its own; together a/c resolves to ``outside``: a/b1 is the staging
    # dir, each a/b<i> one level above the one before, a/c the last one's "outside".
    up = _up(cache_root, outside).split("/")
    links = [_special("a/b1", tarfile.SYMTYPE, "..")]
    links += [_special(f"a/b{i}", tarfile.SYMTYPE, f"b{i - 1}/..") for i in range(2, up.count("..") + 2)]
    links.append(_special("a/c", tarfile.SYMTYPE, f"b{up.count('..') + 1}/{up[-1]}"))
    archive = _tar(tmp_path / "evil.tar.gz", links)
    before = _state(outside)
    with pytest.raises(ArchiveError, match=r"is (a link that resolves outside|unsafe \()"):
        ensure_staged(archive)
    _assert_untouched(cache_root, outside, before)


def test_zip_members_are_validated_too(tmp_path, cache_root, outside):
    up = _up(cache_root, outside)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("bin/ok", "fine")
        zf.writestr(f"{up}/escaped", "nope")
    _assert_refused(archive, cache_root, outside, member=f"{up}/escaped")

    archive = tmp_path / "evil-link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("lib/out")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, str(outside))
        zf.writestr("lib/out/planted", "nope")
    _assert_refused(archive, cache_root, outside, member="lib/out")


def test_setuid_bits_are_dropped_and_relative_links_kept(tmp_path, cache_root):
    archive = _tar(tmp_path / "env.tar.gz", [
        _file("bin/python3.11", b"#!/bin/sh\n", 0o6755),
        _special("bin/python", tarfile.SYMTYPE, "python3.11"),
        _special("lib/python", tarfile.SYMTYPE, "../bin/python"),
    ])
    prefix = ensure_staged(archive).prefix
    assert stat.S_IMODE(os.stat(prefix / "bin/python3.11").st_mode) == 0o755
    assert os.readlink(prefix / "bin/python") == "python3.11"
    assert os.readlink(prefix / "lib/python") == "../bin/python"


def test_a_damaged_header_in_the_middle_is_detected(tmp_path, cache_root, outside):
    # tarfile (and GNU tar) stop silently at a bad header: what conda-pack's hard-link bug produces.
    archive = _tar(tmp_path / "env.tar", [_file(f"lib/f{i}", b"data" * 200) for i in range(3)], mode="w")
    raw = bytearray(archive.read_bytes())
    second_header = 512 + 1024  # header, 800 bytes of data padded to 1024
    raw[second_header:second_header + 100] = b"\xff" * 100
    archive.write_bytes(bytes(raw))

    with pytest.raises(ArchiveError, match=r"is truncated or corrupt \(a tar header has a bad checksum\)"):
        ensure_staged(archive)
    assert find_staged(archive) is None


def test_a_plain_tar_cut_at_a_header_boundary_is_detected_even_without_a_manifest(tiny_archives, copy_archive, cache_root):
    # GNU tar and Python's tarfile both extract such a tar "successfully", minus its tail.
    archive = copy_archive(tiny_archives["tar"])
    Path(f"{archive}.manifest.json").unlink(missing_ok=True)
    with tarfile.open(archive) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    with open(archive, "r+b") as f:
        f.truncate(offsets[len(offsets) // 2])

    with pytest.raises(ArchiveError, match=r"is truncated or corrupt \(the data ends before the end-of-archive marker\)"):
        ensure_staged(archive)
    assert find_staged(archive) is None


def _assert_one_clean_sentence(message: str, archive: Path) -> None:
    """Names the archive, says what to do, and carries none of a decompressor's own words."""
    assert str(archive) in message and "\n" not in message and message.endswith("`kernelprov pack`."), message
    assert not [text for text in RAW_ERROR_TEXTS if text in message], message


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst", "tar.bz2", "tar.xz", "zip"])
def test_truncated_compressed_archives_are_refused_without_a_manifest(fmt, tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives[fmt])
    Path(f"{archive}.manifest.json").unlink(missing_ok=True)
    with open(archive, "r+b") as f:
        f.truncate(archive.stat().st_size * 2 // 3)
    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)
    codec = CODECS[fmt]
    reasons = [f"its {codec} data ends early", f"its {codec} data is damaged", "the data ends before the end-of-archive marker",
               "the data ends before the first tar header", "its zip directory or a member's checksum is damaged"]
    assert str(raised.value) in [f"{archive} is truncated or corrupt ({reason}); re-copy it, or re-create it with `kernelprov pack`."
                                 for reason in reasons]
    assert find_staged(archive) is None and not list(cache_root.glob("kernelprov-*/.staging-*"))
    assert _read_ahead_threads() == []


@pytest.mark.parametrize("fmt", TAR_FORMATS)
def test_a_bit_flip_in_any_format_is_caught_by_the_manifest(fmt, tiny_archives, copy_archive, cache_root):
    from kernelprov.engine.pack import describe_archive

    archive = copy_archive(tiny_archives[fmt])
    Path(f"{archive}.manifest.json").unlink(missing_ok=True)
    describe_archive(archive)
    raw = bytearray(archive.read_bytes())
    raw[700 if fmt == "tar" else len(raw) // 2] ^= 0x01  # plain tar: inside the first file's data
    archive.write_bytes(bytes(raw))
    st = archive.stat()

    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)

    message = str(raised.value)
    assert "does not match its manifest's sha256" in message or "truncated or corrupt (" in message, message
    _assert_one_clean_sentence(message, archive)
    assert find_staged(archive) is None and archive.stat().st_size == st.st_size
    assert not list(cache_root.glob("kernelprov-*/.staging-*"))


def _multi_member_archive(path: Path, fmt: str) -> Path:
    """Three 1 MB members of hex text, so damage in the middle comes after whole members."""
    members = [(f"lib/part{i}.txt", random.Random(i).randbytes(500_000).hex().encode()) for i in range(3)]
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
        return path
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    compress = {"tar.gz": gzip.compress, "tar.bz2": bz2.compress, "tar.xz": lambda d: lzma.compress(d, preset=1),
                "tar.zst": zstandard.ZstdCompressor().compress}[fmt]
    path.write_bytes(compress(plain.getvalue()))
    return path


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.bz2", "tar.xz", "tar.zst", "zip"])
def test_damage_mid_stream_is_one_sentence_and_leaves_nothing(fmt, tmp_path, cache_root):
    archive = _multi_member_archive(tmp_path / f"env.{fmt}", fmt)
    corrupt_mid_stream(archive, fmt)

    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)

    codec = CODECS[fmt]
    reason = "its zip directory or a member's checksum is damaged" if fmt == "zip" else f"its {codec} data is damaged"
    assert str(raised.value) == f"{archive} is truncated or corrupt ({reason}); re-copy it, or re-create it with `kernelprov pack`."
    _assert_one_clean_sentence(str(raised.value), archive)
    assert find_staged(archive) is None and not list(cache_root.glob("kernelprov-*/.staging-*"))
    assert _read_ahead_threads() == []


def test_an_archive_changed_while_reading_is_refused(tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives["tar.gz"])

    def rewrite_midway(done, total):  # another process replacing the archive during the read
        os.utime(archive, (1_500_000_000, 1_500_000_000))

    with pytest.raises(ArchiveError, match="changed while it was being unpacked"):
        ensure_staged(archive, progress=rewrite_midway)
    assert find_staged(archive) is None


@pytest.mark.parametrize("script", [
    "_prefix_records = [" + "[" * 100_000 + "]" * 100_000 + "]\n",  # nesting bomb
    "_prefix_records = [('{up}/victim', '/opt/old', 'text')]\n",  # a record aimed at the victim file
    "_prefix_records = [('{abs}/victim', '/opt/old', 'text')]\n",
    "_prefix_records = __import__('os').system('touch {abs}/pwned')\n",  # code, never executed
], ids=["nesting-bomb", "record-escaping", "record-absolute", "code"])
def test_hostile_prefix_records_are_refused(script, tmp_path, cache_root, outside):
    script = script.replace("{up}", _up(cache_root, outside)).replace("{abs}", str(outside))
    archive = _tar(tmp_path / "env.tar.gz", [_file("etc/conf", b"/opt/old\n"), _file("bin/conda-unpack", script.encode(), 0o755)])
    before = _state(outside)

    with pytest.raises(KernelprovError) as raised:
        ensure_staged(archive)

    assert "\n" not in str(raised.value) and str(archive) in str(raised.value)
    _assert_untouched(cache_root, outside, before)
    assert find_staged(archive) is None
