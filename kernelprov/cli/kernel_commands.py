"""The ``kernelprov`` commands about kernels and their archives: ``pack``, ``install``, ``list``,
``remove``.

Each command is called by :func:`kernelprov.cli.app.main` with the parsed arguments and returns an
exit status; it prints what it did and lets a :class:`~kernelprov.errors.KernelprovError` reach
``main``, which makes it one line on stderr. The work itself is done by the functions the
provisioner and the panel share: :func:`kernelprov.jupyter.install.install_kernel`, the kernelspec
helpers in :mod:`kernelprov.jupyter.kernelspecs` and the engine's inventory.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ..errors import KernelspecError, human_size
from .arguments import settings
from .terminal import print_table

#: ``install --slurm`` flags and the Slurm provisioner settings they set (kernelprov/jupyter/slurm/).
_SLURM_FLAGS = (("partition", "partition"), ("time", "time_limit"), ("cpus", "cpus"), ("mem", "memory"),
                ("gres", "gres"), ("account", "account"))


def install(args) -> int:
    """``kernelprov install NAME``: pack (or take) an archive and place its kernelspec; for a kernel
    outside the user's own dir, warn when other users could not run it."""
    from ..jupyter import kernelspecs
    from ..jupyter.install import install_kernel

    kernels_dir = kernelspecs.kernels_dir_for(sys_prefix=args.sys_prefix, prefix=args.prefix, kernels_dir=args.kernels_dir)
    installed = install_kernel(
        args.name, kernels_dir, env_prefix=args.env_prefix, archive=args.archive, output=args.output, fmt=args.format,
        display_name=args.display_name, env=_parse_env(args.env), replace=args.replace, verbose=sys.stderr.isatty(),
        plain_twin=args.plain_twin,
        slurm=_slurm_settings(args),  # Slurm kernels (kernelprov/jupyter/slurm/)
        # stdout, as progress: a failure that follows is then the one line on stderr
        on_pack=lambda source, destination: print(f"Packing {source} into {destination} ...", flush=True),
    )
    print(f"Installed kernel {installed.name!r} in {installed.resource_dir} (archive: {installed.archive})")
    if installed.plain_twin is not None:
        print(f"Installed its plain twin {installed.plain_twin.name!r} in {installed.plain_twin}")
    if args.kernels_dir or args.prefix or args.sys_prefix:
        from .doctor import shared_access_findings

        for finding in shared_access_findings(sys.executable, installed.archive):
            if not finding.ok:
                print(f"kernelprov: warning: {finding.what}: {finding.fix}", file=sys.stderr)
    return 0


def _slurm_settings(args) -> dict | None:
    """The Slurm kernel settings of ``install --slurm ...`` (None: a local kernel); a Slurm flag
    without ``--slurm`` is refused rather than ignored."""
    given = {flag: getattr(args, flag) for flag, _trait in _SLURM_FLAGS if getattr(args, flag)}
    if not args.slurm:
        if given:
            raise KernelspecError(f"--{', --'.join(given)} apply to Slurm kernels only; add --slurm.")
        return None
    return {trait: given[flag] for flag, trait in _SLURM_FLAGS if flag in given}


