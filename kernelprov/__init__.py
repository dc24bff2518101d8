"""kernelprov: Jupyter kernels from packed conda environments, staged on node-local disk."""

try:  # written at build time from labextension/package.json, the one version source
    from ._version import __version__
except ImportError:  # pragma: no cover - a source tree that was never built or installed
    __version__ = "0+unknown"


def _jupyter_server_extension_points() -> list[dict]:
    """Called by jupyter_server to find the ``kernelprov`` extension; the loader lives in
    ``kernelprov.jupyter.serverext`` so that importing kernelprov (the CLI, the provisioner) never
    imports Tornado."""
    return [{"module": "kernelprov.jupyter.serverext"}]


def _jupyter_labextension_paths() -> list[dict]:
    """Called by ``jupyter labextension develop``: where the built panel is (see labextension/)."""
    return [{"src": "labextension", "dest": "kernelprov"}]
