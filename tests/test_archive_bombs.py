"""Guarantee: no archive can exhaust the memory of the process that stages it (in the provisioner,
the Jupyter server itself) or fill the node's disk: pax and long-name headers, the
``bin/conda-unpack`` script and zip link targets are bounded in memory, and everything an
extraction writes is bounded by the manifest — or, without one, by a ceiling of 25 times the
archive's size (at least 256 MiB), each entry counting 512 bytes besides its data. Each is refused
with one sentence naming the archive, and the staging dir is removed."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import zstandard

from kernelprov.engine.extract import extract, unpack_limits
from kernelprov.engine.inventory import find_staged
from kernelprov.engine.manifest import manifest_for, write_manifest
from kernelprov.engine.stage import ensure_staged
from kernelprov.errors import ArchiveError, human_size

from .tar_bypass_cases import file, header, pax

MiB = 1 << 20


def _zstd_tar(path: Path, blocks) -> Path:
    """Write the tar blocks yielded by ``blocks`` through zstd, streaming (nothing held whole)."""
    with open(path, "wb") as out:
        writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        for block in blocks:
            writer.write(block)
        writer.write(b"\0" * 1024)
        writer.close()
    return path


def _zeros(size: int):
    chunk = b"\0" * MiB
    while size > 0:
        yield chunk[:min(size, MiB)]
        size -= MiB


def _member_of_zeros(name: str, size: int):
    yield header(name, b"0", size)
    yield from _zeros(size)
    yield b"\0" * (-size % 512)


def _no_staging_left(cache_root: Path) -> bool:
    return not list(cache_root.glob("kernelprov-*/.staging-*"))


def test_a_1_gib_pax_header_in_a_30_kb_archive_is_refused_without_using_the_memory(tmp_path, cache_root):
    size = 1 << 30
    record = b"%d comment=" % size

    def blocks():
        yield header("././@PaxHeader", b"x", size)
        yield record
        yield from _zeros(size - len(record) - 1)
        yield b"\n"
        yield file("lib/after")

    archive = _zstd_tar(tmp_path / "bomb.tar.zst", blocks())
    assert archive.stat().st_size < 64_000
    code = ("import resource, sys\n"
            "from kernelprov.engine.stage import ensure_staged\n"
            "from kernelprov.errors import ArchiveError\n"
            "try:\n    ensure_staged(sys.argv[1]); print('staged')\n"
            "except ArchiveError as err:\n    print(err)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")

    child = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, text=True, timeout=300)

    message, max_rss_kib = child.stdout.strip().splitlines()
    assert int(max_rss_kib) < 300 * 1024, f"the staging process peaked at {int(max_rss_kib) // 1024} MB"
    assert message == (f"Refusing {archive}: its pax or long-name headers declare 1.1 GB, more than the 4 MiB "
                       "such headers may hold; re-create it with `kernelprov pack`."), child.stderr
    assert _no_staging_left(cache_root) and find_staged(archive) is None


def test_a_decompression_bomb_without_a_manifest_is_refused_before_it_is_written(tmp_path, cache_root):
    archive = _zstd_tar(tmp_path / "bomb.tar.zst", _member_of_zeros("lib/zeros.bin", 300 * MiB))
    archive_size = archive.stat().st_size

    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)

    assert str(raised.value) == (
        f"Refusing {archive}: it unpacks to more than 268 MB, the most kernelprov unpacks from a "
        f"{human_size(archive_size)} archive without a manifest; if it is a genuine environment, record its real size with "
        "`kernelprov install --archive` (which writes its manifest), or re-create it with `kernelprov pack`.")
    assert _no_staging_left(cache_root) and find_staged(archive) is None


def test_a_bomb_of_many_members_stops_at_the_ceiling(tmp_path):
    # Twenty 1 MiB members against an 8 MiB ceiling: what was written when it stopped is bounded.
    archive = _zstd_tar(tmp_path / "bomb.tar.zst",
                        (block for i in range(20) for block in _member_of_zeros(f"lib/z{i}", MiB)))
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(ArchiveError, match="it unpacks to more than 8.4 MB"):
        extract(archive, dest, limits=unpack_limits(archive.stat().st_size, ceiling=8 * MiB))

    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= 8 * MiB


def test_a_flood_of_empty_entries_counts_against_the_ceiling(tmp_path):
    archive = _zstd_tar(tmp_path / "inodes.tar.zst", (header(f"lib/e{i}", b"0", 0) for i in range(5000)))
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(ArchiveError, match="it unpacks to more than 1.0 MB"):
        extract(archive, dest, limits=unpack_limits(archive.stat().st_size, ceiling=MiB))

    assert len(list(dest.rglob("*"))) <= MiB // 512 + 1


_STAGE_IN_A_CHILD = """
import sys
from pathlib import Path
from kernelprov.engine.stage import ensure_staged
from kernelprov.errors import ArchiveError
try:
    ensure_staged(Path(sys.argv[1]), cache_root=sys.argv[2])
