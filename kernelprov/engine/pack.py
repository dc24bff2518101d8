"""Pack a conda environment with conda-pack and write its manifest sidecar.

Called by ``kernelprov pack`` and ``kernelprov install``. The archive is written under a temporary
name beside its destination and renamed into place only when complete, so a half-written archive
never sits where a kernel would read it; its manifest (sha256, size, python version, package
count) is written next to it for the stage engine to verify against.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from pathlib import Path

from ..errors import PackError
from .formats import DEFAULT_FORMAT, FORMAT_NAMES, format_from_name, strip_suffix
from .image_stage import baked_mount_point
from .manifest import Manifest, manifest_for, read_manifest, write_manifest

log = logging.getLogger(__name__)

#: What ``kernelprov pack`` writes: every format of the table, all of which conda-pack can write.
PACK_FORMATS = FORMAT_NAMES


def pack_env(
    output: Path,
    *,
    name: str | None = None,
    prefix: Path | None = None,
    fmt: str | None = None,
    force: bool = False,
    verbose: bool = False,
) -> Manifest:
    """Pack the env given by conda ``name`` or ``prefix`` into ``output``; return its manifest.

    The env name is resolved by conda-pack itself (``conda info --json``), exactly as
    ``conda pack -n NAME`` would. The archive is made readable per the umask (conda-pack creates
    it 0600), because archives are usually meant for kernels other users start too.
    """
    import conda_pack  # deferred: importing it is slow and only pack/install need it

    if (name is None) == (prefix is None):
        raise PackError("Give either a conda environment name or --env-prefix PATH, not both or neither.")
    output = Path(output).expanduser().absolute()
    fmt = fmt or format_from_name(output) or DEFAULT_FORMAT
    if fmt not in PACK_FORMATS:
        raise PackError(f"Unsupported archive format {fmt!r}; choose one of {', '.join(PACK_FORMATS)}.")
    if output.exists() and not force:
        raise PackError(f"{output} already exists; pass --force to overwrite it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        env = conda_pack.CondaEnv.from_name(name) if name else conda_pack.CondaEnv.from_prefix(str(prefix))
    except conda_pack.CondaPackException as err:
        hint = " Is conda on your PATH? Or give the env by path with --env-prefix." if name else ""
        raise PackError(f"conda-pack cannot read the environment: {_first_line(err)}{hint}") from err
    dest_prefix = None
    if fmt == "squashfs":
        # Read-only images are relocated at pack time, to a fresh mount point of the packing user
        # (a symlink in a directory only they can write; see image_stage).
        dest_prefix = str(baked_mount_point(strip_suffix(output.name)))
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    os.close(fd)
    try:
        env.pack(output=tmp, format=fmt, force=True, verbose=verbose, dest_prefix=dest_prefix)
        os.chmod(tmp, 0o644)
        manifest = manifest_for(
            Path(tmp),
            python_version=_python_version(Path(env.prefix)),
            packages=len(glob.glob(os.path.join(env.prefix, "conda-meta", "*.json"))),
            source_prefix=env.prefix,
            dest_prefix=dest_prefix,
        )
        os.replace(tmp, output)
    except conda_pack.CondaPackException as err:
        raise PackError(f"conda-pack failed: {_first_line(err)}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    write_manifest(output, manifest)
    log.info("packed %s into %s (%s bytes)", env.prefix, output, manifest.size)
    return manifest


def describe_archive(archive: Path) -> Manifest:
    """Write a manifest for an archive made elsewhere (``install --archive``) if it has none.

    Reads the archive once, at install time, so every later kernel start can verify it.
    """
    archive = Path(archive)
    existing = read_manifest(archive)
    if existing is not None:
        return existing
    manifest = manifest_for(archive)
    if os.access(archive.parent, os.W_OK):
        write_manifest(archive, manifest)
    else:
        log.warning("cannot write a manifest beside %s; kernels will start without an integrity check", archive)
    return manifest


def _python_version(prefix: Path) -> str | None:
    for record in glob.glob(os.path.join(prefix, "conda-meta", "python-[0-9]*.json")):
        try:
            with open(record) as f:
                return json.load(f).get("version")
        except (OSError, ValueError):
            continue
    return None


def _first_line(err: Exception) -> str:
    """conda-pack's messages run over many lines and end with a raw dump; keep the first sentence."""
    text = str(err).strip().split(" The full error is below")[0].splitlines()
    return text[0] if text else type(err).__name__
