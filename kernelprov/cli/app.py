"""The ``kernelprov`` command line (also ``jupyter kernelprov``).

A thin layer over the plain functions the provisioner and REST API share: it parses arguments,
shows progress on a terminal, and turns every :class:`~kernelprov.errors.KernelprovError` into a
one-line message and a non-zero exit. ``main(argv)`` is callable from tests.

``run.sh`` runs ``kernelprov unpack`` at every kernel start in clients without the provisioner, so
that command has a fast path: its arguments are read without building the whole argparse tree,
and its settings come from the environment without traitlets when no Jupyter config file could
change them (issue 13; ``benchmarks/warm_unpack.py`` measures it). Anything the fast path does not
recognise goes through argparse as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from .. import __version__
from ..errors import KernelprovError, KernelspecError, human_size

log = logging.getLogger("kernelprov")


_CACHE_DIR_HELP = "node-local cache root (default: $KERNELPROV_CACHE_DIR, $SLURM_TMPDIR, $TMPDIR, then /tmp)"


def _common_options(default) -> "argparse.ArgumentParser":
    """The options every command takes, before or after its name (``kernelprov install x --debug``).

    The top-level parser gets real defaults; each subcommand gets ``SUPPRESS``, so an option
    given before the subcommand is not overwritten by the subcommand's default."""
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=default(False), help="log what happens, with tracebacks")
    common.add_argument("--cache-dir", metavar="DIR", default=default(None), help=_CACHE_DIR_HELP)
    return common


