"""Kernelspecs in the HiPerGator ``template_kernel`` layout; list and remove the ones we made.

Called by :func:`.install.install_kernel`, ``kernelprov list/remove/doctor`` and the panel's
server extension. A kernelprov kernel dir is::

    <kernels dir>/<name>/
        kernel.json          argv = [<dir>/run.sh, -f, {connection_file}], kernel_provisioner config
        run.sh               stages the env if nobody did, activates it, execs ipykernel
        logo-32x32.png  logo-64x64.png
        <name>.tar.zst(+.manifest.json)   only when kernelprov packed the env itself
    <kernels dir>/<name>-plain/          only with ``install --plain-twin``: kernel.json running
        kernel.json  logos               <name>/run.sh without the provisioner, for clients without it

The pipeline follows ipykernel's: build the command → build the kernel dict → write the spec into
a temporary dir → place it. Placement is a rename of that temporary dir (made beside the
destination), not ``KernelSpecManager.install_kernel_spec``'s copy: it is atomic, and an archive
packed into the temporary dir moves into place without a second copy of hundreds of megabytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.paths import jupyter_data_dir

from ..errors import KernelspecError

log = logging.getLogger(__name__)

PROVISIONER_NAME = "kernelprov-provisioner"
#: Slurm kernels (kernelprov/jupyter/slurm/): the kernel runs in a batch job on a compute node.
SLURM_PROVISIONER_NAME = "kernelprov-slurm-provisioner"
PROVISIONER_NAMES = (PROVISIONER_NAME, SLURM_PROVISIONER_NAME)
SPEC_VERSION = 1
LOGOS = ("logo-32x32.png", "logo-64x64.png")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: The IPython config file + extension every kernel loads from this install (run.sh names it): it
#: warns when a cell pip-installs into the node-local copy. Read in place, never copied.
PIP_WARNING = Path(__file__).with_name("pip_warning.py")
PLAIN_TWIN_SUFFIX = "-plain"

_RUN_SH = """\
#!/bin/bash
# kernelprov kernel {name!r}: ipykernel from a packed conda env staged on node-local disk.
# Jupyter runs this as: run.sh -f <connection file>. When the kernelprov provisioner started it,
# KERNELPROV_ENV already names the staged env; otherwise (a client or server without the
# provisioner) it stages the env itself through the same engine: `kernelprov unpack`.
# Tools are named by absolute path: a PATH search walks the user's PATH, often through $HOME on
# the shared filesystem this kernel is meant to stay off.
set -euo pipefail
archive={archive}
# The stager runs isolated (-I): the kernel's working directory, perhaps a shared project folder
# where anyone can drop an argparse.py, is never on its sys.path, nor are PYTHON* variables read.
if [ -z "${{KERNELPROV_ENV:-}}" ] || [ "${{KERNELPROV_ARCHIVE:-}}" != "$archive" ]; then
    KERNELPROV_ENV="$({stager} -I -m kernelprov unpack --quiet --lease $$ "$archive")"
    KERNELPROV_LEASE=""
    export KERNELPROV_ENV KERNELPROV_ARCHIVE="$archive"
fi
# Lease the env for as long as this kernel (or anything it starts) lives, so eviction never
# removes an env in use. The lease file was written under the env's lock before the env was
# handed out: by the provisioner ($KERNELPROV_LEASE) or by `unpack --lease $$` (named by our PID,
# which the exec below hands to the kernel). It is flock'ed on an fd the kernel inherits, so the
# lock dies with the kernel, even on kill -9.
case "${{KERNELPROV_LEASE:-}}" in
    "$KERNELPROV_ENV.leases/"*) lease=$KERNELPROV_LEASE ;;
    *) lease="$KERNELPROV_ENV.leases/$$" ;;
esac
if [ -d "$KERNELPROV_ENV.leases" ] || {mkdir} -p "$KERNELPROV_ENV.leases" 2>/dev/null; then
    exec 9>"$lease"
    if [ -x {flock} ]; then {flock} -n 9 || true; fi
