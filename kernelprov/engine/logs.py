"""The engine's loggers, made on their first message.

Every engine module logs through ``log = get_logger(__name__)`` instead of ``logging.getLogger``:
the object stands in for the ``logging.Logger`` of that name and imports :mod:`logging` only when
a message is logged. ``run.sh`` runs ``python -m kernelprov unpack`` at every kernel start in
clients without the provisioner, and a warm call logs nothing; importing :mod:`logging` (with the
``threading``, ``traceback``, ``string`` and ``weakref`` it brings) was a fifth of that call's
cost (issue 13, point 4). Written by hand because the standard library has no lazy logger; it
holds no state of its own, so handlers, levels and ``caplog`` see the real logger.

:func:`configure_on_first_message` is how the CLI's warm ``unpack`` asks for ``logging.basicConfig``
without importing :mod:`logging` itself: the configuration is applied just before the first
message any engine logger passes on (or at once, when :mod:`logging` is already loaded). Only
that command may defer it: the others also log through the Jupyter layer's plain loggers, which
would never apply it, so they configure :mod:`logging` at once.
"""

from __future__ import annotations

import sys

_pending_config: dict | None = None


class EngineLogger:
    """A ``logging.Logger`` by name, resolved on each use (``logging.getLogger`` caches it)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str):
        return getattr(_real_logger(self.name), attribute)

    def __repr__(self) -> str:
        return f"<EngineLogger {self.name}>"


def get_logger(name: str) -> EngineLogger:
    """The logger of module ``name``; called once at import by each engine module."""
    return EngineLogger(name)


def configure_on_first_message(**basic_config) -> None:
    """Called by :func:`kernelprov.cli.app.main` for ``unpack``: ``logging.basicConfig(**basic_config)`` now if
    :mod:`logging` is loaded, else before the first engine logger is used."""
    global _pending_config
    if "logging" in sys.modules:
        sys.modules["logging"].basicConfig(**basic_config)
    else:
        _pending_config = basic_config


def _real_logger(name: str):
    global _pending_config
    import logging

    if _pending_config is not None:
        config, _pending_config = _pending_config, None
        logging.basicConfig(**config)
    return logging.getLogger(name)
