"""Relocation equals conda-unpack, and never leaves bytecode of the unrelocated sources in force.

Guarantees proven here: (1) a staged env is entry for entry what GNU tar plus the archive's own
``bin/conda-unpack`` make of the same archive — types, bytes, link targets and modes, read-only
files included; (2) every file relocation rewrites gets a new mtime (the others keep theirs), so
a ``.pyc`` compiled from the unrelocated source is stale even when the staged prefix has the same
length as the packed one, while the bytecode of every other source stays valid.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import py_compile
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kernelprov.engine import cache
from kernelprov.engine.relocate import read_prefix_records, relocate
from kernelprov.engine.stage import ensure_staged

from .tiny_env import SITE_PACKAGES, build_relocation_env, conda_pack_each
from .trees import tree

FORMATS = ("tar.gz", "tar.zst")


@pytest.fixture(scope="module")
def relocation_env(tmp_path_factory) -> Path:
    """The relocation env, at a prefix long enough to leave room for any test's cache path."""
    return build_relocation_env(tmp_path_factory.mktemp("reloc") / ("relocation-env-" + "x" * 150))


@pytest.fixture(scope="module")
def relocation_archives(relocation_env, tmp_path_factory) -> dict[str, Path]:
    """The relocation env packed by the real conda-pack (it rewrites shebangs, classifies pip files)."""
    return conda_pack_each(relocation_env, tmp_path_factory.mktemp("reloc-archives") / "reloc", FORMATS)


def pyc_is_valid(source: Path) -> bool:
    """Would Python use ``source``'s timestamp ``.pyc``? (importlib's own check: mtime and size.)"""
    header = Path(importlib.util.cache_from_source(str(source))).read_bytes()[:16]
    st = source.stat()
    return (int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF)


def import_value(site: Path, module: str, attribute: str) -> str:
    """Import ``module`` from ``site`` in a fresh interpreter (the one that compiled its .pyc)."""
    code = f"import sys; sys.path.insert(0, sys.argv[1]); import {module}; print({module}.{attribute})"
    return subprocess.run([sys.executable, "-I", "-B", "-c", code, str(site)], capture_output=True, text=True, check=True).stdout.strip()


def test_same_length_prefix_does_not_keep_stale_bytecode(relocation_env, relocation_archives, tmp_path, monkeypatch):
    # The danger case: an equal-length prefix keeps every source's size, so only the mtime can
    # tell Python that relocmod's .pyc (which holds the packed prefix) no longer matches.
    archive = relocation_archives["tar.gz"]
    tail = f"/kernelprov-{pwd.getpwuid(os.getuid()).pw_name}/{cache.archive_key(archive, archive.stat())}"
    padding = len(str(relocation_env)) - len(str(tmp_path)) - 1 - len(tail)
    assert 0 < padding < 255
    root = tmp_path / ("c" * padding)
    monkeypatch.setenv("KERNELPROV_CACHE_DIR", str(root))
    monkeypatch.setenv("KERNELPROV_IMAGE_ROOT", str(tmp_path / "images"))

    prefix = ensure_staged(archive).prefix

    assert len(str(prefix)) == len(str(relocation_env))
    site = prefix / SITE_PACKAGES
    assert (site / "relocmod.py").stat().st_size == (relocation_env / SITE_PACKAGES / "relocmod.py").stat().st_size
    assert import_value(site, "relocmod", "PREFIX") == str(prefix)
    assert import_value(site, "pipmod", "HOME") == str(prefix)  # pip-installed: relocated by conda-pack's "unknown" record
    assert not pyc_is_valid(site / "relocmod.py")
    # Only rewritten sources recompile: an untouched module's bytecode is still used.
    assert pyc_is_valid(site / "plainmod.py")
    assert (site / "plainmod.py").stat().st_mtime == (relocation_env / SITE_PACKAGES / "plainmod.py").stat().st_mtime