def _add_location_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    """Where a kernel goes (``install``) or is removed from (``remove``), as ``jupyter kernelspec`` says it.

    One helper for both, so that a kernel installed with a flag is removed with the same flag."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help=f"{verb} this user's kernels dir (the default)")
    where.add_argument("--sys-prefix", action="store_true", help=f"{verb} {sys.prefix}/share/jupyter/kernels")
    where.add_argument("--prefix", metavar="DIR", help=f"{verb} DIR/share/jupyter/kernels")
    where.add_argument("--kernels-dir", metavar="DIR", help=f"{verb} a kernels dir such as /apps/jupyterhub/kernels")


def _parser() -> "argparse.ArgumentParser":
    import argparse  # deferred, as is building the tree: the warm `unpack` needs neither

    from ..engine.formats import FORMAT_NAMES

    parser = argparse.ArgumentParser(
        prog="kernelprov",
        description="Run Jupyter kernels from packed conda environments staged on node-local disk.",
        parents=[_common_options(lambda value: value)],
    )
    parser.add_argument("--version", action="version", version=f"kernelprov {__version__}")
    common = _common_options(lambda _value: argparse.SUPPRESS)
    # Every subcommand (and each of cache's actions) takes the common options after its name too.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    install = sub.add_parser("install", parents=[common], help="pack an env (or take an archive) and install its kernel")
    install.add_argument("name", help="kernel name; also the conda env name unless --env-prefix/--archive")
    source = install.add_mutually_exclusive_group()
    source.add_argument("--env-prefix", metavar="PATH", help="the conda env to pack, by path")
    source.add_argument("--archive", metavar="FILE", help="an existing conda-pack archive to use as is")
    install.add_argument("-o", "--output", metavar="FILE",
                         help="where to write the packed archive (default: inside the kernel dir)")
    install.add_argument("--format", choices=FORMAT_NAMES,
                         help="archive format when packing (default: tar.zst)")
    _add_location_flags(install, "install into")
    install.add_argument("--display-name", help="name shown in JupyterLab (default: 'Python (NAME)')")
    install.add_argument("--replace", action="store_true", help="overwrite an existing kernel of that name")
    install.add_argument("--plain-twin", action="store_true",
                         help="also write NAME-plain, the same kernel without the provisioner, for clients "
                              "where kernelprov is not installed (nbclient, papermill, jupyter console)")
    install.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                         help="environment variable for the kernel (repeatable)")
    # --- Slurm kernels (kernelprov/jupyter/slurm/): the kernel runs in a batch job on a compute node
    slurm = install.add_argument_group("Slurm", "run the kernel as a Slurm job on a compute node (kernelprov-slurm-provisioner)")
    slurm.add_argument("--slurm", action="store_true", help="start the kernel with sbatch; the env is staged on the node")
    for flag, metavar, what in (("--partition", "P", "partition"), ("--time", "T", "time limit (sbatch --time)"),
                                ("--cpus", "N", "CPUs (sbatch --cpus-per-task)"), ("--mem", "M", "memory (sbatch --mem)"),
                                ("--gres", "G", "generic resources, e.g. gpu:1"), ("--account", "A", "account")):
        slurm.add_argument(flag, metavar=metavar, help=f"the job's {what} (with --slurm)")
    # --- end Slurm kernels

    pack = sub.add_parser("pack", parents=[common], help="pack a conda env into an archive with a manifest")
    pack.add_argument("name", nargs="?", help="conda env name")
    pack.add_argument("--env-prefix", metavar="PATH", help="the conda env to pack, by path")
    pack.add_argument("-o", "--output", metavar="FILE", required=True, help="archive to write")
    pack.add_argument("--format", choices=FORMAT_NAMES, help="archive format (default: from the -o name, else tar.zst)")
    pack.add_argument("--force", action="store_true", help="overwrite an existing archive")

    listing = sub.add_parser("list", parents=[common], help="list kernelprov kernels and whether each is staged here")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--kernels-dir", action="append", default=[], metavar="DIR",
                         help="also look in DIR (repeatable)")

    remove = sub.add_parser("remove", parents=[common], help="remove a kernelprov kernel")
    remove.add_argument("name")
    _add_location_flags(remove, "remove from")
    remove.add_argument("--evict", action="store_true", help="also remove its staged copy from this node's cache")

    unpack = sub.add_parser("unpack", parents=[common], help="stage an archive now and print its prefix (pre-warm)")
    unpack.add_argument("archive")
    unpack.add_argument("-q", "--quiet", action="store_true", help="print only the prefix")
    unpack.add_argument("--lease", type=int, metavar="PID",
                        help="lease the env for process PID before printing it (run.sh passes its own $$)")

    cache = sub.add_parser("cache", parents=[common], help="inspect or clean this user's node-local cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cache_list = cache_sub.add_parser("list", parents=[common], help="staged envs, the kernels using them, size and last use")
    cache_list.add_argument("--json", action="store_true")
    clean_help = "remove every staged env that no running kernel uses; envs in use or being staged are kept"
    cache_sub.add_parser("clean", parents=[common], help=clean_help, description=clean_help[0].upper() + clean_help[1:] + ".")

    doctor = sub.add_parser("doctor", parents=[common], help="check why a kernel would not start, and say what to fix")
    doctor.add_argument("name", nargs="?", help="one kernel (default: every kernelprov kernel)")
    doctor.add_argument("--kernels-dir", action="append", default=[], metavar="DIR")
    doctor.add_argument("--no-hash", action="store_true", help="skip re-hashing archives against their manifests")

    sub.add_parser("demo", parents=[common], help="build a demo env, install it as a kernel in a scratch dir, start it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kernelprov`` and ``jupyter-kernelprov``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _fast_unpack_args(argv) or _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="kernelprov: %(message)s")
    try:
        return _COMMANDS[args.command](args) or 0
    except KernelprovError as err:
        if args.debug:
            log.exception("failed")
        print(f"kernelprov: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kernelprov: interrupted", file=sys.stderr)
        return 130


def _fast_unpack_args(argv: list[str]):
    """The namespace argparse would make for a plain ``kernelprov unpack`` command line, or None.

    Called by :func:`main` first. It knows only ``unpack``'s own options and the common ones
    (``--debug``, ``--cache-dir``), spelled in full and given once; anything else — help,
    abbreviations, repeats, mistakes — returns None, so that argparse parses it and reports any
    error exactly as before."""
    import types

    values = {"command": "unpack", "debug": False, "cache_dir": None, "quiet": False, "lease": None, "archive": None}
    command_seen = False
    seen: set[str] = set()
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        name, equals, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in seen:
            return None
        if token == "unpack" and not command_seen:
            command_seen = True
        elif name == "--debug" and not equals:
            values["debug"] = True
        elif name in ("-q", "--quiet") and not equals and command_seen:
            values["quiet"] = True
        elif name == "--cache-dir" or (name == "--lease" and command_seen):
            if not equals:
                if not tokens or tokens[0].startswith("-"):
                    return None
                value = tokens.pop(0)
            values[name[2:].replace("-", "_")] = value
        elif command_seen and not token.startswith("-") and values["archive"] is None:
            values["archive"] = token
            continue
        else:
            return None
        seen.add(name)
    if not command_seen or values["archive"] is None:
        return None
    if values["lease"] is not None:
        try:
            values["lease"] = int(values["lease"])
        except ValueError:
            return None
    return types.SimpleNamespace(**values)


def _stage_options(args) -> dict:
    """Keyword arguments of ``ensure_staged`` for this command line: from the environment alone
    when no Jupyter config file could change a kernelprov setting (no traitlets to import, no
    config file to run), else from the full :class:`~kernelprov.config.KernelprovConfig`."""
    from .. import envvars

    if args.cache_dir and not os.path.isabs(os.path.expanduser(args.cache_dir)):
        return _settings(args).stage_options()  # the trait's own validation says what is wrong
    if envvars.site_config_may_configure():
        return _settings(args).stage_options()
    return envvars.stage_options(args.cache_dir)


def _settings(args):
    from ..config import KernelprovConfig, load_site_config

    settings = KernelprovConfig(config=load_site_config())
    if args.cache_dir:
        settings.cache_dir = args.cache_dir
    return settings


@contextlib.contextmanager
def _progress(description: str, enabled: bool) -> Iterator:
    """Yield a (done, total) callback that draws a progress bar on a terminal, or None."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _stage(args, archive: str, quiet: bool = False):
    from ..engine.stage import ensure_staged

    options = _stage_options(args)
    lease = getattr(args, "lease", None)
    with _progress(f"Unpacking {Path(archive).name}", not quiet) as progress:
        return ensure_staged(archive, progress=progress, lease=str(lease) if lease else None, **options)