except ArchiveError as err:
    print(err)
    sys.exit(3)
"""


def _peak_rss_of(argv: list[str]) -> tuple[int, str, int]:
    """Run ``argv``; (exit status, stdout, the child's own peak RSS in bytes from wait4)."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    child.stdout.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, out, usage.ru_maxrss * 1024


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["deep", "long"])
def test_names_cannot_grow_the_stages_memory_without_bound(shape, tmp_path):
    """Each member a ~4 KB name: 1,900 nested directories that exist for it alone ("deep": their
    names in memory grow with the square of the depth, ~4 MB per member) or one long name in a
    shared deep dir ("long"). Both are small archives well inside the byte ceiling; before the
    bookkeeping bound, "deep" took ~1 GB of memory at 250 members and "long" ~380 MB at 80,000.
    Now the child's stage is refused with one sentence, its peak RSS stays under 256 MiB, and the
    1,900-deep half-made tree is removed (``shutil.rmtree`` of CPython 3.11 died of
    RecursionError on it and left it behind)."""
    if shape == "deep":
        names = ("/".join([f"m{i}"] + ["d"] * 1900) + "/f" for i in range(250))
    else:
        shared = "/".join(["e" * 250] * 14)
        names = (f"{shared}/{i:0240d}" for i in range(80_000))
    archive = _zstd_tar(tmp_path / f"{shape}.tar.zst",
                        (block for name in names for block in (pax({"path": name}), header("x", b"0", 0))))
    assert archive.stat().st_size < 8 * MiB
    dest = tmp_path / "dest"
    dest.mkdir()

    status, out, peak = _peak_rss_of([sys.executable, "-c", _STAGE_IN_A_CHILD, str(archive), str(dest)])

    assert status == 3 and "need more than 134 MB of memory to unpack safely" in out, (status, out)
    assert peak < 256 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
    assert _no_staging_left(dest) and list(dest.glob("kernelprov-*")), list(dest.rglob("*"))[:5]


@pytest.mark.parametrize("lie", ["unpacked_bytes", "members"])
def test_an_archive_that_writes_more_than_its_manifest_records_is_refused(lie, tmp_path, cache_root):
    # The manifest is honest about size and sha256 (checked only at the end) but not about what
    # the archive unpacks to, so the free-space check passes: the bound stops the extraction.
    archive = _zstd_tar(tmp_path / "env.tar.zst",
                        (block for i in range(20) for block in _member_of_zeros(f"lib/z{i}", MiB)))
    manifest = manifest_for(archive)
    setattr(manifest, lie, 2 * MiB if lie == "unpacked_bytes" else 3)
    write_manifest(archive, manifest)

    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)

    recorded = "2.1 MB in 20 entries" if lie == "unpacked_bytes" else "21.0 MB in 3 entries"
    assert str(raised.value) == (
        f"Refusing {archive}: it unpacks to more than its manifest records ({recorded}); it is damaged or not the "
        "archive its manifest describes — re-create it with `kernelprov pack`.")
    assert _no_staging_left(cache_root) and find_staged(archive) is None


def test_an_oversized_unpack_script_is_refused_before_it_is_read_into_memory(tmp_path, cache_root):
    archive = _zstd_tar(tmp_path / "env.tar.zst", _member_of_zeros("bin/conda-unpack", 40 * MiB))

    with pytest.raises(ArchiveError) as raised:
        ensure_staged(archive)

    assert str(raised.value) == (f"Refusing {archive}: its bin/conda-unpack is 41.9 MB, more than the 16.8 MB any "
                                 "conda-pack env needs; re-create it with `kernelprov pack`.")
    assert _no_staging_left(cache_root)


def test_a_zip_link_whose_target_is_a_bomb_is_refused(tmp_path, cache_root):
    archive = tmp_path / "env.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        link = zipfile.ZipInfo("lib/link")
        link.external_attr = (0o120777) << 16
        zf.writestr(link, b"a" * (64 * MiB))

    with pytest.raises(ArchiveError, match=r"member 'lib/link' is a link whose target is longer than a path can be"):
        ensure_staged(archive)

    assert _no_staging_left(cache_root)


def test_a_genuine_archive_is_well_inside_its_bounds(tiny_archives, copy_archive, cache_root):
    # Without its manifest, a real conda-pack archive stages under the automatic ceiling.
    archive = copy_archive(tiny_archives["tar.gz"])
    Path(f"{archive}.manifest.json").unlink(missing_ok=True)
    with tarfile.open(archive) as tar:
        unpacked = sum(m.size for m in tar.getmembers())
    assert ensure_staged(archive).extracted
    assert unpacked < unpack_limits(archive.stat().st_size).max_bytes