def _parse_env(pairs: list[str]) -> dict[str, str]:
    """``install --env NAME=VALUE`` (repeatable) as the kernel's environment dict."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KernelspecError(f"--env expects NAME=VALUE, not {pair!r}.")
        env[key] = value
    return env


def pack(args) -> int:
    """``kernelprov pack NAME -o FILE``: conda-pack an env and write its manifest beside it."""
    from ..engine.pack import pack_env

    manifest = pack_env(Path(args.output), name=args.name, prefix=args.env_prefix, fmt=args.format,
                        force=args.force, verbose=sys.stderr.isatty())
    print(f"Packed {args.env_prefix or args.name} into {Path(args.output).absolute()} "
          f"({manifest.format}, {manifest.size / 1e6:.1f} MB, sha256 {manifest.sha256[:12]})")
    return 0


def list_kernels(args) -> int:
    """``kernelprov list [--json]``: every kernelprov kernel and whether it is staged on this node
    (a read: nothing in the cache is created or changed)."""
    from ..engine.inventory import find_staged
    from ..jupyter.kernelspecs import find_kernels

    cache_root = settings(args).cache_dir
    rows = []
    for kernel in find_kernels(args.kernels_dir):
        entry = find_staged(kernel.archive, cache_root=cache_root) if kernel.archive else None
        rows.append({
            "name": kernel.name,
            "display_name": kernel.display_name,
            "archive": str(kernel.archive) if kernel.archive else None,
            "archive_exists": bool(kernel.archive and kernel.archive.is_file()),
            "location": str(kernel.resource_dir),
            "staged": entry is not None,
            "staged_prefix": str(entry.prefix) if entry else None,
            "in_use": entry.in_use if entry else 0,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No kernelprov kernels installed; add one with `kernelprov install NAME`.")
        return 0
    print_table(("name", "display name", "staged", "archive", "location"), [
        (r["name"], r["display_name"], "yes" if r["staged"] else "no",
         (r["archive"] or "-") + ("" if r["archive_exists"] else " (missing)"), r["location"]) for r in rows])
    return 0


def remove(args) -> int:
    """``kernelprov remove NAME [--evict]``: remove the kernel dir (its own archive goes with it)
    and its plain twin; with ``--evict`` also its staged copy, which is refused while it runs."""
    from ..engine.inventory import evict, find_staged
    from ..jupyter import kernelspecs

    kernels_dir = kernelspecs.kernels_dir_for(sys_prefix=args.sys_prefix, prefix=args.prefix, kernels_dir=args.kernels_dir)
    kernel = _kernel_in(kernels_dir, args.name)
    cache_root = settings(args).cache_dir
    # Looked up first: a kernel's own archive goes with its dir, and the staged copy is found by it.
    staged = find_staged(kernel.archive, cache_root=cache_root) if kernel.archive else None
    if staged is not None and args.evict:
        evict(kernel.archive, cache_root=cache_root)  # refuses while a kernel runs, before anything is removed
    try:
        shutil.rmtree(kernel.resource_dir)
    except OSError as err:
        raise KernelspecError(f"Cannot remove {kernel.resource_dir}: {err.strerror}.") from err
    print(f"Removed kernel {kernel.name!r} from {kernel.resource_dir}")
    twin = kernelspecs.remove_plain_twin(kernel.resource_dir)
    if twin is not None:
        print(f"Removed its plain twin {twin.name!r} from {twin}")
    if staged is not None and args.evict:
        print(f"Removed its staged environment {staged.prefix} ({human_size(staged.env_bytes)}) from this node.")
    elif staged is not None:
        print(f"Its environment is still staged on this node ({staged.prefix}, {human_size(staged.env_bytes)}); "
              "`kernelprov cache clean` removes staged envs no kernel is using.")
    return 0


def _kernel_in(kernels_dir: Path, name: str):
    """The kernelprov kernel ``name`` in ``kernels_dir`` (the one ``remove``'s location flags name).

    Called by :func:`remove`. When it is not there but elsewhere on the Jupyter path, the error
    says which flag reaches it."""
    from ..jupyter import kernelspecs

    resource_dir = kernels_dir / kernelspecs.validate_name(name)
    try:
        spec = json.loads((resource_dir / "kernel.json").read_text())
    except FileNotFoundError:
        spec = None
    except (OSError, ValueError) as err:
        raise KernelspecError(f"Cannot read {resource_dir / 'kernel.json'} ({err}); remove {resource_dir} by hand.") from err
    kernel = kernelspecs.kernel_from_spec(name, resource_dir, spec) if isinstance(spec, dict) else None
    if kernel is not None:
        return kernel
    elsewhere = [k.resource_dir.parent for k in kernelspecs.find_kernels() if k.name == name and k.resource_dir != resource_dir]
    if elsewhere:
        sys_kernels = Path(sys.prefix) / "share" / "jupyter" / "kernels"
        flag = "--sys-prefix" if elsewhere[0] == sys_kernels else f"--kernels-dir {elsewhere[0]}"
        raise KernelspecError(f"No kernelprov kernel named {name!r} in {kernels_dir}; it is in {elsewhere[0]}: "
                              f"remove it with `kernelprov remove {name} {flag}`.")
    raise KernelspecError(f"No kernelprov kernel named {name!r} in {kernels_dir}; `kernelprov list` shows the installed ones.")
