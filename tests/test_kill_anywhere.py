"""Guarantee: ``kill -9`` of ``kernelprov unpack`` at any moment is survivable. Killed at 30
random points across a whole cold unpack of the real runnable archive, each next start succeeds and
yields an env equal, entry for entry (type, mode, bytes, link target), to a clean staging."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelprov.engine.inventory import find_staged

from .trees import tree

KILLS = int(os.environ.get("KERNELPROV_TEST_KILLS", "30"))


def _unpack(archive: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelprov", "unpack", "--quiet", str(archive)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_9_at_random_points_never_breaks_the_next_start(runnable_archive, cache_root):
    env = {**os.environ, "KERNELPROV_CACHE_DIR": str(cache_root)}
    started = time.monotonic()
    clean = _unpack(runnable_archive, env)
    duration = time.monotonic() - started
    assert clean.returncode == 0, clean.stderr
    prefix = Path(clean.stdout.strip())
    reference = tree(prefix, mtimes=False)
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
        assert staged is None or tree(staged.prefix, mtimes=False) == reference, f"kill {attempt} at {delay:.2f} s left a trusted, damaged env"
        again = _unpack(runnable_archive, env)
        assert again.returncode == 0, f"kill {attempt} at {delay:.2f} s: the next start failed: {again.stderr}"
        assert Path(again.stdout.strip()) == prefix
        assert tree(prefix, mtimes=False) == reference, f"kill {attempt} at {delay:.2f} s: the next start's env differs"
    assert outcomes["killed"] >= KILLS * 2 // 3, outcomes
