"""Guarantee: while one process stages an archive, every other process of the same user sees how
far it got (``inventory.staging_progress``), and nothing of that record outlives the stage — nor
is a record left by a killed stage ever believed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from kernelprov.engine import cache, inventory

#: A stage in a child process whose progress callback sleeps, so that another process can watch.
_SLOW_STAGE = """
import sys, time
from kernelprov.engine.stage import ensure_staged
ensure_staged(sys.argv[1], progress=lambda done, total: time.sleep(float(sys.argv[2])))
"""


@pytest.fixture
def big_archive(tmp_path) -> Path:
    """An uncompressed tar of a minimal env (``bin/python``, ``conda-meta/``) plus 24 MB of random data: the
    read-ahead thread reports every 4 MB, so a stage reports several times."""
    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data, mode in (("bin/python", b"#!/bin/sh\nexit 3\n", 0o755), ("conda-meta/history", b"", 0o644),
                                 ("share/big.bin", os.urandom(24 << 20), 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, time.time()
            tar.addfile(info, io.BytesIO(data))
    return archive


def _start_slow_stage(archive: Path, sleep: float) -> subprocess.Popen:
    """The stage in a child process; its stderr goes to ``<archive>.stderr``."""
    with open(f"{archive}.stderr", "wb") as stderr:
        return subprocess.Popen([sys.executable, "-c", _SLOW_STAGE, str(archive), str(sleep)],
                                stdout=subprocess.DEVNULL, stderr=stderr)


def _stderr(archive: Path) -> str:
    return Path(f"{archive}.stderr").read_text(errors="replace")


def _user_dir(cache_root: Path) -> Path:
    (user_dir,) = cache_root.glob("kernelprov-*")
    return user_dir


def test_another_process_sees_the_stage_grow_and_nothing_is_left(big_archive, cache_root):
    before = time.time()
    child = _start_slow_stage(big_archive, 0.25)
    seen = []
    while child.poll() is None:
        progress = inventory.staging_progress(big_archive)
        if progress is not None:
            seen.append(progress)
        time.sleep(0.05)
    assert child.returncode == 0, _stderr(big_archive)

    assert seen, "the stage was never visible from another process"
    done = [p["done"] for p in seen]
    assert done == sorted(done) and len(set(done)) >= 3, f"done did not grow: {done}"
    size = big_archive.stat().st_size
    assert {p["total"] for p in seen} == {size}
    assert {p["pid"] for p in seen} == {child.pid}
    started = {p["started_at"] for p in seen}
    assert len(started) == 1 and before <= started.pop() <= time.time()
    assert inventory.staging_in_progress(big_archive) is None  # the stage is over
    # the record went with the stage; the env is published
    assert not list(_user_dir(cache_root).glob("*.progress*"))
    assert inventory.find_staged(big_archive) is not None
    assert inventory.staging_progress(big_archive) is None


def test_a_failed_stage_removes_its_record(big_archive, cache_root):
    data = big_archive.read_bytes()
    big_archive.write_bytes(data[: len(data) // 2])  # cut short: the stage fails half way
    child = _start_slow_stage(big_archive, 0.1)
    assert child.wait(timeout=60) != 0
    assert "truncated" in _stderr(big_archive)
    assert not list(_user_dir(cache_root).glob("*.progress*"))
    assert inventory.staging_progress(big_archive) is None


def test_a_killed_stage_leaves_a_record_nobody_believes(big_archive, cache_root):
    child = _start_slow_stage(big_archive, 1.0)
    deadline = time.monotonic() + 30
    while inventory.staging_progress(big_archive) is None:
        assert child.poll() is None and time.monotonic() < deadline, "the stage never became visible"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()

    (record,) = _user_dir(cache_root).glob("*.progress")  # kill -9 runs no cleanup
    assert json.loads(record.read_text())["pid"] == child.pid
    assert inventory.staging_progress(big_archive) is None  # nobody holds the lock
    assert inventory.staging_in_progress(big_archive) is None
    # the next start clears it with the rest of the killed stage's leftovers
    proc = subprocess.run([sys.executable, "-c", _SLOW_STAGE, str(big_archive), "0"], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert not list(_user_dir(cache_root).glob("*.progress*"))


@pytest.mark.parametrize("content", [
    b"x" * 10_000,  # longer than any record kernelprov writes
    b"[1, 2, 3]",
    b'{"done": "1", "total": 2, "started_at": 1.0, "pid": 1}',
    b'{"done": true, "total": 2, "started_at": 1.0, "pid": 1}',
    b'{"done": -1, "total": 2, "started_at": 1.0, "pid": 1}',
    b'{"done": 1, "total": 2, "started_at": "now", "pid": 1}',
    b'{"done": 1, "total": 2, "started_at": 1.0}',
    b"\xff\xfe not json",
])
def test_a_record_is_read_bounded_and_type_checked(content, cache_root):
    with cache.user_cache_dir(cache_root) as user_dir:
        (user_dir / cache.progress_name("0123456789ab")).write_bytes(content)
        assert cache.read_progress(user_dir, "0123456789ab") is None


def test_a_record_that_is_a_link_is_not_followed(tmp_path, cache_root):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"done": 1, "total": 2, "started_at": 1.0, "pid": os.getpid()}))
    with cache.user_cache_dir(cache_root) as user_dir:
        os.symlink(elsewhere, user_dir / cache.progress_name("0123456789ab"))
        assert cache.read_progress(user_dir, "0123456789ab") is None
        os.unlink(user_dir / cache.progress_name("0123456789ab"))
        os.link(elsewhere, user_dir / cache.progress_name("0123456789ab"))
        assert cache.read_progress(user_dir, "0123456789ab") == {"done": 1, "total": 2, "started_at": 1.0,
                                                                 "pid": os.getpid()}
