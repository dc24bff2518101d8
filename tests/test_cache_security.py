"""Guarantee: the cache is reached only through directories nobody else can change, and once
verified it is worked on through its open descriptor, so no path swapped in later redirects a
publish or an eviction; a cache on a filesystem without locks fails in one sentence.

The attacks by real other unix users are in ``test_multiuser.py``; here the directories are made
by root with the ownership and modes such a user would give them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernelprov.engine import cache, unpack
from kernelprov.engine.inventory import clean, evict, find_staged
from kernelprov.engine.stage import ensure_staged
from kernelprov.errors import CacheError

SOMEONE_ELSE = 54321  # a uid no account has: "another user" for ownership checks


@pytest.mark.parametrize("how", ["owned-by-someone-else", "world-writable", "group-writable"])
@pytest.mark.parametrize("where", ["root", "ancestor"])
def test_a_cache_root_another_user_can_change_is_refused(how, where, tiny_archives, tmp_path):
    top = tmp_path / "scratch"
    top.mkdir()
    root = top / "cache" if where == "ancestor" else top
    root.mkdir(exist_ok=True)
    if how == "owned-by-someone-else":
        os.chown(top, SOMEONE_ELSE, SOMEONE_ELSE)
    else:
        os.chmod(top, 0o777 if how == "world-writable" else 0o775)
        if how == "group-writable":
            os.chown(top, 0, 100)  # group "users": others are in it

    with pytest.raises(CacheError, match=rf"The kernelprov cache root {root} is unsafe: {'it' if where == 'root' else top} "
                                         rf"(is owned by another user|can be written by).*set KERNELPROV_CACHE_DIR"):
        ensure_staged(tiny_archives["tar.gz"], cache_root=root)
    assert not (root / f"kernelprov-{_me()}").exists()


def test_a_sticky_world_writable_root_like_tmp_is_fine(tiny_archives, tmp_path):
    root = tmp_path / "tmp-like"
    root.mkdir()
    os.chmod(root, 0o1777)
    staged = ensure_staged(tiny_archives["tar.gz"], cache_root=root)
    assert staged.prefix.parent == root / f"kernelprov-{_me()}"


def test_a_symlinked_cache_root_is_resolved_and_checked_where_it_points(tiny_archives, tmp_path):
    real = tmp_path / "real"
    (real / "cache").mkdir(parents=True)
    os.chown(real, SOMEONE_ELSE, SOMEONE_ELSE)
    (tmp_path / "link").symlink_to(real / "cache")
    with pytest.raises(CacheError, match=f"{real} is owned by another user"):
        ensure_staged(tiny_archives["tar.gz"], cache_root=tmp_path / "link")


def _swap_for_symlink(user_dir: Path, decoy: Path) -> Path:
    """What an attacker who could write the parent would do: move the dir away, plant a symlink."""
    moved = user_dir.with_name(user_dir.name + ".moved")
    os.rename(user_dir, moved)
    user_dir.symlink_to(decoy)
    return moved


def test_publishing_goes_through_the_verified_dir_even_if_its_path_is_swapped(tiny_archives, cache_root, tmp_path, monkeypatch):
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    user_dir = cache_root / f"kernelprov-{_me()}"
    real_relocate, moved = unpack.relocate, []

    def relocate_then_swap(*args, **kwargs):
        real_relocate(*args, **kwargs)
        moved.append(_swap_for_symlink(user_dir, decoy))  # between relocation and publishing

    monkeypatch.setattr(unpack, "relocate", relocate_then_swap)
    staged = ensure_staged(tiny_archives["tar.gz"])

    assert os.listdir(decoy) == []  # neither the env nor its marker went through the swapped path
    assert (moved[0] / staged.key / "bin/hello").exists() and cache.read_marker(moved[0], staged.key) is not None
    monkeypatch.setattr(unpack, "relocate", real_relocate)
    again = ensure_staged(tiny_archives["tar.gz"])  # the symlink is refused: a private fallback
    assert again.prefix.parent.name.startswith(f"kernelprov-{_me()}.") and os.listdir(decoy) == []


def test_eviction_never_deletes_through_a_swapped_path(tiny_archives, cache_root, tmp_path, monkeypatch):
    staged = ensure_staged(tiny_archives["tar.gz"])
    user_dir = staged.prefix.parent
    # The decoy looks like the cache: the same marker, and an "env" that is someone's real data.
    decoy = tmp_path / "decoy"
    (decoy / staged.key).mkdir(parents=True)
    (decoy / staged.key / "precious").write_text("keep me")
    shutil.copy(cache.marker_path(user_dir, staged.key), decoy / f"{staged.key}.json")
    assert "prefix" not in json.loads((decoy / f"{staged.key}.json").read_text())  # a tree's is <user dir>/<key>
    real_count, moved = cache.count_leases, []

    def count_then_swap(prefix):
        if not moved:  # the last look before deleting: the dir was verified, now its path is swapped
            moved.append(_swap_for_symlink(user_dir, decoy))
        return real_count(prefix)

    monkeypatch.setattr(cache, "count_leases", count_then_swap)
    evicted = clean()

    assert (decoy / staged.key / "precious").read_text() == "keep me"
    assert [e.key for e in evicted] == [staged.key] and not (moved[0] / staged.key).exists()  # the real one went


def test_eviction_removes_only_plain_names_inside_the_dir(tiny_archives, cache_root, tmp_path):
    # An env whose tree holds a symlink to data elsewhere: eviction removes the link, not the data.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    staged = ensure_staged(tiny_archives["tar.gz"])
    (staged.prefix / "share" / "link-out").symlink_to(outside)
    assert evict(tiny_archives["tar.gz"]).key == staged.key
    assert not staged.prefix.exists() and (outside / "precious").read_text() == "keep me"
    assert find_staged(tiny_archives["tar.gz"]) is None


@pytest.mark.skipif(not shutil.which("strace"), reason="strace injects the filesystem's ENOLCK into flock")
def test_a_cache_without_file_locks_fails_in_one_sentence(tiny_archives, cache_root):
    # What an NFS mount without lockd answers to every flock: ENOLCK, injected into the real syscall.
    result = _stage_with_injected_error(tiny_archives["tar.gz"], "flock", "ENOLCK")
    assert result.returncode == 3, result.stderr[-2000:]
    user_dir = cache_root / f"kernelprov-{_me()}"
    assert result.stdout.strip() == (f"The kernelprov cache {user_dir} is on a filesystem without file locks (No locks available), "
                                     "which kernelprov needs to stage safely; set KERNELPROV_CACHE_DIR to a directory on a local disk.")


def _stage_with_injected_error(archive, syscall: str, error: str) -> subprocess.CompletedProcess:
    """Stage ``archive`` in a child whose every ``syscall`` fails with ``error`` (strace's fault
    injection into the real syscall); the child prints the KernelprovError and exits 3."""
    code = ("import sys; from kernelprov.engine.stage import ensure_staged; from kernelprov.errors import KernelprovError\n"
            "try:\n    ensure_staged(sys.argv[1])\nexcept KernelprovError as err:\n    print(err); sys.exit(3)")
    return subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e", f"inject={syscall}:error={error}",
                           sys.executable, "-c", code, str(archive)], capture_output=True, text=True, timeout=120)


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.skipif(not shutil.which("strace"), reason="strace injects ENOSPC into the marker's fsync")
def test_a_disk_that_fills_at_the_marker_write_gives_one_sentence_and_frees_the_env(tiny_archives, cache_root):
    # The env is complete, then the disk fills exactly while its marker is written (the one fsync
    # of a stage): one sentence naming the cache, and the complete-but-unmarked env is not left
    # on the full disk.
    result = _stage_with_injected_error(tiny_archives["tar.gz"], "fsync", "ENOSPC")
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stdout.strip()
    assert "\n" not in message and "Errno" not in message and ".json.tmp" not in message, message
    assert str(cache_root) in message and "ran out of space" in message, message
    user_dir = cache_root / f"kernelprov-{_me()}"
    left = [p.name for p in user_dir.iterdir() if not p.name.startswith(".")]
    assert not [n for n in left if not n.endswith((".lock", ".failed"))], left  # the lock, and the failure remembered for the panel
    assert find_staged(tiny_archives["tar.gz"]) is None
