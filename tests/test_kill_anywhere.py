"""Guarantee: ``kill -9`` of ``kernelprov unpack`` at any moment is survivable. Killed at 30
random points across a whole cold unpack of the real runnable archive, each next start succeeds and
yields an env equal, entry for entry (type, mode, bytes, link target), to a clean staging."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelprov.engine.inventory import find_staged

KILLS = int(os.environ.get("KERNELPROV_TEST_KILLS", "30"))


def _unpack(archive: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelprov", "unpack", "--quiet", str(archive)],
                          env=env, capture_output=True, text=True, timeout=300)


def _tree(prefix: Path) -> dict[str, tuple]:
    """Every entry under ``prefix``: (type, permission bits, sha256 of bytes or link target)."""
    entries = {}
    for root, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                what = ("dir",)
            else:
                with open(path, "rb") as f:
                    what = ("file", hashlib.sha256(f.read()).hexdigest())
            entries[os.path.relpath(path, prefix)] = (*what, stat.S_IMODE(st.st_mode))
    return entries


@pytest.mark.slow
def test_kill_9_at_random_points_never_breaks_the_next_start(runnable_archive, cache_root):
    env = {**os.environ, "KERNELPROV_CACHE_DIR": str(cache_root)}
    started = time.monotonic()
    clean = _unpack(runnable_archive, env)
    duration = time.monotonic() - started
    assert clean.returncode == 0, clean.stderr
    prefix = Path(clean.stdout.strip())
    reference = _tree(prefix)
    assert len(reference) > 1000 and "bin/python" in "\n".join(reference)

    rng = random.Random(int(os.environ.get("KERNELPROV_TEST_SEED", "11")))
    outcomes = {"killed": 0, "finished first": 0}
    for attempt in range(KILLS):
        assert subprocess.run([sys.executable, "-m", "kernelprov", "cache", "clean"], env=env,
                              capture_output=True, timeout=120).returncode == 0
        assert not prefix.exists()
        delay = rng.uniform(0, duration * 1.1)
        child = subprocess.Popen([sys.executable, "-m", "kernelprov", "unpack", "--quiet", str(runnable_archive)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        outcomes["killed" if child.poll() is None else "finished first"] += 1
        child.send_signal(signal.SIGKILL)
        child.wait()

        staged = find_staged(runnable_archive, cache_root=cache_root)
        assert staged is None or _tree(staged.prefix) == reference, f"kill {attempt} at {delay:.2f} s left a trusted, damaged env"
        again = _unpack(runnable_archive, env)
        assert again.returncode == 0, f"kill {attempt} at {delay:.2f} s: the next start failed: {again.stderr}"
        assert Path(again.stdout.strip()) == prefix
        assert _tree(prefix) == reference, f"kill {attempt} at {delay:.2f} s: the next start's env differs"
    assert outcomes["killed"] >= KILLS * 2 // 3, outcomes
