"""Every ``kernelprov`` command, run through ``main(argv)`` against real archives and kernel dirs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kernelprov.jupyter.kernelspecs import PROVISIONER_NAME
from kernelprov.engine.manifest import read_manifest


def _kernel_dir(jp_data_dir: Path, name: str) -> Path:
    return jp_data_dir / "kernels" / name


def test_install_from_env_prefix_writes_the_template_kernel_layout(cli, tiny_env, jp_data_dir):
    status, out, _ = cli("install", "tiny", "--env-prefix", str(tiny_env), "--display-name", "Tiny env", "--env", "FOO=bar")

    assert status == 0, out
    kdir = _kernel_dir(jp_data_dir, "tiny")
    assert sorted(p.name for p in kdir.iterdir()) == [
        "kernel.json", "logo-32x32.png", "logo-64x64.png", "run.sh", "tiny.tar.zst", "tiny.tar.zst.manifest.json",
    ]
    spec = json.loads((kdir / "kernel.json").read_text())
    assert spec["argv"] == [str(kdir / "run.sh"), "-f", "{connection_file}"]
    assert spec["display_name"] == "Tiny env" and spec["language"] == "python" and spec["env"] == {"FOO": "bar"}
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": PROVISIONER_NAME, "config": {"archive": str(kdir / "tiny.tar.zst")},
    }
    run_sh = kdir / "run.sh"
    assert run_sh.stat().st_mode & stat.S_IXUSR
    text = run_sh.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert 'exec "$KERNELPROV_ENV/bin/python" -m ipykernel_launcher "$@"' in text
    assert (kdir / "logo-64x64.png").read_bytes().startswith(b"\x89PNG")
    manifest = read_manifest(kdir / "tiny.tar.zst")
    assert manifest.format == "tar.zst" and manifest.packages == 1


def test_install_refuses_to_overwrite_without_replace(cli, tiny_archives, jp_data_dir):
    archive = str(tiny_archives["tar.gz"])
    assert cli("install", "tiny", "--archive", archive)[0] == 0
    status, _, err = cli("install", "tiny", "--archive", archive, "--display-name", "Second")

    assert status == 1 and err.count("\n") == 1 and "--replace" in err
    assert cli("install", "tiny", "--archive", archive, "--display-name", "Second", "--replace")[0] == 0
    spec = json.loads((_kernel_dir(jp_data_dir, "tiny") / "kernel.json").read_text())
    assert spec["display_name"] == "Second"
    assert not [p for p in (jp_data_dir / "kernels").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("flag", ["--prefix", "--kernels-dir"])
def test_install_locations(cli, tiny_archives, tmp_path, flag):
    target = tmp_path / "site"
    status, _, _ = cli("install", "tiny", "--archive", str(tiny_archives["tar.gz"]), flag, str(target))

    assert status == 0
    expected = target / "share/jupyter/kernels/tiny" if flag == "--prefix" else target / "tiny"
    assert (expected / "kernel.json").is_file()


def test_install_sys_prefix_goes_to_sys_prefix(cli, tiny_archives, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert cli("install", "tiny", "--archive", str(tiny_archives["tar.gz"]), "--sys-prefix")[0] == 0
    assert (tmp_path / "venv/share/jupyter/kernels/tiny/run.sh").is_file()


def test_install_archive_writes_a_manifest_beside_it(cli, tiny_archives, copy_archive):
    archive = copy_archive(tiny_archives["tar.bz2"])
    assert cli("install", "tiny", "--archive", str(archive))[0] == 0
    manifest = read_manifest(archive)
    assert manifest.format == "tar.bz2" and manifest.size == archive.stat().st_size


def test_pack_writes_archive_and_manifest(cli, tiny_env, tmp_path):
    out = tmp_path / "tiny.tar.gz"
    status, stdout, _ = cli("pack", "--env-prefix", str(tiny_env), "-o", str(out))

    assert status == 0 and "tar.gz" in stdout
    assert read_manifest(out).format == "tar.gz"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert cli("pack", "--env-prefix", str(tiny_env), "-o", str(out))[0] == 1  # exists, no --force


def test_list_unpack_cache_and_remove(cli, tiny_archives, jp_data_dir, cache_root):
    archive = str(tiny_archives["tar.zst"])
    cli("install", "tiny", "--archive", archive)

    rows = json.loads(cli("list", "--json")[1])
    assert [(r["name"], r["staged"], r["archive"]) for r in rows] == [("tiny", False, archive)]

    status, out, _ = cli("unpack", archive, "--quiet")
    prefix = Path(out.strip())
    assert status == 0 and prefix.parent.parent == cache_root and (prefix / "bin/hello").exists()

    rows = json.loads(cli("list", "--json")[1])
    assert rows[0]["staged"] and rows[0]["staged_prefix"] == str(prefix)
    assert "tiny" in cli("list")[1]

    entries = json.loads(cli("cache", "list", "--json")[1])
    assert [(e["name"], e["prefix"]) for e in entries] == [("tiny", str(prefix))] and entries[0]["bytes"] > 0
    assert "tiny" in cli("cache", "list")[1]

    status, out, _ = cli("cache", "clean")
    assert status == 0 and "Removed 1" in out and not prefix.exists()

    status, out, _ = cli("remove", "tiny")
    assert status == 0 and not _kernel_dir(jp_data_dir, "tiny").exists()
    assert json.loads(cli("list", "--json")[1]) == []


@pytest.mark.parametrize("argv, message", [
    (["remove", "nothere"], "No kernelprov kernel named 'nothere'"),
    (["unpack", "/no/such/env.tar.zst"], "does not exist"),
    (["install", "../evil", "--archive", "/dev/null"], "Invalid kernel name"),
    (["install", "evil\n", "--archive", "/dev/null"], "Invalid kernel name"),  # "$" would match before "\n"
    (["install", "x", "--env", "NOEQUALS", "--archive", "/dev/null"], "NAME=VALUE"),
    (["pack", "-o", "/tmp/x.tar.gz"], "either a conda environment name or --env-prefix"),
])
def test_errors_are_one_line_and_nonzero(cli, argv, message):
    status, out, err = cli(*argv)
    assert status == 1
    assert err.startswith("kernelprov: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_installed_console_scripts_run(jp_environ):
    bindir = Path(sys.executable).parent
    for command in (["kernelprov", "--version"], ["jupyter", "kernelprov", "--version"]):
        result = subprocess.run([str(bindir / command[0]), *command[1:]], capture_output=True, text=True,
                                env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
        assert result.returncode == 0 and result.stdout.startswith("kernelprov ")
