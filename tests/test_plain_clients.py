"""Clients without kernelprov: what they see of its kernels, and the plain twin they can start.

jupyter_client >= 7 hides a kernelspec whose provisioner it cannot load (``NoSuchKernel``); the twin
that ``kernelprov install --plain-twin`` writes has no provisioner stanza and runs the same run.sh,
which stages the env itself. The real test runs nbclient from a venv made from PyPI without
kernelprov, once per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from kernelprov.jupyter.kernelspecs import PROVISIONER_NAME, remove_kernel

# Run by the client venv's Python: try each kernel name with nbclient, report what happened.
CLIENT_SCRIPT = r"""
import json, sys
import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

report = {"listed": sorted(KernelSpecManager().get_all_specs())}
try:
    import kernelprov  # noqa: F401
    report["kernelprov_importable"] = True
except ImportError:
    report["kernelprov_importable"] = False
for name in sys.argv[1:]:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os, sys; print(sys.prefix); print(os.environ.get('KERNELPROV_ENV'))")])
    try:
        NotebookClient(nb, kernel_name=name, timeout=120, startup_timeout=120).execute()
    except NoSuchKernel as err:
        report[name] = {"error": type(err).__name__}
    else:
        report[name] = {"stdout": "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stdout")}
print(json.dumps(report))
"""


@pytest.fixture(scope="session")
def client_python(tmp_path_factory) -> Path:
    """A plain venv (no system site-packages: kernelprov is installed there) with jupyter_client
    and nbclient from PyPI, built once per session (or kept under ``KERNELPROV_TEST_CACHE``)."""
    cache_dir = os.environ.get("KERNELPROV_TEST_CACHE")
    root = Path(cache_dir) if cache_dir else tmp_path_factory.mktemp("client-venv")
    target = root / f"plain-client-venv-py{sys.version_info[0]}{sys.version_info[1]}"
    python = target / "bin" / "python"
    if not (target / "ready").exists():
        building = root / f"{target.name}.building-{os.getpid()}"
        venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True, symlinks=True).create(building)
        # A venv's paths are absolute: build it where it will live, then mark it ready.
        if target.exists():
            import shutil

            shutil.rmtree(target)
        building.rename(target)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "jupyter_client", "nbclient"],
                       check=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
        (target / "ready").write_text("jupyter_client nbclient\n")
    return python


def run_client(client_python: Path, *names: str) -> dict:
    """Run CLIENT_SCRIPT in the client venv with the test's isolated Jupyter paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run([str(client_python), "-c", CLIENT_SCRIPT, *names], capture_output=True, text=True,
                            timeout=300, env=env, cwd=str(client_python.parent))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_client_without_kernelprov_runs_the_plain_twin_from_the_staged_env(cli, kernel_environ, runnable_archive,
                                                                               client_python, cache_root):
    status, out, err = cli("install", "demo", "--archive", str(runnable_archive), "--plain-twin")
    assert status == 0, err
    assert "'demo-plain'" in out

    report = run_client(client_python, "demo", "demo-plain")

    assert report["kernelprov_importable"] is False
    # What the README says: jupyter_client >= 7 without kernelprov hides the provisioned spec...
    assert "demo" not in report["listed"] and report["demo"] == {"error": "NoSuchKernel"}
    # ...and starts the twin, whose run.sh staged the env into this user's node-local cache.
    assert "demo-plain" in report["listed"]
    prefix, kernelprov_env = report["demo-plain"]["stdout"].splitlines()
    assert Path(prefix).parent.parent == cache_root
    assert kernelprov_env == prefix


def test_plain_twin_layout_replace_and_remove(cli, tiny_archives, jp_data_dir):
    archive = str(tiny_archives["tar.gz"])
    assert cli("install", "tiny", "--archive", archive, "--display-name", "Tiny", "--env", "FOO=bar", "--plain-twin")[0] == 0
    kernels = jp_data_dir / "kernels"
    twin = kernels / "tiny-plain"
    assert sorted(p.name for p in twin.iterdir()) == ["kernel.json", "logo-32x32.png", "logo-64x64.png"]
    spec = json.loads((twin / "kernel.json").read_text())
    assert spec["argv"] == [str(kernels / "tiny" / "run.sh"), "-f", "{connection_file}"]
    assert spec["display_name"] == "Tiny (no provisioner)" and spec["env"] == {"FOO": "bar"}
    assert "kernel_provisioner" not in spec["metadata"] and spec["metadata"]["kernelprov"]["plain_twin_of"] == "tiny"
    main_spec = json.loads((kernels / "tiny" / "kernel.json").read_text())
    assert main_spec["metadata"]["kernel_provisioner"]["provisioner_name"] == PROVISIONER_NAME

    # The twin is not a kernelprov kernel of its own: `list` shows one kernel.
    status, out, _ = cli("list", "--json")
    assert status == 0 and [row["name"] for row in json.loads(out)] == ["tiny"]

    status, _, err = cli("install", "tiny", "--archive", archive, "--plain-twin")
    assert status == 1 and "--replace" in err and err.count("\n") == 1
    assert cli("install", "tiny", "--archive", archive, "--display-name", "Tiny 2", "--plain-twin", "--replace")[0] == 0
    assert json.loads((twin / "kernel.json").read_text())["display_name"] == "Tiny 2 (no provisioner)"
    assert not [p for p in kernels.iterdir() if p.name.startswith(".")]

    removed = remove_kernel("tiny")
    assert removed.name == "tiny" and not (kernels / "tiny").exists() and not twin.exists()


def test_replace_and_remove_leave_a_kernel_that_only_shares_the_twin_name(cli, tiny_archives, jp_data_dir):
    archive = str(tiny_archives["tar.gz"])
    assert cli("install", "tiny", "--archive", archive)[0] == 0
    other = jp_data_dir / "kernels" / "tiny-plain"
    other.mkdir()
    (other / "kernel.json").write_text(json.dumps({"argv": ["/bin/true"], "display_name": "someone else's", "language": "python"}))

    status, _, err = cli("install", "tiny", "--archive", archive, "--replace", "--plain-twin")
    assert status == 1 and "is not the plain twin of 'tiny'" in err and err.count("\n") == 1
    remove_kernel("tiny")
    assert json.loads((other / "kernel.json").read_text())["display_name"] == "someone else's"
    assert not [p for p in other.parent.iterdir() if p.name.startswith(".")]


def test_kernelprov_remove_takes_the_plain_twin_with_it(cli, tiny_archives, jp_data_dir):
    assert cli("install", "tiny", "--archive", str(tiny_archives["tar.gz"]), "--plain-twin")[0] == 0
    assert (jp_data_dir / "kernels" / "tiny-plain" / "kernel.json").is_file()

    status, out, _err = cli("remove", "tiny")

    assert status == 0 and "plain twin 'tiny-plain'" in out
    assert not (jp_data_dir / "kernels" / "tiny").exists() and not (jp_data_dir / "kernels" / "tiny-plain").exists()
