"""Guarantee: a full disk, a kill mid-unpack or a missing archive gives a clear error, loses no
staged env, and leaves nothing half-made that a later start would trust.

Full disks are real: small tmpfs mounts (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelprov.engine import cache
from kernelprov.errors import CacheError
from kernelprov.engine.manifest import read_manifest
from kernelprov.engine.inventory import find_staged
from kernelprov.engine.stage import ensure_staged


@pytest.fixture
def small_fs(tmp_path):
    """Mount a size-limited tmpfs; yields a factory taking mount options."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounts = []

    def mount(options: str) -> Path:
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _no_staging_left(root: Path) -> bool:
    return not list(root.glob("kernelprov-*/.staging-*"))


def test_preflight_refuses_an_env_larger_than_the_free_space(small_fs, runnable_archive, tiny_archives):
    root = small_fs("size=8m")
    kept = ensure_staged(tiny_archives["tar.gz"], cache_root=root)
    needed = read_manifest(runnable_archive).unpacked_bytes

    with pytest.raises(CacheError) as raised:
        ensure_staged(runnable_archive, cache_root=root)

    message = str(raised.value)
    assert "Not enough space in" in message and str(kept.prefix.parent) in message
    stated = re.search(r"it needs about (\d+) MB", message)
    assert stated and int(stated.group(1)) >= needed // 1_000_000 and "KERNELPROV_CACHE_DIR" in message
    assert _no_staging_left(root)
    assert find_staged(tiny_archives["tar.gz"], cache_root=root) is not None  # an existing env is intact


def test_preflight_counts_inodes_too(small_fs, runnable_archive):
    root = small_fs("size=2g,nr_inodes=2000")
    with pytest.raises(CacheError, match=r"files, but only [\d.]+ [kMGT]?B and [\d,]+ files are free"):
        ensure_staged(runnable_archive, cache_root=root)
    assert _no_staging_left(root)


def test_disk_full_mid_extraction_cleans_up_and_keeps_staged_envs(small_fs, runnable_archive, tiny_archives, copy_archive):
    # Room for the compressed archive but not the unpacked env, and no manifest to warn us early.
    root = small_fs(f"size={runnable_archive.stat().st_size * 2}")
    kept = ensure_staged(tiny_archives["tar.gz"], cache_root=root)
    archive = copy_archive(runnable_archive)
    Path(f"{archive}.manifest.json").unlink()

    with pytest.raises(CacheError) as raised:
        ensure_staged(archive, cache_root=root)

    message = str(raised.value)
    assert message.startswith(f"The local disk at {kept.prefix.parent} ran out of space while unpacking {archive.name}")
    assert "KERNELPROV_CACHE_DIR" in message
    assert _no_staging_left(root) and find_staged(archive, cache_root=root) is None
    assert (kept.prefix / "etc/tiny.conf").read_text().startswith("prefix=")
    # The space is back: a second, smaller archive still stages there.
    assert ensure_staged(tiny_archives["tar.bz2"], cache_root=root).extracted


def test_a_disk_filling_mid_stream_is_reported_as_full_not_as_a_damaged_archive(small_fs, tmp_path):
    # Decompressors report damage as exceptions without an errno; ENOSPC has one. A full disk
    # while a .tar.zst streams must stay "the disk is full", never "the archive is corrupt".
    import io
    import tarfile

    import zstandard

    root = small_fs("size=2m")
    data = os.urandom(1 << 20) + b"\0" * (3 << 20)  # ~1 MiB compressed, 4 MiB unpacked
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        info = tarfile.TarInfo("lib/data.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "env.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(plain.getvalue()))

    with pytest.raises(CacheError) as raised:
        ensure_staged(archive, cache_root=root)

    assert " ran out of space while unpacking env.tar.zst" in str(raised.value)
    assert _no_staging_left(root) and find_staged(archive, cache_root=root) is None


def test_a_full_disk_evicts_idle_envs_to_make_room(small_fs, tiny_archives, copy_archive, runnable_archive):
    root = small_fs("size=400m")
    # Fill the disk with an idle staged env, then ask for one that only fits once it is gone.
    first = ensure_staged(runnable_archive, cache_root=root)
    os.utime(cache.marker_path(first.prefix.parent, first.key), (0, 0))  # idle for decades
    filler = root / "filler"
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    needed = read_manifest(runnable_archive).unpacked_bytes
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - needed // 2))
    second_archive = copy_archive(runnable_archive, "second.tar.zst")

    second = ensure_staged(second_archive, cache_root=root)

    assert second.extracted and not first.prefix.exists()


def test_kill_9_mid_extraction_leaves_nothing_trusted_and_the_next_start_recovers(runnable_archive, cache_root):
    code = "import sys; from kernelprov.engine.stage import ensure_staged; ensure_staged(sys.argv[1])"
    child = subprocess.Popen([sys.executable, "-c", code, str(runnable_archive)], env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        staging = []
        while time.monotonic() < deadline and child.poll() is None:
            staging = list(cache_root.glob("kernelprov-*/.staging-*/lib/python3*/*"))
            if len(staging) > 50:
                break
            time.sleep(0.01)
        assert child.poll() is None and staging, "the child should still be extracting"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()

    assert find_staged(runnable_archive) is None  # nothing half-made is trusted
    assert list(cache_root.glob("kernelprov-*/.staging-*"))  # the debris is there ...

    staged = ensure_staged(runnable_archive)

    assert staged.extracted and (staged.prefix / "bin/python").exists()
    assert not list(cache_root.glob("kernelprov-*/.staging-*"))  # ... and the next start removed it
    result = subprocess.run([staged.prefix / "bin/python", "-c", "import ipykernel, sys; print(sys.prefix)"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == str(staged.prefix), result.stderr
