"""The panel's REST API against a real jupyter_server (pytest-jupyter) and real conda-pack archives.

The tests are synchronous and drive the server's own event loop (``jp_asyncio_loop``) through
:func:`api`: pytest-asyncio would run a coroutine test on a loop of its own, where the server
never answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from jupyter_server.auth import Authorizer
from pytest_jupyter.jupyter_server import *  # noqa: F403 — the server fixtures, for this module only

from kernelprov.engine import cache, stage
from kernelprov.cli.app import main
from kernelprov.jupyter.kernelspecs import build_kernel_json


@pytest.fixture
def jp_server_config(cache_root):
    """The server with our extension; KERNELPROV_CACHE_DIR (``cache_root``) is set before it starts."""
    return {"ServerApp": {"jpserver_extensions": {"kernelprov": True}}}


@pytest.fixture
def api(jp_serverapp, jp_fetch, jp_asyncio_loop):
    """``api(method, *path, headers=None) -> (status, json)`` under ``/kernelprov``, authenticated."""

    def call(method: str, *parts: str, **kwargs):
        kwargs.setdefault("body", b"" if method == "POST" else None)
        response = jp_asyncio_loop.run_until_complete(
            jp_fetch("kernelprov", *parts, method=method, raise_error=False, **kwargs)
        )
        return response.code, json.loads(response.body) if response.body else None

    call.loop = jp_asyncio_loop
    return call


def envs(api) -> dict[str, dict]:
    status, body = api("GET", "envs")
    assert status == 200, body
    return {env["name"]: env for env in body["envs"]}


def wait_for(api, name: str, ready, timeout: float = 30.0) -> dict:
    """Poll GET (letting the server run in between) until ``ready(env)``; return that env."""
    deadline = time.monotonic() + timeout
    while True:
        env = envs(api)[name]
        if ready(env):
            return env
        assert not (env["staging"] or {}).get("error"), env["staging"]["error"]
        assert time.monotonic() < deadline, env
        api.loop.run_until_complete(asyncio.sleep(0.05))


@pytest.fixture
def install(jp_environ, copy_archive, capsys):
    """Install an archive (copied, so its manifest is written beside the copy) as kernel ``name``."""

    def run(name: str, archive: Path) -> Path:
        archive = copy_archive(archive, f"{name}{archive.name[len('tiny'):]}")
        assert main(["install", name, "--archive", str(archive)]) == 0
        capsys.readouterr()
        return archive

    return run


def write_kernel(jp_data_dir: Path, name: str, spec: dict) -> Path:
    kernel_dir = jp_data_dir / "kernels" / name
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    return kernel_dir


def test_lists_kernelprov_kernels_with_facts_from_their_manifests(api, install, tiny_env, tiny_archives, jp_data_dir):
    assert envs(api) == {}
    assert main(["install", "tiny", "--env-prefix", str(tiny_env)]) == 0  # packed by us: package count known
    archive = jp_data_dir / "kernels" / "tiny" / "tiny.tar.zst"
    install("other", tiny_archives["zip"])
    write_kernel(jp_data_dir, "plain", {"argv": ["python3", "-m", "ipykernel_launcher"], "display_name": "Plain", "language": "python"})

    listed = envs(api)

    assert sorted(listed) == ["other", "tiny"]  # a kernel without our provisioner is not ours
    assert listed["tiny"] == {
        "name": "tiny",
        "display_name": "Python (tiny)",
        "language": "python",
        "archive": str(archive),
        "archive_size": archive.stat().st_size,
        "format": "tar.zst",
        "python_version": None,  # the tiny env has no python package
        "packages": 1,
        "pip_packages": 0,  # counted at pack time: the tiny env has no pip-installed distributions
        "staged": None,
        "staging": None,
        "last_failure": None,
        "slurm_jobs": None,  # runs where the server does
        "problems": [],
    }
    # Made by conda-pack itself: its package count was read from its conda-meta at install.
    assert listed["other"]["format"] == "zip" and listed["other"]["packages"] == 1


def test_stage_runs_in_the_background_and_reports_progress(api, install, tiny_archives, cache_root, monkeypatch):
    install("tiny", tiny_archives["tar.gz"])
    release = threading.Event()
    calls = []
    real_ensure_staged = stage.ensure_staged

    def slow_ensure_staged(archive, *, progress, **options):
        calls.append(archive)
        progress(3, 12)
        assert release.wait(20), "the test never released the stage"
        return real_ensure_staged(archive, progress=progress, **options)

    monkeypatch.setattr(stage, "ensure_staged", slow_ensure_staged)

    status, body = api("POST", "envs", "tiny", "stage")
    assert status == 202, body
    assert body["name"] == "tiny" and body["staged"] is None
    running = wait_for(api, "tiny", lambda env: env["staging"] and env["staging"]["done"])
    assert running["staging"]["done"] == 3 and running["staging"]["total"] == 12
    assert running["staging"]["fraction"] == 0.25 and running["staging"]["error"] is None
    assert api("POST", "envs", "tiny", "stage")[0] == 202  # joins the running stage
    assert len(calls) == 1

    release.set()
    done = wait_for(api, "tiny", lambda env: env["staged"])
    assert done["staging"] is None
    prefix = Path(done["staged"]["prefix"])
    assert prefix.parent.parent == cache_root and (prefix / "bin" / "hello").is_file()
    assert done["staged"]["bytes"] > 0 and done["staged"]["in_use"] == 0
    assert done["staged"]["last_used"] >= done["staged"]["staged_at"] - 1


def test_a_stage_started_by_a_kernel_is_shown_as_staging(api, install, tiny_archives, cache_root):
    archive = install("tiny", tiny_archives["tar.gz"])
    release, started = threading.Event(), threading.Event()

    def hold(done, total):  # the real engine, paused mid-unpack, as a kernel start would be
        started.set()
        assert release.wait(20)

    kernel_start = threading.Thread(target=stage.ensure_staged, args=(archive,),
                                    kwargs={"progress": hold})
    kernel_start.start()
    try:
        assert started.wait(20)
        env = envs(api)["tiny"]
        assert env["staged"] is None and env["staging"]["error"] is None
        # Its progress reaches this server through the cache dir, as a job prologue's would.
        assert env["staging"]["total"] > 0 and 0 < env["staging"]["fraction"] <= 1
    finally:
        release.set()
        kernel_start.join()
    assert envs(api)["tiny"]["staging"] is None and envs(api)["tiny"]["staged"]


def test_a_failed_stage_is_shown_with_its_message(api, install, tiny_archives):
    archive = install("broken", tiny_archives["tar.gz"])
    data = bytearray(archive.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damaged inside: no cheap check sees it
    archive.write_bytes(bytes(data))
    assert envs(api)["broken"]["problems"] == []

    assert api("POST", "envs", "broken", "stage")[0] == 202
    env = wait_for(api, "broken", lambda env: env["staging"] and env["staging"]["error"])

    assert "corrupt" in env["staging"]["error"] and env["staged"] is None


def test_evict_removes_the_staged_copy(api, install, tiny_archives):
    install("tiny", tiny_archives["tar.gz"])
    assert api("DELETE", "envs", "tiny", "stage")[0] == 404  # nothing staged yet
    api("POST", "envs", "tiny", "stage")
    prefix = Path(wait_for(api, "tiny", lambda env: env["staged"])["staged"]["prefix"])

    status, body = api("DELETE", "envs", "tiny", "stage")

    assert status == 200, body
    assert body["staged"] is None and not prefix.exists()
    assert envs(api)["tiny"]["staged"] is None


def test_evict_is_refused_while_kernels_use_the_env(api, install, tiny_archives):
    archive = install("tiny", tiny_archives["tar.gz"])
    api("POST", "envs", "tiny", "stage")
    prefix = Path(wait_for(api, "tiny", lambda env: env["staged"])["staged"]["prefix"])
    # Two stand-in kernels lease the env the way run.sh does, through `kernelprov unpack --lease`.
    kernels = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        for kernel in kernels:
            unpack = subprocess.run([sys.executable, "-m", "kernelprov", "unpack", "--quiet", "--lease", str(kernel.pid),
                                     str(archive)], capture_output=True, text=True, timeout=120)
            assert unpack.returncode == 0 and unpack.stdout.strip() == str(prefix), unpack.stderr

        status, body = api("DELETE", "envs", "tiny", "stage")

        assert status == 409, body
        assert "in use" in body["message"] and prefix.is_dir()
        assert envs(api)["tiny"]["staged"]["in_use"] == 2
        kernels[0].kill()
        kernels[0].wait()
        assert envs(api)["tiny"]["staged"]["in_use"] == 1
        assert api("DELETE", "envs", "tiny", "stage")[0] == 409
    finally:
        for kernel in kernels:
            kernel.kill()
            kernel.wait()

    status, body = api("DELETE", "envs", "tiny", "stage")  # the last kernel has gone: the lease with it

    assert status == 200, body
    assert not prefix.exists()


def test_problems_are_reported_and_block_staging(api, install, tiny_archives, jp_data_dir):
    missing = install("gone", tiny_archives["tar.gz"])
    missing.unlink()
    archive = install("tiny", tiny_archives["tar.gz"])
    spec = build_kernel_json(jp_data_dir / "kernels" / "misconfigured", display_name="Misconfigured", archive=archive,
                             provisioner_config={"lock_timeout": -1, "colour": "blue"})
    write_kernel(jp_data_dir, "misconfigured", spec)
    write_kernel(jp_data_dir, "noarchive", {**spec, "metadata": {"kernel_provisioner": {"provisioner_name": "kernelprov-provisioner"}}})

    listed = envs(api)

    assert listed["tiny"]["problems"] == []
    [gone] = listed["gone"]["problems"]
    assert "does not exist" in gone and listed["gone"]["archive_size"] is not None  # known from the manifest
    problems = listed["misconfigured"]["problems"]
    assert any("'colour'" in p for p in problems) and any("lock_timeout" in p for p in problems)
    assert "names no archive" in listed["noarchive"]["problems"][0]
    for name in ("gone", "misconfigured", "noarchive"):
        status, body = api("POST", "envs", name, "stage")
        assert status == 409, (name, body)
        assert body["message"]


@pytest.mark.parametrize("name", ["..", "-rf", "a b", "x%2F..%2Fy", ".hidden"])
def test_bad_kernel_names_are_refused(api, name):
    for method in ("POST", "DELETE"):
        status, body = api(method, "envs", name, "stage")
        assert status == 400, (method, name, body)
        assert "Invalid kernel name" in body["message"]


def test_unknown_kernels_are_not_found(api):
    for method in ("POST", "DELETE"):
        status, body = api(method, "envs", "nosuch", "stage")
        assert status == 404 and "nosuch" in body["message"]


def test_every_handler_requires_authentication(api, install, tiny_archives):
    install("tiny", tiny_archives["tar.gz"])
    anonymous = {"Authorization": ""}
    assert api("GET", "envs", headers=anonymous)[0] == 403
    assert api("POST", "envs", "tiny", "stage", headers=anonymous)[0] == 403
    assert api("DELETE", "envs", "tiny", "stage", headers=anonymous)[0] == 403
    assert envs(api)["tiny"]["staging"] is None and envs(api)["tiny"]["staged"] is None


def test_writes_from_a_browser_session_need_the_xsrf_token(api, install, tiny_archives, jp_serverapp):
    install("tiny", tiny_archives["tar.gz"])
    token = jp_serverapp.identity_provider.token
    # jp_fetch has no cookie jar: log in as a browser does, then reuse the cookie it was given.
    login = api.loop.run_until_complete(_browser_login(jp_serverapp, token))
    cookie = {"Authorization": "", "Cookie": login}

    assert api("GET", "envs", headers=cookie)[0] == 200  # reads need no XSRF token
    status, body = api("POST", "envs", "tiny", "stage", headers=cookie)
    assert status == 403 and "_xsrf" in body["message"]
    xsrf = "2|deadbeef|0123456789abcdef|1700000000"
    status, body = api("POST", "envs", "tiny", "stage", headers={**cookie, "Cookie": f"{login}; _xsrf={xsrf}", "X-XSRFToken": xsrf})
    assert status == 202, body


async def _browser_login(serverapp, token: str) -> str:
    """POST the token to /login as the login form does; return the session cookie it sets."""
    from tornado.httpclient import AsyncHTTPClient

    base = f"http://127.0.0.1:{serverapp.port}{serverapp.base_url}"
    client = AsyncHTTPClient()
    page = await client.fetch(f"{base}login", raise_error=False)
    xsrf = re.search(r"_xsrf=([^;]+)", page.headers.get("Set-Cookie", "")).group(1)
    response = await client.fetch(
        f"{base}login", method="POST", body=f"password={token}&_xsrf={xsrf}",
        headers={"Cookie": f"_xsrf={xsrf}"}, follow_redirects=False, raise_error=False,
    )
    cookies = [c.split(";")[0] for c in response.headers.get_list("Set-Cookie") if c.startswith("username-")]
    assert response.code == 302 and cookies, (response.code, response.headers)
    return cookies[0]


class ReadOnly(Authorizer):
    """Lets everybody read, nobody write; records what it was asked."""

    asked: list[tuple[str, str]] = []

    def is_authorized(self, handler, user, action, resource) -> bool:
        self.asked.append((action, resource))
        return action == "read"


@pytest.fixture
def read_only_server(jp_server_config):
    ReadOnly.asked = []
    jp_server_config["ServerApp"]["authorizer_class"] = ReadOnly
    return jp_server_config


def test_every_handler_is_authorized_on_the_kernelprov_resource(read_only_server, api, install, tiny_archives):
    install("tiny", tiny_archives["tar.gz"])

    assert api("GET", "envs")[0] == 200
    assert api("POST", "envs", "tiny", "stage")[0] == 403
    assert api("DELETE", "envs", "tiny", "stage")[0] == 403

    assert [a for a in ReadOnly.asked if a[1] == "kernelprov"] == [("read", "kernelprov"), ("write", "kernelprov"), ("write", "kernelprov")]
    assert envs(api)["tiny"]["staging"] is None


@pytest.fixture
def configured_cache(jp_server_config, tmp_path) -> Path:
    chosen = tmp_path / "c2"  # no longer than cache_root's path: the tiny env's prefix must fit
    jp_server_config["KernelprovConfig"] = {"cache_dir": str(chosen)}
    return chosen


def test_server_config_chooses_the_cache(configured_cache, api, install, tiny_archives):
    chosen = configured_cache
    install("tiny", tiny_archives["tar.gz"])

    status, body = api("GET", "envs")
    assert status == 200 and body["cache_dir"] == str(chosen)
    api("POST", "envs", "tiny", "stage")
    prefix = Path(wait_for(api, "tiny", lambda env: env["staged"])["staged"]["prefix"])
    assert prefix.parent.parent == chosen


class TestTheServersAllowedKernelspecs:
    """A server that offers only some kernels (``KernelSpecManager.allowed_kernelspecs``): the
    panel lists and pre-warms only those, like JupyterLab's launcher."""

    @pytest.fixture
    def jp_server_config(self, cache_root):
        return {"ServerApp": {"jpserver_extensions": {"kernelprov": True}},
                "KernelSpecManager": {"allowed_kernelspecs": ["shown"]}}

    def test_only_allowed_kernels_are_listed_or_staged(self, api, install, tiny_archives):
        install("shown", tiny_archives["tar.gz"])
        install("hidden", tiny_archives["tar.zst"])

        assert set(envs(api)) == {"shown"}
        status, body = api("POST", "envs", "hidden", "stage")
        assert status == 404 and "hidden" in body["message"]
        assert api("POST", "envs", "shown", "stage")[0] == 202


