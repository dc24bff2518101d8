"""The ``kernelprov`` command line (also ``jupyter kernelprov`` and ``python -m kernelprov``).

A thin layer over the plain functions the provisioner and REST API share: :func:`main` parses the
command line (:mod:`.arguments`), runs one command from the table below, and turns every
:class:`~kernelprov.errors.KernelprovError` into a one-line message and a non-zero exit. ``main(argv)``
is callable from tests. The commands live in the modules named for what they act on:

``kernel_commands``  ``pack``, ``install``, ``list``, ``remove``
``cache_commands``   ``unpack`` (the warm path ``run.sh`` runs), ``cache list``, ``cache clean``
``doctor``           ``doctor``
``demo``             ``demo``
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from ..errors import KernelprovError
from . import arguments, cache_commands, kernel_commands

log = logging.getLogger("kernelprov")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kernelprov`` and ``jupyter-kernelprov``; returns the exit status.

    Called by :func:`run` (the console scripts, ``python -m kernelprov``, ``run.sh``'s stager) and
    by tests. A plain ``unpack`` command line skips argparse (:func:`.arguments.fast_unpack_args`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = arguments.fast_unpack_args(argv) or arguments.parser().parse_args(argv)
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


def _doctor(args) -> int:
    # Imported on use: doctor imports jupyter_client, which the warm `unpack` must not load.
    from .doctor import run_doctor

    return run_doctor(args)


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(cache_dir=args.cache_dir)


def run() -> None:
    """Console-script entry point (``kernelprov``, ``jupyter-kernelprov``, ``python -m kernelprov``)."""
    sys.exit(main())


_COMMANDS = {
    "install": kernel_commands.install,
    "pack": kernel_commands.pack,
    "list": kernel_commands.list_kernels,
    "remove": kernel_commands.remove,
    "unpack": cache_commands.unpack,
    "cache": cache_commands.cache,
    "doctor": _doctor,
    "demo": _demo,
}
