"""``kernelprov pack``'s ``.tar.zst``: conda-pack's members, written as independent zstd frames.

The archive must hold exactly what conda-pack's own packer puts in a tar (members, modes, link
targets, rewritten shebangs, ``conda-unpack``), be read by every zstd reader as one stream — the
stage engine, ``zstd -d``, ``pzstd -d`` and ``tarfile`` over zstandard, as a conda-pack user would
read it — and stage through the real engine into a relocated tree.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from kernelprov.engine.formats import detect_format
from kernelprov.engine.manifest import read_manifest
from kernelprov.engine.pack import MultiFrameZstdWriter, pack_env
from kernelprov.engine.stage import ensure_staged

SKIPPABLE = struct.pack("<I", 0x184D2A50)


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every zstd frame, walked through the skippable frames that hold sizes."""
    frames, offset = [], 0
    while offset < len(data):
        magic, length, size = struct.unpack_from("<III", data, offset)
        assert magic == 0x184D2A50 and length == 4
        frames.append((offset + 12, size))
        offset += 12 + size
    assert offset == len(data)
    return frames


def test_writer_makes_independent_frames_that_read_as_one_stream():
    data = os.urandom(100_000) + b"abc" * 200_000 + os.urandom(5)
    out = io.BytesIO()
    with MultiFrameZstdWriter(out, frame_bytes=64 * 1024, threads=2) as writer:
        for start in range(0, len(data), 10_000):  # writes that straddle frame boundaries
            writer.write(data[start:start + 10_000])
        assert writer.tell() == len(data)
    compressed = out.getvalue()
    frames = _frames(compressed)
    assert len(frames) == -(-len(data) // (64 * 1024))
    # every frame decompresses on its own (what a parallel reader does) ...
    parts = [zstandard.ZstdDecompressor().decompress(compressed[o:o + n]) for o, n in frames]
    assert b"".join(parts) == data
    assert all(len(p) == 64 * 1024 for p in parts[:-1])
    # ... and the whole file is one stream to the engine's reader
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True)
    assert reader.read() == data


def test_writer_of_nothing_is_a_valid_empty_stream():
    out = io.BytesIO()
    MultiFrameZstdWriter(out).close()
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue()), read_across_frames=True)
    assert reader.read() == b""


@pytest.fixture(scope="module")
def packed(tiny_env, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny env packed by ``pack_env`` as .tar.zst, and by conda-pack itself as plain .tar."""
    import conda_pack

    out = tmp_path_factory.mktemp("multiframe")
    archive = out / "tiny.tar.zst"
    pack_env(archive, prefix=tiny_env)
    reference = out / "reference.tar"
    conda_pack.pack(prefix=str(tiny_env), output=str(reference), format="tar")
    return archive, reference


def _members(tar: tarfile.TarFile) -> dict[str, tuple]:
    found = {}
    for member in tar:
        data = tar.extractfile(member).read() if member.isfile() else None
        found[member.name] = (member.type, member.mode, member.linkname, data)
    return found


def test_pack_writes_exactly_conda_packs_members_in_frames(packed):
    archive, reference = packed
    assert archive.read_bytes().startswith(SKIPPABLE)
    assert detect_format(archive) == "tar.zst"
    assert read_manifest(archive).format == "tar.zst"
    # conda-pack users read .tar.zst with tarfile over zstandard: the same members as its own tar
    with open(archive, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            ours = _members(tar)
    with tarfile.open(reference) as tar:
        theirs = _members(tar)
    assert ours == theirs
    assert "bin/conda-unpack" in ours


@pytest.mark.parametrize("tool", ["zstd", "pzstd"])
def test_command_line_tools_read_it(packed, tool, tmp_path):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    archive, reference = packed
    argv = [tool, "-d", "-c", str(archive)] + (["-p", "2"] if tool == "pzstd" else [])
    data = subprocess.run(argv, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar, tarfile.open(reference) as theirs:
        assert _members(tar) == _members(theirs)


def test_the_stage_engine_stages_it_relocated(packed, cache_root):
    archive, _ = packed
    staged = ensure_staged(archive)
    assert staged.extracted
    prefix = staged.prefix
    assert (prefix / "etc/tiny.conf").read_text() == f"prefix={prefix}\ndata={prefix}/share/tiny\n"
    assert (prefix / "lib/libtiny.so").read_bytes().startswith(b"\x7fELF\x00\x00" + f"{prefix}/lib\x00".encode())
    out = subprocess.run([prefix / "bin/hello"], capture_output=True, text=True, check=True).stdout
    assert out == f"hello from {prefix}\n"
    assert ensure_staged(archive).extracted is False