fi
# Activate as conda-pack's bin/activate does (CONDA_PREFIX, PATH, etc/conda/activate.d/*.sh),
# without its dirname/basename/ls subshells.
export CONDA_PREFIX="$KERNELPROV_ENV" PATH="$KERNELPROV_ENV/bin:$PATH"
shopt -s nullglob
set +eu
for script in "$KERNELPROV_ENV"/etc/conda/activate.d/*.sh; do
    . "$script"
done
set -eu
# Warn in the kernel when a cell runs %pip/%conda install, which lands in this node's copy only
# (kernelprov/jupyter/pip_warning.py). IPython reads it as one more config file: no sys.path or
# PYTHONPATH entry, so nothing the kernel starts inherits anything, and the env is not touched.
pip_warning={pip_warning}
if [ -f "$pip_warning" ]; then
    set -- "$@" --IPKernelApp.extra_config_file="$pip_warning" \\
        --IPKernelApp.extra_extensions=kernelprov_pip_warning --KernelprovPipWarning.kernel_name={name_arg}
fi
exec "$KERNELPROV_ENV/bin/python" -m ipykernel_launcher "$@"
"""


def validate_name(name: str) -> str:
    """Refuse kernel names that Jupyter would reject or that could name another directory."""
    # fullmatch: with match, "$" would accept a name ending in a newline.
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KernelspecError(f"Invalid kernel name {name!r}: use letters, digits, '.', '_' and '-' only.")
    return name


def kernels_dir_for(*, user: bool = True, sys_prefix: bool = False, prefix: str | None = None, kernels_dir: str | None = None) -> Path:
    """The kernels directory an install goes to, mirroring ``jupyter kernelspec install``'s flags."""
    if kernels_dir:
        return Path(kernels_dir).expanduser().absolute()
    if prefix:
        return Path(prefix).expanduser().absolute() / "share" / "jupyter" / "kernels"
    if sys_prefix:
        return Path(sys.prefix) / "share" / "jupyter" / "kernels"
    return Path(jupyter_data_dir()) / "kernels"


def build_kernel_json(kernel_dir: Path, *, display_name: str, archive: Path, env: dict[str, str] | None = None,
                      provisioner_config: dict | None = None, archive_managed: bool = False,
                      stager: str | None = None) -> dict:
    """The kernel dict: run.sh as argv[0] (never a bare ``python``), our provisioner in metadata.

    ``metadata.kernelprov.stager`` records the interpreter run.sh stages through (the one written
    into run.sh), so ``kernelprov doctor`` reads it from here rather than parsing the script."""
    return {
        "argv": [str(kernel_dir / "run.sh"), "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": dict(env or {}),
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME,
                "config": {"archive": str(archive), **(provisioner_config or {})},
            },
            "kernelprov": {"version": SPEC_VERSION, "archive_managed": archive_managed, "stager": stager or sys.executable},
        },
    }


def system_tool(name: str) -> str | None:
    """Absolute path of a base-system tool run.sh calls (in /usr/bin or /bin), or None.

    Called by :func:`render_run_sh`, which writes it into run.sh, and by ``kernelprov doctor``.
    """
    return shutil.which(name, path="/usr/bin:/bin")


def render_run_sh(name: str, archive: Path, stager_python: str | None = None) -> str:
    """run.sh for ``archive``; ``stager_python`` (default: this interpreter) has kernelprov installed."""
    return _RUN_SH.format(name=name, archive=shlex.quote(str(archive)), stager=shlex.quote(stager_python or sys.executable),
                          mkdir=shlex.quote(system_tool("mkdir") or "mkdir"), flock=shlex.quote(system_tool("flock") or "flock"),
                          pip_warning=shlex.quote(str(PIP_WARNING)), name_arg=shlex.quote(name))


def prepare_kernel_dir(name: str, kernels_dir: Path, *, replace: bool) -> Path:
    """Make an empty temporary kernel dir beside its destination (refusing to clobber without
    ``replace``); the caller fills it and passes it to :func:`place_kernel_dir`."""
    validate_name(name)
    destination = kernels_dir / name
    if destination.exists() and not replace:
        raise KernelspecError(f"A kernel named {name!r} already exists in {kernels_dir}; pass --replace to overwrite it.")
    try:
        kernels_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".installing", dir=kernels_dir))
    except OSError as err:
        raise KernelspecError(f"Cannot write to {kernels_dir}: {err.strerror}; choose another location (--user, --prefix or --kernels-dir).") from err


def write_kernel_files(tmp_dir: Path, name: str, *, display_name: str, archive: Path, env: dict[str, str] | None = None,
                       provisioner_config: dict | None = None, archive_managed: bool = False,
                       slurm: dict | None = None) -> None:
    """Write kernel.json, run.sh and the logos into ``tmp_dir`` for the final dir ``kernels_dir/name``.

    ``slurm`` (settings, possibly empty) writes a Slurm kernel (:func:`slurm_kernel_json`)."""
    final_dir = tmp_dir.parent / name
    stager = sys.executable
    spec = build_kernel_json(final_dir, display_name=display_name, archive=archive, env=env,
                             provisioner_config=provisioner_config, archive_managed=archive_managed, stager=stager)
    if slurm is not None:
        spec = slurm_kernel_json(spec, slurm, stager)
    (tmp_dir / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    run_sh = tmp_dir / "run.sh"
    run_sh.write_text(render_run_sh(name, archive, stager))
    run_sh.chmod(0o755)
    for logo in LOGOS:
        (tmp_dir / logo).write_bytes(resources.files("kernelprov.resources").joinpath(logo).read_bytes())


def slurm_kernel_json(spec: dict, settings: dict, stager: str) -> dict:
    """``spec`` (from :func:`build_kernel_json`) as a Slurm kernel: ``kernelprov-slurm-provisioner``
    with ``settings`` (partition, time_limit, cpus, memory, gres, account, ...) and the stager,
    which the job runs on the compute node. argv stays run.sh: the job runs it there."""
    config = spec["metadata"]["kernel_provisioner"]["config"]
    spec["metadata"]["kernel_provisioner"] = {"provisioner_name": SLURM_PROVISIONER_NAME,
                                              "config": {**config, **settings, "stager": stager}}
    spec["metadata"]["kernelprov"]["slurm"] = True
    return spec


def plain_twin_name(name: str) -> str:
    """The name of ``name``'s plain twin (``kernelprov install --plain-twin``): ``NAME-plain``."""
    return f"{name}{PLAIN_TWIN_SUFFIX}"


def build_plain_twin_json(kernel_dir: Path, *, display_name: str, env: dict[str, str] | None = None) -> dict:
    """The plain twin's kernel dict: the same run.sh as the kernel in ``kernel_dir``, no provisioner.

    jupyter_client >= 7 refuses a kernelspec whose ``metadata.kernel_provisioner`` names a
    provisioner it cannot load (``KernelSpecManager.get_kernel_spec`` raises ``NoSuchKernel``, and
    ``get_all_specs`` leaves it out), so a client without kernelprov never sees the main spec. The
    twin has no such stanza: any client starts it with its default ``LocalProvisioner``, which runs
    argv, and run.sh stages the env through the stager python it names. ``plain_twin_of`` lets
    :func:`remove_plain_twin` tell it from another kernel that merely has its name."""
    return {
        "argv": [str(kernel_dir / "run.sh"), "-f", "{connection_file}"],
        "display_name": f"{display_name} (no provisioner)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": dict(env or {}),
        "metadata": {"kernelprov": {"version": SPEC_VERSION, "plain_twin_of": kernel_dir.name}},
    }


def prepare_plain_twin_dir(name: str, kernels_dir: Path, *, replace: bool) -> Path:
    """:func:`prepare_kernel_dir` for kernel ``name``'s plain twin; ``replace`` replaces only a twin
    of ``name``, never another kernel that happens to be called ``NAME-plain``."""
    twin = kernels_dir / plain_twin_name(name)
    if replace and twin.exists() and not _is_plain_twin_of(twin, name):
        raise KernelspecError(f"{twin} is not the plain twin of {name!r}; remove it, or install without --plain-twin.")
    return prepare_kernel_dir(twin.name, kernels_dir, replace=replace)


def write_plain_twin_files(tmp_dir: Path, name: str, *, display_name: str, env: dict[str, str] | None = None) -> None:
    """Write the plain twin of kernel ``name`` (kernel.json, logos) into ``tmp_dir``.

    Called by :func:`.install.install_kernel` with ``plain_twin=True``; ``tmp_dir`` comes from
    :func:`prepare_plain_twin_dir` and is placed after the kernel itself."""
    spec = build_plain_twin_json(tmp_dir.parent / name, display_name=display_name, env=env)
    (tmp_dir / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    for logo in LOGOS:
        (tmp_dir / logo).write_bytes(resources.files("kernelprov.resources").joinpath(logo).read_bytes())


def place_kernel_dir(tmp_dir: Path, name: str) -> Path:
    """Rename the filled temporary dir into place, replacing an existing kernel of that name."""
    destination = tmp_dir.parent / name
    os.chmod(tmp_dir, 0o755)
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".replaced", dir=tmp_dir.parent))
        os.rename(destination, old / name)
    os.rename(tmp_dir, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("installed kernel %s in %s", name, destination)
    return destination


@dataclass
class KernelprovKernel:
    """One installed kernelprov kernel, as found by :func:`find_kernels`."""

    name: str
    display_name: str
    language: str
    resource_dir: Path
    archive: Path | None
    archive_managed: bool
    provisioner_config: dict
    #: The interpreter run.sh stages through, as kernel.json records it (None: written before 0.1.0
    #: recorded it; ``kernelprov doctor`` then reads run.sh)
    stager: str | None = None
    #: Runs in a Slurm job on a compute node (``kernelprov-slurm-provisioner``)
    slurm: bool = False


def kernel_spec_manager(extra_dirs: list[str] | None = None) -> KernelSpecManager:
    """A KernelSpecManager over the Jupyter path plus ``extra_dirs`` (the server's own kernel dirs)."""
    ksm = KernelSpecManager()
    if extra_dirs:
        ksm.kernel_dirs = list(ksm.kernel_dirs) + [str(Path(d).expanduser().absolute()) for d in extra_dirs]
    return ksm


def find_kernels(extra_dirs: list[str] | None = None) -> list[KernelprovKernel]:
    """Every kernelprov kernel on this Jupyter path (plus ``extra_dirs``), sorted by name.

    Called by ``kernelprov list/remove`` and the REST API. A kernel dir whose kernel.json cannot
    be read is skipped with a warning rather than hiding all the others.
    """
    found = []
    for name, entry in sorted(kernel_spec_manager(extra_dirs).get_all_specs().items()):
        kernel = kernel_from_spec(name, Path(entry["resource_dir"]), entry.get("spec", {}))
        if kernel is not None:
            found.append(kernel)
    return found


def kernel_from_spec(name: str, resource_dir: Path, spec: dict) -> KernelprovKernel | None:
    """The kernelprov kernel a parsed kernel.json describes, or None when it is not ours.

    Called by :func:`find_kernels` and by the panel's listing, which caches kernel.json files by
    modification time rather than re-reading every one on each poll."""
    metadata = spec.get("metadata") or {}
    provisioner = metadata.get("kernel_provisioner") or {}
    if not isinstance(provisioner, dict) or provisioner.get("provisioner_name") not in PROVISIONER_NAMES:
        return None
    config = provisioner.get("config") or {}
    ours = metadata.get("kernelprov") or {}
    if not isinstance(config, dict) or not isinstance(ours, dict):
        return None
    return KernelprovKernel(
        name=name,
        display_name=str(spec.get("display_name", name)),
        language=str(spec.get("language", "python")),
        resource_dir=resource_dir,
        archive=Path(config["archive"]) if isinstance(config.get("archive"), str) and config["archive"] else None,
        archive_managed=bool(ours.get("archive_managed")),
        provisioner_config=config,
        stager=ours.get("stager") if isinstance(ours.get("stager"), str) else None,
        slurm=provisioner.get("provisioner_name") == SLURM_PROVISIONER_NAME,
    )


def get_kernel(name: str, extra_dirs: list[str] | None = None) -> KernelprovKernel:
    """The kernelprov kernel called ``name``; raise a clear error if there is none."""
    validate_name(name)
    for kernel in find_kernels(extra_dirs):
        if kernel.name == name:
            return kernel
    raise KernelspecError(f"No kernelprov kernel named {name!r}; `kernelprov list` shows the installed ones.")


def remove_kernel(name: str, extra_dirs: list[str] | None = None) -> KernelprovKernel:
    """Delete a kernelprov kernel dir (and the archive inside it when kernelprov packed it)."""
    kernel = get_kernel(name, extra_dirs)
    try:
        shutil.rmtree(kernel.resource_dir)
    except OSError as err:
        raise KernelspecError(f"Cannot remove {kernel.resource_dir}: {err.strerror}.") from err
    remove_plain_twin(kernel.resource_dir)
    return kernel


def remove_plain_twin(kernel_dir: Path) -> Path | None:
    """Delete the plain twin of the kernel that lived in ``kernel_dir``, if it has one; return its dir.

    Called by :func:`remove_kernel` after removing the kernel: the twin runs that kernel's run.sh
    and would otherwise stay listed in every client, failing to start. A ``NAME-plain`` that is not
    this kernel's twin (another kernel that merely has that name) is left alone."""
    twin = kernel_dir.parent / plain_twin_name(kernel_dir.name)
    if not _is_plain_twin_of(twin, kernel_dir.name):
        return None
    try:
        shutil.rmtree(twin)
    except OSError as err:
        raise KernelspecError(f"Cannot remove the plain twin {twin}: {err.strerror}.") from err
    log.info("removed plain twin %s", twin)
    return twin


def _is_plain_twin_of(kernel_dir: Path, name: str) -> bool:
    try:
        spec = json.loads((kernel_dir / "kernel.json").read_text())
    except (OSError, ValueError):
        return False
    metadata = spec.get("metadata") if isinstance(spec, dict) else None
    ours = metadata.get("kernelprov") if isinstance(metadata, dict) else None
    return isinstance(ours, dict) and ours.get("plain_twin_of") == name
