"""The Environments panel in a real browser: Debian's chromium, driven by Playwright, against a real
``jupyter lab`` (started once per session, isolated Jupyter paths) with real kernelprov kernels.

Set ``KERNELPROV_UPDATE_SCREENSHOT=1`` to rewrite ``docs/panel.png`` (light theme) from this run;
otherwise the screenshot goes to the test's temporary directory only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kernelprov.engine import cache

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 60_000


def _chromium() -> str:
    """Debian's chromium (``.ci/setup.d/20-browser.sh`` installs it); CI fails without it."""
    found = os.environ.get("KERNELPROV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; run .ci/setup (its setup.d/20-browser.sh installs it)")
    pytest.skip("chromium is not installed; `bash .ci/setup.d/20-browser.sh` installs it")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lab:
    """A running ``jupyter lab`` subprocess and what the tests need to know about it."""

    def __init__(self, root: Path, cache_dir: Path, environ: dict[str, str]):
        self.root = root
        self.cache_dir = cache_dir
        self.environ = environ
        self.token = os.urandom(12).hex()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "jupyter-lab.log"
        self.process: subprocess.Popen | None = None

    def run(self, *argv: str) -> str:
        """Run ``python -m ARGV`` in the lab's environment; return what it printed (both streams)."""
        result = subprocess.run([sys.executable, "-m", *argv], env=self.environ, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=120)
        assert result.returncode == 0, result.stdout
        return _plain(result.stdout)

    def start(self) -> None:
        notebooks = self.root / "notebooks"
        notebooks.mkdir()
        argv = [
            sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser", "--ip=127.0.0.1",
            f"--port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={notebooks}",
            # No network here: no news feed, no update check.
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, env=self.environ, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"jupyter lab exited:\n{self.log.read_text()}"
            try:
                self.api("GET", "api/status")
                return
            except OSError:
                assert time.monotonic() < deadline, f"jupyter lab did not answer:\n{self.log.read_text()}"
                time.sleep(0.2)

    def api(self, method: str, path: str):
        """Call the server's REST API with the token; return the decoded JSON (or None)."""
        request = urllib.request.Request(f"{self.url}/{path}", method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for kernel in self.api("GET", "api/kernels"):
            self.api("DELETE", f"api/kernels/{kernel['id']}")
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture(autouse=True)
def jp_asyncio_loop():
    """Replaces pytest-jupyter's autouse loop fixture here: Playwright's sync API owns this thread's
    event loop, which that fixture would otherwise pick up and close after each test."""
    yield None


@pytest.fixture(scope="module")
def lab(tmp_path_factory, runnable_archive):
    """``jupyter lab`` (once for this module) with two kernelprov kernels from the runnable archive: ``demo`` and
    ``scratch`` (a copy, so it stages separately). Everything Jupyter writes goes to a temporary
    home; the server finds kernelprov's extensions through this venv's own share/ and etc/."""
    root = tmp_path_factory.mktemp("lab")
    cache_dir = root / "cache"
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith(("JUPYTER", "KERNELPROV_", "PYTHON", "IPYTHON", "SLURM_"))}
    environ.update(
        HOME=str(root / "home"),
        JUPYTER_CONFIG_DIR=str(root / "config"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        IPYTHONDIR=str(root / "ipython"),
        KERNELPROV_CACHE_DIR=str(cache_dir),
        TMPDIR=str(root),
    )
    (root / "home").mkdir()
    server = Lab(root, cache_dir, environ)
    scratch = root / "archives" / "scratch.tar.zst"
    scratch.parent.mkdir()
    shutil.copy2(runnable_archive, scratch)
    shutil.copy2(f"{runnable_archive}.manifest.json", f"{scratch}.manifest.json")
    server.run("kernelprov", "install", "demo", "--archive", str(runnable_archive))
    server.run("kernelprov", "install", "scratch", "--archive", str(scratch))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, lab, tmp_path):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=2, color_scheme="light")
    context.set_default_timeout(TIMEOUT_MS)
    # Generous: this 2-core machine also runs the server, kernels and an evict's rmtree of thousands of files.
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{lab.url}/lab?reset&token={lab.token}")  # a fresh workspace: the panel starts closed
    page.locator("#jp-main-dock-panel").wait_for()
    yield page
    context.close()


