"""The one exception family of kernelprov.

Every failure a researcher or an admin can act on is a :class:`KernelprovError` whose message is
one sentence saying what went wrong and what to do. The CLI prints it as a single line, the REST
routes map it to an HTTP status, and the provisioner lets it propagate so that JupyterLab shows it
in its "Error Starting Kernel" dialog.
"""


class KernelprovError(Exception):
    """Base of every error kernelprov raises on purpose; its ``str()`` is the user-facing text.

    Raised as ``SomeError(lead, message)`` where a kernel start can meet it: ``lead`` is a short
    sentence saying what failed, without a path ("The archive is damaged."), which the provisioner
    turns into the first sentence of JupyterLab's "Error Starting Kernel" dialog — one monospace
    line, cut at its width, so under 80 characters with the kernel's display name in it; the
    message (the ``str()``, what the CLI prints) names the paths and says what to do. With one
    argument, that is the message and there is no lead.
    """

    #: The short sentence saying what failed, or None.
    lead: str | None = None

    def __init__(self, lead: str = "", message: str = "", *args):
        if message:
            super().__init__(message, *args)
            self.lead = lead
        else:
            super().__init__(lead, *args)


class ConfigError(KernelprovError):
    """A setting (most often an environment variable) has a value kernelprov cannot use."""


class ArchiveError(KernelprovError):
    """The archive is missing, unreadable, of an unknown format, corrupt or unsafe."""


class CacheError(KernelprovError):
    """The node-local cache cannot be used: unwritable, squatted, full, or locked."""


class RelocateError(KernelprovError):
    """The unpacked environment could not be relocated to its cache path."""


class PackError(KernelprovError):
    """conda-pack could not pack the requested environment."""


class KernelspecError(KernelprovError):
    """A kernelspec cannot be written, found or removed."""


class EnvBuildError(KernelprovError):
    """A conda-format demo environment cannot be built from a local CPython."""


def human_size(count: int | float) -> str:
    """``count`` bytes as researchers read sizes ("830 MB", "1.2 GB", decimal units like ``df -H``).

    Used by every message that names a size (errors, the CLI, the panel's server side): raw byte
    counts do not fit JupyterLab's one-line error dialog and nobody reads them."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" or abs(value) >= 100 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - the loop always returns
