"""The CLI's warm ``unpack`` path (issue 13): argparse and traitlets only when they can matter.

``kernelprov unpack`` reads its own command line without argparse and its settings from the
environment without traitlets when no Jupyter config file could change them; these tests hold it
to the same answers as the full path.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from kernelprov import envvars
from kernelprov.cli import arguments
from kernelprov.config import KernelprovConfig, load_site_config


@pytest.mark.parametrize("argv", [
    ["unpack", "a.tar.zst"],
    ["unpack", "--quiet", "--lease", "123", "/x/a.tar.zst"],
    ["--debug", "unpack", "-q", "--lease=7", "a"],
    ["--cache-dir", "/c", "unpack", "a"],
    ["unpack", "--cache-dir=/c", "a", "--debug"],
])
def test_fast_arguments_are_what_argparse_makes(argv):
    fast = arguments.fast_unpack_args(argv)
    assert fast is not None and vars(fast) == vars(arguments.parser().parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["unpack"], ["unpack", "-h"], ["unpack", "a", "b"], ["-q", "unpack", "a"], ["unpack", "--qui", "a"],
    ["unpack", "--lease", "x", "a"], ["unpack", "--quiet", "--quiet", "a"], ["list"], ["install", "unpack"],
])
def test_anything_else_goes_to_argparse(argv):
    assert arguments.fast_unpack_args(argv) is None


def test_environment_options_are_the_configs(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELPROV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KERNELPROV_LOCK_TIMEOUT", "12.5")
    monkeypatch.setenv("KERNELPROV_CACHE_MAX_BYTES", "1e9")
    monkeypatch.setenv("KERNELPROV_MAX_UNPACKED_BYTES", "4096")
    monkeypatch.setenv("KERNELPROV_ALLOWED_ARCHIVE_ROOTS", "/apps:/blue")
    assert envvars.stage_options() == KernelprovConfig().stage_options()
    assert envvars.stage_options("/other")["cache_root"] == "/other"


@pytest.mark.parametrize("variables", [
    {}, {"JUPYTER_CONFIG_DIR": "/site/cfg"}, {"JUPYTER_CONFIG_PATH": "/a:/b/:/c"},
    {"JUPYTER_PREFER_ENV_PATH": "1"}, {"JUPYTER_PREFER_ENV_PATH": "0", "JUPYTER_CONFIG_PATH": "/x"},
    {"CONDA_PREFIX": sys.prefix, "CONDA_DEFAULT_ENV": "myenv"}, {"HOME": "/nonexistent-home"},
])
def test_the_warm_path_checks_every_dir_jupyter_core_would(monkeypatch, variables):
    """The warm path's own list of config dirs (no jupyter_core import) covers jupyter_core's."""
    from jupyter_core.paths import jupyter_config_path

    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_CONFIG_PATH", "JUPYTER_PREFER_ENV_PATH", "JUPYTER_PLATFORM_DIRS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert set(jupyter_config_path()) <= envvars.config_dirs_by_rule()


def test_a_config_file_that_names_kernelprov_is_loaded(jp_environ, jp_env_config_path):
    jp_env_config_path.mkdir(parents=True, exist_ok=True)
    (jp_env_config_path / "jupyter_server_config.py").write_text("c.ServerApp.open_browser = False\n")
    assert not envvars.site_config_may_configure()
    (jp_env_config_path / "jupyter_config.json").write_text(json.dumps({"KernelprovConfig": {"cache_max_bytes": 1}}))
    assert envvars.site_config_may_configure()
    assert KernelprovConfig(config=load_site_config()).cache_max_bytes == 1


def test_warm_unpack_imports_no_traitlets_and_answers_the_same(cli, tiny_archives, cache_root, jp_environ):
    status, out, _ = cli("unpack", "--quiet", str(tiny_archives["tar.zst"]))
    assert status == 0
    # What only a cold stage, another command or the full config loader needs stays unloaded.
    heavy = ("traitlets", "argparse", "jupyter_core", "jupyter_client", "hashlib", "shutil", "typing", "tarfile",
             "logging", "threading",
             "zstandard", "dataclasses", "rich", "kernelprov.config", "kernelprov.engine.extract",
             "kernelprov.engine.unpack", "kernelprov.engine.image", "kernelprov.engine.image_stage",
             "kernelprov.engine.space", "kernelprov.engine.formats", "kernelprov.engine.manifest",
             "kernelprov.cli.kernel_commands")
    probe = (f"import sys; HEAVY = {heavy!r}; from kernelprov.cli.app import main; code = main(sys.argv[1:]); "
             "heavy = [m for m in HEAVY if m in sys.modules]; assert not heavy, heavy; "
             "sys.exit(code)")
    again = subprocess.run([sys.executable, "-c", probe, "unpack", "--quiet", str(tiny_archives["tar.zst"])],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()) == Path(out.strip())


def test_a_warning_on_the_warm_path_is_still_configured(tiny_archives, cache_root, tmp_path):
    """Logging is configured on the first message (kernelprov.engine.logs), not skipped: a squatted
    cache dir's warning reaches stderr in the CLI's format from ``python -m kernelprov unpack``."""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    squatted = cache_root / f"kernelprov-{pwd.getpwuid(os.getuid()).pw_name}"
    squatted.symlink_to(decoy)
    done = subprocess.run([sys.executable, "-I", "-m", "kernelprov", "unpack", "--quiet", str(tiny_archives["tar.zst"])],
                          capture_output=True, text=True, env=dict(os.environ, KERNELPROV_CACHE_DIR=str(cache_root)))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()  # (this tiny archive's "no manifest" warning comes next)
    assert lines[0] == f"kernelprov: kernelprov cache directory {squatted} is a symbolic link; not using it"
    assert all(line.startswith("kernelprov: ") for line in lines), lines
    assert Path(done.stdout.strip()).parent.name.startswith(squatted.name + ".") and os.listdir(decoy) == []


def test_other_commands_configure_logging_at_once():
    """Only the warm ``unpack`` defers logging's configuration: ``--debug list`` logs through the
    Jupyter layer's plain loggers, which never apply a deferred one."""
    probe = ("import contextlib, io; from kernelprov.cli.app import main\n"  # logging not loaded before main
             "with contextlib.redirect_stdout(io.StringIO()): main(['--debug', 'list'])\n"
             "import logging; root = logging.getLogger()\n"
             "assert root.level == logging.DEBUG and root.handlers, (root.level, root.handlers)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
