"""Guarantee: a kernel start that fails shows, in JupyterLab's "Error Starting Kernel" dialog —
the ``message`` of the ``POST /api/sessions`` reply — one sentence saying what failed and what
to do, through a real jupyter_server and the real provisioner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 — the server fixtures, for this module only

from kernelprov.cli.app import main
from kernelprov.errors import human_size

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
    ("gone", "Python (gone) could not be unpacked: the archive is missing. The environment archive {archive} does not "
             "exist; check the path, or reinstall the kernel with `kernelprov install`."),
    ("corrupt", "Python (corrupt) could not be unpacked: the archive is incomplete. {archive} is {size} but its manifest "
                "records {recorded}; it may be incomplete or still being copied — wait for the copy to finish or "
                "re-create it with `kernelprov pack`."),
    ("damaged", "Python (damaged) could not be unpacked: the archive is damaged. {archive} is truncated or corrupt "
                "(its zstd data is damaged); re-copy it, or re-create it with `kernelprov pack`."),
])
def test_error_starting_kernel_shows_one_actionable_sentence(kernel, expected, broken_kernels, jp_fetch, jp_asyncio_loop,
                                                              cache_root):
    archive = broken_kernels[kernel]
    details = {"archive": archive}
    if kernel == "corrupt":
        manifest = json.loads(archive.with_name(archive.name + ".manifest.json").read_text())
        details.update(size=human_size(archive.stat().st_size), recorded=human_size(manifest["size"]))

    status, reply = _start_session(jp_fetch, jp_asyncio_loop, kernel)

    assert status == 500
    assert reply["message"] == expected.format(**details)
    assert not reply.get("traceback")
    assert not list(cache_root.glob("kernelprov-*/.staging-*")), "nothing half-made may stay behind"


@pytest.fixture
def failing_kernels(kernel_environ, tiny_archives, copy_archive, capsys):
    """Kernels with display names of their own, whose start fails for four real reasons: the
    archive is gone, cut short, damaged inside, or (its manifest says) far larger unpacked than
    any disk here holds."""
    kinds = {"gone": "tar.gz", "cut": "tar.zst", "damaged": "tar.zst", "huge": "tar.bz2"}
    archives = {}
    for kind, fmt in kinds.items():
        archives[kind] = copy_archive(tiny_archives[fmt], f"{kind}.{fmt}")
        assert main(["install", kind, "--archive", str(archives[kind]), "--display-name", f"Env {kind} (3.11)"]) == 0
    archives["gone"].unlink()
    with open(archives["cut"], "r+b") as f:
        f.truncate(archives["cut"].stat().st_size // 2)
    corrupt_mid_stream(archives["damaged"], "tar.zst")
    manifest_file = Path(f"{archives['huge']}.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["unpacked_bytes"] = 50 * 10**15  # 50 PB: no disk has room, so the space check refuses it
    manifest_file.write_text(json.dumps(manifest))
    capsys.readouterr()
    return archives


@pytest.mark.parametrize("kernel, lead", [
    ("gone", "the archive is missing"),
    ("cut", "the archive is incomplete"),
    ("damaged", "the archive is damaged"),
    ("huge", "the local disk has too little room"),
])
def test_every_start_error_leads_with_a_short_sentence_naming_the_kernel(kernel, lead, failing_kernels, jp_fetch,
                                                                          jp_asyncio_loop):
    status, reply = _start_session(jp_fetch, jp_asyncio_loop, kernel)

    assert status == 500
    message = reply["message"]
    first = message[: message.index(". ") + 1]
    assert first == f"Env {kernel} (3.11) could not be unpacked: {lead}."
    assert len(first) < 80, first
    assert "/" not in first, "no path in the lead sentence"
    assert not re.search(r"\d{7,}", message), f"a raw byte count: {message}"
    archive = failing_kernels[kernel]
    assert (archive.name if kernel == "huge" else str(archive)) in message[len(first):], "the details name the archive"
    if kernel == "huge":
        assert re.search(r"needs about [\d.]+ [kMGTP]?B and [\d,]+ files, but only [\d.]+ [kMGT]?B and [\d,]+ files are free",
                         message), message
