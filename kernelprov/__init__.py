"""kernelprov: Jupyter kernels from packed conda environments, staged on node-local disk."""

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict]:
    """Called by jupyter_server to find the ``kernelprov`` extension; the loader lives in
    ``kernelprov.jupyter.serverext`` so that importing kernelprov (the CLI, the provisioner) never
    imports Tornado."""
    return [{"module": "kernelprov.jupyter.serverext"}]


def _jupyter_labextension_paths() -> list[dict]:
    """Called by ``jupyter labextension develop``: where the built panel is (see labextension/)."""
    return [{"src": "labextension", "dest": "kernelprov"}]
