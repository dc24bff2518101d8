"""Guarantee: the tarfile extraction-filter bypasses of 2025-2026 — a hard link to a deeper symlink
(CVE-2026-11940), a hard link to a symlink changing permissions or exposing a file
(CVE-2026-82049), empty directories created outside the target (CVE-2026-19672), header/pax size
disagreement smuggling entries (TARmageddon, CVE-2025-62518) and symlink chains — are refused
by kernelprov's own checks, or cannot hurt, on the venv's Python and on Debian's 3.11.2 (which
has no ``tarfile`` filter at all); the directory each attack aims at, the cache root and the
user's cache dir stay as they were. The archives are built in ``tests/tar_bypass_cases.py``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from kernelprov.engine import cache
from kernelprov.engine.inventory import find_staged
from kernelprov.engine.stage import ensure_staged
from kernelprov.errors import ArchiveError

from .tar_bypass_cases import CASES, SECRET, snapshot

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")
ATTACK_NAMES = ("planted", "made", "smuggled", "secret")


@pytest.fixture
def outside(tmp_path) -> Path:
    """The directory every attack aims at, beside the cache: it holds the victim's ``secret``."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "secret").write_bytes(SECRET)
    os.chmod(target / "secret", 0o600)
    return target


def _aim(cache_root: Path, outside: Path) -> str:
    """``outside`` as seen from a staging dir of this user's cache: what the attacks climb to."""
    return os.path.relpath(outside, cache.user_cache_dir(cache_root) / ".staging-key-random")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_bypass_is_refused_or_harmless(case, tmp_path, cache_root, outside):
    archive = tmp_path / "archives" / f"{case.name}.tar"
    archive.parent.mkdir()
    archive.write_bytes(case.build(_aim(cache_root, outside)))
    user_dir = cache.user_cache_dir(cache_root)
    before = snapshot(tmp_path, skip=user_dir)

    try:
        prefix = ensure_staged(archive).prefix
        outcome = "unaffected"
    except ArchiveError as err:
        outcome = str(err)

    assert case.refused_as_expected(outcome), f"{case.doc}\n{outcome}"
    assert "\n" not in outcome and (outcome == "unaffected" or str(archive) in outcome)
    assert snapshot(tmp_path, skip=user_dir) == before, "nothing outside the user's cache dir may change"
    assert os.listdir(cache_root) == [user_dir.name]
    leftovers = [p for p in user_dir.rglob("*") if p.name.startswith(".staging-") or p.name in ATTACK_NAMES]
    assert leftovers == []
    if case.refusal is None:
        assert case.check(prefix) == ""
    else:
        assert find_staged(archive) is None


@pytest.mark.parametrize("case", [c for c in CASES if c.lands_outside_naively],
                         ids=[c.name for c in CASES if c.lands_outside_naively])
def test_each_attack_is_aimed_at_the_watched_directory(case, tmp_path, outside):
    """These tests can fail: extracted by ``tarfile`` with no filter, from where kernelprov's
    staging dir would be, the same archive writes into (or chmods) ``outside``."""
    dest = tmp_path / "cache" / "kernelprov-u" / ".staging-key-random"
    dest.mkdir(parents=True)
    before = snapshot(outside, skip=dest)
    with tarfile.open(fileobj=io.BytesIO(case.build(os.path.relpath(outside, dest)))) as tar:
        tar.extractall(dest, filter="fully_trusted")
    assert snapshot(outside, skip=dest) != before


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="Debian's /usr/bin/python3 is not installed")
def test_each_bypass_is_refused_under_debians_python_too(tmp_path):
    """The same cases, extracted by kernelprov's engine under /usr/bin/python3, in a process
    that imports it from this checkout."""
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([str(DEBIAN_PYTHON), "-s", str(ROOT / "tests/tar_bypass_cases.py"), str(work)],
                            capture_output=True, text=True, timeout=120, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["case"] for r in results] == [c.name for c in CASES]
    for outcome in results:
        assert outcome["as_expected"] and outcome["changed"] == [] and outcome["problem"] == "", outcome
