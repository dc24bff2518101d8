"""What a ``kernelprov`` command line says: the argparse tree, the warm ``unpack`` fast path, and
the settings a command line selects.

Called by :func:`kernelprov.cli.app.main` (parsing) and by the commands (:func:`settings`,
:func:`stage_options`). ``run.sh`` runs ``kernelprov unpack`` at every kernel start in clients
without the provisioner, so that command has a fast path: :func:`fast_unpack_args` reads its
arguments without building the whole argparse tree, and :func:`stage_options` takes its settings
from the environment without traitlets when no Jupyter config file could change them (issue 13;
``benchmarks/warm_unpack.py`` measures it). Anything the fast path does not recognise goes through
argparse as before.
"""

from __future__ import annotations

import os
import sys

from .. import __version__

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


def _add_location_flags(parser: "argparse.ArgumentParser", verb: str) -> None:
    """Where a kernel goes (``install``) or is removed from (``remove``), as ``jupyter kernelspec`` says it.

    One helper for both, so that a kernel installed with a flag is removed with the same flag."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help=f"{verb} this user's kernels dir (the default)")
    where.add_argument("--sys-prefix", action="store_true", help=f"{verb} {sys.prefix}/share/jupyter/kernels")
    where.add_argument("--prefix", metavar="DIR", help=f"{verb} DIR/share/jupyter/kernels")
    where.add_argument("--kernels-dir", metavar="DIR", help=f"{verb} a kernels dir such as /apps/jupyterhub/kernels")


def parser() -> "argparse.ArgumentParser":
    """The whole argparse tree of ``kernelprov``.

    Called by :func:`kernelprov.cli.app.main` for every command line the fast path leaves alone,
    and by tests that compare the two. The format choices come from the engine's one formats
    table (:data:`kernelprov.engine.formats.FORMAT_NAMES`)."""
    import argparse  # deferred, as is building the tree: the warm `unpack` needs neither

    from ..engine.formats import FORMAT_NAMES

    top = argparse.ArgumentParser(
        prog="kernelprov",
        description="Run Jupyter kernels from packed conda environments staged on node-local disk.",
        parents=[_common_options(lambda value: value)],
    )
    top.add_argument("--version", action="version", version=f"kernelprov {__version__}")
    common = _common_options(lambda _value: argparse.SUPPRESS)
    # Every subcommand (and each of cache's actions) takes the common options after its name too.
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    return top


def fast_unpack_args(argv: list[str]):
    """The namespace argparse would make for a plain ``kernelprov unpack`` command line, or None.

    Called by :func:`kernelprov.cli.app.main` first. It knows only ``unpack``'s own options and
    the common ones (``--debug``, ``--cache-dir``), spelled in full and given once; anything else —
    help, abbreviations, repeats, mistakes — returns None, so that argparse parses it and reports
    any error exactly as before."""
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


def settings(args):
    """The :class:`~kernelprov.config.KernelprovConfig` a command runs with: the site's Jupyter
    config files (the ones the server reads), then ``--cache-dir``.

    Called by every command that looks at the cache or kernels (``list``, ``remove``, ``cache``,
    ``doctor``) and by :func:`stage_options` when a config file may matter."""
    from ..config import KernelprovConfig, load_site_config

    configured = KernelprovConfig(config=load_site_config())
    if args.cache_dir:
        configured.cache_dir = args.cache_dir
    return configured


def stage_options(args) -> dict:
    """Keyword arguments of ``ensure_staged`` for this command line.

    Called by ``kernelprov unpack`` (:func:`kernelprov.cli.cache_commands.unpack`): from the
    environment alone when no Jupyter config file could change a kernelprov setting (no traitlets
    to import, no config file to run), else from :func:`settings`."""
    from .. import envvars

    if args.cache_dir and not os.path.isabs(os.path.expanduser(args.cache_dir)):
        return settings(args).stage_options()  # the trait's own validation says what is wrong
    if envvars.site_config_may_configure():
        return settings(args).stage_options()
    return envvars.stage_options(args.cache_dir)
