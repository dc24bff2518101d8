"""A tiny conda-format environment for engine tests: packs in well under a second.

It holds a shebang script, a config file and a NUL-terminated "binary" file that contain the
prefix (so relocation has work of all kinds), a relative symlink, an executable, and a file with
an old mtime (so tests can see mtimes survive). :func:`build_relocation_env` adds what a real env
has on top: read-only files, shebangs conda-pack rewrites at pack time, Python sources with their
bytecode, and pip-installed files that no conda record lists. See ../shared/FIXTURES.md for what
conda-pack reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import sys
from pathlib import Path

OLD_MTIME = 1_600_000_000  # 2020-09-13, far from "now" so a lost mtime is obvious


def build_tiny_env(prefix: Path) -> Path:
    """Write the tiny env at ``prefix`` (and its package-cache dir beside it); return prefix."""
    prefix = Path(prefix)
    pkgs = prefix.parent / f"{prefix.name}-pkgs" / "tiny-1.0-0"
    text_files = {
        "bin/hello": f"#!/bin/sh\n# installed in {prefix}\necho hello from {prefix}\n",
        "etc/tiny.conf": f"prefix={prefix}\ndata={prefix}/share/tiny\n",
        "share/tiny/plain.txt": "no prefix here\n",
    }
    binary_files = {"lib/libtiny.so": b"\x7fELF\x00\x00" + str(prefix).encode() + b"/lib\x00tail\x00"}
    records = []
    for rel, content in text_files.items():
        _write(prefix / rel, content.encode())
        records.append((rel, content.encode(), "text" if str(prefix) in content else None))
    for rel, content in binary_files.items():
        _write(prefix / rel, content)
        records.append((rel, content, "binary"))
    os.chmod(prefix / "bin/hello", 0o755)
    # Every conda env has bin/python (kernelprov refuses archives without one); the tiny env's is a
    # stub, unmanaged like a file pip installed: kernels cannot run from it, tests start none.
    _write(prefix / "bin/python", b"#!/bin/sh\necho 'the tiny test env has no real python' >&2\nexit 3\n", 0o755)
    os.utime(prefix / "share/tiny/plain.txt", (OLD_MTIME, OLD_MTIME))
    os.symlink("hello", prefix / "bin/hello-link")

    paths = []
    for rel, content, mode in records:
        entry = {"_path": rel, "path_type": "hardlink", "sha256": hashlib.sha256(content).hexdigest(), "size_in_bytes": len(content)}
        if mode:
            entry.update(prefix_placeholder=str(prefix), file_mode=mode)
        paths.append(entry)
        _write(pkgs / rel, content)
        os.chmod(pkgs / rel, os.stat(prefix / rel).st_mode)
        os.utime(pkgs / rel, ns=(os.stat(prefix / rel).st_atime_ns, os.stat(prefix / rel).st_mtime_ns))
    os.symlink("hello", pkgs / "bin/hello-link")
    paths.append({"_path": "bin/hello-link", "path_type": "softlink", "sha256": "", "size_in_bytes": 5})
    _write(pkgs / "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}).encode())
    record = {
        "name": "tiny", "version": "1.0", "build": "0", "build_number": 0,
        "files": [p["_path"] for p in paths],
        "link": {"source": str(pkgs), "type": 1},
        "url": "https://example.invalid/tiny-1.0-0.tar.bz2", "channel": "local",
    }
    _write(prefix / "conda-meta/tiny-1.0-0.json", json.dumps(record).encode())
    _write(prefix / "conda-meta/history", b"==> 2026-01-01 00:00:00 <==\n# cmd: tiny fixture\n+local::tiny-1.0-0\n")
    return prefix


def _write(path: Path, content: bytes, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.chmod(path, 0o644)  # a read-only copy being rewritten
    path.write_bytes(content)
    if mode is not None:
        os.chmod(path, mode)


#: Where the relocation env keeps its Python modules (a tag of the interpreter running the tests,
#: whose bytecode it holds).
SITE_PACKAGES = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"


def build_relocation_env(prefix: Path) -> Path:
    """The tiny env plus what makes relocation hard, for comparing kernelprov with conda-unpack.

    A second package ``reloc`` holds: a shebang script conda-pack rewrites at pack time (one
    prefix) and one it cannot (two, so it keeps a text record); read-only (0444) files with and
    without the prefix; a binary file with several C strings; a record whose file no longer holds
    its placeholder; and ``relocmod.py`` (the prefix in a string) and ``plainmod.py`` with their
    timestamp-based ``.pyc``. Unmanaged, as ``pip install`` leaves them: a package whose
    ``__init__.py`` holds the prefix (with its ``.pyc``), a dist-info dir, an entry-point script and
    a non-UTF-8 binary, which conda-pack keeps without a record.
    """
    prefix = build_tiny_env(prefix)
    site = SITE_PACKAGES
    text = {
        "bin/reloc-tool": (f"#!{prefix}/bin/python3\nprint('tool')\n", 0o755),
        "bin/reloc-tool2": (f"#!{prefix}/bin/python3 -E\n# data in {prefix}/share\n", 0o755),
        "etc/reloc-readonly.conf": (f"home={prefix}\n", 0o444),
        "share/reloc/readonly.txt": ("read-only, no prefix\n", 0o444),
        "share/reloc/moved-on.txt": ("the placeholder was edited out\n", 0o644),
        f"{site}/relocmod.py": (f"PREFIX = {str(prefix)!r}\n", 0o644),
        f"{site}/plainmod.py": ("VALUE = 42\n", 0o644),
    }
    binary = {"lib/libreloc.so": (b"\x7fELF\x02\x01" + f"{prefix}/lib\x00\xff\xfe{prefix}/share/x:{prefix}/y\x00end".encode(), 0o755)}
    with_prefix = {"bin/reloc-tool", "bin/reloc-tool2", "etc/reloc-readonly.conf", "share/reloc/moved-on.txt", f"{site}/relocmod.py"}
    entries = []
    for rel, (content, mode) in text.items():
        _write(prefix / rel, content.encode(), mode)
        entries.append((rel, "text" if rel in with_prefix else None))
    for rel, (content, mode) in binary.items():
        _write(prefix / rel, content, mode)
        entries.append((rel, "binary"))
    for module in ("relocmod", "plainmod"):
        entries.append((_compile(prefix / site / f"{module}.py"), None))
    _package(prefix, "reloc", entries)

    pip = {  # unmanaged: conda-pack inspects each itself ("unknown" file mode)
        f"{site}/pipmod/__init__.py": (f"HOME = {str(prefix)!r}\n".encode(), 0o644),
        f"{site}/pipmod/data.txt": (f"read-only {prefix}\n".encode(), 0o444),
        f"{site}/pipmod-1.0.dist-info/METADATA": (b"Metadata-Version: 2.1\nName: pipmod\nVersion: 1.0\n", 0o644),
        f"{site}/pipmod-1.0.dist-info/INSTALLER": (b"pip\n", 0o644),
        "bin/pipmod-run": (f"#!{prefix}/bin/python3\nimport pipmod\n".encode(), 0o755),
        "lib/libpipmod.so": (b"\x7fELF\xff\xfe" + f"{prefix}/lib\x00".encode(), 0o755),
    }
    for rel, (content, mode) in pip.items():
        _write(prefix / rel, content, mode)
    _compile(prefix / site / "pipmod/__init__.py")
    return prefix


def _compile(source: Path) -> str:
    """Compile ``source`` as pip and conda do (timestamp-based .pyc); return the .pyc's relative path."""
    import importlib.util

    cfile = Path(importlib.util.cache_from_source(str(source)))
    py_compile.compile(str(source), cfile=str(cfile), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    prefix = next(p for p in source.parents if (p / "conda-meta").is_dir())
    return cfile.relative_to(prefix).as_posix()


def _package(prefix: Path, name: str, entries: list[tuple[str, str | None]]) -> None:
    """Record files already written in ``prefix`` as conda package ``name``: a package-cache copy
    (same bytes, mode and mtime) with ``info/paths.json``, and its ``conda-meta`` record."""
    pkgs = prefix.parent / f"{prefix.name}-pkgs" / f"{name}-1.0-0"
    paths = []
    for rel, mode in entries:
        content = (prefix / rel).read_bytes()
        entry = {"_path": rel, "path_type": "hardlink", "sha256": hashlib.sha256(content).hexdigest(), "size_in_bytes": len(content)}
        if mode:
            entry.update(prefix_placeholder=str(prefix), file_mode=mode)
        paths.append(entry)
        st = os.stat(prefix / rel)
        _write(pkgs / rel, content, st.st_mode & 0o777)
        os.utime(pkgs / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
    _write(pkgs / "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}).encode())
    record = {
        "name": name, "version": "1.0", "build": "0", "build_number": 0,
        "files": [p["_path"] for p in paths],
        "link": {"source": str(pkgs), "type": 1},
        "url": f"https://example.invalid/{name}-1.0-0.tar.bz2", "channel": "local",
    }
    _write(prefix / f"conda-meta/{name}-1.0-0.json", json.dumps(record).encode())


def conda_pack_each(prefix: Path, stem: Path, formats, **options) -> dict[str, Path]:
    """``prefix`` packed by the real conda-pack into ``<stem>.<format>`` for each format."""
    import conda_pack

    archives = {}
    for fmt in formats:
        archives[fmt] = stem.parent / f"{stem.name}.{fmt}"
        conda_pack.pack(prefix=str(prefix), output=str(archives[fmt]), format=fmt, **options)
    return archives