def test_the_extensions_are_installed_and_enabled(lab):
    assert re.search(r"kernelprov v\S+ enabled OK", lab.run("jupyter", "labextension", "list"))
    assert re.search(r"kernelprov enabled", lab.run("jupyter", "server", "extension", "list"))


def _plain(text: str) -> str:
    """Drop terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_panel_stages_an_env_and_runs_a_notebook_on_it(lab, page, runnable_archive, tmp_path):
    from playwright.sync_api import expect

    manifest = json.loads(Path(f"{runnable_archive}.manifest.json").read_text())
    page.locator('.jp-SideBar [data-id="kernelprov-environments"]').click()
    panel = page.locator("#kernelprov-environments")
    expect(panel.get_by_role("heading", name="Environments")).to_be_visible()
    row = panel.locator('tbody[data-kernel-name="demo"]')
    expect(row).to_contain_text("Python (demo)")
    expect(row.locator(".jp-kernelprov-state")).to_have_text("not staged")
    expect(panel.locator('tbody[data-kernel-name="scratch"]')).to_contain_text("not staged")
    # JupyterLab's default side bar is narrow: Python and package count move under the name.
    python, packages = manifest["python_version"], manifest["packages"]
    narrow = row.locator(".jp-kernelprov-narrowFacts")
    expect(narrow).to_contain_text(f"Python {python}")
    expect(narrow).to_contain_text(f"{packages} package")
    _widen_left_area(page, 200)
    expect(row.locator(".jp-kernelprov-col-python")).to_have_text(python)
    expect(row.locator(".jp-kernelprov-col-packages")).to_have_text(str(packages))
    expect(row.locator(".jp-kernelprov-narrowFacts")).to_be_hidden()

    # Record every state the row shows, to see "staging" pass by on the way to "ready".
    page.evaluate("""() => {
        window.kernelprovStates = [];
        const table = document.querySelector('#kernelprov-environments table');
        new MutationObserver(() => {
            const state = document.querySelector('tbody[data-kernel-name="demo"] .jp-kernelprov-stateLabel');
            if (state) window.kernelprovStates.push(state.textContent);
        }).observe(table, {subtree: true, childList: true, characterData: true});
    }""")
    row.get_by_role("button", name="Stage now").click()
    expect(row.locator(".jp-kernelprov-state")).to_have_text("ready", timeout=120_000)
    assert any(s.startswith("staging") for s in page.evaluate("window.kernelprovStates")), page.evaluate("window.kernelprovStates")
    staged_prefix = row.locator(".jp-kernelprov-path").inner_text().strip()
    assert Path(staged_prefix).parent.parent == lab.cache_dir and (Path(staged_prefix) / "bin" / "python").exists()
    expect(row.get_by_role("button", name="Stage now")).to_be_disabled()

    row.get_by_role("button", name="Open notebook").click()
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    expect(notebook.locator(".jp-Notebook-toolbarKernelName, .jp-KernelName").first).to_have_text("Python (demo)")
    expect(notebook.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_be_attached(timeout=120_000)
    editor = notebook.locator(".jp-Cell .cm-content").first
    editor.click()
    page.keyboard.type("import sys; print(sys.prefix)")
    page.keyboard.press("Shift+Enter")
    expect(notebook.locator(".jp-OutputArea-output").first).to_have_text(staged_prefix, timeout=60_000)

    # The running kernel holds the staged env: the panel says so, and refuses to evict it.
    panel.get_by_role("button", name="Refresh the list of environments").click()
    expect(row).to_contain_text("in use by 1 kernel")
    _save_screenshot(page, panel, tmp_path)
    row.get_by_role("button", name="Evict").click()
    page.locator(".jp-Dialog").get_by_role("button", name="Evict").click()
    expect(page.locator(".jp-Dialog")).to_contain_text("in use")
    page.locator(".jp-Dialog").get_by_role("button", name="Close").click()
    assert Path(staged_prefix).is_dir()

    page.get_by_role("menuitem", name="Kernel").click()
    page.get_by_role("menuitem", name="Shut Down Kernel").click()
    expect(notebook.locator(".jp-Notebook-toolbarKernelName, .jp-KernelName").first).to_have_text("No Kernel")
    panel.get_by_role("button", name="Refresh the list of environments").click()
    expect(row).not_to_contain_text("in use")
    row.get_by_role("button", name="Evict").click()
    page.locator(".jp-Dialog").get_by_role("button", name="Evict").click()
    expect(row.locator(".jp-kernelprov-state")).to_have_text("not staged")
    expect(page.locator(".jp-Dialog")).to_have_count(0)  # no error
    assert not Path(staged_prefix).exists()


def test_a_filter_box_appears_when_there_are_many(lab, page):
    from playwright.sync_api import expect

    kernels = Path(lab.environ["JUPYTER_DATA_DIR"]) / "kernels"
    extra = []
    try:
        for i in range(5):  # seven in all: more than the panel shows without a filter
            target = kernels / f"team-{i}"
            shutil.copytree(kernels / "scratch", target)
            spec = json.loads((target / "kernel.json").read_text())
            (target / "kernel.json").write_text(json.dumps({**spec, "display_name": f"Team env {i}"}))
            extra.append(target)
        page.locator('.jp-SideBar [data-id="kernelprov-environments"]').click()
        panel = page.locator("#kernelprov-environments")
        expect(panel.locator("tbody")).to_have_count(7)
        search = panel.get_by_role("searchbox", name="Filter environments")
        search.fill("team env 3")
        expect(panel.locator("tbody")).to_have_count(1)
        expect(panel.locator("tbody")).to_contain_text("Team env 3")
        search.fill("nothing like this")
        expect(panel).to_contain_text("No environment matches")
    finally:
        for target in extra:
            shutil.rmtree(target)


def _widen_left_area(page, pixels: int) -> None:
    """Drag the handle between the left side bar's panel and the main area to the right."""
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle:not(.lm-mod-hidden)").first
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + pixels, y, steps=5)
    page.mouse.up()


