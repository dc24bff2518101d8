"""Guarantee: a kernel start that fails shows, in JupyterLab's "Error Starting Kernel" dialog —
the ``message`` of the ``POST /api/sessions`` reply — one sentence saying what failed and what
to do, through a real jupyter_server and the real provisioner."""

from __future__ import annotations

import json

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 — the server fixtures, for this module only

from kernelprov.cli.app import main

from .archive_damage import corrupt_mid_stream


@pytest.fixture
def broken_kernels(kernel_environ, tiny_archives, copy_archive, capsys):
    """Kernels whose archive is gone, cut short, or damaged in the middle (same size, so its
    manifest's size check passes and the zstd stream fails while it is being unpacked);
    installed before the server starts."""
    missing = copy_archive(tiny_archives["tar.gz"], "gone.tar.gz")
    corrupt = copy_archive(tiny_archives["tar.zst"], "corrupt.tar.zst")
    damaged = copy_archive(tiny_archives["tar.zst"], "damaged.tar.zst")
    assert main(["install", "gone", "--archive", str(missing)]) == 0
    assert main(["install", "corrupt", "--archive", str(corrupt)]) == 0
    assert main(["install", "damaged", "--archive", str(damaged)]) == 0
    missing.unlink()
    with open(corrupt, "r+b") as f:
        f.truncate(corrupt.stat().st_size // 2)
    corrupt_mid_stream(damaged, "tar.zst")
    capsys.readouterr()
    return {"gone": missing, "corrupt": corrupt, "damaged": damaged}


def _start_session(jp_fetch, loop, kernel: str):
    body = json.dumps({"path": f"{kernel}.ipynb", "type": "notebook", "name": "", "kernel": {"name": kernel}})
    response = loop.run_until_complete(jp_fetch("api", "sessions", method="POST", body=body, raise_error=False))
    return response.code, json.loads(response.body)


@pytest.mark.parametrize("kernel, expected", [
    ("gone", "The environment archive {archive} does not exist; check the path, or reinstall the kernel with `kernelprov install`."),
    ("corrupt", "{archive} is {size} bytes but its manifest records {recorded}; it may be incomplete or still being "
                "copied — wait for the copy to finish or re-create it with `kernelprov pack`."),
    ("damaged", "{archive} is truncated or corrupt (its zstd data is damaged); re-copy it, or re-create it with `kernelprov pack`."),
])
def test_error_starting_kernel_shows_one_actionable_sentence(kernel, expected, broken_kernels, jp_fetch, jp_asyncio_loop,
                                                              cache_root):
    archive = broken_kernels[kernel]
    details = {"archive": archive}
    if kernel == "corrupt":
        manifest = json.loads(archive.with_name(archive.name + ".manifest.json").read_text())
        details.update(size=archive.stat().st_size, recorded=manifest["size"])

    status, reply = _start_session(jp_fetch, jp_asyncio_loop, kernel)

    assert status == 500
    assert reply["message"] == expected.format(**details)
    assert not reply.get("traceback")
    assert not list(cache_root.glob("kernelprov-*/.staging-*")), "nothing half-made may stay behind"