@pytest.mark.skipif(not shutil.which("tar") or not shutil.which("zstd"), reason="needs GNU tar and zstd")
@pytest.mark.parametrize("fmt", FORMATS)
def test_staged_tree_equals_gnu_tar_plus_conda_unpack(fmt, relocation_archives, cache_root):
    archive = relocation_archives[fmt]
    with _open_tar(archive) as tf:
        packed = {m.name: m for m in tf.getmembers()}
        packed_bytes = {m.name: tf.extractfile(m).read() for m in packed.values() if m.isfile()}
    records = read_prefix_records(packed_bytes["bin/conda-unpack"], archive)
    # The env exercises every kind of record: text and binary, read-only, pip-installed, and
    # shebangs that conda-pack rewrote at pack time (so they have no record at all).
    modes = {path: mode for path, _, mode in records}
    assert {"text", "binary"} <= set(modes.values())
    assert modes["etc/reloc-readonly.conf"] == "text" and packed["etc/reloc-readonly.conf"].mode & 0o777 == 0o444
    assert modes[f"{SITE_PACKAGES}/pipmod/__init__.py"] == "text"
    assert "bin/reloc-tool" not in modes and packed_bytes["bin/reloc-tool"].startswith(b"#!/usr/bin/env python3\n")
    assert "bin/pipmod-run" not in modes and packed_bytes["bin/pipmod-run"].startswith(b"#!/usr/bin/env python3\n")
    assert modes["bin/reloc-tool2"] == "text"  # two prefixes in it: conda-pack leaves it to conda-unpack

    prefix = ensure_staged(archive).prefix
    ours = tree(prefix)
    # The reference at the very same path, so that bytes compare without any substitution.
    prefix.rename(f"{prefix}.kernelprov")
    prefix.mkdir()
    subprocess.run(["tar", "--same-permissions", "-xf", str(archive), "-C", str(prefix)], check=True)
    # conda-unpack's shebang is `#!/usr/bin/env python`, and this env has no python of its own:
    # run it with the test interpreter (it needs only the standard library); -B keeps it from
    # leaving bytecode of its progress module in bin/.
    subprocess.run([sys.executable, "-B", "-s", str(prefix / "bin/conda-unpack")], check=True)
    theirs = tree(prefix)

    assert sorted(ours) == sorted(theirs)
    for name in sorted(theirs):
        assert ours[name][:3] == theirs[name][:3], f"{name}: kernelprov {ours[name][:2]} vs conda-unpack {theirs[name][:2]}"
    # mtimes: a rewritten file is newer than its archive member (in both trees), any other keeps it.
    rewritten = {name for name, entry in theirs.items() if entry[0] == "file" and entry[2] != packed_bytes[name]}
    assert {"etc/reloc-readonly.conf", "lib/libreloc.so", f"{SITE_PACKAGES}/relocmod.py", "bin/reloc-tool2"} <= rewritten
    assert "share/reloc/moved-on.txt" not in rewritten  # recorded, but its placeholder is gone
    for name, entry in ours.items():
        if entry[0] != "file":
            continue
        member_seconds = int(packed[name].mtime)
        if name in rewritten:
            assert entry[3] // 10**9 > member_seconds and theirs[name][3] // 10**9 >= member_seconds, name
        else:
            # (to the microsecond: the tar reader keeps a pax mtime as a float, GNU tar to the ns)
            assert abs(entry[3] - theirs[name][3]) < 1000 and entry[3] // 10**9 == member_seconds, name


def _open_tar(archive: Path) -> tarfile.TarFile:
    """The archive as a random-access TarFile (this Python's tarfile cannot read zstd itself)."""
    if archive.suffix != ".zst":
        return tarfile.open(archive)
    import io

    import zstandard

    with open(archive, "rb") as f:
        return tarfile.open(fileobj=io.BytesIO(zstandard.ZstdDecompressor().stream_reader(f).read()))


# Unit checks of relocate() itself, on hand-made trees.

def _relocate(root: Path, records, new_prefix: str = "/new") -> int:
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    return relocate(root, new_prefix, records, files=files, archive=root / "fake.tar")


@pytest.mark.parametrize("mode", [0o444, 0o400, 0o555, 0o000])
def test_a_file_without_owner_write_keeps_its_exact_mode(tmp_path, mode):
    target = tmp_path / "etc/conf"
    target.parent.mkdir()
    target.write_bytes(b"at /old/prefix\n")
    target.chmod(mode)

    assert _relocate(tmp_path, [("etc/conf", "/old/prefix", "text")]) == 1

    assert stat.S_IMODE(target.stat().st_mode) == mode
    target.chmod(0o644)
    assert target.read_bytes() == b"at /new\n"


