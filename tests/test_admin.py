"""Admin-facing behaviour: site-wide settings from Jupyter config files, allowed archive roots,
the cache-root variable order, and `kernelprov doctor`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kernelprov.config import KernelprovConfig, load_site_config
from kernelprov.errors import ArchiveError
from kernelprov.engine.stage import ensure_staged


def test_site_config_file_reaches_the_cli(cli, jp_env_config_path, tiny_archives, tmp_path, monkeypatch):
    # An admin's jupyter_server_config.py on the config path configures every entry point.
    site_cache = tmp_path / "site-cache"
    (jp_env_config_path / "jupyter_server_config.py").parent.mkdir(parents=True, exist_ok=True)
    (jp_env_config_path / "jupyter_server_config.py").write_text(f"c.KernelprovConfig.cache_dir = {str(site_cache)!r}\n")
    monkeypatch.delenv("KERNELPROV_CACHE_DIR")

    status, out, _ = cli("unpack", "--quiet", str(tiny_archives["tar.gz"]))

    assert status == 0 and Path(out.strip()).parent.parent == site_cache
    assert load_site_config().KernelprovConfig.cache_dir == str(site_cache)


def test_json_site_config_sets_the_budget(jp_environ, jp_env_config_path):
    jp_env_config_path.mkdir(parents=True, exist_ok=True)
    (jp_env_config_path / "jupyter_config.json").write_text(json.dumps({"KernelprovConfig": {"cache_max_bytes": 12345}}))
    assert KernelprovConfig(config=load_site_config()).cache_max_bytes == 12345


def test_cache_root_variables_are_tried_in_the_configured_order(monkeypatch, tmp_path):
    monkeypatch.delenv("KERNELPROV_CACHE_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", "/var/tmp")
    monkeypatch.setenv("LOCAL_SCRATCH", str(tmp_path))
    assert KernelprovConfig().cache_dir == "/var/tmp"
    assert KernelprovConfig(cache_dir_variables=["LOCAL_SCRATCH", "TMPDIR"]).cache_dir == str(tmp_path)


def test_archives_outside_the_allowed_roots_are_refused(tiny_archives, copy_archive, cache_root, tmp_path):
    allowed = tmp_path / "apps"
    allowed.mkdir()
    inside = allowed / "tiny.tar.gz"
    inside.write_bytes(tiny_archives["tar.gz"].read_bytes())
    outside = copy_archive(tiny_archives["tar.gz"])
    sneaky = allowed / "sneaky.tar.gz"
    sneaky.symlink_to(outside)  # a link inside the allowed tree to an archive outside it

    assert ensure_staged(inside, allowed_roots=[str(allowed)]).extracted
    for archive in (outside, sneaky):
        with pytest.raises(ArchiveError, match=r"is outside the archive locations this site allows .* ask your admin"):
            ensure_staged(archive, allowed_roots=[str(allowed)])


def test_allowed_roots_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("KERNELPROV_ALLOWED_ARCHIVE_ROOTS", "/apps/envs:/blue/shared")
    assert KernelprovConfig().stage_options()["allowed_roots"] == ["/apps/envs", "/blue/shared"]


def test_doctor_passes_a_healthy_kernel(cli, tiny_archives, copy_archive):
    archive = copy_archive(tiny_archives["tar.zst"])
    cli("install", "good", "--archive", str(archive))

    status, out, _ = cli("doctor", "good")

    assert status == 0 and out.rstrip().endswith("No problems found.")
    assert "archive matches its manifest's sha256" in out and "provisioner is installed" in out


def test_doctor_says_what_to_fix(cli, tiny_archives, copy_archive, jp_data_dir, monkeypatch):
    missing = copy_archive(tiny_archives["tar.gz"], "missing.tar.gz")
    replaced = copy_archive(tiny_archives["tar.bz2"], "replaced.tar.bz2")
    cli("install", "gone", "--archive", str(missing))
    cli("install", "swapped", "--archive", str(replaced))
    missing.unlink()
    replaced.write_bytes(tiny_archives["tar.gz"].read_bytes())  # someone overwrote it in place
    os.chmod(jp_data_dir / "kernels/gone/run.sh", 0o644)
    monkeypatch.setenv("JUPYTERHUB_DISABLE_USER_CONFIG", "1")

    status, out, _ = cli("doctor")

    assert status == 1
    assert f"FIX archive {missing} does not exist" in out
    assert "run.sh is not executable" in out and "chmod a+rx" in out
    assert "its manifest says" in out and "re-create it with `kernelprov pack`" in out
    assert "disable_user_config hides kernels in your home directory" in out
    assert "-> install it with --sys-prefix or --kernels-dir DIR" in out


def test_a_global_kernel_whose_stager_or_archive_others_cannot_reach_is_flagged(cli, tiny_archives, tmp_path):
    # The installer's interpreter lives under root's private home here, as on many admin setups.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    archive = private / "tiny.tar.gz"
    archive.write_bytes(tiny_archives["tar.gz"].read_bytes())
    os.chmod(archive, 0o600)
    kernels = tmp_path / "apps-kernels"

    status, _, err = cli("install", "site", "--archive", str(archive), "--kernels-dir", str(kernels))

    assert status == 0
    assert f"kernelprov: warning: other users cannot read {archive}: chmod a+r {archive}" in err
    status, out, _ = cli("doctor", "site", "--kernels-dir", str(kernels), "--no-hash")
    assert status == 1 and f"FIX other users cannot read {archive}" in out
