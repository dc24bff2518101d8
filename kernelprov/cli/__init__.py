"""The ``kernelprov`` command (also ``jupyter kernelprov`` and ``python -m kernelprov``).

``app`` parses arguments and maps errors to exit codes; ``doctor`` explains why a kernel would not
start; ``demo`` runs the whole journey on a built-in env that ``demo_env`` builds without conda.
"""
