"""The ``kernelprov`` commands about this node's cache: ``unpack`` (stage now), ``cache list``,
``cache clean``.

Each command is called by :func:`kernelprov.cli.app.main` with the parsed arguments and returns an
exit status. ``unpack`` is the one ``run.sh`` runs at every kernel start in clients without the
provisioner: it stays on the warm path (:func:`kernelprov.cli.arguments.stage_options`), importing
neither traitlets nor argparse nor rich when it prints only the prefix.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .arguments import settings, stage_options
from .terminal import print_table, progress


def unpack(args) -> int:
    """``kernelprov unpack ARCHIVE [--quiet] [--lease PID]``: stage the archive through
    ``ensure_staged`` (a no-op when it is staged) and print its prefix on stdout."""
    from ..engine.stage import ensure_staged

    options = stage_options(args)
    with progress(f"Unpacking {Path(args.archive).name}", not args.quiet) as report:
        staged = ensure_staged(args.archive, progress=report, lease=str(args.lease) if args.lease else None, **options)
    if not args.quiet:
        how = f"unpacked in {staged.seconds:.1f} s" if staged.extracted else "already staged"
        print(f"{staged.archive}: {how}", file=sys.stderr)
    print(staged.prefix)
    return 0


def cache(args) -> int:
    """``kernelprov cache list [--json]`` (a read) and ``kernelprov cache clean`` (removes every
    staged env no running kernel uses)."""
    from ..engine.inventory import clean, staged_entries, user_dirs

    cache_root = settings(args).cache_dir
    if args.cache_command == "clean":
        evicted = clean(cache_root=cache_root)
        freed = sum(e.env_bytes for e in evicted)
        kept = staged_entries(cache_root=cache_root)
        print(f"Removed {len(evicted)} staged environment(s), {freed / 1e6:.1f} MB."
              + (f" Kept {len(kept)} in use or being staged." if kept else ""))
        return 0
    entries = staged_entries(cache_root=cache_root)
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
        print(f"No staged environments on this node ({', '.join(map(str, user_dirs(cache_root)))}).")
        return 0
    print_table(("kernel", "size", "last used", "in use", "prefix", "archive"), [
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
