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


@pytest.mark.parametrize("variable, value, message", [
    ("KERNELPROV_LOCK_TIMEOUT", "-1", "KERNELPROV_LOCK_TIMEOUT=-1.0 must be a positive number of seconds"),
    ("KERNELPROV_LOCK_TIMEOUT", "soon", "KERNELPROV_LOCK_TIMEOUT='soon' is not a positive number of seconds"),
    ("KERNELPROV_CACHE_MAX_BYTES", "-5", "KERNELPROV_CACHE_MAX_BYTES=-5 must be 0 (no budget) or a positive"),
    ("KERNELPROV_CACHE_DIR", "relative/cache", "KERNELPROV_CACHE_DIR='relative/cache' is not an absolute path"),
    ("KERNELPROV_ALLOWED_ARCHIVE_ROOTS", "apps/envs", "names 'apps/envs', which is not an absolute path"),
])
def test_a_bad_setting_in_the_environment_is_refused_in_one_sentence(cli, tiny_archives, monkeypatch, variable, value, message):
    # Trait defaults skip traitlets' @validate: without the checks in config.py, -1 waited forever,
    # -5 evicted every idle env and a relative cache dir landed wherever the kernel was started.
    monkeypatch.setenv(variable, value)
    status, out, err = cli("unpack", "--quiet", str(tiny_archives["tar.gz"]))
    assert status == 1 and out == ""
    assert err.startswith("kernelprov: error: ") and message in err and err.count("\n") == 1, err


async def test_site_allowed_roots_win_over_a_kernels_own_config(cli, tiny_archives, copy_archive, jp_data_dir, tmp_path):
    # A user's kernel.json that clears (or widens) the site's allowed_archive_roots must not get
    # past the site policy: provisioner config from kernel.json arrives as constructor keywords,
    # which beat the site's config file unless the policy is applied on purpose.
    from jupyter_client.manager import AsyncKernelManager
    from traitlets.config import Config

    allowed = tmp_path / "apps-envs"
    allowed.mkdir()
    outside = copy_archive(tiny_archives["tar.gz"], "mine.tar.gz")
    assert cli("install", "mine", "--archive", str(outside))[0] == 0
    spec_path = jp_data_dir / "kernels" / "mine" / "kernel.json"
    for own in ([], [str(outside.parent)]):
        spec = json.loads(spec_path.read_text())
        spec["metadata"]["kernel_provisioner"]["config"]["allowed_archive_roots"] = own
        spec_path.write_text(json.dumps(spec))
        site = Config({"KernelprovConfig": {"allowed_archive_roots": [str(allowed)]}})
        km = AsyncKernelManager(kernel_name="mine", config=site)
        with pytest.raises(Exception, match="outside the archive locations this site allows"):
            await km.start_kernel()
        assert km.provisioner is None or km.provisioner.staged_env is None


def test_a_kernel_may_narrow_the_site_allowed_roots(tmp_path):
    from traitlets.config import Config

    site = Config({"KernelprovConfig": {"allowed_archive_roots": [str(tmp_path)]}})
    narrower = str(tmp_path / "team")
    assert KernelprovConfig(config=site, allowed_archive_roots=[narrower]).stage_options()["allowed_roots"] == [narrower]
    assert KernelprovConfig(config=site, allowed_archive_roots=["/"]).stage_options()["allowed_roots"] == [str(tmp_path)]
    assert KernelprovConfig(allowed_archive_roots=["/x"]).stage_options()["allowed_roots"] == ["/x"]  # no site policy


def test_run_sh_stages_from_outside_the_kernels_working_directory(cli, tiny_archives, copy_archive, jp_data_dir, tmp_path):
    # A shared project folder where another user dropped argparse.py: run.sh (no provisioner)
    # must not import it when it runs `python -m kernelprov unpack` there.
    archive = copy_archive(tiny_archives["tar.gz"])
    assert cli("install", "plain", "--archive", str(archive))[0] == 0
    project = tmp_path / "shared-project"
    project.mkdir()
    pwned = tmp_path / "pwned"
    (project / "argparse.py").write_text(f"open({str(pwned)!r}, 'w').write('ran')\nraise SystemExit(3)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("KERNELPROV_ENV", "PYTHONPATH")}
    import subprocess

    result = subprocess.run([str(jp_data_dir / "kernels/plain/run.sh"), "-f", str(tmp_path / "conn.json")],
                            cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert not pwned.exists(), "the stager imported argparse.py from the kernel's working directory"
    # It got as far as exec'ing the staged env's python (the tiny env's is a stub), so it staged.
    assert "kernelprov: error" not in result.stderr, result.stderr


def _plain_directory_archive(tmp_path: Path) -> Path:
    """A tar of an ordinary directory: no conda-meta/, no bin/python — a kernel that can never start."""
    import tarfile

    folder = tmp_path / "just-a-folder"
    (folder / "data").mkdir(parents=True)
    (folder / "data/results.csv").write_text("a,b\n1,2\n")
    archive = tmp_path / "folder.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")
    return archive


def test_install_refuses_an_archive_that_is_no_conda_env(cli, tmp_path, jp_data_dir):
    archive = _plain_directory_archive(tmp_path)
    status, _, err = cli("install", "folder", "--archive", str(archive))
    assert status == 1 and err.count("\n") == 1
    assert f"{archive} is not a conda-pack environment (it has no bin/python or no conda-meta/)" in err
    assert not (jp_data_dir / "kernels/folder").exists()


def test_doctor_and_the_panel_say_an_archive_is_no_conda_env(cli, tiny_archives, copy_archive, tmp_path, jp_data_dir):
    # Installed from a good archive, which was later replaced by a folder's tar (manifest and all).
    from kernelprov.engine.manifest import manifest_for, write_manifest
    from kernelprov.jupyter.environments import KernelprovEnvironments

    good = copy_archive(tiny_archives["tar.gz"], "env.tar.gz")
    assert cli("install", "env", "--archive", str(good))[0] == 0
    plain = _plain_directory_archive(tmp_path)
    good.write_bytes(plain.read_bytes())
    write_manifest(good, manifest_for(good))

    status, out, _ = cli("doctor", "env")
    assert status == 1 and "FIX archive holds no conda env" in out and "not a conda-pack environment" in out
    problems = next(env for env in KernelprovEnvironments().describe_all() if env["name"] == "env")["problems"]
    assert any("is not a conda-pack environment" in p for p in problems), problems


def test_staging_refuses_an_archive_without_bin_python(tmp_path, cache_root):
    # No manifest to warn at install (made elsewhere, used directly): the start itself says so,
    # instead of run.sh failing on a missing bin/python and the restarter retrying 5 times.
    from kernelprov.engine.inventory import find_staged

    archive = _plain_directory_archive(tmp_path)
    with pytest.raises(ArchiveError, match="is not a conda-pack environment"):
        ensure_staged(archive)
    assert find_staged(archive) is None
    assert not [p for p in cache_root.rglob("*") if p.is_dir() and (p / "data").exists()]
