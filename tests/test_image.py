"""Zero-copy image mode: a squashfs archive copied as one file and mounted with squashfuse, with
automatic fallback to unsquashfs where FUSE is unavailable. Guarantees: the baked mount point
from a manifest decides nothing until checked; two images never take each other's place; an
image's members obey the tar rules; a hung FUSE daemon never hangs a start."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelprov.engine import cache, image
from kernelprov.cli.app import main
from kernelprov.errors import ArchiveError, CacheError
from kernelprov.engine.image_stage import baked_mount_point, image_dirs
from kernelprov.engine.manifest import manifest_for, read_manifest, write_manifest
from kernelprov.engine.pack import pack_env
from kernelprov.engine.inventory import clean, find_staged
from kernelprov.engine.stage import ensure_staged

from .kernel_client import evaluate
from .tiny_env import build_tiny_env

pytestmark = pytest.mark.skipif(not shutil.which("mksquashfs"), reason="packing squashfs needs mksquashfs (squashfs-tools)")
fuse = pytest.mark.skipif(not (shutil.which("squashfuse") and os.path.exists("/dev/fuse")),
                          reason="mounting needs squashfuse and /dev/fuse")


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(str(path))]


@pytest.fixture(autouse=True)
def unmount_afterwards(tmp_path):
    """Leave no FUSE mount behind, whatever the test did (pytest's tmp cleanup trips on them)."""
    yield
    for point in _mounts_under(tmp_path):
        subprocess.run([shutil.which("fusermount3") or "fusermount", "-u", "-z", point], check=False, timeout=30)


@pytest.fixture
def tiny_image(tiny_env, tmp_path, cache_root) -> Path:
    archive = tmp_path / "tiny.squashfs"
    pack_env(archive, prefix=tiny_env)
    return archive


def _mounted(prefix: Path) -> bool:
    """The baked mount point is a symlink to the mount in the user's cache dir."""
    return os.path.islink(prefix) and image.is_mounted(Path(os.readlink(prefix)))


def _without_fuse(tmp_path, monkeypatch) -> None:
    """A node without squashfuse: only unsquashfs is on PATH."""
    bindir = tmp_path / "bin-nofuse"
    bindir.mkdir()
    (bindir / "unsquashfs").symlink_to(shutil.which("unsquashfs"))
    monkeypatch.setenv("PATH", str(bindir))


@fuse
def test_an_image_is_mounted_at_its_baked_mount_point(tiny_image, cache_root):
    mount_point = Path(read_manifest(tiny_image).dest_prefix)
    assert re.fullmatch(r"tiny\.[0-9a-f]{6}\.img", mount_point.name) and mount_point.parent == image_dirs()[0]

    staged = ensure_staged(tiny_image)

    assert staged.extracted and staged.prefix == mount_point and _mounted(mount_point)
    target = Path(os.readlink(mount_point))
    assert target.parent.parent == cache_root and stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    with open("/proc/mounts") as mounts:
        assert "nosuid" in [line for line in mounts if f" {target} " in line][0]
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
    target = os.readlink(mount_point)
    assert (mount_point / "bin/hello").exists()  # a kernel ran from it: the kernel caches attributes
    # What a job's end does to the user's squashfuse daemon.
    subprocess.run(["pkill", "-9", "-f", f"squashfuse(_ll)? .* {target}"], check=True)
    deadline = time.monotonic() + 10
    while image.is_alive(Path(target)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not image.is_alive(Path(target))
    again = ensure_staged(tiny_image)
    assert again.extracted and _mounted(mount_point)
    assert (mount_point / "bin/hello").exists()
    assert len(_mounts_under(cache_root)) == 1  # the dead mount was detached, not stacked over


@fuse
@pytest.mark.timeout(120)
def test_a_hung_fuse_daemon_does_not_hang_the_start(tiny_image, cache_root, monkeypatch):
    # A stopped daemon never answers: statvfs on its mount would block forever.
    monkeypatch.setattr(image, "PROBE_TIMEOUT", 1.0, raising=False)
    mount_point = ensure_staged(tiny_image).prefix
    target = os.readlink(mount_point)
    (pid,) = subprocess.run(["pgrep", "-f", f"squashfuse(_ll)? .* {target}$"], capture_output=True, text=True).stdout.split()
    os.kill(int(pid), signal.SIGSTOP)
    try:
        started = time.monotonic()
        again = ensure_staged(tiny_image)
        assert again.extracted and time.monotonic() - started < 30
        assert (mount_point / "etc/tiny.conf").read_text().startswith(f"prefix={mount_point}\n")
    finally:
        os.kill(int(pid), signal.SIGKILL)


@fuse
@pytest.mark.timeout(120)
def test_a_squashfuse_that_never_returns_times_out(tiny_image, cache_root, tmp_path, monkeypatch):
    monkeypatch.setattr(image, "FUSE_TIMEOUT", 2.0, raising=False)
    bindir = tmp_path / "bin-hang"
    bindir.mkdir()
    (bindir / "squashfuse").write_text("#!/bin/sh\nexec /bin/sleep 600\n")
    (bindir / "squashfuse").chmod(0o755)
    for tool in ("unsquashfs", "fusermount3", "fusermount"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bindir))

    started = time.monotonic()
    staged = ensure_staged(tiny_image)

    assert time.monotonic() - started < 30 and find_staged(tiny_image).mode == "extracted"
    assert (staged.prefix / "bin/hello").exists()


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
    daemons = subprocess.run([pgrep, "-a", "-f", f" {os.readlink(mount_point)}$"], capture_output=True, text=True).stdout
    assert Path(daemons.split()[1]).name == binary, daemons
    assert [e.prefix for e in clean()] == [mount_point]


@fuse
def test_evicting_an_image_unmounts_it(tiny_image, cache_root):
    mount_point = ensure_staged(tiny_image).prefix
    target = Path(os.readlink(mount_point))
    assert [e.prefix for e in clean()] == [mount_point]
    assert not image.is_mounted(target) and not target.exists() and not os.path.lexists(mount_point)
    assert find_staged(tiny_image) is None


def test_without_fuse_the_image_is_extracted_instead(tiny_image, cache_root, tmp_path, monkeypatch):
    _without_fuse(tmp_path, monkeypatch)

    staged = ensure_staged(tiny_image)

    assert not _mounted(staged.prefix) and find_staged(tiny_image).mode == "extracted"
    assert (staged.prefix / "etc/tiny.conf").read_text().startswith(f"prefix={staged.prefix}\n")
    assert not ensure_staged(tiny_image).extracted
    assert not list(cache.user_cache_dir(cache_root).glob("*.squashfs"))  # the copy went once extracted


def _set_dest_prefix(archive: Path, dest_prefix: str) -> None:
    manifest_file = Path(f"{archive}.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["dest_prefix"] = dest_prefix
    manifest_file.write_text(json.dumps(manifest))


def test_an_image_packed_for_someone_elses_mount_point_is_refused(tiny_image, cache_root):
    _set_dest_prefix(tiny_image, "/tmp/kernelprov-someoneelse/tiny.img")

    with pytest.raises(CacheError, match="was packed to be mounted at /tmp/kernelprov-someoneelse/tiny.img, which is not"):
        ensure_staged(tiny_image)


@pytest.mark.parametrize("hostile", ["parent-of-user-dir", "dotdot-inside", "the-user-dir", "the-cache-dir", "absolute-elsewhere",
                                     "relative", "not-an-img"])
def test_a_hostile_dest_prefix_deletes_and_mounts_nothing(hostile, tiny_image, cache_root, tmp_path):
    # The victim: a directory holding a kernelprov-<user> dir, like the user's home would.
    victim = tmp_path / "home"
    user = Path(image_dirs()[0]).name
    (victim / user).mkdir(parents=True, mode=0o700)  # private, as a user's own would be
    (victim / "precious").write_text("keep me")
    (victim / user / "precious").write_text("keep me too")
    link_dir = image_dirs()[0]
    dest = {
        "parent-of-user-dir": f"{victim}/{user}/..",
        "dotdot-inside": f"{link_dir}/../../home/{user}/x.img/..",
        "the-user-dir": str(link_dir),
        "the-cache-dir": str(cache.user_cache_dir(cache_root)),
        "absolute-elsewhere": f"{victim}/{user}/tiny.img",
        "relative": f"{user}/tiny.img",
        "not-an-img": f"{link_dir}/precious",
    }[hostile]
    _set_dest_prefix(tiny_image, dest)

    with pytest.raises(CacheError, match="which is not a mount point in your private kernelprov directory"):
        ensure_staged(tiny_image)

    assert (victim / "precious").read_text() == "keep me" and (victim / user / "precious").read_text() == "keep me too"
    assert not _mounts_under(tmp_path)


@fuse
def test_a_symlink_planted_at_the_mount_point_is_replaced_never_followed(tiny_image, cache_root, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    mount_point = Path(read_manifest(tiny_image).dest_prefix)
    mount_point.parent.mkdir(parents=True, mode=0o700)
    mount_point.symlink_to(victim)

    staged = ensure_staged(tiny_image)

    assert _mounted(staged.prefix) and os.listdir(victim) == ["precious"]


def _two_envs(tmp_path):
    """Two different envs packed into two archives with the same file name (a/tiny.squashfs, b/...)."""
    archives = []
    for which in "ab":
        env = build_tiny_env(tmp_path / f"env-{which}-{'x' * 60}")
        (env / "share/which.txt").write_text(which)
        archive = tmp_path / which / "tiny.squashfs"
        archive.parent.mkdir()
        pack_env(archive, prefix=env)
        archives.append(archive)
    return archives


@fuse
@pytest.mark.timeout(300)
def test_two_images_with_one_file_name_each_get_their_own_env(tmp_path, cache_root):
    archives = _two_envs(tmp_path)
    for _round in range(6):
        results, errors = {}, []

        def start(archive):
            try:
                results[archive.parent.name] = ensure_staged(archive).prefix
            except Exception as err:  # noqa: BLE001 — collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=start, args=(a,)) for a in archives]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
        assert {which: (prefix / "share/which.txt").read_text() for which, prefix in results.items()} == {"a": "a", "b": "b"}
        assert len(_mounts_under(cache_root)) == 2  # one mount each, none stacked
        assert len(clean()) == 2


def _hostile_image(tmp_path, member: str) -> Path:
    """A squashfs image of a tiny tree plus one hostile member, with a valid manifest."""
    tree = tmp_path / f"tree-{member}"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/ok").write_text("#!/bin/sh\necho ok\n")
    if member == "device":
        os.mknod(tree / "dev-null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif member == "setuid":
        shutil.copy("/bin/true", tree / "bin/su-root")
        os.chmod(tree / "bin/su-root", 0o4755)
    elif member == "absolute-link":
        (tree / "lib").symlink_to("/etc")
    elif member == "escaping-link":
        (tree / "bin/up").symlink_to("../../../../etc/passwd")
    elif member == "escaping-chain":
        (tree / "a").symlink_to("bin/..")
        (tree / "bin/b").symlink_to("../a/..")
    archive = tmp_path / f"{member}.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(archive), "-quiet", "-noappend", "-no-progress"], check=True,
                   capture_output=True)
    write_manifest(archive, manifest_for(archive, dest_prefix=str(baked_mount_point(member))))
    return archive


def _kept(cache_root: Path) -> dict[Path, set[str]]:
    """What is in each place kernelprov keeps images (locks and remembered failures aside), for a before/after comparison:
    the fallback ``/tmp/kernelprov-<user>`` is shared with anything else run on this machine."""
    kept = {}
    for where in [Path(os.fspath(cache.user_cache_dir(cache_root))), *image_dirs()]:
        kept[where] = {p.name for p in where.iterdir() if p.suffix not in (".lock", ".failed")} if where.exists() else set()
    return kept


def _nothing_left(cache_root: Path, tmp_path: Path, before: dict[Path, set[str]]) -> None:
    """No copy, env, staging dir, marker or mount left by the test anywhere kernelprov keeps images."""
    for where, names in _kept(cache_root).items():
        assert sorted(names - before.get(where, set())) == [], where
    assert not _mounts_under(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="device files and setuid-root files need root to make and unsquashfs")
@pytest.mark.parametrize("mode", ["extracted", pytest.param("mounted", marks=fuse)])
@pytest.mark.parametrize("member,name", [("device", "dev-null"), ("absolute-link", "lib"), ("escaping-link", "bin/up"),
                                         ("escaping-chain", "")])
def test_an_image_obeys_the_tar_member_rules(mode, member, name, tmp_path, cache_root, monkeypatch):
    archive = _hostile_image(tmp_path, member)
    if mode == "extracted":
        _without_fuse(tmp_path, monkeypatch)
    before = _kept(cache_root)

    with pytest.raises(ArchiveError, match=rf"Refusing {archive}: member '{name}.*"):
        ensure_staged(archive)

    _nothing_left(cache_root, tmp_path, before)


@pytest.mark.skipif(os.geteuid() != 0, reason="a setuid-root file needs root to make and unsquashfs")
def test_setuid_bits_and_foreign_owners_are_dropped_from_an_extracted_image(tmp_path, cache_root, monkeypatch):
    archive = _hostile_image(tmp_path, "setuid")
    _without_fuse(tmp_path, monkeypatch)

    prefix = ensure_staged(archive).prefix

    st = os.stat(prefix / "bin/su-root")
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID) and st.st_mode & 0o111
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_a_failed_unsquashfs_leaves_nothing_behind(tiny_image, tmp_path, cache_root, monkeypatch):
    _without_fuse(tmp_path, monkeypatch)
    damaged = tmp_path / "damaged.squashfs"
    data = bytearray(tiny_image.read_bytes())
    damaged.write_bytes(bytes(data[: len(data) // 2]))  # a copy cut short, with a manifest that matches it
    write_manifest(damaged, manifest_for(damaged, dest_prefix=str(baked_mount_point("damaged"))))
    before = _kept(cache_root)

    with pytest.raises(ArchiveError, match="could not be unpacked"):
        ensure_staged(damaged)

    _nothing_left(cache_root, tmp_path, before)


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
        target = os.readlink(mount_point)
        assert _mounted(mount_point) and values["p"] in (str(mount_point), target)
        assert values["k"].startswith((f"{mount_point}/lib/", f"{target}/lib/"))
    finally:
        await km.shutdown_kernel(now=True)
    clean()


@fuse
def test_one_mount_point_serves_one_image_at_a_time(tmp_path, cache_root):
    a, b = _two_envs(tmp_path)
    mount_point = Path(read_manifest(a).dest_prefix)
    # b claims a's mount point (a hand-made manifest): it shares a's lock, never a's env.
    _set_dest_prefix(b, str(mount_point))
    staged = ensure_staged(a)
    with pytest.raises(CacheError, match=rf"{mount_point} already serves another image \({a}\), used in the last few minutes"):
        ensure_staged(b)
    assert (staged.prefix / "share/which.txt").read_text() == "a" and _mounted(mount_point)

    copy = tmp_path / "copy-of-a.squashfs"  # the same bytes elsewhere: the same env, reused
    shutil.copy(a, copy)
    shutil.copy(f"{a}.manifest.json", f"{copy}.manifest.json")
    assert not ensure_staged(copy).extracted and find_staged(copy).key == staged.key

    user_dir = Path(os.readlink(mount_point)).parent
    os.utime(cache.marker_path(user_dir, staged.key), (time.time() - 3600,) * 2)  # idle for an hour: now it may make room
    ensure_staged(b)
    assert (mount_point / "share/which.txt").read_text() == "b" and len(_mounts_under(cache_root)) == 1
    assert find_staged(a) is None


@fuse
def test_a_lost_mount_point_symlink_is_restored_without_restaging(tiny_image, cache_root):
    # logind empties a runtime dir at logout; the mount in the cache survives.
    mount_point = ensure_staged(tiny_image).prefix
    target = os.readlink(mount_point)
    os.unlink(mount_point)
    again = ensure_staged(tiny_image)
    assert os.readlink(again.prefix) == target and image.is_alive(Path(target))
    assert (mount_point / "bin/hello").exists()
