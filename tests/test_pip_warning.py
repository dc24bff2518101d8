"""``%pip install`` in a kernelprov kernel warns that it lands in the node-local copy (pip_warning.py).

The patterns are checked alone; the real test starts a kernel from a real archive through
jupyter_client, installs a real wheel with ``%pip`` and checks where it went, that the warning came
once on stderr, that nothing leaked into the kernel's environment and that the user's own IPython
config still applies.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelprov.cli.app import main
from kernelprov.jupyter.kernelspecs import PIP_WARNING
from kernelprov.jupyter.pip_warning import installs_into_env, warning_text


@pytest.mark.parametrize("cell", [
    "%pip install numpy",
    "  %pip install -U 'pandas>=2'",
    "import os\n!pip install requests",
    "!!pip3 install rich",
    "!python -m pip install --upgrade tqdm",
    "!{sys.executable} -m pip install tqdm",
    "%conda install -y scipy",
    "%mamba install scipy",
    "!/opt/env/bin/pip install x",
    "!uv pip install x",
    "for p in ['a', 'b']:\n    %pip install $p",
])
def test_installs_into_the_env(cell):
    assert installs_into_env(cell)


@pytest.mark.parametrize("cell", [
    "%pip list",
    "%pip show numpy",
    "# %pip install numpy",
    "print('%pip install numpy')",
    "!pip install --user requests",
    "!pip install --target=/scratch/lib requests",
    "%conda install -n other scipy",
    "%conda install --prefix /blue/envs/x scipy",
    "!pip uninstall -y x",
    "",
])
def test_leaves_other_cells_alone(cell):
    assert not installs_into_env(cell)


def test_the_warning_names_the_copy_and_the_fix():
    text = warning_text("/tmp/kernelprov-alice/0123abcd", "demo")
    assert "/tmp/kernelprov-alice/0123abcd" in text and "`kernelprov install demo --replace`" in text
    assert "\n" not in text and len(text) < 300


def build_wheel(directory: Path, module: str = "kp_probe_pkg") -> Path:
    """A minimal pure-Python wheel, for pip to install without an index."""
    dist_info = f"{module}-1.0.dist-info"
    files = {
        f"{module}.py": b"VALUE = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kernelprov-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    wheel = directory / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


async def run_cell(client, code: str) -> dict[str, str]:
    """Execute ``code`` as a notebook cell; return what it printed, by stream."""
    streams = {"stdout": "", "stderr": ""}

    def collect(message):
        if message["msg_type"] == "stream":
            streams[message["content"]["name"]] += message["content"]["text"]

    reply = await client.execute_interactive(code, output_hook=collect, timeout=120)
    assert reply["content"]["status"] == "ok", reply["content"]
    return streams


@pytest.mark.slow
async def test_pip_install_in_a_kernel_warns_once_and_leaks_nothing(kernel_environ, runnable_archive, cache_root,
                                                                   tmp_path, monkeypatch, capsys):
    # The user's own IPython config must keep working beside the extra config file run.sh adds.
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text(
        'c.InteractiveShellApp.exec_lines = ["USER_CONFIG_RAN = \'yes\'"]\n'
        'c.InteractiveShellApp.extensions = ["IPython.extensions.autoreload"]\n')
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    assert main(["install", "demo", "--archive", str(runnable_archive)]) == 0
    capsys.readouterr()
    wheel = build_wheel(tmp_path)

    km = AsyncKernelManager(kernel_name="demo")
    await km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        prefix = str(km.provisioner.staged_env.prefix)

        installed = await run_cell(client, f"%pip install --no-index --no-deps {wheel}\n%pip list")
        assert installed["stderr"].count("kernelprov:") == 1, installed
        assert f"node-local copy of the env at {prefix}," in installed["stderr"]
        assert "`kernelprov install demo --replace`" in installed["stderr"]
        assert "kp_probe_pkg" in installed["stdout"]  # it was installed, and listed: into the copy
        where = await run_cell(client, "import kp_probe_pkg; print(kp_probe_pkg.__file__)")
        assert where["stdout"].startswith(prefix + "/lib/")

        shell_escape = await run_cell(client, "import sys\n!{sys.executable} -m pip install --no-index --no-deps /nonexistent/x.whl")
        assert shell_escape["stderr"].count("kernelprov:") == 1
        for quiet in ("%pip list", "!pip install --user --no-index --no-deps /nonexistent/x.whl", "x = 1"):
            assert "kernelprov:" not in (await run_cell(client, quiet))["stderr"], quiet

        # Nothing reaches the user's subprocesses, kernelprov is not importable, the config holds.
        probe = await run_cell(client, "\n".join([
            "import os, subprocess, sys",
            f"print([k for k, v in os.environ.items() if {str(PIP_WARNING.parent)!r} in v or 'kernelprov_pip' in v])",
            f"print({str(PIP_WARNING.parent)!r} in sys.path, 'kernelprov' in sys.modules, 'PYTHONPATH' in os.environ)",
            "print(subprocess.run([sys.executable, '-c', 'import kernelprov_pip_warning'], capture_output=True).returncode)",
            "print(USER_CONFIG_RAN, sorted(get_ipython().extension_manager.loaded))",
        ]))
        lines = probe["stdout"].splitlines()
        assert lines[:3] == ["[]", "False False False", "1"], probe
        assert lines[3] == "yes ['IPython.extensions.autoreload', 'IPython.extensions.storemagic', 'kernelprov_pip_warning']"

        await run_cell(client, "%unload_ext kernelprov_pip_warning")
        assert "kernelprov:" not in (await run_cell(client, "%pip install --no-index --no-deps /nonexistent/x.whl"))["stderr"]
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=True)
