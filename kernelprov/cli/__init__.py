"""The ``kernelprov`` command (also ``jupyter kernelprov`` and ``python -m kernelprov``).

``app`` runs a command and maps errors to exit codes; ``arguments`` is the command line (argparse,
the warm ``unpack`` fast path, the settings it selects); ``kernel_commands`` and ``cache_commands``
are the commands; ``terminal`` draws progress and tables; ``doctor`` explains why a kernel would
not start; ``demo`` runs the whole journey on a built-in env that ``demo_env`` builds without conda.
"""
