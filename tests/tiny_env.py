"""A tiny conda-format environment for engine tests: packs in well under a second.

It holds a shebang script, a config file and a NUL-terminated "binary" file that contain the
prefix (so relocation has work of all kinds), a relative symlink, an executable, and a file with
an old mtime (so tests can see mtimes survive). See ../shared/FIXTURES.md for what conda-pack reads.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
