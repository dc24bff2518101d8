"""Guarantee: under ``CI=true`` a skipped test fails the run, so a missing install step in
``.ci/setup`` can never hide behind a skip; an expected failure (xfail) stays what it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = '''
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("chromium is not installed")

@pytest.mark.skipif(True, reason="squashfuse is missing")
def test_skipped_by_marker():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
'''


def _run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.ci_skips", "-p", "no:cacheprovider", "-q",
         "-o", "addopts=", "-o", "asyncio_default_fixture_loop_scope=function", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_skip_fails_the_run_under_ci(tmp_path, ci):
    result = _run_sample(tmp_path, ci)
    assert result.returncode == 1, result.stdout
    # A skip in the call fails the test; one at set-up (a skipif marker) errors it: both fail the run.
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in result.stdout, result.stdout
    assert "chromium is not installed" in result.stdout and "squashfuse is missing" in result.stdout


def test_a_skip_is_a_skip_outside_ci(tmp_path):
    result = _run_sample(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in result.stdout, result.stdout
