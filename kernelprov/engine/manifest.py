"""The manifest sidecar written beside an archive: ``myenv.tar.zst`` → ``myenv.tar.zst.manifest.json``.

Written by :mod:`kernelprov.pack` (and by ``kernelprov install --archive`` for archives made
elsewhere); read by the stage engine to verify the archive while it streams (size, sha256, member
count) and by ``kernelprov list`` and the REST API to describe an env without decompressing it.
An archive without a manifest still works; it is just not verified.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .extract import scan
from .formats import FORMAT_NAMES
from .logs import get_logger
from ..errors import ArchiveError

log = get_logger(__name__)

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
    #: Holds ``conda-meta/`` and ``bin/python`` (None: not known, e.g. an image or an old manifest)
    conda_env: bool | None = None
    #: Distributions pip installed (``*.dist-info``/``*.egg-info`` in site-packages that no conda
    #: record owns), which ``packages`` does not count (None: not known, e.g. an old manifest)
    pip_packages: int | None = None


#: A manifest is a few hundred bytes; refuse to read a sidecar that is anything but small.
MAX_MANIFEST_BYTES = 1 << 20

#: Each field's accepted types and how the error describes them. A field that accepts null may also
#: be missing; keys not listed are ignored (a newer kernelprov may add some).
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "format": ((str,), f"one of {', '.join(FORMAT_NAMES)}"),
    "size": ((int,), "a byte count (an integer, 0 or more)"),
    "sha256": ((str,), "64 hexadecimal digits"),
    "members": ((int, type(None)), "an entry count (an integer, 0 or more) or null"),
    "unpacked_bytes": ((int, type(None)), "a byte count (an integer, 0 or more) or null"),
    "python_version": ((str, type(None)), "a version string or null"),
    "packages": ((int, type(None)), "a package count (an integer, 0 or more) or null"),
    "source_prefix": ((str, type(None)), "a path or null"),
    "dest_prefix": ((str, type(None)), "a path or null"),
    "created": ((int, float, type(None)), "a Unix time or null"),
    "conda_env": ((bool, type(None)), "true, false or null"),
    "pip_packages": ((int, type(None)), "a package count (an integer, 0 or more) or null"),
}
_REQUIRED = ("format", "size", "sha256")


def manifest_path(archive: Path) -> Path:
    """The sidecar's path for ``archive``; used by the reader, the writer and ``doctor``."""
    return Path(f"{archive}{MANIFEST_SUFFIX}")


def read_manifest(archive: Path) -> Manifest | None:
    """Return the archive's manifest, None when it has none; raise if it is unreadable or invalid.

    Called at every cold start (:mod:`.unpack`, :mod:`.stage` for images), by ``install``,
    ``doctor`` and the panel. The sidecar is as untrusted as the archive, and one bad sidecar must
    not break the listing of every other kernel, so its shape and every field's type are checked
    here and any problem is one :class:`ArchiveError` sentence naming the file, which the callers
    show for that one env.
    """
    path = manifest_path(archive)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _invalid(path, f"is unreadable ({err.strerror})") from err
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _invalid(path, f"is larger than {MAX_MANIFEST_BYTES >> 20} MiB, so it is no kernelprov manifest")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise _invalid(path, f"is not valid JSON ({_short(str(err))})") from err
    if not isinstance(data, dict):
        raise _invalid(path, f"holds a JSON {_json_type(data)}, not an object")
    if data.get("kernelprov_manifest") != MANIFEST_VERSION:
        raise ArchiveError(f"The manifest {path} is not a kernelprov manifest; remove it or re-create the archive with `kernelprov pack`.")
    return Manifest(**{name: _checked(path, data, name) for name in _FIELDS})


def _checked(path: Path, data: dict, name: str) -> object:
    """The value of field ``name`` after checking its type (bool is no integer here) and range."""
    types, expected = _FIELDS[name]
    if name not in data:
        if name in _REQUIRED:
            raise _invalid(path, f"has no {name!r} field")
        return None
    value = data[name]
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if ok and isinstance(value, (int, float)):
        ok = value >= 0 and (isinstance(value, int) or math.isfinite(value))
    if ok and name == "format":
        ok = value in FORMAT_NAMES
    if ok and name == "sha256":
        ok = len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())
        value = value.lower()
    if not ok:
        raise _invalid(path, f"has {name!r} = {_short(json.dumps(value))}, which should be {expected}")
    return value


def _invalid(path: Path, problem: str) -> ArchiveError:
    return ArchiveError(f"The manifest {path} {problem}; re-create it with `kernelprov pack` (or `kernelprov install --archive`) or remove it.")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _json_type(value: object) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _short(text: str, limit: int = 60) -> str:
    """Keep error sentences one readable line whatever a hostile file holds."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_manifest(archive: Path, manifest: Manifest) -> Path:
    """Write the sidecar atomically (readable by others when the archive is).

    Called by :func:`kernelprov.engine.pack.pack_env` and ``describe_archive`` (``install --archive``).
    """
    path = manifest_path(archive)
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        json.dump({"kernelprov_manifest": MANIFEST_VERSION, **asdict(manifest)}, f, indent=2)
    os.chmod(tmp, os.stat(archive).st_mode & 0o666)
    os.replace(tmp, path)
    return path


def manifest_for(archive: Path, **details) -> Manifest:
    """Scan ``archive`` once (hash, members, unpacked size) into a manifest; ``details`` adds
    what the packer knows (python version, conda and pip package counts, source prefix).

    Called at pack and install time, never at a kernel start.
    """
    found = scan(archive)
    return Manifest(format=found.format, size=found.size, sha256=found.sha256, members=found.members,
                    unpacked_bytes=found.unpacked_bytes, created=time.time(), conda_env=found.conda_env, **details)
