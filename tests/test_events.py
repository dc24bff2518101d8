"""Guarantee: a kernel start reports its staging on jupyter_server's event bus — what JupyterLab
subscribes to at ``/api/events/subscribe`` — as started, progress, then finished or failed; a stage
that another process runs is reported from that process's progress record; and a stage that fails
is not retried by the restarter.

Like tests/test_routes.py, the tests are synchronous and drive the server's own event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 — the server fixtures, for this module only

from kernelprov.cli.app import main
from kernelprov.engine import inventory
from kernelprov.engine.manifest import manifest_for, write_manifest
from kernelprov.jupyter.events import STAGING_SCHEMA_ID, event_logger_of

from .test_progress import _SLOW_STAGE, big_archive  # noqa: F401 — the fixture, shared


@pytest.fixture
def jp_server_config(cache_root):
    """The server with our extension and a restarter that polls often (the restart test)."""
    return {"ServerApp": {"jpserver_extensions": {"kernelprov": True}},
            "KernelRestarter": {"time_to_dead": 0.5}}


@pytest.fixture
def bus(jp_serverapp, jp_ws_fetch, jp_asyncio_loop):
    """A subscriber of ``/api/events/subscribe``, as JupyterLab's: ``bus.until(test)`` reads the
    kernelprov staging events until ``test(event)`` holds, and returns them all."""

    class Bus:
        def __init__(self):
            self.socket = jp_asyncio_loop.run_until_complete(jp_ws_fetch("api", "events", "subscribe"))
            self.events: list[dict] = []

        def until(self, test, timeout: float = 60.0) -> list[dict]:
            async def read():
                while not self.events or not test(self.events[-1]):
                    message = await self.socket.read_message()
                    assert message is not None, "the event socket closed"
                    event = json.loads(message)  # the event's data and its schema_id
                    if event["schema_id"] == STAGING_SCHEMA_ID:
                        self.events.append(event)
                return self.events

            return jp_asyncio_loop.run_until_complete(asyncio.wait_for(read(), timeout))

        def quiet_for(self, seconds: float) -> list[dict]:
            """Read whatever staging events come within ``seconds``."""
            try:
                self.until(lambda event: False, timeout=seconds)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            return self.events

    bus = Bus()
    yield bus
    bus.socket.close()


@pytest.fixture
def kernels(jp_fetch, jp_asyncio_loop):
    """``kernels.start(name) -> (status, reply)`` through ``POST /api/kernels``; every started
    kernel is shut down at the end."""

    class Kernels:
        started: list[str] = []

        def start(self, name: str):
            response = jp_asyncio_loop.run_until_complete(jp_fetch(
                "api", "kernels", method="POST", body=json.dumps({"name": name}), raise_error=False))
            reply = json.loads(response.body)
            if response.code == 201:
                self.started.append(reply["id"])
            return response.code, reply

        def listed(self) -> set[str]:
            response = jp_asyncio_loop.run_until_complete(jp_fetch("api", "kernels"))
            return {k["id"] for k in json.loads(response.body)}

    kernels = Kernels()
    yield kernels
    for kernel_id in kernels.started:
        jp_asyncio_loop.run_until_complete(jp_fetch("api", "kernels", kernel_id, method="DELETE", raise_error=False))


def _install(name: str, archive: Path, display_name: str) -> None:
    assert main(["install", name, "--archive", str(archive), "--display-name", display_name]) == 0


def test_the_server_knows_the_schema_before_any_kernel_starts(jp_serverapp):
    event_logger = event_logger_of(jp_serverapp)
    assert STAGING_SCHEMA_ID in event_logger.schemas
    assert event_logger.schemas.get(STAGING_SCHEMA_ID).version == "1"


def test_a_cold_start_reports_started_progress_finished(bus, kernels, tiny_archives, copy_archive, cache_root, capsys):
    archive = copy_archive(tiny_archives["tar.zst"])
    _install("tiny", archive, "Tiny (events)")
    capsys.readouterr()

    status, reply = kernels.start("tiny")
    assert status == 201, reply
    events = bus.until(lambda event: event["action"] in ("finished", "failed"))

    actions = [e["action"] for e in events]
    assert actions[0] == "started" and actions[-1] == "finished" and set(actions[1:-1]) == {"progress"}, actions
    identity = {"archive": str(archive), "kernel_id": reply["id"], "kernel_name": "tiny", "display_name": "Tiny (events)"}
    for event in events:
        assert {k: event.get(k) for k in identity} == identity
    last = events[-2]
    assert last["done"] == last["total"] == archive.stat().st_size and last["fraction"] == 1.0 and last["eta"] == 0
    assert events[-1]["outcome"] == "unpacked" and events[-1]["seconds"] >= 0

    # a second kernel reuses the env: started, finished, nothing to report in between
    del bus.events[:]
    status, reply = kernels.start("tiny")
    assert status == 201, reply
    events = bus.until(lambda event: event["action"] in ("finished", "failed"))
    assert [e["action"] for e in events] == ["started", "finished"] and events[-1]["outcome"] == "reused"


def test_stage_now_reports_on_the_bus_like_a_kernel_start(bus, jp_fetch, jp_asyncio_loop, tiny_archives, copy_archive,
                                                           capsys):
    archive = copy_archive(tiny_archives["tar.zst"], "panel.tar.zst")
    _install("panel", archive, "Panel (events)")
    capsys.readouterr()

    reply = jp_asyncio_loop.run_until_complete(jp_fetch("kernelprov", "envs", "panel", "stage", method="POST", body=b""))
    assert reply.code == 202
    events = bus.until(lambda event: event["action"] in ("finished", "failed"))

    actions = [e["action"] for e in events]
    assert actions[0] == "started" and actions[-1] == "finished" and events[-1]["outcome"] == "unpacked", events
    for event in events:  # no kernel: the panel's own stage, named by its kernel
        assert "kernel_id" not in event and event["kernel_name"] == "panel" and event["display_name"] == "Panel (events)"


def test_a_failed_start_reports_its_message(bus, kernels, tiny_archives, copy_archive, capsys):
    archive = copy_archive(tiny_archives["tar.gz"], "gone.tar.gz")
    _install("gone", archive, "Gone (events)")
    archive.unlink()
    capsys.readouterr()

    status, reply = kernels.start("gone")
    assert status == 500
    events = bus.until(lambda event: event["action"] in ("finished", "failed"))
    assert [e["action"] for e in events] == ["started", "failed"]
    assert events[-1]["message"] == reply["message"] and "Gone (events)" in reply["message"]


def test_a_start_waiting_for_another_process_reports_its_progress(bus, kernels, big_archive, cache_root, capsys):
    # A job prologue's `kernelprov unpack` (here a slowed-down stage in a child process) holds the
    # archive's lock; the kernel start waits for it and relays the progress it publishes.
    write_manifest(big_archive, manifest_for(big_archive))
    _install("big", big_archive, "Big (events)")
    capsys.readouterr()
    with open(f"{big_archive}.stderr", "wb") as stderr:
        prologue = subprocess.Popen([sys.executable, "-c", _SLOW_STAGE, str(big_archive), "0.4"],
                                    stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while inventory.staging_progress(big_archive) is None:
            assert prologue.poll() is None and time.monotonic() < deadline, Path(f"{big_archive}.stderr").read_text()
            time.sleep(0.05)

        status, reply = kernels.start("big")
        assert status == 201, reply
        events = bus.until(lambda event: event["action"] in ("finished", "failed"))
    finally:
        assert prologue.wait(timeout=60) == 0, Path(f"{big_archive}.stderr").read_text()

    assert events[0]["action"] == "started" and events[-1]["action"] == "finished"
    assert events[-1]["outcome"] == "reused"  # the prologue unpacked it
    progress = [e for e in events if e["action"] == "progress"]
    assert len(progress) >= 2, events
    done = [e["done"] for e in progress]
    assert done == sorted(done) and len(set(done)) == len(done), done
    assert {e["total"] for e in progress} == {big_archive.stat().st_size}
    # (the socket's messages carry no time stamp, and arrive bunched: the test drives the loop)
    elapsed = [e["elapsed"] for e in progress]
    assert all(b - a >= 0.9 for a, b in zip(elapsed, elapsed[1:])), f"progress comes at most once a second: {elapsed}"
    assert all(e["eta"] is None or e["eta"] >= 0 for e in progress)
    assert all(0 <= e["fraction"] <= 1 and e["elapsed"] > 0 for e in progress)


def test_a_restart_whose_archive_broke_is_staged_once_and_not_retried(bus, kernels, runnable_archive, copy_archive,
                                                                      jp_serverapp, kernel_environ, capsys):
    archive = copy_archive(runnable_archive, "restart.tar.zst")
    _install("restart", archive, "Restart (events)")
    capsys.readouterr()
    status, reply = kernels.start("restart")
    assert status == 201, reply
    kernel_id = reply["id"]
    bus.until(lambda event: event["action"] == "finished")
    manager = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    bus.quiet_for(3.0)  # alive a while: the restarter watches it
    assert manager.provisioner.process.poll() is None

    # The archive is re-copied badly (cut short, a new mtime: a new version), and the kernel dies.
    del bus.events[:]
    with open(archive, "r+b") as f:
        f.truncate(archive.stat().st_size // 2)
    os.killpg(manager.provisioner.process.pid, signal.SIGKILL)

    events = bus.until(lambda event: event["action"] in ("finished", "failed"))
    assert [e["action"] for e in events] == ["started", "failed"]
    assert "Restart (events)" in events[-1]["message"]
    # Polled every 0.5 s, the restarter would have tried again several times by now.
    events = bus.quiet_for(4.0)
    assert [e["action"] for e in events] == ["started", "failed"], "a failed stage was retried"
    assert kernel_id not in kernels.listed(), "the server was told the kernel is dead"
    kernels.started.remove(kernel_id)


async def test_restarting_an_unchanged_broken_archive_fails_at_once(runnable_archive, copy_archive, kernel_environ,
                                                                    cache_root, caplog, capsys):
    # Without a server (plain jupyter_client: no event bus, no restarter callbacks), a caller
    # that restarts again and again gets the same message, and the archive is read only once.
    from jupyter_client.manager import AsyncKernelManager

    from kernelprov.jupyter.provisioner import KernelStartError

    archive = copy_archive(runnable_archive, "again.tar.zst")
    _install("again", archive, "Again (events)")
    capsys.readouterr()
    km = AsyncKernelManager(kernel_name="again")
    await km.start_kernel()
    try:
        assert event_logger_of(km) is None
        with open(archive, "r+b") as f:
            f.truncate(archive.stat().st_size // 2)
        caplog.set_level(logging.INFO)
        caplog.clear()
        messages = []
        for _attempt in range(3):
            with pytest.raises(KernelStartError) as failed:
                await km.restart_kernel(now=True)
            messages.append(str(failed.value))
        assert len(set(messages)) == 1 and "Again (events)" in messages[0]
        staged = [r for r in caplog.records if r.getMessage().startswith("kernelprov: staging")]
        assert len(staged) == 1, "an unchanged broken archive was staged again"

        # a fixed archive (a new version) is staged again at the next restart
        shutil.copy2(runnable_archive, archive)
        await km.restart_kernel(now=True)
        assert km.provisioner.staged_env is not None and not km.provisioner.staged_env.extracted
    finally:
        await km.shutdown_kernel(now=True)
