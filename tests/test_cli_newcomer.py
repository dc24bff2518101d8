"""The CLI as a newcomer meets it (issue 12, points 7a and 10): flags where they would be typed,
hints after the command that leaves something behind, one-line failures that say what to do
next, and manifests that count what is really in an env.

Every test runs the real ``kernelprov`` through ``main(argv)`` against real archives packed by
the real conda-pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from kernelprov.cli.app import main
from kernelprov.engine import pack
from kernelprov.engine.manifest import manifest_path, read_manifest
from kernelprov.engine.securedir import user_name

from .tiny_env import build_relocation_env, build_tiny_env, conda_pack_each

PYTHON_VERSION = "3.11.7"


def _add_python_record(prefix: Path, version: str = PYTHON_VERSION) -> None:
    """Give ``prefix`` a conda record for python (owning no file, with its package-cache dir so
    that conda-pack packs it without a warning), as every real conda env has."""
    pkgs = prefix.parent / f"{prefix.name}-pkgs" / f"python-{version}-0"
    (pkgs / "info").mkdir(parents=True)
    (pkgs / "info/paths.json").write_text(json.dumps({"paths": [], "paths_version": 1}))
    record = {"name": "python", "version": version, "build": "0", "build_number": 0, "files": [],
              "link": {"source": str(pkgs), "type": 1}, "url": f"https://example.invalid/python-{version}-0.tar.bz2",
              "channel": "local"}
    (prefix / f"conda-meta/python-{version}-0.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def pip_env(tmp_path_factory) -> Path:
    """Conda records for tiny, reloc and python, plus one distribution pip installed (pipmod)."""
    prefix = build_relocation_env(tmp_path_factory.mktemp("pip-env") / "env")
    _add_python_record(prefix)
    return prefix


@pytest.fixture(scope="module")
def pip_archives(pip_env, tmp_path_factory) -> dict[str, Path]:
    """``pip_env`` packed by conda-pack itself (no kernelprov manifest)."""
    return conda_pack_each(pip_env, tmp_path_factory.mktemp("pip-archives") / "pipenv", ("tar.gz", "zip"))


def _kernel_dir(jp_data_dir: Path, name: str) -> Path:
    return jp_data_dir / "kernels" / name


def _user_cache(cache_root: Path) -> Path:
    return cache_root / f"kernelprov-{user_name()}"


# 1. remove takes install's location flags

@pytest.mark.parametrize("flag", ["--prefix", "--kernels-dir"])
def test_remove_takes_the_location_flag_the_kernel_was_installed_with(cli, tiny_archives, tmp_path, flag):
    site = tmp_path / "site"
    assert cli("install", "tiny", "--archive", str(tiny_archives["tar.gz"]), flag, str(site))[0] == 0
    kernel_dir = site / "share/jupyter/kernels/tiny" if flag == "--prefix" else site / "tiny"
    assert kernel_dir.is_dir()

    status, out, err = cli("remove", "tiny", flag, str(site))

    assert status == 0, err
    assert f"Removed kernel 'tiny' from {kernel_dir}" in out and not kernel_dir.exists()


def test_remove_defaults_to_the_user_and_names_the_flag_for_a_sys_prefix_kernel(cli, tiny_archives, jp_env_jupyter_path,
                                                                               monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(jp_env_jupyter_path.parent.parent))  # its kernels are on the Jupyter path
    assert cli("install", "tiny", "--archive", str(tiny_archives["tar.gz"]), "--sys-prefix")[0] == 0
    kernel_dir = jp_env_jupyter_path / "kernels/tiny"

    status, _, err = cli("remove", "tiny")
    assert status == 1 and err.count("\n") == 1 and kernel_dir.is_dir()
    assert "`kernelprov remove tiny --sys-prefix`" in err

    assert cli("remove", "tiny", "--sys-prefix")[0] == 0 and not kernel_dir.exists()


# 2. --cache-dir after the subcommand

def test_cache_dir_is_accepted_after_the_subcommand(cli, tiny_archives, tmp_path, cache_root):
    other = tmp_path / "other-cache"
    archive = str(tiny_archives["tar.zst"])

    status, out, err = cli("unpack", archive, "--quiet", "--cache-dir", str(other))

    assert status == 0, err
    assert Path(out.strip()).parent == _user_cache(other) and not _user_cache(cache_root).exists()
    listed = json.loads(cli("cache", "list", "--json", "--cache-dir", str(other))[1])
    assert [e["prefix"] for e in listed] == [out.strip()]
    assert json.loads(cli("--cache-dir", str(other), "cache", "list", "--json")[1]) == listed  # before it: as always


# 3. remove says what it leaves staged (or evicts it)

def test_remove_says_its_env_is_still_staged_and_how_to_remove_it(cli, tiny_archives, copy_archive):
    archive = copy_archive(tiny_archives["tar.zst"])
    cli("install", "tiny", "--archive", str(archive))
    prefix = Path(cli("unpack", str(archive), "--quiet")[1].strip())

    status, out, _ = cli("remove", "tiny")

    assert status == 0 and prefix.is_dir()
    hint = out.splitlines()[1:]
    assert len(hint) == 1 and str(prefix) in hint[0] and "`kernelprov cache clean`" in hint[0]


def test_remove_evict_also_removes_the_staged_copy(cli, tiny_archives, copy_archive, jp_data_dir):
    archive = copy_archive(tiny_archives["tar.zst"])
    cli("install", "tiny", "--archive", str(archive))
    prefix = Path(cli("unpack", str(archive), "--quiet")[1].strip())

    status, out, err = cli("remove", "tiny", "--evict")

    assert status == 0, err
    assert not prefix.exists() and not _kernel_dir(jp_data_dir, "tiny").exists()
    assert f"Removed its staged environment {prefix}" in out and "cache clean" not in out


def test_remove_evict_refuses_an_env_in_use_and_removes_nothing(cli, tiny_archives, copy_archive, jp_data_dir):
    archive = copy_archive(tiny_archives["tar.zst"])
    cli("install", "tiny", "--archive", str(archive))
    prefix = Path(cli("unpack", str(archive), "--quiet", "--lease", str(os.getpid()))[1].strip())

    status, _, err = cli("remove", "tiny", "--evict")

    assert status == 1 and err.count("\n") == 1 and "in use" in err
    assert prefix.is_dir() and _kernel_dir(jp_data_dir, "tiny").is_dir()


# 4. cache list names entries by kernel and marks a missing archive

def test_cache_list_names_staged_envs_by_their_kernels_and_marks_missing_archives(cli, tiny_archives, copy_archive):
    archive = copy_archive(tiny_archives["tar.zst"], "shared-env.tar.zst")
    for name in ("alpha", "beta"):
        assert cli("install", name, "--archive", str(archive))[0] == 0
    cli("unpack", str(archive), "--quiet")

    [entry] = json.loads(cli("cache", "list", "--json")[1])
    assert entry["kernels"] == ["alpha", "beta"] and entry["archive_exists"] is True
    table = cli("cache", "list")[1]
    assert table.splitlines()[1].split()[:2] == ["alpha,", "beta"]  # the first column of the one row

    archive.unlink()
    [entry] = json.loads(cli("cache", "list", "--json")[1])
    assert entry["archive_exists"] is False
    assert "(archive missing)" in cli("cache", "list")[1]


def test_cache_list_falls_back_to_the_archive_name(cli, tiny_archives, copy_archive):
    archive = copy_archive(tiny_archives["tar.zst"], "no-kernel.tar.zst")
    cli("unpack", str(archive), "--quiet")

    [entry] = json.loads(cli("cache", "list", "--json")[1])
    assert entry["kernels"] == [] and entry["name"] == "no-kernel"
    assert "no-kernel" in cli("cache", "list")[1]


# 5. doctor runs every check, creates nothing, and says what a missing archive needs

def test_doctor_creates_no_cache_dir(cli, tiny_archives, cache_root):
    assert cli("install", "tiny", "--archive", str(tiny_archives["tar.zst"]))[0] == 0

    status, out, err = cli("doctor", "--no-hash")

    assert status == 0, out + err
    assert "does not exist yet" in out and "not staged on this node yet" in out
    assert list(cache_root.iterdir()) == []


def test_doctor_reports_an_unusable_cache_with_every_other_check(cli, tiny_archives, tmp_path):
    assert cli("install", "tiny", "--archive", str(tiny_archives["tar.zst"]))[0] == 0
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")

    status, out, err = cli("doctor", "--cache-dir", str(not_a_dir / "cache"))

    assert status == 1 and err == "", err
    assert f"FIX the cache root {not_a_dir / 'cache'} cannot be used: {not_a_dir} is not a directory" in out
    kernel_section = out.split("kernel 'tiny'")[1]
    for check in ("run.sh is executable", "is readable", "matches its manifest's sha256", "is on the Jupyter path"):
        assert check in kernel_section
    assert "1 problem(s) found." in out


def test_doctor_says_a_missing_archive_is_missing_and_how_to_get_it_back(cli, tiny_archives, copy_archive):
    archive = copy_archive(tiny_archives["tar.zst"])
    cli("install", "tiny", "--archive", str(archive))
    archive.unlink()

    status, out, _ = cli("doctor")

    assert status == 1
    assert f"FIX archive {archive} does not exist\n      -> it is missing: restore it" in out
    assert "reinstall the kernel" in out and "chmod" not in out


# 6 and 7. failures after "Packing ..." are one line, and "not a conda environment" says what next

@pytest.mark.parametrize("env_prefix", ["/nonexistent", "not-conda"])
def test_a_pack_failure_is_one_line_with_a_next_step(cli, tmp_path, env_prefix, jp_data_dir):
    if env_prefix == "not-conda":
        env_prefix = str(tmp_path / "not-conda")
        Path(env_prefix).mkdir()

    status, out, err = cli("install", "x", "--env-prefix", env_prefix)

    assert status == 1 and out.startswith("Packing ")
    assert err.startswith("kernelprov: error: conda-pack cannot read the environment") and err.count("\n") == 1
    assert "point --env-prefix at a conda env (a directory with conda-meta/)" in err and "--archive FILE" in err
    assert not _kernel_dir(jp_data_dir, "x").exists()


# 8. cache clean --help says what it keeps

def test_cache_clean_help_says_envs_in_use_are_kept(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["cache", "clean", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "no running kernel uses" in help_text and "envs in use or being staged are kept" in help_text


# 9 and 10. manifests count conda and pip packages, from an env or from a conda-pack archive

@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_install_archive_reads_python_and_package_counts_from_its_conda_records(cli, pip_archives, copy_archive, fmt):
    archive = copy_archive(pip_archives[fmt])
    assert not manifest_path(archive).exists()

    assert cli("install", "pipenv", "--archive", str(archive))[0] == 0

    manifest = read_manifest(archive)
    assert (manifest.python_version, manifest.packages, manifest.pip_packages) == (PYTHON_VERSION, 3, 1)
    assert manifest.size == archive.stat().st_size


def test_pack_counts_pip_installed_distributions(cli, pip_env, tiny_env, tmp_path):
    for env, expected in ((pip_env, (PYTHON_VERSION, 3, 1)), (tiny_env, (None, 1, 0))):
        out = tmp_path / f"{env.name}.tar.zst"
        assert cli("pack", "--env-prefix", str(env), "-o", str(out))[0] == 0
        manifest = read_manifest(out)
        assert (manifest.python_version, manifest.packages, manifest.pip_packages) == expected


def test_a_conda_owned_dist_info_is_not_a_pip_package(tmp_path, cli):
    """conda's python packages ship their own ``*.dist-info``: owned by a record, not pip's."""
    prefix = build_tiny_env(tmp_path / "env")
    site = "lib/python3.11/site-packages"
    files = {f"{site}/condamod-2.0.dist-info/METADATA": b"Name: condamod\n", f"{site}/condamod/__init__.py": b""}
    pkgs = prefix.parent / f"{prefix.name}-pkgs" / "condamod-2.0-0"
    paths = []
    for rel, content in files.items():
        for root in (prefix, pkgs):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        paths.append({"_path": rel, "path_type": "hardlink", "sha256": hashlib.sha256(content).hexdigest(),
                      "size_in_bytes": len(content)})
    (pkgs / "info").mkdir()
    (pkgs / "info/paths.json").write_text(json.dumps({"paths": paths, "paths_version": 1}))
    (prefix / "conda-meta/condamod-2.0-0.json").write_text(json.dumps({
        "name": "condamod", "version": "2.0", "build": "0", "build_number": 0, "files": list(files),
        "link": {"source": str(pkgs), "type": 1}, "url": "https://example.invalid/condamod-2.0-0.tar.bz2", "channel": "local"}))
    (prefix / f"{site}/pipped-1.0.egg-info").write_text("Name: pipped\n")  # an old installer's single file
    [archive] = conda_pack_each(prefix, tmp_path / "env", ("tar.gz",)).values()

    assert cli("pack", "--env-prefix", str(prefix), "-o", str(tmp_path / "packed.tar.gz"))[0] == 0
    assert cli("install", "condamod", "--archive", str(archive))[0] == 0

    for packed in (tmp_path / "packed.tar.gz", archive):
        assert (read_manifest(packed).packages, read_manifest(packed).pip_packages) == (2, 1)


def test_an_oversized_conda_record_leaves_the_pip_count_unknown(cli, pip_archives, copy_archive, monkeypatch):
    """At most MAX_CONDA_RECORD_BYTES of a record is held; past it ownership is not known."""
    monkeypatch.setattr(pack, "MAX_CONDA_RECORD_BYTES", 64)
    archive = copy_archive(pip_archives["tar.gz"])

    assert cli("install", "pipenv", "--archive", str(archive))[0] == 0

    manifest = read_manifest(archive)
    assert manifest.packages == 3 and manifest.pip_packages is None
