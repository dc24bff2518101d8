"""Guarantee: a malicious, corrupt or truncated archive is refused before anything lands outside
its staging dir, names the offending member and archive, and leaves nothing a later start trusts."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from kernelprov.errors import ArchiveError, KernelprovError
from kernelprov.engine.inventory import find_staged
from kernelprov.engine.stage import ensure_staged


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
    """A directory next to the cache that an attack would like to write into; must stay empty."""
    target = tmp_path / "outside"
    target.mkdir()
    return target


def _assert_refused(archive: Path, cache_root: Path, outside: Path, *, member: str) -> None:
    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)
    message = str(raised.value)
    assert str(archive) in message and repr(member) in message, message
    assert "\n" not in message
    assert list(outside.iterdir()) == []
    user_dir = next(cache_root.glob("kernelprov-*"))
    assert not list(user_dir.glob(".staging-*")), "the staging dir must be removed"
    assert find_staged(archive) is None
    assert _read_ahead_threads() == [], "a refused archive must not leave its decompression thread running"


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kernelprov-read-ahead"]


@pytest.mark.parametrize("members, offender", [
    ([_file("bin/ok"), _file("../escaped")], "../escaped"),
    ([_file("bin/ok"), _file("lib/../../escaped")], "lib/../../escaped"),
    ([_file("/etc/kernelprov-escaped")], "/etc/kernelprov-escaped"),
    ([_special("lib/passwd", tarfile.SYMTYPE, "/etc/passwd")], "lib/passwd"),
    ([_special("lib/up", tarfile.SYMTYPE, "../../..")], "lib/up"),
    ([_special("lib/shadow", tarfile.LNKTYPE, "/etc/shadow")], "lib/shadow"),
    ([_special("lib/shadow", tarfile.LNKTYPE, "../../etc/shadow")], "lib/shadow"),
    ([_special("lib/missing", tarfile.LNKTYPE, "lib/nothing")], "lib/missing"),
    ([_special("dev/null", tarfile.CHRTYPE)], "dev/null"),
    ([_special("dev/sda", tarfile.BLKTYPE)], "dev/sda"),
    ([_special("tmp/pipe", tarfile.FIFOTYPE)], "tmp/pipe"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-absolute", "symlink-escaping", "hardlink-absolute",
        "hardlink-escaping", "hardlink-dangling", "char-device", "block-device", "fifo"])
def test_unsafe_members_are_refused(members, offender, tmp_path, cache_root, outside):
    archive = _tar(tmp_path / "evil.tar.gz", members)
    _assert_refused(archive, cache_root, outside, member=offender)


def test_a_refusal_early_in_a_big_archive_stops_the_read_ahead(tmp_path, cache_root, outside):
    # 24 MiB of incompressible data after the offending member: the decompression thread runs
    # ahead, fills its queue and blocks; the refusal must stop and join that thread.
    big = _file("lib/big.bin", os.urandom(24 << 20))
    archive = _tar(tmp_path / "evil.tar", [_file("lib/ok"), _file("../escaped"), big], mode="w")
    import zstandard

    compressed = tmp_path / "evil.tar.zst"
    compressed.write_bytes(zstandard.ZstdCompressor(level=1).compress(archive.read_bytes()))
    _assert_refused(compressed, cache_root, outside, member="../escaped")


def test_symlink_then_write_through_it_is_refused(tmp_path, cache_root, outside):
    # A link that stays inside (so it passes on its own), then a file written "through" it.
    archive = _tar(tmp_path / "evil.tar.gz", [_special("lib", tarfile.SYMTYPE, "."), _file("lib/planted")])
    _assert_refused(archive, cache_root, outside, member="lib/planted")


def test_a_link_chain_that_escapes_is_refused(tmp_path, cache_root, outside):
    # Each link looks inside on its own; together a/c resolves to the staging dir's parent.
    archive = _tar(tmp_path / "evil.tar.gz", [
        _special("a/c", tarfile.SYMTYPE, "b/../x"), _special("a/b", tarfile.SYMTYPE, ".."),
    ])
    with pytest.raises(ArchiveError, match=r"'a/c' is a link that resolves outside"):
        ensure_staged(archive)
    assert list(outside.iterdir()) == []


def test_zip_members_are_validated_too(tmp_path, cache_root, outside):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("bin/ok", "fine")
        zf.writestr("../../escaped", "nope")
    _assert_refused(archive, cache_root, outside, member="../../escaped")

    archive = tmp_path / "evil-link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("lib/passwd")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    _assert_refused(archive, cache_root, outside, member="lib/passwd")


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


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst", "tar.bz2"])
def test_truncated_compressed_archives_are_refused_without_a_manifest(fmt, tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives[fmt])
    os.unlink(f"{archive}.manifest.json") if os.path.exists(f"{archive}.manifest.json") else None
    with open(archive, "r+b") as f:
        f.truncate(archive.stat().st_size * 2 // 3)
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        ensure_staged(archive)
    assert find_staged(archive) is None
    assert _read_ahead_threads() == []


def test_a_bit_flip_is_caught_by_the_manifest(tiny_archives, copy_archive, cache_root):
    from kernelprov.engine.pack import describe_archive

    archive = copy_archive(tiny_archives["tar"])
    describe_archive(archive)
    raw = bytearray(archive.read_bytes())
    raw[700] ^= 0x01  # inside the first file's data: tar itself cannot notice
    archive.write_bytes(bytes(raw))
    st = archive.stat()

    with pytest.raises(ArchiveError, match="does not match its manifest's sha256"):
        ensure_staged(archive)
    assert find_staged(archive) is None and archive.stat().st_size == st.st_size


def test_an_archive_changed_while_reading_is_refused(tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives["tar.gz"])

    def rewrite_midway(done, total):  # another process replacing the archive during the read
        os.utime(archive, (1_500_000_000, 1_500_000_000))

    with pytest.raises(ArchiveError, match="changed while it was being unpacked"):
        ensure_staged(archive, progress=rewrite_midway)
    assert find_staged(archive) is None


@pytest.mark.parametrize("script", [
    b"_prefix_records = [" + b"[" * 100_000 + b"]" * 100_000 + b"]\n",  # nesting bomb
    b"_prefix_records = [('../../etc/passwd', '/opt/old', 'text')]\n",  # a record pointing outside
    b"_prefix_records = __import__('os').system('touch /tmp/pwned')\n",  # code, never executed
])
def test_hostile_prefix_records_are_refused(script, tmp_path, cache_root, outside):
    archive = _tar(tmp_path / "env.tar.gz", [_file("etc/conf", b"/opt/old\n"), _file("bin/conda-unpack", script, 0o755)])

    with pytest.raises(KernelprovError) as raised:
        ensure_staged(archive)

    assert "\n" not in str(raised.value) and str(archive) in str(raised.value)
    assert list(outside.iterdir()) == [] and not os.path.exists("/tmp/pwned")
    assert find_staged(archive) is None
