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

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    def start(self) -> None:
        notebooks = self.notebooks
        notebooks.mkdir(exist_ok=True)
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

    def restart(self) -> None:
        """Stop the server and start it again on the same port and token (the page stays open)."""
        self.stop()
        self.start()

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
    """``jupyter lab`` (once for this module) with kernelprov kernels from the runnable archive: ``demo``,
    ``scratch`` (a copy, so it stages separately), ``cut`` (cut short) and ``damaged``. Everything Jupyter writes goes to a temporary
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
    # Installed whole, then cut short or damaged, as a copy gone wrong after install would be.
    broken = {}
    for name in ("cut", "damaged"):
        broken[name] = root / "archives" / f"{name}.tar.zst"
        shutil.copy2(runnable_archive, broken[name])
        shutil.copy2(f"{runnable_archive}.manifest.json", f"{broken[name]}.manifest.json")
        server.run("kernelprov", "install", name, "--archive", str(broken[name]), "--display-name", f"Python ({name})")
    size = runnable_archive.stat().st_size
    with open(broken["cut"], "r+b") as f:
        f.truncate(size // 2)  # its manifest still the packed one's: a problem before any start
    with open(broken["damaged"], "r+b") as f:
        f.seek(size // 20)
        f.write(bytes(4096))  # the size unchanged: no cheap check sees it, a start fails
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



AXE = REPO / "labextension" / "node_modules" / "axe-core" / "axe.min.js"


def _open_panel(page):
    page.locator('.jp-SideBar [data-id="kernelprov-environments"]').click()
    return page.locator("#kernelprov-environments")


def _row(panel, name: str):
    return panel.locator(f'li.jp-kernelprov-env[data-kernel-name="{name}"]')


def _expand(row):
    toggle = row.locator(".jp-kernelprov-row")
    if toggle.get_attribute("aria-expanded") != "true":
        toggle.click()
    return row.locator(".jp-kernelprov-expanded")


def _axe_violations(page, selector: str) -> list:
    """axe-core's WCAG A/AA violations inside ``selector`` (the scan JupyterLab's own UI tests use)."""
    assert AXE.is_file(), "axe-core comes with the labextension's dev dependencies (jlpm install)"
    page.add_script_tag(path=str(AXE))
    return page.evaluate("""async (selector) => {
        const result = await axe.run(selector, {runOnly: ['wcag2a', 'wcag2aa']});
        return result.violations.map(v => ({id: v.id, nodes: v.nodes.map(n => n.html).slice(0, 3)}));
    }""", selector)


def test_fifteen_envs_fit_the_default_sidebar_one_line_each(lab, browser, tmp_path):
    # A researcher with many envs at 1440x900 and JupyterLab's default 250 px sidebar: one line per
    # env, the whole state readable, problems first, the summary and filter always in view, every
    # row reachable by wheel and keyboard, and a clean accessibility scan.
    from playwright.sync_api import expect

    kernels = Path(lab.environ["JUPYTER_DATA_DIR"]) / "kernels"
    extra = []
    context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="light")
    try:
        for i in range(11):
            target = kernels / f"many-{i:02d}"
            shutil.copytree(kernels / "scratch", target)
            spec = json.loads((target / "kernel.json").read_text())
            (target / "kernel.json").write_text(json.dumps({**spec, "display_name": f"Many env {i:02d}"}))
            extra.append(target)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{lab.url}/lab?reset&token={lab.token}")
        page.locator("#jp-main-dock-panel").wait_for()
        panel = _open_panel(page)
        rows = panel.locator("li.jp-kernelprov-env")
        expect(rows).to_have_count(15, timeout=TIMEOUT_MS)
        assert 240 <= panel.bounding_box()["width"] <= 260  # the default sidebar width
        expect(panel.locator(".jp-kernelprov-summary")).to_have_text("1 problem · 14 not staged")

        # The problem row comes first, says why on hover, and cannot be opened.
        first = rows.first
        expect(first).to_have_attribute("data-kernel-name", "cut")
        expect(first.locator(".jp-kernelprov-state")).to_have_text("problem")
        assert "cut short" in first.locator(".jp-kernelprov-row").get_attribute("title")
        details = _expand(first)
        expect(details).to_contain_text(re.compile(r"The archive is [\d.]+ MB, but was [\d.]+ MB when packed"))
        expect(details.get_by_role("button", name="Open notebook")).to_be_disabled()
        expect(details.get_by_role("button", name="Stage now")).to_be_disabled()
        first.locator(".jp-kernelprov-row").click()  # collapse again

        # Then by display name; every row is one line and its state is not cut.
        names = rows.locator(".jp-kernelprov-displayName").all_inner_texts()
        assert names[1:] == sorted(names[1:], key=str.casefold), names
        for i in range(rows.count()):
            line = rows.nth(i).locator(".jp-kernelprov-rowLine").bounding_box()
            assert line["height"] <= 30, (i, line)
            state = rows.nth(i).locator(".jp-kernelprov-state")
            assert state.evaluate("e => e.scrollWidth <= e.clientWidth"), state.inner_text()
        page.screenshot(path=str(tmp_path / "fifteen-envs.png"))

        # Wheel: the rows below the fold come into view, the summary and filter stay.
        page.set_viewport_size({"width": 1440, "height": 500})
        last = rows.last
        assert last.bounding_box()["y"] > 500, "the last env should start below the fold"
        rows.first.hover()
        for _ in range(10):
            page.mouse.wheel(0, 400)
        expect(last).to_be_in_viewport()
        expect(panel.get_by_role("searchbox", name="Filter environments")).to_be_in_viewport()
        expect(panel.locator(".jp-kernelprov-summary")).to_be_in_viewport()

        # Keyboard: arrows move between rows, one tab stop for the list.
        rows.first.locator(".jp-kernelprov-row").focus()
        for _ in range(3):
            page.keyboard.press("ArrowDown")
        focused = page.evaluate("document.activeElement.closest('li').dataset.kernelName")
        assert focused == rows.nth(3).get_attribute("data-kernel-name")
        page.keyboard.press("End")
        assert page.evaluate("document.activeElement.closest('li').dataset.kernelName") == "scratch"
        assert panel.locator('.jp-kernelprov-row[tabindex="0"]').count() == 1
        page.keyboard.press("ArrowRight")
        expect(rows.last.locator(".jp-kernelprov-expanded")).to_be_visible()

        assert _axe_violations(page, "#kernelprov-environments") == []
    finally:
        context.close()
        for target in extra:
            shutil.rmtree(target)


def test_a_filter_box_appears_when_there_are_many(lab, page):
    from playwright.sync_api import expect

    kernels = Path(lab.environ["JUPYTER_DATA_DIR"]) / "kernels"
    extra = []
    try:
        for i in range(3):  # seven in all: more than the panel shows without a filter
            target = kernels / f"team-{i}"
            shutil.copytree(kernels / "scratch", target)
            spec = json.loads((target / "kernel.json").read_text())
            (target / "kernel.json").write_text(json.dumps({**spec, "display_name": f"Team env {i}"}))
            extra.append(target)
        panel = _open_panel(page)
        rows = panel.locator("li.jp-kernelprov-env")
        expect(rows).to_have_count(7)
        search = panel.get_by_role("searchbox", name="Filter environments")
        search.fill("team env 2")
        expect(rows).to_have_count(1)
        expect(rows).to_contain_text("Team env 2")
        search.fill("nothing like this")
        expect(panel).to_contain_text("No environment matches")
    finally:
        for target in extra:
            shutil.rmtree(target)


def test_panel_stages_an_env_and_runs_a_notebook_on_it(lab, page, runnable_archive, tmp_path):
    from playwright.sync_api import expect

    manifest = json.loads(Path(f"{runnable_archive}.manifest.json").read_text())
    panel = _open_panel(page)
    expect(panel.get_by_role("heading", name="Environments")).to_be_visible()
    row = _row(panel, "demo")
    expect(row.locator(".jp-kernelprov-state")).to_have_text("not staged")
    details = _expand(row)
    # The package count is conda's records plus pip's distributions, from the manifest.
    packages = manifest["packages"] + manifest["pip_packages"]
    expect(details).to_contain_text(f"Python {manifest['python_version']} · {packages} package")

    # Record every progress line the row shows on its way to "ready".
    page.evaluate("""() => {
        window.kernelprovProgress = [];
        const row = document.querySelector('li[data-kernel-name="demo"]');
        new MutationObserver(() => {
            const text = row.querySelector('.jp-kernelprov-progressText');
            if (text) window.kernelprovProgress.push(text.textContent);
        }).observe(row, {subtree: true, childList: true, characterData: true});
    }""")
    details.get_by_role("button", name="Stage now").click()
    expect(row.locator(".jp-kernelprov-state")).to_have_text("ready", timeout=120_000)
    progress = page.evaluate("window.kernelprovProgress")
    assert any(re.search(r"\d+ % · [\d.]+ MB of [\d.]+ MB · \d+ s elapsed", p) for p in progress), progress
    expect(page.locator(".jp-Notification-Toast-success, .Toastify__toast--success")).to_contain_text(
        "Python (demo) is staged on this node")
    staged_prefix = details.locator(".jp-kernelprov-path").inner_text().strip()
    assert Path(staged_prefix).parent.parent == lab.cache_dir and (Path(staged_prefix) / "bin" / "python").exists()
    expect(details).to_contain_text("not used yet")  # staged, but no kernel has run from it
    expect(details.get_by_role("button", name="Stage now")).to_be_disabled()
    assert "Already staged" in details.get_by_role("button", name="Stage now").get_attribute("title")

    # Enter on the row opens a notebook on it.
    row.locator(".jp-kernelprov-row").focus()
    page.keyboard.press("Enter")
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    expect(notebook.locator(".jp-Notebook-toolbarKernelName, .jp-KernelName").first).to_have_text("Python (demo)")
    expect(notebook.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_be_attached(timeout=120_000)
    notebook.locator(".jp-Cell .cm-content").first.click()
    page.keyboard.type("import sys; print(sys.prefix)")
    page.keyboard.press("Shift+Enter")
    expect(notebook.locator(".jp-OutputArea-output").first).to_have_text(staged_prefix, timeout=60_000)

    # The running kernel holds the env: Evict is disabled and says why; the kernel can be shut
    # down from the row.
    expect(row.locator(".jp-kernelprov-state")).to_have_text("in use")
    expect(details).to_contain_text("in use by 1 kernel")
    expect(details).to_contain_text("last used")
    evict = details.get_by_role("button", name="Evict")
    expect(evict).to_be_disabled()
    assert evict.get_attribute("title") == "In use by 1 kernel: shut it down first"
    _save_screenshot(page, panel, tmp_path)
    details.get_by_role("button", name="Shut down the kernel using it").click()
    page.locator(".jp-Dialog").get_by_role("button", name="Shut Down").click()
    expect(notebook.locator(".jp-Notebook-toolbarKernelName, .jp-KernelName").first).to_have_text("No Kernel")
    expect(row.locator(".jp-kernelprov-state")).to_have_text("ready")
    expect(evict).to_be_enabled()
    evict.click()
    page.locator(".jp-Dialog").get_by_role("button", name="Evict").click()
    expect(row.locator(".jp-kernelprov-state")).to_have_text("not staged")
    expect(page.locator(".jp-Dialog")).to_have_count(0)  # no error
    assert not Path(staged_prefix).exists()


def test_a_failed_start_is_shown_remembered_and_leaves_no_notebook(lab, page):
    from playwright.sync_api import expect

    panel = _open_panel(page)
    # The row's actions are on its context menu too, disabled where they would fail.
    _row(panel, "cut").locator(".jp-kernelprov-row").click(button="right")
    menu = page.locator(".lm-Menu")
    expect(menu.locator('.lm-Menu-item[data-command="kernelprov:open-notebook"]')).to_have_attribute(
        "aria-disabled", "true")
    expect(menu.locator('.lm-Menu-item[data-command="kernelprov:stage"]')).to_have_attribute("aria-disabled", "true")
    page.keyboard.press("Escape")
    _row(panel, "scratch").locator(".jp-kernelprov-row").click(button="right")
    expect(menu.locator('.lm-Menu-item[data-command="kernelprov:open-notebook"]')).not_to_have_attribute(
        "aria-disabled", "true")
    page.keyboard.press("Escape")
    row = _row(panel, "damaged")
    expect(row.locator(".jp-kernelprov-state")).to_have_text("not staged")  # nothing cheap can tell
    before = sorted(p.name for p in lab.notebooks.iterdir())
    _expand(row).get_by_role("button", name="Open notebook").click()

    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Error Starting Kernel", timeout=120_000)
    message = dialog.locator(".jp-Dialog-body").inner_text().strip()
    lead = message.split(". ")[0]
    assert message.startswith("Python (damaged) could not be unpacked") and len(lead) < 80, message
    assert not re.search(r"\d{7,}", message), f"raw byte counts in {message!r}"
    dialog.get_by_role("button", name=re.compile("Dismiss|Close|Ok", re.I)).click()
    assert sorted(p.name for p in lab.notebooks.iterdir()) == before  # no UntitledN.ipynb left behind
    expect(row.locator(".jp-kernelprov-state")).to_have_text("failed")
    expect(panel.locator("li.jp-kernelprov-env").nth(1)).to_have_attribute("data-kernel-name", "damaged")  # problems first

    # The server goes away: the rows stay, greyed, with nothing to click.
    # JupyterLab's own modal "Server Connection Error" dialog comes up too: the researcher
    # dismisses it, as this does whenever it appears, to look at the panel.
    page.evaluate("""() => new MutationObserver(() => {
        for (const dialog of document.querySelectorAll('.jp-Dialog')) {
            if (dialog.textContent.includes('Server Connection Error')) {
                dialog.querySelector('.jp-Dialog-button.jp-mod-accept, .jp-Dialog-button')?.click();
            }
        }
    }).observe(document.body, {childList: true, subtree: true})""")
    lab.stop()
    panel.get_by_role("button", name="Refresh the list of environments").click()
    expect(panel.get_by_role("alert")).to_contain_text("Cannot list environments")
    expect(panel.locator(".jp-kernelprov-body.jp-mod-disconnected")).to_have_count(1)
    scratch = _expand(_row(panel, "scratch"))
    for name in ("Open notebook", "Stage now"):
        expect(scratch.get_by_role("button", name=name)).to_be_disabled()
    assert "not answering" in scratch.get_by_role("button", name="Open notebook").get_attribute("title")

    # Back again, a new server remembers the failure (on the node, not in the old server's memory).
    lab.start()
    panel.get_by_role("button", name="Refresh the list of environments").click()
    expect(panel.get_by_role("alert")).to_have_count(0)
    expect(row.locator(".jp-kernelprov-state")).to_have_text("failed")
    expect(_expand(row)).to_contain_text("The last start failed")
    expect(panel.locator("li.jp-kernelprov-env").nth(1)).to_have_attribute("data-kernel-name", "damaged")  # problems first


def _save_screenshot(page, panel, tmp_path: Path, name: str = "panel.png") -> None:
    """The panel down to its last line, light theme: to tmp_path, and to docs/ when asked."""
    panel.locator(".jp-kernelprov-footer").click()  # no focus ring on a button
    page.mouse.move(900, 700)  # no hover highlight
    box = panel.bounding_box()
    footer = panel.locator(".jp-kernelprov-footer").bounding_box()
    clip = {"x": box["x"], "y": box["y"], "width": box["width"], "height": footer["y"] + footer["height"] + 12 - box["y"]}
    shot = tmp_path / name
    page.screenshot(path=str(shot), clip=clip)
    if os.environ.get("KERNELPROV_UPDATE_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy2(shot, REPO / "docs" / name)


def test_the_readme_screenshot_shows_a_staging_and_a_problem_row(lab, page, tmp_path):
    # docs/panel.png: light theme, the default sidebar width, a summary, a problem row first, a
    # ready row and one staging with its progress line (KERNELPROV_UPDATE_SCREENSHOT=1 rewrites it).
    from playwright.sync_api import expect

    panel = _open_panel(page)
    demo, scratch = _row(panel, "demo"), _row(panel, "scratch")
    _expand(demo).get_by_role("button", name="Stage now").click()
    expect(demo.locator(".jp-kernelprov-state")).to_have_text("ready", timeout=120_000)
    demo.locator(".jp-kernelprov-row").click()  # collapsed again
    _expand(scratch).get_by_role("button", name="Stage now").click()
    expect(scratch.locator(".jp-kernelprov-progressText")).to_contain_text(
        re.compile(r"\d+ % · [\d.]+ MB of [\d.]+ MB"), timeout=120_000)
    _save_screenshot(page, panel, tmp_path)
    summary = panel.locator(".jp-kernelprov-summary")
    text = summary.inner_text()
    problems = re.search(r"(\d+) (problems?)\b", text)  # how many depends on the tests run before
    assert problems and "ready" in text, text
    assert problems[2] == ("problem" if problems[1] == "1" else "problems"), text
    assert summary.evaluate("e => e.scrollWidth <= e.clientWidth"), "the summary wraps, it is never cut"
    expect(scratch.locator(".jp-kernelprov-state")).to_have_text("ready", timeout=120_000)


def test_a_kernel_start_elsewhere_shows_its_unpack_in_the_status_bar(lab, page):
    # A start the panel did not make (the launcher, another tab, a script through the REST API)
    # reports on the event bus: the status bar shows its progress and the row follows it.
    import threading

    from playwright.sync_api import expect

    archives = lab.root / "archives"
    shutil.copy2(archives / "scratch.tar.zst", archives / "elsewhere.tar.zst")
    shutil.copy2(archives / "scratch.tar.zst.manifest.json", archives / "elsewhere.tar.zst.manifest.json")
    lab.run("kernelprov", "install", "elsewhere", "--archive", str(archives / "elsewhere.tar.zst"))
    panel = _open_panel(page)
    panel.get_by_role("button", name="Refresh the list of environments").click()
    row = _row(panel, "elsewhere")
    expect(row.locator(".jp-kernelprov-state")).to_have_text("not staged")
    page.evaluate("""() => {
        window.kernelprovStatus = [];
        new MutationObserver(() => {
            const item = document.querySelector('.jp-kernelprov-status');
            if (item && item.textContent) window.kernelprovStatus.push(item.textContent);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    started = []
    request = urllib.request.Request(f"{lab.url}/api/kernels", method="POST", data=json.dumps({"name": "elsewhere"}).encode(),
                                     headers={"Authorization": f"token {lab.token}", "Content-Type": "application/json"})
    start = threading.Thread(target=lambda: started.append(json.loads(urllib.request.urlopen(request, timeout=180).read())))
    start.start()
    try:
        expect(page.locator(".jp-kernelprov-status")).to_contain_text("Unpacking Python (elsewhere)", timeout=60_000)
        start.join(180)
        expect(row.locator(".jp-kernelprov-state")).to_have_text("in use")
        expect(page.locator(".jp-kernelprov-status")).to_be_hidden()
        assert any("Unpacking Python (elsewhere)" in s for s in page.evaluate("window.kernelprovStatus"))
    finally:
        start.join(180)
        for kernel in started:
            lab.api("DELETE", f"api/kernels/{kernel['id']}")