_AS_USER = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from kernelprov.engine.relocate import relocate
root = Path(sys.argv[2])
print(relocate(root, "/new", [("etc/conf", "/old/prefix", "text")], files={"etc/conf"}, archive=root / "fake.tar"))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root to run as another user")
def test_a_read_only_file_is_relocated_by_an_ordinary_user(tmp_path):
    # Root ignores mode bits; an ordinary user's relocation must make the file writable itself
    # (and only for the rewrite). Debian's python runs a world-readable copy of the engine.
    import tempfile

    import kernelprov

    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="kernelprov-relocate-", dir="/tmp"))
    try:
        top.chmod(0o755)
        shutil.copytree(Path(kernelprov.__file__).parent, top / "lib/kernelprov",
                        ignore=shutil.ignore_patterns("__pycache__", "labextension", "jupyter", "cli"))
        subprocess.run(["chmod", "-R", "a+rX", str(top / "lib")], check=True)
        target = top / "env/etc/conf"
        target.parent.mkdir(parents=True)
        target.write_bytes(b"at /old/prefix\n")
        target.chmod(0o444)
        for path in (top / "env", target.parent, target):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)

        out = subprocess.run(["/usr/bin/python3", "-I", "-B", "-c", _AS_USER, str(top / "lib"), str(top / "env")],
                             user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True)

        assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
        assert target.read_bytes() == b"at /new\n" and stat.S_IMODE(target.stat().st_mode) == 0o444
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_an_unchanged_record_keeps_its_mtime_and_a_fresh_one_moves_on(tmp_path):
    untouched, fresh = tmp_path / "untouched", tmp_path / "fresh.py"
    untouched.write_bytes(b"nothing to replace\n")
    os.utime(untouched, (1_600_000_000, 1_600_000_000))
    fresh.write_bytes(b"P = '/old/prefix'\n")  # written this very second, like a just-built env
    before = fresh.stat().st_mtime_ns

    assert _relocate(tmp_path, [("untouched", "/old/prefix", "text"), ("fresh.py", "/old/prefix", "text")], "/new/prefix") == 1

    assert untouched.stat().st_mtime == 1_600_000_000
    assert fresh.read_bytes() == b"P = '/new/prefix'\n"  # same size: only the mtime can tell
    assert fresh.stat().st_mtime_ns // 10**9 > before // 10**9  # a whole second on: a .pyc records seconds


def test_hard_links_share_the_rewrite_as_with_conda_unpack(tmp_path):
    (tmp_path / "a").write_bytes(b"/old/prefix\n")
    os.link(tmp_path / "a", tmp_path / "b")

    _relocate(tmp_path, [("a", "/old/prefix", "text")])

    assert (tmp_path / "b").read_bytes() == b"/new\n" and (tmp_path / "a").stat().st_ino == (tmp_path / "b").stat().st_ino


def test_unchecked_hash_bytecode_of_a_rewritten_source_is_dropped(tmp_path):
    # Python never checks an unchecked hash-based .pyc against its source (PEP 552): kept, it
    # would run the unrelocated code forever. Timestamp and checked ones go stale by themselves.
    modes = {"unchecked": py_compile.PycInvalidationMode.UNCHECKED_HASH,
             "checked": py_compile.PycInvalidationMode.CHECKED_HASH,
             "stamped": py_compile.PycInvalidationMode.TIMESTAMP,
             "other": py_compile.PycInvalidationMode.UNCHECKED_HASH}
    for name, mode in modes.items():
        source = tmp_path / f"{name}.py"
        source.write_text("P = '/old/prefix'\n" if name != "other" else "P = 1\n")
        py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True, invalidation_mode=mode)
    records = [(f"{name}.py", "/old/prefix", "text") for name in modes]

    _relocate(tmp_path, records)

    left = {p.name.split(".")[0] for p in (tmp_path / "__pycache__").iterdir()}
    assert left == {"checked", "stamped", "other"}

