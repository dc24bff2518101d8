"""The manifest sidecar written beside an archive: ``myenv.tar.zst`` → ``myenv.tar.zst.manifest.json``.

Written by :mod:`kernelprov.pack` (and by ``kernelprov install --archive`` for archives made
elsewhere); read by the stage engine to verify the archive while it streams (size, sha256, member
count) and by ``kernelprov list`` and the REST API to describe an env without decompressing it.
An archive without a manifest still works; it is just not verified.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .extract import scan
from ..errors import ArchiveError

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1


@dataclass
class Manifest:
    """What we know about an archive without opening it."""

    format: str
    size: int
    sha256: str
    members: int | None = None
    unpacked_bytes: int | None = None
    python_version: str | None = None
    packages: int | None = None
    source_prefix: str | None = None
    dest_prefix: str | None = None  # squashfs images: the mount point baked in at pack time
    created: float | None = None


def manifest_path(archive: Path) -> Path:
    return Path(f"{archive}{MANIFEST_SUFFIX}")


def read_manifest(archive: Path) -> Manifest | None:
    """Return the archive's manifest, None when it has none; raise if it is unreadable."""
    path = manifest_path(archive)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ArchiveError(f"The manifest {path} is unreadable ({err}); re-create it with `kernelprov pack` or remove it.") from err
    if data.pop("kernelprov_manifest", None) != MANIFEST_VERSION:
        raise ArchiveError(f"The manifest {path} is not a kernelprov manifest; remove it or re-create the archive with `kernelprov pack`.")
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})


def write_manifest(archive: Path, manifest: Manifest) -> Path:
    """Write the sidecar atomically (readable by others when the archive is)."""
    path = manifest_path(archive)
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        json.dump({"kernelprov_manifest": MANIFEST_VERSION, **asdict(manifest)}, f, indent=2)
    os.chmod(tmp, os.stat(archive).st_mode & 0o666)
    os.replace(tmp, path)
    return path


def manifest_for(archive: Path, **details) -> Manifest:
    """Scan ``archive`` once (hash, members, unpacked size) into a manifest; ``details`` adds
    what the packer knows (python version, package count, source prefix)."""
    found = scan(archive)
    return Manifest(format=found.format, size=found.size, sha256=found.sha256, members=found.members,
                    unpacked_bytes=found.unpacked_bytes, created=time.time(), **details)
