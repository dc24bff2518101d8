"""The unpack engine: every format, relocation, atomic publication, reuse and single extraction."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from kernelprov.engine import cache
from kernelprov.engine.formats import detect_format
from kernelprov.errors import ArchiveError
from kernelprov.engine.manifest import read_manifest
from kernelprov.engine.pack import describe_archive
from kernelprov.engine.inventory import clean, find_staged
from kernelprov.engine.stage import ensure_staged

from .conftest import TAR_FORMATS
from .tiny_env import OLD_MTIME


@pytest.mark.parametrize("fmt", TAR_FORMATS)
def test_each_format_stages_a_relocated_runnable_tree(fmt, tiny_archives, cache_root):
    staged = ensure_staged(tiny_archives[fmt])

    assert staged.extracted
    prefix = staged.prefix
    assert prefix.parent.parent == cache_root and prefix.parent.name.startswith("kernelprov-")
    # text and NUL-padded binary placeholders both point at the new prefix
    assert (prefix / "etc/tiny.conf").read_text() == f"prefix={prefix}\ndata={prefix}/share/tiny\n"
    binary = (prefix / "lib/libtiny.so").read_bytes()
    assert binary.startswith(b"\x7fELF\x00\x00" + f"{prefix}/lib\x00".encode())
    # execute bits, relative symlinks and mtimes survive (zip included)
    out = subprocess.run([prefix / "bin/hello"], capture_output=True, text=True, check=True).stdout
    assert out == f"hello from {prefix}\n"
    assert os.readlink(prefix / "bin/hello-link") == "hello"
    assert os.stat(prefix / "share/tiny/plain.txt").st_mtime == OLD_MTIME


def test_zip_sources_get_their_bytecode_mtime_back(tmp_path, cache_root):
    # zip keeps mtimes to 2 s: an odd-second source would look newer than its .pyc, and every
    # first kernel start would recompile. A .pyc that was already stale must stay stale.
    import importlib.util
    import py_compile
    import zipfile

    tree = tmp_path / "env"
    (tree / "lib").mkdir(parents=True)
    for name, text in (("fresh", "x = 1\n"), ("stale", "y = 2\n")):
        source = tree / "lib" / f"{name}.py"
        source.write_text(text)
        os.utime(source, (1_600_000_001, 1_600_000_001))
        py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True)
    (tree / "bin").mkdir()
    (tree / "bin/python").write_text("#!/bin/sh\n")  # staging refuses an env without one
    (tree / "lib/stale.py").write_text("y = 22\n")  # edited after compiling: a different size
    os.utime(tree / "lib/stale.py", (1_600_000_001, 1_600_000_001))
    archive = tmp_path / "env.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:  # as conda-pack writes zips
        for path in sorted(tree.rglob("*")):
            zf.write(path, path.relative_to(tree).as_posix())

    prefix = ensure_staged(archive).prefix

    assert os.stat(prefix / "lib/fresh.py").st_mtime == 1_600_000_001
    assert int(os.stat(prefix / "lib/stale.py").st_mtime) == 1_600_000_000


def test_binary_files_keep_their_length(tiny_env, tiny_archives, cache_root):
    staged = ensure_staged(tiny_archives["tar.zst"])
    assert (staged.prefix / "lib/libtiny.so").stat().st_size == (tiny_env / "lib/libtiny.so").stat().st_size


def test_format_is_detected_from_bytes_not_name(tiny_archives, copy_archive, cache_root):
    disguised = copy_archive(tiny_archives["tar.zst"], "tiny.zip")
    assert detect_format(disguised) == "tar.zst"
    assert (ensure_staged(disguised).prefix / "bin/hello").exists()


def test_a_file_that_is_no_archive_is_refused(tmp_path, cache_root):
    bogus = tmp_path / "env.tar.gz"
    bogus.write_text("this is not an archive\n" * 40)
    with pytest.raises(ArchiveError, match="is not a conda-pack archive"):
        ensure_staged(bogus)


def test_a_missing_archive_names_the_path(tmp_path, cache_root):
    with pytest.raises(ArchiveError, match=r"nope\.tar\.zst does not exist"):
        ensure_staged(tmp_path / "nope.tar.zst")


def test_warm_start_reuses_without_reading_the_archive(tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives["tar.gz"])
    first = ensure_staged(archive)
    before = archive.stat()
    # Same path, size and mtime but unreadable garbage: a warm start must not even open it.
    archive.write_bytes(b"\0" * before.st_size)
    os.utime(archive, ns=(before.st_atime_ns, before.st_mtime_ns))

    second = ensure_staged(archive)

    assert not second.extracted
    assert second.prefix == first.prefix


def test_a_changed_archive_gets_a_fresh_unpack(tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives["tar.gz"])
    first = ensure_staged(archive)
    os.utime(archive, (OLD_MTIME, OLD_MTIME))

    second = ensure_staged(archive)

    assert second.extracted and second.prefix != first.prefix
    assert first.prefix.is_dir()  # the old copy is left for eviction, not yanked from a running kernel


def test_concurrent_starts_extract_once(tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives["tar.bz2"])
    results, barrier = [], threading.Barrier(4)

    def start():
        barrier.wait()
        results.append(ensure_staged(archive))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(r.extracted for r in results) == [False, False, False, True]
    assert len({r.prefix for r in results}) == 1


def test_only_a_marked_env_is_reused(tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives["tar"])
    staged = ensure_staged(archive)
    user_dir = staged.prefix.parent
    # Simulate a kill after the rename but before the marker, plus a stale staging dir.
    cache.marker_path(user_dir, staged.key).unlink()
    (staged.prefix / "etc/tiny.conf").write_text("half-made\n")
    leftover = user_dir / f".staging-{staged.key}-killed"
    leftover.mkdir()

    again = ensure_staged(archive)

    assert again.extracted
    assert (again.prefix / "etc/tiny.conf").read_text().startswith("prefix=")
    assert not leftover.exists()


def test_cache_dir_is_private_and_leaves_no_staging(tiny_archives, cache_root):
    staged = ensure_staged(tiny_archives["tar.gz"])
    user_dir = staged.prefix.parent
    assert stat.S_IMODE(user_dir.stat().st_mode) == 0o700
    assert user_dir.stat().st_uid == os.getuid()
    assert cache.read_marker(user_dir, staged.key).prefix == staged.prefix
    assert not list(user_dir.glob(".staging-*"))


def test_cache_root_order(monkeypatch):
    for name in cache.CACHE_ROOT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cache.default_cache_root() == Path("/tmp")
    monkeypatch.setenv("TMPDIR", "/scratch/tmp")
    assert cache.default_cache_root() == Path("/scratch/tmp")
    monkeypatch.setenv("SLURM_TMPDIR", "/local/job42")
    assert cache.default_cache_root() == Path("/local/job42")
    monkeypatch.setenv("KERNELPROV_CACHE_DIR", "/fast/ssd")
    assert cache.default_cache_root() == Path("/fast/ssd")


def test_manifest_catches_a_truncated_archive(tiny_archives, copy_archive, cache_root):
    archive = copy_archive(tiny_archives["tar"])
    describe_archive(archive)
    assert read_manifest(archive).size == archive.stat().st_size
    with open(archive, "r+b") as f:  # cut at a 512-byte header boundary: tar itself would not notice
        f.truncate(archive.stat().st_size // 1024 * 512)

    with pytest.raises(ArchiveError, match="manifest"):
        ensure_staged(archive)
    assert find_staged(archive) is None
    assert not list((cache_root).glob("kernelprov-*/.staging-*"))


def test_clean_evicts_staged_envs(tiny_archives, cache_root):
    staged = ensure_staged(tiny_archives["tar.gz"])
    assert find_staged(tiny_archives["tar.gz"]) is not None

    evicted = clean()

    assert [e.key for e in evicted] == [staged.key]
    assert not staged.prefix.exists() and find_staged(tiny_archives["tar.gz"]) is None
    shutil.rmtree(cache_root)


def test_clean_sweeps_what_a_killed_eviction_left(tiny_archives, cache_root):
    # Eviction deletes the marker first: killed right after, the tree stays, unmarked.
    staged = ensure_staged(tiny_archives["tar.gz"])
    cache.lease_dir(staged.prefix).mkdir()  # a kernel ran from it once (its lease file is gone)
    cache.marker_path(staged.prefix.parent, staged.key).unlink()
    assert staged.prefix.is_dir() and find_staged(tiny_archives["tar.gz"]) is None

    assert clean() == []

    assert not staged.prefix.exists()
    assert sorted(p.name for p in staged.prefix.parent.iterdir()) == [f"{staged.key}.lock"]


def test_an_archive_without_a_manifest_works_with_a_warning(tiny_archives, copy_archive, cache_root, caplog):
    archive = copy_archive(tiny_archives["tar.zst"])
    (archive.parent / f"{archive.name}.manifest.json").unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="kernelprov.engine"):
        assert ensure_staged(archive).extracted
    assert f"{archive} has no manifest; extracting it without an integrity check" in caplog.text
