"""binder/postBuild, run for real except for ``conda create``.

The demo env builder (``runnable_env``: CPython + ipykernel in conda's layout, built without
conda) stands in for the conda env postBuild would create: postBuild skips ``conda create`` when
``KERNELPROV_DEMO_ENV`` already is an env. A fresh venv stands in for Binder's server env: it sees
this venv's packages through a ``.pth`` line (so ``pip install .`` finds the dependencies already
there and installs kernelprov alone, panel included), and comes first on ``PATH``, so the rest of
postBuild runs the copy it installed. Everything Jupyter writes goes to a scratch ``HOME``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

START_DEMO_KERNEL = """
import json
from jupyter_client.manager import start_new_kernel

km, kc = start_new_kernel(kernel_name="demo", startup_timeout=120)
try:
    out = []
    reply = kc.execute_interactive(
        "import json, sys; print(json.dumps({'prefix': sys.prefix}))",
        output_hook=lambda msg: out.append(msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None,
        timeout=60,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    print("".join(out))
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"""


@pytest.fixture(scope="module")
def post_build(runnable_env, tmp_path_factory):
    """Run binder/postBuild once; return (its environment, its output, the scratch dirs)."""
    scratch = tmp_path_factory.mktemp("binder")
    home, venv, cache = scratch / "home", scratch / "venv", scratch / "cache"
    home.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    venv_python = venv / "bin" / "python"
    site = Path(run_in({}, str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # A path line, not addsitedir: this venv's editable kernelprov (a .pth hook) stays invisible.
    (site / "kernelprov-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("JUPYTER", "PIP_", "PYTHON", "KERNELPROV_"))}
    env.update(
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(home / ".jupyter"),
        JUPYTER_DATA_DIR=str(home / ".local" / "share" / "jupyter"),
        JUPYTER_RUNTIME_DIR=str(home / ".local" / "share" / "jupyter" / "runtime"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / ".jupyter" / "lab" / "workspaces"),
        JUPYTER_PLATFORM_DIRS="1",
        KERNELPROV_CACHE_DIR=str(cache),
        KERNELPROV_DEMO_ENV=str(runnable_env),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PATH=os.pathsep.join([str(venv / "bin"), os.path.dirname(sys.executable), env.get("PATH", os.defpath)]),
    )
    result = subprocess.run(["bash", "binder/postBuild"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"postBuild failed:\n{result.stdout}\n{result.stderr}"
    return env, result.stdout + result.stderr, {"home": home, "venv": venv, "site": site, "cache": cache}


def run_in(env: dict[str, str], *argv: str) -> str:
    """Run a command in ``env``, from its HOME: in the repository, ``python -c`` would import the checkout."""
    result = subprocess.run(argv, env=env, cwd=env.get("HOME"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_postbuild_installs_kernelprov_from_the_repository(post_build):
    env, _output, dirs = post_build
    location = run_in(env, "python", "-c", "import kernelprov; print(kernelprov.__file__)")
    assert Path(location.strip()).is_relative_to(dirs["site"]), "the rest of postBuild must use the copy it installed"
    assert shutil.which("kernelprov", path=env["PATH"]) == str(dirs["venv"] / "bin" / "kernelprov")
    # The panel and the server extension that serves its data are installed with it.
    assert list((dirs["venv"] / "share/jupyter/labextensions/kernelprov/static").glob("remoteEntry.*.js"))
    assert (dirs["venv"] / "etc/jupyter/jupyter_server_config.d/kernelprov.json").is_file()


def test_postbuild_leaves_a_packed_demo_kernel(post_build):
    env, _output, dirs = post_build
    kernels = json.loads(run_in(env, "kernelprov", "list", "--json"))
    demo = next(kernel for kernel in kernels if kernel["name"] == "demo")
    assert demo["display_name"] == "Python (demo, packed)"
    assert Path(demo["location"]).is_relative_to(dirs["home"])
    archive = Path(demo["archive"])
    assert archive.is_file() and Path(f"{archive}.manifest.json").is_file()


def test_the_demo_kernel_runs_from_its_staged_copy(post_build):
    env, _output, dirs = post_build
    output = run_in(env, "python", "-c", START_DEMO_KERNEL)
    prefix = Path(json.loads(output.strip().splitlines()[-1])["prefix"])
    assert prefix.parent.parent == dirs["cache"] and prefix.parent.name.startswith("kernelprov-"), prefix


def test_jupyterlab_opens_with_the_environments_panel(post_build):
    env, _output, _dirs = post_build
    workspace = json.loads(run_in(env, "jupyter", "lab", "workspaces", "export", "default"))
    current = workspace["data"]["layout-restorer:data"]["left"]["current"]
    panel_id = re.search(r"const PANEL_ID = '([^']+)'", (REPO / "labextension" / "src" / "index.ts").read_text())
    assert panel_id, "labextension/src/index.ts no longer defines PANEL_ID; update binder/workspace.json"
    assert current == panel_id.group(1)
    assert workspace["data"]["layout-restorer:data"]["left"]["collapsed"] is False


@pytest.mark.browser
def test_jupyterlab_shows_the_demo_environment_in_the_panel(post_build, tmp_path):
    """What a Binder visitor sees: JupyterLab opens with the Environments panel listing the demo."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed; `bash .ci/setup.d/20-browser.sh` installs it")
    from playwright.sync_api import sync_playwright

    env, _output, dirs = post_build
    # Binder's server env holds JupyterLab's assets itself; the stand-in venv borrows this venv's.
    env = dict(env, JUPYTERLAB_DIR=str(Path(sys.prefix) / "share" / "jupyter" / "lab"))
    port, token = _free_port(), os.urandom(12).hex()
    with open(tmp_path / "lab.log", "wb") as log:
        lab = subprocess.Popen(
            [str(dirs["venv"] / "bin" / "python"), "-m", "jupyter", "lab", "--allow-root", "--no-browser",
             "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={dirs['home']}", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, cwd=dirs["home"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 700})
                deadline = time.monotonic() + 60
                while True:  # until the server answers
                    assert lab.poll() is None, (tmp_path / "lab.log").read_text()
                    try:
                        page.goto(f"http://127.0.0.1:{port}/lab?token={token}")
                        break
                    except Exception:  # playwright's connection-refused error has no narrower type
                        assert time.monotonic() < deadline, (tmp_path / "lab.log").read_text()
                        time.sleep(0.5)
                panel = page.locator("#kernelprov-environments")
                panel.get_by_text("Python (demo, packed)").wait_for(state="visible", timeout=60_000)
                page.screenshot(path=str(tmp_path / "binder.png"))
            finally:
                browser.close()
    finally:
        lab.terminate()
        lab.wait(20)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
