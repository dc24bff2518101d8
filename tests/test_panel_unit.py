"""The panel's model and state helpers, through their jest unit tests (``labextension/test``).

Run from pytest so that the README's one test command covers them too; the browser tests in
``test_panel.py`` check the same behaviour end to end against a real server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

LABEXTENSION = Path(__file__).resolve().parent.parent / "labextension"


def test_the_panel_model_unit_tests_pass():
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    jlpm = shutil.which("jlpm", path=env["PATH"])
    assert jlpm, "jlpm comes with jupyter-builder in the venv; run .ci/setup"
    if not (LABEXTENSION / "node_modules" / ".bin" / "jest").exists():
        subprocess.run([jlpm, "install", "--immutable"], cwd=LABEXTENSION, env=env, check=True, capture_output=True,
                       timeout=900)
    result = subprocess.run([jlpm, "test", "--ci"], cwd=LABEXTENSION, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Tests:" in result.stderr and " failed" not in result.stderr, result.stderr