def test_a_cut_short_archive_is_a_problem_before_any_start_and_sorts_first(api, install, tiny_archives):
    install("alpha", tiny_archives["tar.gz"])
    cut = install("zulu", tiny_archives["tar.gz"])
    size = cut.stat().st_size
    with open(cut, "r+b") as f:
        f.truncate(size // 2)  # a copy that stopped half way, its manifest still the packed one's

    status, body = api("GET", "envs")

    assert status == 200, body
    first, second = body["envs"]
    assert first["name"] == "zulu" and second["name"] == "alpha" and not second["problems"]
    assert len(first["problems"]) == 1 and "cut short" in first["problems"][0], first["problems"]
    assert re.search(r"is \d+(\.\d)? kB, but was \d+(\.\d)? kB when packed", first["problems"][0])
    assert api("POST", "envs", "zulu", "stage")[0] == 409  # the problem blocks Stage now too


def test_a_failed_stage_is_remembered_on_the_node_until_the_archive_changes(api, install, tiny_archives):
    archive = install("tiny", tiny_archives["tar.gz"])
    install("good", tiny_archives["tar.gz"])
    data = bytearray(archive.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damaged inside, the same size as packed
    archive.write_bytes(bytes(data))
    assert envs(api)["tiny"]["last_failure"] is None
    # A job prologue, not this server, fails to stage it: the memory is on the node, not in the server.
    unpack = subprocess.run([sys.executable, "-m", "kernelprov", "unpack", "--quiet", str(archive)],
                            capture_output=True, text=True, timeout=120)
    assert unpack.returncode != 0

    listed = api("GET", "envs")[1]["envs"]

    assert [env["name"] for env in listed] == ["tiny", "good"]  # the failed one first
    failure = listed[0]["last_failure"]
    assert unpack.stderr.strip() == f"kernelprov: error: {failure['message']}" and time.time() - failure["at"] < 60
    assert listed[0]["staged"] is None and listed[0]["problems"] == []
    # A new version of the archive starts clean.
    shutil.copyfile(tiny_archives["tar.gz"], archive)
    assert envs(api)["tiny"]["last_failure"] is None


def test_a_stage_that_works_forgets_the_failure_of_the_same_version(api, install, tiny_archives, cache_root):
    archive = install("tiny", tiny_archives["tar.gz"])
    with cache.user_cache_dir(cache_root) as user_dir, cache.key_lock(user_dir, cache.archive_key(archive, archive.stat()), 0):
        # Another process holds the env's lock for longer than this start waits: a passing failure.
        unpack = subprocess.run([sys.executable, "-m", "kernelprov", "unpack", "--quiet", str(archive)],
                                env={**os.environ, "KERNELPROV_LOCK_TIMEOUT": "0.2"}, capture_output=True, text=True,
                                timeout=120)
    assert unpack.returncode != 0 and "Timed out" in envs(api)["tiny"]["last_failure"]["message"]

    api("POST", "envs", "tiny", "stage")

    assert wait_for(api, "tiny", lambda env: env["staged"])["last_failure"] is None


def test_the_fast_poll_reports_only_staging_state(api, install, tiny_archives, monkeypatch):
    install("tiny", tiny_archives["tar.gz"])
    install("other", tiny_archives["tar.zst"])
    release = threading.Event()
    real_ensure_staged = stage.ensure_staged

    def slow_ensure_staged(archive, *, progress, **options):
        progress(1, 4)
        assert release.wait(20), "the test never released the stage"
        return real_ensure_staged(archive, progress=progress, **options)

    monkeypatch.setattr(stage, "ensure_staged", slow_ensure_staged)  # holds the stage, so it can be seen
    api("POST", "envs", "tiny", "stage")
    try:
        status, body = api("GET", "staging", params=[("name", "tiny"), ("name", "other"), ("name", "unknown")])
        assert status == 200, body
        assert sorted(body["envs"]) == ["other", "tiny"]
        tiny = body["envs"]["tiny"]
        assert tiny["staged"] is False and tiny["staging"]["fraction"] == 0.25 and tiny["staging"]["elapsed"] >= 0
        assert body["envs"]["other"] == {"staging": None, "staged": False, "slurm_jobs": None}
        assert api("GET", "staging", params=[("name", "../etc")])[0] == 400
    finally:
        release.set()
    wait_for(api, "tiny", lambda env: env["staged"])
    assert api("GET", "staging", params=[("name", "tiny")])[1]["envs"]["tiny"] == {"staging": None, "staged": True, "slurm_jobs": None}


def test_polls_read_kernel_json_and_manifests_only_when_they_change(api, install, tiny_archives, jp_data_dir):
    install("tiny", tiny_archives["tar.gz"])
    install("other", tiny_archives["tar.zst"])
    opened: list[str] = []
    counting = threading.Event()

    def audit(event, args):  # every open() by Python code in this process, the server's threads included
        if counting.is_set() and event == "open" and isinstance(args[0], str) and "kernels" in args[0]:
            opened.append(args[0])

    sys.addaudithook(audit)
    envs(api)  # the first poll reads everything
    counting.set()
    try:
        for _ in range(3):
            envs(api)
        assert [p for p in opened if p.endswith(("kernel.json", ".manifest.json"))] == []
        spec = jp_data_dir / "kernels" / "other" / "kernel.json"
        spec.write_text(spec.read_text().replace('"Python (other)"', '"Renamed"'))
        opened.clear()
        assert envs(api)["other"]["display_name"] == "Renamed"
        assert [Path(p).name for p in opened if p.endswith(("kernel.json", ".manifest.json"))] == ["kernel.json"]
    finally:
        counting.clear()