def _slurm_settings(args) -> dict | None:
    """The Slurm kernel settings of ``install --slurm ...`` (None: a local kernel); a Slurm flag
    without ``--slurm`` is refused rather than ignored."""
    flags = (("partition", "partition"), ("time", "time_limit"), ("cpus", "cpus"), ("mem", "memory"), ("gres", "gres"),
             ("account", "account"))
    given = {flag: getattr(args, flag) for flag, _trait in flags if getattr(args, flag)}
    if not args.slurm:
        if given:
            raise KernelspecError(f"--{', --'.join(given)} apply to Slurm kernels only; add --slurm.")
        return None
    return {trait: given[flag] for flag, trait in flags if flag in given}


def _cmd_install(args) -> int:
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


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KernelspecError(f"--env expects NAME=VALUE, not {pair!r}.")
        env[key] = value
    return env


def _cmd_pack(args) -> int:
    from ..engine.pack import pack_env

    manifest = pack_env(Path(args.output), name=args.name, prefix=args.env_prefix, fmt=args.format,
                        force=args.force, verbose=sys.stderr.isatty())
    print(f"Packed {args.env_prefix or args.name} into {Path(args.output).absolute()} "
          f"({manifest.format}, {manifest.size / 1e6:.1f} MB, sha256 {manifest.sha256[:12]})")
    return 0


def _cmd_list(args) -> int:
    from ..engine.inventory import find_staged
    from ..jupyter.kernelspecs import find_kernels

    settings = _settings(args)
    rows = []
    for kernel in find_kernels(args.kernels_dir):
        entry = find_staged(kernel.archive, cache_root=settings.cache_dir) if kernel.archive else None
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
    _print_table(("name", "display name", "staged", "archive", "location"), [
        (r["name"], r["display_name"], "yes" if r["staged"] else "no",
         (r["archive"] or "-") + ("" if r["archive_exists"] else " (missing)"), r["location"]) for r in rows])
    return 0


