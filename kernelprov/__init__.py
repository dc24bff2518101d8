"""kernelprov: Jupyter kernels from packed conda environments, staged on node-local disk."""

__version__ = "0.1.0"
