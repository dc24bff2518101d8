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

import sys
from collections.abc import Sequence

from ..engine import logs
from ..errors import KernelprovError
from . import arguments

log = logs.get_logger("kernelprov")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kernelprov`` and ``jupyter-kernelprov``; returns the exit status.

    Called by :func:`run` (the console scripts, ``python -m kernelprov``, ``run.sh``'s stager) and
    by tests. A plain ``unpack`` command line skips argparse (:func:`.arguments.fast_unpack_args`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fast = arguments.fast_unpack_args(argv)
    args = fast or arguments.parser().parse_args(argv)
    config = {"level": "DEBUG" if args.debug else "WARNING", "format": "kernelprov: %(message)s"}
    if fast:  # a warm unpack logs nothing and never imports logging: configured on its first message
        logs.configure_on_first_message(**config)
    else:  # other commands log through the Jupyter layer's plain loggers too
        import logging

        logging.basicConfig(**config)
    try:
        return _command(args.command)(args) or 0
    except KernelprovError as err:
        if args.debug:
            log.exception("failed")
        print(f"kernelprov: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kernelprov: interrupted", file=sys.stderr)
        return 130


def _command(name: str):
    """The function that runs command ``name``, its module imported only now: the warm ``unpack``
    that ``run.sh`` runs at every kernel start loads none of the others' imports (doctor's
    jupyter_client, install's shutil and kernelspecs)."""
    import importlib

    module, function = _COMMANDS[name]
    return getattr(importlib.import_module(module, __package__), function)


def run() -> None:
    """Console-script entry point (``kernelprov``, ``jupyter-kernelprov``, ``python -m kernelprov``)."""
    sys.exit(main())


#: Every command: the module (relative to this package) and function that run it.
_COMMANDS = {
    "install": (".kernel_commands", "install"),
    "pack": (".kernel_commands", "pack"),
    "list": (".kernel_commands", "list_kernels"),
    "remove": (".kernel_commands", "remove"),
    "unpack": (".cache_commands", "unpack"),
    "cache": (".cache_commands", "cache"),
    "doctor": (".doctor", "run_doctor"),
    "demo": (".demo", "run_demo_command"),
}