def _print_table(headers: Sequence[str], rows: list[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=None, header_style="bold")
    for row in rows:
        table.add_row(*row)
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


def _cmd_remove(args) -> int:
    from ..engine.inventory import evict, find_staged
    from ..jupyter import kernelspecs

    kernels_dir = kernelspecs.kernels_dir_for(sys_prefix=args.sys_prefix, prefix=args.prefix, kernels_dir=args.kernels_dir)
    kernel = _kernel_in(kernels_dir, args.name)
    cache_root = _settings(args).cache_dir
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

    Called by :func:`_cmd_remove`. When it is not there but elsewhere on the Jupyter path, the
    error says which flag reaches it."""
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


def _cmd_unpack(args) -> int:
    staged = _stage(args, args.archive, quiet=args.quiet)
    if not args.quiet:
        how = f"unpacked in {staged.seconds:.1f} s" if staged.extracted else "already staged"
        print(f"{staged.archive}: {how}", file=sys.stderr)
    print(staged.prefix)
    return 0


def _cmd_cache(args) -> int:
    from ..engine.inventory import clean, staged_entries, user_dirs

    settings = _settings(args)
    if args.cache_command == "clean":
        evicted = clean(cache_root=settings.cache_dir)
        freed = sum(e.env_bytes for e in evicted)
        kept = staged_entries(cache_root=settings.cache_dir)
        print(f"Removed {len(evicted)} staged environment(s), {freed / 1e6:.1f} MB."
              + (f" Kept {len(kept)} in use or being staged." if kept else ""))
        return 0
    entries = staged_entries(cache_root=settings.cache_dir)
    kernels = _kernels_by_archive() if entries else {}
    rows = [(e, kernels.get(os.path.realpath(e.archive), []), os.path.exists(e.archive)) for e in entries]
    if args.json:
        print(json.dumps([{
            "name": e.name, "kernels": names, "key": e.key, "prefix": str(e.prefix), "archive": e.archive,
            "archive_exists": exists, "bytes": e.env_bytes, "members": e.members, "staged_at": e.staged_at,
            "last_used": e.last_used, "in_use": e.in_use,
        } for e, names, exists in rows], indent=2))
        return 0
    if not entries:
        print(f"No staged environments on this node ({', '.join(map(str, user_dirs(settings.cache_dir)))}).")
        return 0
    _print_table(("kernel", "size", "last used", "in use", "prefix", "archive"), [
        (", ".join(names) or e.name, f"{e.env_bytes / 1e6:.1f} MB",
         time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)), f"{e.in_use} kernel(s)" if e.in_use else "no",
         str(e.prefix), e.archive + ("" if exists else " (archive missing)")) for e, names, exists in rows])
    return 0


def _kernels_by_archive() -> dict[str, list[str]]:
    """The installed kernels that run from each archive (by its real path), so that ``cache
    list`` names a staged env by its kernels rather than by its archive's file name."""
    from ..jupyter.kernelspecs import find_kernels

    found: dict[str, list[str]] = {}
    for kernel in find_kernels():
        if kernel.archive is not None:
            found.setdefault(os.path.realpath(kernel.archive), []).append(kernel.name)
    return found


def _cmd_doctor(args) -> int:
    from ..jupyter.kernelspecs import find_kernels, get_kernel
    from .doctor import check_kernel, check_node

    settings = _settings(args)
    kernels = [get_kernel(args.name, args.kernels_dir)] if args.name else find_kernels(args.kernels_dir)
    sections = [("this node", check_node(settings))]
    sections += [(f"kernel {k.name!r} ({k.display_name})", check_kernel(k, settings, verify_hash=not args.no_hash))
                 for k in kernels]
    problems = 0
    for title, findings in sections:
        print(f"{title}:")
        for finding in findings:
            print(f"  {'ok ' if finding.ok else 'FIX'} {finding.what}" + ("" if finding.ok else f"\n      -> {finding.fix}"))
            problems += not finding.ok
    if not kernels:
        print("No kernelprov kernels found; install one with `kernelprov install NAME`.")
    print(f"{problems} problem(s) found." if problems else "No problems found.")
    return 1 if problems else 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(cache_dir=args.cache_dir)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


_COMMANDS = {
    "install": _cmd_install,
    "pack": _cmd_pack,
    "list": _cmd_list,
    "remove": _cmd_remove,
    "unpack": _cmd_unpack,
    "cache": _cmd_cache,
    "doctor": _cmd_doctor,
    "demo": _cmd_demo,
}
