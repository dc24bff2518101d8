"""Session fixtures: real conda-format envs packed by the real conda-pack, built once per run.

Set ``KERNELPROV_TEST_CACHE=/some/dir`` to keep the runnable env between runs (it is keyed by its
inputs); by default it is built once into the session's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jupyter_core.paths  # noqa: F401 — pytest_jupyter's jp_environ patches it without importing it
import pytest

from kernelprov.cli.app import main
from kernelprov.cli.demo_env import cached_conda_env
from kernelprov.engine.pack import pack_env

from .tiny_env import build_tiny_env, conda_pack_each

# tests.ci_skips: under CI=true a skipped test fails the run.
pytest_plugins = ["pytest_jupyter.jupyter_core", "tests.ci_skips"]


# The fixtures that build or start a real runnable env (CPython + ipykernel, packed).
REAL_ENV_FIXTURES = frozenset({"runnable_env", "runnable_archive"})


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that needs a real runnable env, directly or through another
    fixture, so ``-m "not slow"`` is always the quick suite whatever a test file remembers."""
    for item in items:
        if REAL_ENV_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


TAR_FORMATS = ("tar.gz", "tar.bz2", "tar.zst", "tar", "zip", "tar.xz")


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory) -> Path:
    """A tiny conda-format env whose prefix is long enough to relocate binary files into any cache."""
    return build_tiny_env(tmp_path_factory.mktemp("tiny") / ("tiny-env-" + "x" * 60))


@pytest.fixture(scope="session")
def tiny_archives(tiny_env, tmp_path_factory) -> dict[str, Path]:
    """The tiny env packed by conda-pack in every format it writes (tar.xz through conda_pack's API)."""
    return conda_pack_each(tiny_env, tmp_path_factory.mktemp("tiny-archives") / "tiny", TAR_FORMATS, zip_symlinks=True)



@pytest.fixture(scope="session")
def runnable_env(tmp_path_factory) -> Path:
    """A real conda-format env (CPython + pip-installed ipykernel) that runs kernels."""
    cache_dir = os.environ.get("KERNELPROV_TEST_CACHE")
    root = Path(cache_dir) if cache_dir else tmp_path_factory.mktemp("runnable")
    return cached_conda_env(root, packages=("ipykernel",))


@pytest.fixture(scope="session")
def runnable_archive(runnable_env, tmp_path_factory) -> Path:
    """``runnable_env`` packed once by ``kernelprov pack`` (tar.zst with its manifest)."""
    archive = tmp_path_factory.mktemp("runnable-archive") / "demo.tar.zst"
    pack_env(archive, prefix=runnable_env)
    return archive


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """A fresh node-local cache root for one test, reached through KERNELPROV_CACHE_DIR (and a
    private image root, so no test sees the real /tmp/kernelprov-<user>)."""
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("KERNELPROV_CACHE_DIR", str(root))
    monkeypatch.setenv("KERNELPROV_IMAGE_ROOT", str(tmp_path / "images"))
    return root


@pytest.fixture
def cli(jp_environ, cache_root, capsys):
    """Run the CLI; return (exit status, stdout, stderr)."""

    def run(*argv: str):
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def kernel_environ(jp_environ, cache_root, monkeypatch):
    """Isolated Jupyter paths for kernel tests, without the PYTHONPATH that jp_environ sets:
    a kernel must import its packages from its own staged env, not from the test runner's."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("PYTHONHOME", raising=False)
    return jp_environ


@pytest.fixture
def copy_archive(tmp_path):
    """Copy an archive (and its manifest) to a test's own directory, to modify it freely."""

    def copy(archive: Path, name: str | None = None) -> Path:
        target = tmp_path / "archives" / (name or archive.name)
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(archive, target)
        manifest = Path(f"{archive}.manifest.json")
        if manifest.exists():
            shutil.copy2(manifest, Path(f"{target}.manifest.json"))
        return target

    return copy
