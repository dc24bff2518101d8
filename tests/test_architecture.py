"""The layers the README's code map promises, and the entry points that must outlive any move.

The import contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and are checked here with
import-linter's own ``lint-imports``, so a change that makes the engine import Jupyter, points a
layer upwards or adds an import cycle fails CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from kernelprov.cli.doctor import stager_python
from kernelprov.jupyter.kernelspecs import PROVISIONER_NAME, find_kernels, write_kernel_files

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 3


def test_the_engine_loads_without_jupyter_modules():
    code = ("import sys; import kernelprov.engine.stage, kernelprov.engine.inventory, kernelprov.engine.pack; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jupyter_client', 'jupyter_core', 'jupyter_server', 'tornado', 'traitlets', 'ipykernel')); print(bad)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_entry_points_are_stable():
    (provisioner,) = [ep for ep in entry_points(group="jupyter_client.kernel_provisioners") if ep.name == PROVISIONER_NAME]
    from jupyter_client.provisioning import KernelProvisionerBase

    assert issubclass(provisioner.load(), KernelProvisionerBase)
    import kernelprov

    (point,) = kernelprov._jupyter_server_extension_points()
    module = __import__(point["module"], fromlist=["_load_jupyter_server_extension"])
    assert callable(module._load_jupyter_server_extension)
    config = json.loads((ROOT / "jupyter-config/jupyter_server_config.d/kernelprov.json").read_text())
    assert config["ServerApp"]["jpserver_extensions"] == {"kernelprov": True}
    for command in ([sys.executable, "-m", "kernelprov", "--version"], [str(Path(sys.executable).with_name("kernelprov")), "--version"],
                    [str(Path(sys.executable).with_name("jupyter-kernelprov")), "--version"]):
        assert subprocess.run(command, capture_output=True, text=True, check=True).stdout.startswith("kernelprov ")


def test_a_kernelspec_from_before_the_stager_was_recorded_still_reads(tmp_path, monkeypatch):
    kernels = tmp_path / "kernels"
    (kernels / ".tmp").mkdir(parents=True)
    write_kernel_files(kernels / ".tmp", "old", display_name="Old", archive=tmp_path / "env.tar.zst")
    (kernels / ".tmp").rename(kernels / "old")
    spec_path = kernels / "old" / "kernel.json"
    spec = json.loads(spec_path.read_text())
    assert spec["metadata"]["kernelprov"]["stager"] == sys.executable  # what new installs record
    del spec["metadata"]["kernelprov"]["stager"]  # as the first layout wrote it
    spec["argv"][0] = str(kernels / "old" / "run.sh")
    spec_path.write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))

    (kernel,) = [k for k in find_kernels() if k.name == "old"]

    assert kernel.stager is None
    assert stager_python(kernel) == sys.executable  # read from its run.sh, which calls `-m kernelprov unpack`
