"""Guarantee: the cache stays within its budget by evicting least-recently-used envs, and an env
that a running kernel uses is never evicted — its lease dies with the kernel process."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelprov.engine import cache
from kernelprov.cli.app import main
from kernelprov.errors import CacheError
from kernelprov.engine.inventory import clean, evict, find_staged
from kernelprov.engine.stage import ensure_staged

from .kernel_client import evaluate


def _age(entry_or_staged, seconds: float = 3600) -> None:
    """Pretend an env was last used ``seconds`` ago (the marker's mtime is its last use)."""
    user_dir, key = entry_or_staged.prefix.parent, entry_or_staged.key
    past = time.time() - seconds
    os.utime(cache.marker_path(user_dir, key), (past, past))


def _versions(copy_archive, tiny_archives, n: int):
    """n distinct archives (distinct keys) of the tiny env."""
    return [copy_archive(tiny_archives["tar.gz"], f"v{i}.tar.gz") for i in range(n)]


def test_budget_evicts_least_recently_used_first(tiny_archives, copy_archive, cache_root):
    a, b, c = _versions(copy_archive, tiny_archives, 3)
    first, second = ensure_staged(a), ensure_staged(b)
    size = cache.read_marker(first.prefix.parent, first.key).env_bytes
    _age(first, 7200)
    _age(second, 3600)  # used more recently than the first

    third = ensure_staged(c, max_bytes=2 * size)

    assert not first.prefix.exists() and find_staged(a) is None  # least recently used: gone
    assert second.prefix.exists() and third.prefix.exists()


def test_budget_never_evicts_what_was_just_used(tiny_archives, copy_archive, cache_root):
    a, b = _versions(copy_archive, tiny_archives, 2)
    first = ensure_staged(a)
    ensure_staged(b, max_bytes=1)  # over budget, but the first env was used seconds ago
    assert first.prefix.exists()


def test_a_held_lease_blocks_eviction_until_its_process_dies(tiny_archives, copy_archive, cache_root):
    a, b = _versions(copy_archive, tiny_archives, 2)
    staged = ensure_staged(a)
    _age(staged)
    leases = cache.lease_dir(staged.prefix)
    leases.mkdir()
    # What run.sh does: a lease named by its PID, flock'ed, inherited by the process it execs.
    holder = subprocess.Popen(["bash", "-c", f'exec 9>"{leases}/$$"; flock -n 9; echo locked; exec sleep 60'],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert find_staged(a).in_use == 1
        with pytest.raises(CacheError, match=r"in use by 1 running kernel\(s\); shut them down"):
            evict(a)
        ensure_staged(b, max_bytes=1)
        assert clean() and staged.prefix.exists()  # clean removed b, kept the leased a
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()

    assert find_staged(a).in_use == 0  # the lock and the process are gone: stale at once
    assert evict(a).key == staged.key and not staged.prefix.exists()


def test_a_lease_counts_while_its_process_lives_even_without_flock(tiny_archives, copy_archive, cache_root):
    staged = ensure_staged(copy_archive(tiny_archives["tar.gz"]))
    leases = cache.lease_dir(staged.prefix)
    leases.mkdir()
    with subprocess.Popen(["sleep", "60"]) as alive:
        (leases / str(alive.pid)).touch()  # opened, not (yet) locked
        assert cache.count_leases(staged.prefix) == 1
        alive.kill()
    assert cache.count_leases(staged.prefix) == 0 and list(leases.iterdir())  # counting never deletes
    assert cache.prune_leases(staged.prefix) == 0 and not list(leases.iterdir())


async def test_a_running_kernel_holds_its_env(kernel_environ, runnable_archive, cache_root, capsys):
    assert main(["install", "demo", "--archive", str(runnable_archive)]) == 0
    km = AsyncKernelManager(kernel_name="demo")
    await km.start_kernel()
    try:
        await evaluate(km, "pass")
        staged = km.provisioner.staged_env
        capsys.readouterr()

        assert main(["cache", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(e["prefix"], e["in_use"]) for e in listed] == [(str(staged.prefix), 1)]
        with pytest.raises(CacheError, match="in use by 1 running kernel"):
            evict(runnable_archive)
        assert main(["cache", "clean"]) == 0
        assert "Kept 1 in use" in capsys.readouterr().out and staged.prefix.exists()
    finally:
        await km.shutdown_kernel(now=True)
    # The kernel is gone, and so are its lock and its process: evicting works at once.
    assert find_staged(runnable_archive).in_use == 0
    assert evict(runnable_archive).key == staged.key and not staged.prefix.exists()


def test_cache_list_shows_size_last_use_and_use(tiny_archives, cache_root, capsys):
    ensure_staged(tiny_archives["tar.zst"])
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "MB" in out and "no" in out and time.strftime("%Y-%m-%d") in out


def test_budget_setting_comes_from_the_environment(monkeypatch):
    from kernelprov.config import KernelprovConfig

    monkeypatch.setenv("KERNELPROV_CACHE_MAX_BYTES", "5e9")
    assert KernelprovConfig().cache_max_bytes == 5_000_000_000
    assert KernelprovConfig().stage_options()["max_bytes"] == 5_000_000_000


def test_a_reused_pid_does_not_keep_a_dead_kernels_lease(tiny_archives, copy_archive, cache_root):
    # A kernel died an hour ago without its flock (no flock on the node); its PID now belongs to
    # an unrelated process that started long after the lease was written.
    staged = ensure_staged(copy_archive(tiny_archives["tar.gz"]))
    _age(staged)
    leases = cache.lease_dir(staged.prefix)
    leases.mkdir()
    with subprocess.Popen(["sleep", "60"]) as unrelated:
        lease = leases / str(unrelated.pid)
        lease.touch()
        an_hour_ago = time.time() - 3600
        os.utime(lease, (an_hour_ago, an_hour_ago))
        try:
            assert cache.count_leases(staged.prefix) == 0
            assert evict(staged.archive).key == staged.key and not staged.prefix.exists()
        finally:
            unrelated.kill()


def test_a_marker_dated_in_the_future_can_still_be_evicted(tiny_archives, copy_archive, cache_root):
    # The clock was stepped back after the env was last used: its marker is dated next year.
    a, b, c = _versions(copy_archive, tiny_archives, 3)
    future, explicit = ensure_staged(a), ensure_staged(b)
    next_year = time.time() + 365 * 86400
    for staged in (future, explicit):
        os.utime(cache.marker_path(staged.prefix.parent, staged.key), (next_year, next_year))
    assert find_staged(b).last_used <= time.time()  # read as used now, never later

    assert [e.key for e in clean()] and not explicit.prefix.exists() and not future.prefix.exists()

    # The size budget re-dates such a marker to now, so it ages (and is evicted) from here on.
    first = ensure_staged(a)
    os.utime(cache.marker_path(first.prefix.parent, first.key), (next_year, next_year))
    ensure_staged(c, max_bytes=1)
    assert first.prefix.exists() and os.stat(cache.marker_path(first.prefix.parent, first.key)).st_mtime <= time.time()


def test_an_env_is_leased_before_it_is_handed_to_a_starting_kernel(tiny_archives, copy_archive, cache_root, capsys):
    # Between staging and run.sh's own flock a kernel held no lease, and an Evict (or cache clean)
    # in that window deleted the env under it. Now the lease is taken under the key lock, before
    # ensure_staged returns: for the provisioner (its server PID + kernel id) and for run.sh
    # (`kernelprov unpack --lease $$`).
    import subprocess as sp

    from kernelprov.cli.app import main as cli
    from kernelprov.engine.inventory import clean, evict
    from kernelprov.engine.leases import release_lease
    from kernelprov.engine.stage import ensure_staged
    from kernelprov.errors import CacheError

    archive = copy_archive(tiny_archives["tar.gz"])
    staged = ensure_staged(archive, lease=f"{os.getpid()}.kernel-1")
    assert staged.lease is not None and staged.lease.exists()
    with pytest.raises(CacheError, match="in use by 1 running kernel"):
        evict(archive)
    assert clean() == [] and staged.prefix.exists()
    release_lease(staged.lease)  # the provisioner's cleanup once its kernel is gone
    assert evict(archive).key == staged.key and not staged.prefix.exists()

    # run.sh's way: a shell (the future kernel) stages through the CLI with its own PID.
    shell = sp.Popen(["sleep", "60"])
    try:
        assert cli(["unpack", "--quiet", "--lease", str(shell.pid), str(archive)]) == 0
        prefix = Path(capsys.readouterr().out.strip())
        assert clean() == [] and prefix.exists()
    finally:
        shell.kill()
        shell.wait()
    assert [e.prefix for e in clean()] == [prefix]  # its process is gone: the lease no longer holds
