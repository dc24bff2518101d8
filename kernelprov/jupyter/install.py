"""``install_kernel()``: pack an env (or take an archive) and place its kernelspec.

The one install pipeline, called by ``kernelprov install``, by ``kernelprov demo`` and by any later
installer (a site script, a Slurm variant). Following ipykernel's ``kernelspec.py``: make a
temporary kernel dir beside the destination, fill it (the archive, when kernelprov packs it, goes
inside), then rename it into place; on any failure the temporary dir is removed and nothing else
has changed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..engine.archive import not_a_conda_env
from ..engine.formats import DEFAULT_FORMAT, archive_file_name
from ..engine.pack import describe_archive, pack_env
from ..errors import KernelspecError
from . import kernelspecs

log = logging.getLogger(__name__)


@dataclass
class InstalledKernel:
    """What :func:`install_kernel` placed: the kernel dir and the archive it runs from."""

    name: str
    resource_dir: Path
    archive: Path
    archive_managed: bool
    #: The plain twin's dir (``plain_twin=True``), for clients without kernelprov
    plain_twin: Path | None = None


def install_kernel(
    name: str,
    kernels_dir: Path,
    *,
    env_name: str | None = None,
    env_prefix: Path | str | None = None,
    archive: Path | str | None = None,
    output: Path | str | None = None,
    fmt: str | None = None,
    display_name: str | None = None,
    env: dict[str, str] | None = None,
    replace: bool = False,
    verbose: bool = False,
    on_pack: Callable[[str, Path], None] | None = None,
    plain_twin: bool = False,
    slurm: dict | None = None,
) -> InstalledKernel:
    """Install kernel ``name`` into ``kernels_dir`` and return where it went.

    The env comes from exactly one of ``archive`` (an existing conda-pack archive, used in place;
    a manifest is written beside it when it has none and the directory is writable), ``env_prefix``
    (a conda env by path) or ``env_name`` (a conda env by name; default ``name``). A packed archive
    goes to ``output`` when given, else inside the kernel dir (and is removed with it).
    ``on_pack(source, destination)`` is called before packing starts, for the CLI to say so.
    ``plain_twin`` also writes ``NAME-plain`` (:func:`.kernelspecs.build_plain_twin_json`): the same
    run.sh without the provisioner stanza, for clients that lack kernelprov.
    ``slurm`` (a dict of :class:`~.slurm.provisioner.KernelprovSlurmProvisioner` settings, possibly
    empty) makes a Slurm kernel: its kernel.json selects ``kernelprov-slurm-provisioner`` with
    those settings, and the kernel runs as a batch job on a compute node.
    Raises :class:`~kernelprov.errors.KernelprovError` subclasses.
    """
    name = kernelspecs.validate_name(name)
    tmp_dir = kernelspecs.prepare_kernel_dir(name, kernels_dir, replace=replace)
    twin_name, twin_tmp, twin = kernelspecs.plain_twin_name(name), None, None
    try:
        if plain_twin:
            twin_tmp = kernelspecs.prepare_plain_twin_dir(name, kernels_dir, replace=replace)
        if archive is not None:
            archive = Path(archive).expanduser().absolute()
            if not archive.is_file():
                raise KernelspecError(f"The archive {archive} does not exist.")
            if describe_archive(archive).conda_env is False:
                raise not_a_conda_env(archive)
            managed = False
        else:
            fmt = fmt or DEFAULT_FORMAT
            managed = output is None
            target = Path(output).expanduser().absolute() if output else tmp_dir / archive_file_name(name, fmt)
            final = target if output else kernels_dir / name / target.name
            source = str(env_prefix) if env_prefix else (env_name or name)
            if on_pack is not None:
                on_pack(source, final)
            pack_env(target, name=None if env_prefix else (env_name or name), prefix=env_prefix, fmt=fmt,
                     force=bool(output) and replace, verbose=verbose)
            archive = final
        kernelspecs.write_kernel_files(tmp_dir, name, display_name=display_name or f"Python ({name})",
                                       archive=archive, env=env, archive_managed=managed, slurm=slurm)
        if twin_tmp is not None:
            kernelspecs.write_plain_twin_files(twin_tmp, name, display_name=display_name or f"Python ({name})", env=env)
        destination = kernelspecs.place_kernel_dir(tmp_dir, name)
        if twin_tmp is not None:
            twin = kernelspecs.place_kernel_dir(twin_tmp, twin_name)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if twin_tmp is not None:
            shutil.rmtree(twin_tmp, ignore_errors=True)
        raise
    log.info("installed kernel %s in %s (archive %s)", name, destination, archive)
    return InstalledKernel(name, destination, archive, managed, twin)
