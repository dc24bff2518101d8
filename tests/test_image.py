"""Zero-copy image mode: a squashfs archive copied as one file and mounted with squashfuse, with
automatic fallback to unsquashfs where FUSE is unavailable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelprov.engine import image
from kernelprov.cli.app import main
from kernelprov.errors import CacheError
from kernelprov.engine.manifest import read_manifest
from kernelprov.engine.pack import pack_env
from kernelprov.engine.inventory import clean, find_staged
from kernelprov.engine.stage import ensure_staged

from .kernel_client import evaluate

pytestmark = pytest.mark.skipif(not shutil.which("mksquashfs"), reason="packing squashfs needs mksquashfs (squashfs-tools)")
fuse = pytest.mark.skipif(not (shutil.which("squashfuse") and os.path.exists("/dev/fuse")),
                          reason="mounting needs squashfuse and /dev/fuse")


@pytest.fixture(autouse=True)
def unmount_afterwards(tmp_path):
    """Leave no FUSE mount behind, whatever the test did (pytest's tmp cleanup trips on them)."""
    yield
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(str(tmp_path))]
    for point in points:
        subprocess.run([shutil.which("fusermount3") or "fusermount", "-u", "-z", point], check=False)


@pytest.fixture
def tiny_image(tiny_env, tmp_path, cache_root) -> Path:
    archive = tmp_path / "tiny.squashfs"
    pack_env(archive, prefix=tiny_env)
    return archive


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


@fuse
def test_an_image_is_mounted_at_its_baked_mount_point(tiny_image, cache_root):
    mount_point = Path(read_manifest(tiny_image).dest_prefix)
    assert mount_point.name == "tiny.img" and mount_point.parent.name.startswith("kernelprov-")

    staged = ensure_staged(tiny_image)

    assert staged.extracted and staged.prefix == mount_point and _mounted(mount_point)
    # conda-pack relocated it at pack time, to exactly this path
    assert (mount_point / "etc/tiny.conf").read_text() == f"prefix={mount_point}\ndata={mount_point}/share/tiny\n"
    out = subprocess.run([mount_point / "bin/hello"], capture_output=True, text=True, check=True).stdout
    assert out == f"hello from {mount_point}\n"
    warm = ensure_staged(tiny_image)
    assert not warm.extracted and warm.prefix == mount_point
    assert find_staged(tiny_image).mode == "mounted"


@fuse
def test_a_dead_mount_is_mounted_again(tiny_image, cache_root):
    mount_point = ensure_staged(tiny_image).prefix
    assert (mount_point / "bin/hello").exists()  # a kernel ran from it: the kernel caches attributes
    # What a job's end does to the user's squashfuse daemon.
    subprocess.run(["pkill", "-9", "-f", f"squashfuse(_ll)? .* {mount_point}"], check=True)
    deadline = time.monotonic() + 10
    while image.is_alive(mount_point) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not image.is_alive(mount_point)
    again = ensure_staged(tiny_image)
    assert again.extracted and _mounted(mount_point)
    assert (mount_point / "bin/hello").exists()


@fuse
@pytest.mark.parametrize("binary", ["squashfuse_ll", "squashfuse"])
def test_either_squashfuse_binary_mounts(binary, tiny_image, cache_root, tmp_path, monkeypatch):
    # squashfuse_ll (kernel-cached lookups) is preferred; older nodes may only have squashfuse.
    if not shutil.which(binary):
        pytest.skip(f"{binary} is not installed")
    pgrep = shutil.which("pgrep")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in (binary, "fusermount3", "fusermount", "umount"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bindir))

    mount_point = ensure_staged(tiny_image).prefix

    assert _mounted(mount_point) and find_staged(tiny_image).mode == "mounted"
    daemons = subprocess.run([pgrep, "-a", "-f", f" {mount_point}$"], capture_output=True, text=True).stdout
    assert Path(daemons.split()[1]).name == binary, daemons
    assert [e.prefix for e in clean()] == [mount_point]


@fuse
def test_evicting_an_image_unmounts_it(tiny_image, cache_root):
    mount_point = ensure_staged(tiny_image).prefix
    assert [e.prefix for e in clean()] == [mount_point]
    assert not _mounted(mount_point) and not mount_point.exists()
    assert find_staged(tiny_image) is None


def test_without_fuse_the_image_is_extracted_instead(tiny_image, cache_root, tmp_path, monkeypatch):
    # A node without squashfuse: only unsquashfs is on PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "unsquashfs").symlink_to(shutil.which("unsquashfs"))
    monkeypatch.setenv("PATH", str(bindir))

    staged = ensure_staged(tiny_image)

    assert not _mounted(staged.prefix) and find_staged(tiny_image).mode == "extracted"
    assert (staged.prefix / "etc/tiny.conf").read_text().startswith(f"prefix={staged.prefix}\n")
    assert not ensure_staged(tiny_image).extracted


def test_an_image_packed_for_someone_elses_mount_point_is_refused(tiny_image, cache_root):
    manifest_file = Path(f"{tiny_image}.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["dest_prefix"] = "/tmp/kernelprov-someoneelse/tiny.img"
    manifest_file.write_text(json.dumps(manifest))

    with pytest.raises(CacheError, match="was packed to be mounted at /tmp/kernelprov-someoneelse/tiny.img, which is not your"):
        ensure_staged(tiny_image)


@fuse
@pytest.mark.slow
async def test_a_kernel_runs_from_a_mounted_image(kernel_environ, runnable_env, tmp_path, cache_root, capsys):
    archive = tmp_path / "demo.squashfs"
    assert main(["install", "img", "--env-prefix", str(runnable_env), "--format", "squashfs", "-o", str(archive)]) == 0
    capsys.readouterr()
    km = AsyncKernelManager(kernel_name="img")
    await km.start_kernel()
    try:
        values = await evaluate(km, "import sys, ipykernel", {"p": "sys.prefix", "k": "ipykernel.__file__"})
        mount_point = km.provisioner.staged_env.prefix
        assert _mounted(mount_point) and values["p"] == str(mount_point)
        assert values["k"].startswith(f"{mount_point}/lib/")
    finally:
        await km.shutdown_kernel(now=True)
    clean()
