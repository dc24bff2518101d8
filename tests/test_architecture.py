"""The layers the README's code map promises, and the entry points that must outlive any move.

The import contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and are checked here with
import-linter's own ``lint-imports``, so a change that makes the engine import Jupyter, points a
layer upwards or adds an import cycle fails CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from kernelprov.cli.doctor import stager_python
from kernelprov.jupyter.kernelspecs import PROVISIONER_NAME, find_kernels, write_kernel_files

ROOT = Path(__file__).resolve().parent.parent
#: Modules stay small ("a few hundred lines"); the ones named here are over and are to be split
#: by their owners (issue 10) — remove a name once its module is under the limit.
MAX_MODULE_LINES = 400
OVER_THE_LIMIT = {"cache.py", "slurm/provisioner.py"}  # kernelprov/engine/, kernelprov/jupyter/


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


def _code_map() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Code map")
    return readme[start:readme.index("\n## ", start)]


def _modules_by_code_map_name() -> dict[str, Path]:
    """Every module in the tree, by the name the code map gives it (its path below its package's row)."""
    found = {}
    for path in sorted((ROOT / "kernelprov").rglob("*.py")):
        relative = path.relative_to(ROOT / "kernelprov")
        if path.name == "__init__.py" or relative.parts[0] in ("labextension", "__pycache__"):
            continue
        package_row = relative.parts[0] if relative.parts[0] in ("engine", "jupyter", "cli") else None
        found[str(relative.relative_to(package_row) if package_row else relative)] = path
    for path in sorted((ROOT / "labextension" / "src").glob("*.ts*")):
        found[path.name] = path
    return found


def test_the_readme_code_map_names_every_module_and_only_those():
    table = "\n".join(line for line in _code_map().splitlines() if line.startswith("|"))
    named = set(re.findall(r"`([\w/]+\.(?:py|tsx?))`", table))
    modules = _modules_by_code_map_name()
    assert sorted(set(modules) - named - {"_version.py"}) == [], "modules missing from the README's code map"
    assert sorted(named - set(modules) - {"_version.py"}) == [], "the README's code map names modules that do not exist"


def test_modules_stay_small():
    too_long = {}
    for name, path in _modules_by_code_map_name().items():
        if path.suffix == ".py" and name not in OVER_THE_LIMIT:
            lines = len(path.read_text().splitlines())
            if lines > MAX_MODULE_LINES:
                too_long[name] = lines
    assert too_long == {}, f"split these along a seam (one responsibility per module): {too_long}"


def test_old_and_new_run_sh_stager_command_lines_still_stage(tiny_archives, cache_root, jp_environ):
    """run.sh calls ``<stager> -m kernelprov unpack``: as the first layout wrote it
    (``-m kernelprov unpack --quiet ARCHIVE``) and as kernelprov writes it now
    (``-I -m kernelprov unpack --quiet --lease $$ ARCHIVE``); both print the same staged prefix."""
    archive = str(tiny_archives["tar.zst"])
    old = subprocess.run([sys.executable, "-m", "kernelprov", "unpack", "--quiet", archive],
                         capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert old.returncode == 0, old.stderr
    new = subprocess.run([sys.executable, "-I", "-m", "kernelprov", "unpack", "--quiet", "--lease", str(os.getpid()), archive],
                         capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert new.returncode == 0, new.stderr
    prefix = Path(old.stdout.strip())
    assert Path(new.stdout.strip()) == prefix and (prefix / "conda-meta").is_dir()
    assert str(prefix).startswith(str(cache_root))
    assert "kernelprov unpack" in (ROOT / "kernelprov/jupyter/kernelspecs.py").read_text()  # what new run.sh files call


def test_one_version_source_and_dependencies_per_side():
    """The Python package's version is labextension/package.json's; the server side's dependencies
    leave ipykernel (the packed envs' business) and JupyterLab (the ``lab`` extra) out."""
    from importlib.metadata import requires, version

    import kernelprov

    package_json = json.loads((ROOT / "labextension" / "package.json").read_text())
    assert kernelprov.__version__ == version("kernelprov") == package_json["version"]
    requirements = requires("kernelprov")
    hard = {re.split(r"[<>=!~ \[;]", r)[0].lower() for r in requirements if "extra ==" not in r}
    assert "ipykernel" not in hard and "jupyterlab" not in hard
    assert "jupyter-server" in {name.replace("_", "-") for name in hard}
    assert any(r.lower().startswith("jupyterlab") and re.search(r"extra == ['\"]lab['\"]", r) for r in requirements)


def _quiet_pip(tmp_path: Path, status: int, output: str) -> subprocess.CompletedProcess:
    """``.ci/setup``'s own ``quiet_pip``, run under its ``set -euo pipefail`` against a stand-in pip
    that prints ``output`` and exits with ``status``."""
    setup = (ROOT / ".ci" / "setup").read_text()
    function = setup[setup.index("quiet_pip() {"):]
    function = function[:function.index("\n}\n") + 3]
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' {json.dumps(output)}\nexit {status}\n")
    fake.chmod(0o755)
    script = f"set -euo pipefail\n{function}\nquiet_pip install --quiet -e '.[test]'\necho after-pip\n"
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_ci_setup_stops_when_pip_fails(tmp_path):
    failed = _quiet_pip(tmp_path, 1, "ERROR: No matching distribution found for nothing")
    assert failed.returncode == 1 and "after-pip" not in failed.stdout
    assert "No matching distribution" in failed.stdout


def test_ci_setup_goes_on_when_pip_succeeds_even_if_every_line_is_filtered(tmp_path):
    quiet = _quiet_pip(tmp_path, 0, "WARNING: Location 'file:///opt/pypi' is ignored")
    assert quiet.returncode == 0 and quiet.stdout == "after-pip\n"
