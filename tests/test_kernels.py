"""Real kernels from a real conda-pack archive, started through jupyter_client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelprov.engine import cache
from kernelprov.cli.app import main
from kernelprov.engine.pack import pack_env
from kernelprov.jupyter.provisioner import KernelprovProvisioner

from .kernel_client import evaluate

pytestmark = pytest.mark.slow

PROBE = "import sys, os, ipykernel"
EXPRESSIONS = {
    "prefix": "sys.prefix",
    "ipykernel": "ipykernel.__file__",
    "conda_prefix": "os.environ.get('CONDA_PREFIX')",
    "kernelprov_env": "os.environ.get('KERNELPROV_ENV')",
    "path0": "os.environ['PATH'].split(os.pathsep)[0]",
}


@pytest.fixture
def installed_kernel(kernel_environ, runnable_archive, capsys) -> str:
    """The runnable archive installed as kernel 'demo' into the isolated user kernels dir."""
    assert main(["install", "demo", "--archive", str(runnable_archive)]) == 0
    capsys.readouterr()
    return "demo"


async def probe(km: AsyncKernelManager) -> dict[str, str]:
    """Where the kernel runs from: PROBE's expressions, evaluated in the kernel."""
    return await evaluate(km, PROBE, EXPRESSIONS)


async def test_kernel_runs_from_the_staged_env_and_restart_reuses_it(installed_kernel, cache_root):
    km = AsyncKernelManager(kernel_name=installed_kernel)
    await km.start_kernel()
    try:
        assert isinstance(km.provisioner, KernelprovProvisioner)
        first = km.provisioner.staged_env
        assert first.extracted

        seen = await probe(km)
        prefix = str(first.prefix)
        assert Path(prefix).parent.parent == cache_root
        assert seen["prefix"] == prefix
        assert seen["ipykernel"].startswith(prefix + "/lib/")  # the pip-installed package, from the env
        assert seen["conda_prefix"] == seen["kernelprov_env"] == prefix
        assert seen["path0"] == prefix + "/bin"

        await km.restart_kernel()
        second = km.provisioner.staged_env
        assert not second.extracted and second.prefix == first.prefix
        assert (await probe(km))["prefix"] == prefix
    finally:
        await km.shutdown_kernel(now=True)


async def test_eight_kernels_starting_at_once_extract_once_and_all_run(installed_kernel, cache_root):
    managers = [AsyncKernelManager(kernel_name=installed_kernel) for _ in range(8)]
    try:
        await asyncio.gather(*(km.start_kernel() for km in managers))
        staged = [km.provisioner.staged_env for km in managers]
        assert sorted(s.extracted for s in staged) == [False] * 7 + [True]
        # Every kernel runs, from the one published env: none saw a half-staged tree.
        seen = await asyncio.gather(*(probe(km) for km in managers))
        assert {s["prefix"] for s in seen} == {str(staged[0].prefix)}
        assert all(s["ipykernel"].startswith(s["prefix"] + "/lib/") for s in seen)
    finally:
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers if km.has_kernel))


async def test_starts_waiting_for_an_unpack_leave_the_servers_threads_free(installed_kernel, runnable_archive, cache_root):
    # jupyter_server runs blocking work (e.g. the async contents manager's reads and saves) in
    # the event loop's default executor. Starts waiting on another process's unpack must not sit
    # in it: here it has two threads, and three starts wait behind a lock held elsewhere.
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    lock = cache.user_cache_dir(cache_root) / f"{cache.archive_key(runnable_archive, runnable_archive.stat())}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(120)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    managers = [AsyncKernelManager(kernel_name=installed_kernel) for _ in range(3)]
    try:
        assert holder.stdout.readline() == "held\n"
        starts = asyncio.gather(*(km.start_kernel() for km in managers))
        await asyncio.sleep(0.5)
        assert not starts.done()  # all three wait for the lock
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=5) == "free"
        holder.kill()
        await asyncio.wait_for(starts, timeout=120)
        assert sorted(km.provisioner.staged_env.extracted for km in managers) == [False, False, True]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers if km.has_kernel))


