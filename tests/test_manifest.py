"""The manifest sidecar is validated: a bad one is one sentence naming the file, for that env only.

Guarantee: whatever a ``.manifest.json`` holds (not JSON, a list, a wrong-typed field, a huge
file), kernelprov refuses it with one :class:`ArchiveError` sentence naming it; the panel's
``GET /kernelprov/envs`` still lists every other kernel and shows that sentence as the bad one's
problem, and ``kernelprov doctor`` reports it instead of crashing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 — the server fixtures, for this module only

from kernelprov.cli.app import main
from kernelprov.engine.manifest import MAX_MANIFEST_BYTES, Manifest, manifest_path, read_manifest, write_manifest
from kernelprov.errors import ArchiveError

GOOD = {
    "kernelprov_manifest": 1, "format": "tar.zst", "size": 1234, "sha256": "ab" * 32, "members": 10,
    "unpacked_bytes": 5678, "python_version": "3.11.7", "packages": 3, "source_prefix": "/envs/x",
    "dest_prefix": None, "created": 1_700_000_000.5,
}


def _with(**changes) -> dict:
    data = dict(GOOD)
    for key, value in changes.items():
        if value is _MISSING:
            del data[key]
        else:
            data[key] = value
    return data


_MISSING = object()

BAD_SHAPES = {
    "a JSON list": ([GOOD], "holds a JSON list, not an object"),
    "a JSON string": ("tar.zst", "holds a JSON string, not an object"),
    "JSON null": (None, "holds a JSON null, not an object"),
    "no size": (_with(size=_MISSING), "has no 'size' field"),
    "no sha256": (_with(sha256=_MISSING), "has no 'sha256' field"),
    "size as text": (_with(size="1234"), "'size' = \"1234\", which should be a byte count"),
    "negative size": (_with(size=-1), "'size' = -1"),
    "size as a boolean": (_with(size=True), "'size' = true"),
    "size as a float": (_with(size=12.5), "'size' = 12.5"),
    "null size": (_with(size=None), "'size' = null"),
    "sha256 as a number": (_with(sha256=1234), "'sha256' = 1234, which should be 64 hexadecimal digits"),
    "sha256 not hex": (_with(sha256="z" * 64), "'sha256' = \"zzzz"),
    "unknown format": (_with(format="rar"), "'format' = \"rar\", which should be one of tar.zst"),
    "format as a list": (_with(format=["tar.zst"]), "'format' = [\"tar.zst\"]"),
    "members as text": (_with(members="10"), "'members' = \"10\""),
    "unpacked bytes as a dict": (_with(unpacked_bytes={"a": 1}), "'unpacked_bytes' = {\"a\": 1}"),
    "packages as a float": (_with(packages=3.0), "'packages' = 3.0"),
    "pip packages as text": (_with(pip_packages="2"), "'pip_packages' = \"2\", which should be a package count"),
    "negative pip packages": (_with(pip_packages=-1), "'pip_packages' = -1"),
    "pip packages as a boolean": (_with(pip_packages=False), "'pip_packages' = false"),
    "python version as a number": (_with(python_version=3.11), "'python_version' = 3.11"),
    "dest prefix as a number": (_with(dest_prefix=5), "'dest_prefix' = 5"),
    "created as text": (_with(created="yesterday"), "'created' = \"yesterday\""),
    "a long bad value": (_with(source_prefix=["x" * 500]), "'source_prefix' = [\"xxx"),
}


def _write(tmp_path: Path, data) -> Path:
    archive = tmp_path / "env.tar.zst"
    archive.write_bytes(b"")
    manifest_path(archive).write_text(json.dumps(data))
    return archive


def _one_sentence(message: str, archive: Path) -> None:
    assert str(manifest_path(archive)) in message
    assert "\n" not in message and message.endswith(".") and len(message) < 400
    assert "re-create it with `kernelprov pack`" in message


@pytest.mark.parametrize("shape", BAD_SHAPES)
def test_each_bad_shape_is_one_sentence_naming_the_file(shape, tmp_path):
    data, expected = BAD_SHAPES[shape]
    archive = _write(tmp_path, data)

    with pytest.raises(ArchiveError) as caught:
        read_manifest(archive)

    _one_sentence(str(caught.value), archive)
    assert expected in str(caught.value)


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    (b'{"kernelprov_manifest": 1, "size": NaN}', "is not valid JSON (NaN is not a number)"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
    (b" " * (MAX_MANIFEST_BYTES + 1), "is larger than 1 MiB"),
])
def test_unparsable_or_huge_sidecars_are_refused(content, expected, tmp_path):
    archive = tmp_path / "env.tar.zst"
    manifest_path(archive).write_bytes(content)

    with pytest.raises(ArchiveError, match="The manifest .* " + expected.split(" (")[0]) as caught:
        read_manifest(archive)

    _one_sentence(str(caught.value), archive)
    assert expected in str(caught.value)


def test_a_good_manifest_round_trips_and_tolerates_optional_and_unknown_fields(tmp_path):
    archive = tmp_path / "env.tar.zst"
    archive.write_bytes(b"x")
    manifest = Manifest(format="zip", size=1, sha256="AB" * 32, created=1.5)
    write_manifest(archive, manifest)
    assert read_manifest(archive) == Manifest(format="zip", size=1, sha256="ab" * 32, created=1.5)

    minimal = {"kernelprov_manifest": 1, "format": "tar", "size": 0, "sha256": "0" * 64, "from_the_future": [1]}
    manifest_path(archive).write_text(json.dumps(minimal))
    assert read_manifest(archive) == Manifest(format="tar", size=0, sha256="0" * 64)


def test_pip_packages_round_trips_and_manifests_written_before_it_still_load(tmp_path):
    archive = _write(tmp_path, GOOD)  # as an older kernelprov wrote it: no pip_packages
    older = read_manifest(archive)
    assert older.pip_packages is None and older.packages == 3

    older.pip_packages = 7
    write_manifest(archive, older)
    assert json.loads(manifest_path(archive).read_text())["pip_packages"] == 7
    assert read_manifest(archive) == older


def test_a_foreign_json_object_is_not_a_kernelprov_manifest(tmp_path):
    archive = _write(tmp_path, {"name": "something else"})
    with pytest.raises(ArchiveError, match="is not a kernelprov manifest"):
        read_manifest(archive)


# The consumers: one bad sidecar spoils neither the panel's list nor doctor.

@pytest.fixture
def two_kernels(jp_environ, cache_root, tiny_archives, copy_archive, capsys):
    """Kernels ``good`` and ``bad`` from copies of the tiny archive; ``bad``'s manifest is a JSON list."""
    good = copy_archive(tiny_archives["tar.zst"], "good.tar.zst")
    bad = copy_archive(tiny_archives["tar.gz"], "bad.tar.gz")
    assert main(["install", "good", "--archive", str(good)]) == 0
    assert main(["install", "bad", "--archive", str(bad)]) == 0
    capsys.readouterr()
    manifest_path(bad).write_text(json.dumps([json.loads(manifest_path(bad).read_text())]))
    return good, bad