def _save_screenshot(page, panel, tmp_path: Path) -> None:
    """The panel down to its last line, light theme: to tmp_path, and to docs/ when asked."""
    panel.locator(".jp-kernelprov-footer").click()  # no focus ring on the refresh button
    page.mouse.move(900, 700)  # no hover highlight
    box = panel.bounding_box()
    footer = panel.locator(".jp-kernelprov-footer").bounding_box()
    clip = {"x": box["x"], "y": box["y"], "width": box["width"], "height": footer["y"] + footer["height"] + 12 - box["y"]}
    shot = tmp_path / "panel.png"
    page.screenshot(path=str(shot), clip=clip)
    if os.environ.get("KERNELPROV_UPDATE_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy2(shot, REPO / "docs" / "panel.png")


def test_fifteen_envs_scroll_at_the_default_sidebar_width(lab, browser, tmp_path):
    # A researcher with many envs: at 1440x900 and JupyterLab's default 250 px sidebar, the rows
    # below the fold must be reachable with the mouse wheel (the panel did not scroll before).
    from playwright.sync_api import expect

    kernels = Path(lab.environ["JUPYTER_DATA_DIR"]) / "kernels"
    extra = []
    context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="light")
    try:
        for i in range(13):
            target = kernels / f"many-{i:02d}"
            shutil.copytree(kernels / "scratch", target)
            spec = json.loads((target / "kernel.json").read_text())
            (target / "kernel.json").write_text(json.dumps({**spec, "display_name": f"Many env {i:02d}"}))
            extra.append(target)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{lab.url}/lab?reset&token={lab.token}")
        page.locator("#jp-main-dock-panel").wait_for()
        page.locator('.jp-SideBar [data-id="kernelprov-environments"]').click()
        panel = page.locator("#kernelprov-environments")
        expect(panel.locator("tbody")).to_have_count(15, timeout=TIMEOUT_MS)
        assert 240 <= panel.bounding_box()["width"] <= 260  # the default sidebar width
        last = panel.locator("tbody").last
        assert last.bounding_box()["y"] > 900, "the last env should start below the fold"
        panel.locator("tbody").first.hover()
        for _ in range(20):
            page.mouse.wheel(0, 600)
        expect(last).to_be_in_viewport()
        page.screenshot(path=str(tmp_path / "fifteen-envs-scrolled.png"))
    finally:
        context.close()
        for target in extra:
            shutil.rmtree(target)