async def test_run_sh_stages_the_env_without_the_provisioner(installed_kernel, jp_data_dir, cache_root):
    # A kernelspec with the provisioner metadata stripped is what a client without provisioner
    # support (or a server without kernelprov) effectively runs: just argv, i.e. run.sh.
    source = jp_data_dir / "kernels" / installed_kernel
    plain = jp_data_dir / "kernels" / "plain"
    shutil.copytree(source, plain)
    spec = json.loads((plain / "kernel.json").read_text())
    del spec["metadata"]["kernel_provisioner"]
    (plain / "kernel.json").write_text(json.dumps(spec))

    km = AsyncKernelManager(kernel_name="plain")
    await km.start_kernel()
    try:
        assert not isinstance(km.provisioner, KernelprovProvisioner)
        seen = await probe(km)
        assert Path(seen["prefix"]).parent.parent == cache_root
        assert seen["ipykernel"].startswith(seen["prefix"] + "/lib/")
        assert seen["conda_prefix"] == seen["kernelprov_env"] == seen["prefix"]
    finally:
        await km.shutdown_kernel(now=True)


async def test_activate_d_scripts_run_in_the_kernel(kernel_environ, runnable_env, tmp_path, cache_root, capsys):
    # An env whose etc/conda/activate.d sets a variable, as many conda packages do (e.g. GDAL_DATA).

    activate_d = runnable_env / "etc/conda/activate.d"
    script = activate_d / "kernelprov-test.sh"
    activate_d.mkdir(parents=True, exist_ok=True)
    script.write_text('export KERNELPROV_TEST_ACTIVATED="yes from $CONDA_PREFIX"\n')
    try:
        archive = tmp_path / "with-activate.tar.zst"
        pack_env(archive, prefix=runnable_env)
    finally:
        script.unlink()
        if not any(activate_d.iterdir()):
            os.removedirs(activate_d)
    assert main(["install", "act", "--archive", str(archive)]) == 0
    capsys.readouterr()

    km = AsyncKernelManager(kernel_name="act")
    await km.start_kernel()
    try:
        value = (await evaluate(km, "import os", {"v": "os.environ.get('KERNELPROV_TEST_ACTIVATED')"}))["v"]
        assert value == f"yes from {km.provisioner.staged_env.prefix}"
    finally:
        await km.shutdown_kernel(now=True)


async def test_run_sh_never_searches_the_users_path(installed_kernel, cache_root, tmp_path):
    # A user's PATH usually starts in $HOME, on the shared filesystem: run.sh must not walk it.
    # Every tool it could look up sits first on PATH here and would leave a trace if run.
    trap, traces = tmp_path / "home-bin", tmp_path / "traces"
    trap.mkdir()
    traces.mkdir()
    for tool in ("bash", "env", "dirname", "basename", "ls", "mkdir", "flock", "python", "python3", "cat", "sed"):
        (trap / tool).write_text(f"#!/bin/sh\ntouch {traces}/{tool}\nexit 1\n")
        (trap / tool).chmod(0o755)
    km = AsyncKernelManager(kernel_name=installed_kernel)
    await km.start_kernel(env={**os.environ, "PATH": f"{trap}:{os.environ['PATH']}"})
    try:
        seen = await probe(km)
        assert seen["path0"] == f"{km.provisioner.staged_env.prefix}/bin"
        assert sorted(p.name for p in traces.iterdir()) == []
        assert cache.count_leases(km.provisioner.staged_env.prefix) == 1  # flock found without PATH
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_missing_archive_fails_the_start_with_an_actionable_message(installed_kernel, runnable_archive, jp_data_dir):
    spec_path = jp_data_dir / "kernels" / installed_kernel / "kernel.json"
    spec = json.loads(spec_path.read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["archive"] = "/nonexistent/lab/envs/gone.tar.zst"
    spec_path.write_text(json.dumps(spec))

    km = AsyncKernelManager(kernel_name=installed_kernel)
    with pytest.raises(Exception, match=r"gone\.tar\.zst does not exist; check the path, or reinstall"):
        await km.start_kernel()