@pytest.fixture
def jp_server_config(cache_root):
    return {"ServerApp": {"jpserver_extensions": {"kernelprov": True}}}


def test_the_panel_lists_every_kernel_and_names_the_bad_manifest(two_kernels, jp_serverapp, jp_fetch, jp_asyncio_loop):
    _, bad = two_kernels

    response = jp_asyncio_loop.run_until_complete(jp_fetch("kernelprov", "envs", method="GET", raise_error=False))

    assert response.code == 200, response.body
    listed = {env["name"]: env for env in json.loads(response.body)["envs"]}
    assert listed["good"]["problems"] == [] and listed["good"]["format"] == "tar.zst"
    [problem] = listed["bad"]["problems"]
    assert problem.startswith(f"The manifest {manifest_path(bad)} holds a JSON list, not an object;")
    assert listed["bad"]["format"] == "tar.gz"  # still described, from the archive's first bytes


def test_doctor_reports_the_bad_manifest_and_checks_the_others(two_kernels, cli):
    _, bad = two_kernels

    status, out, err = cli("doctor", "--no-hash")

    assert status == 1 and "Traceback" not in out + err
    assert "FIX its manifest cannot be used" in out
    assert f"-> The manifest {manifest_path(bad)} holds a JSON list, not an object;" in out
    good_section = out.split("kernel 'good'")[1].split("kernel '")[0]
    assert "FIX" not in good_section
