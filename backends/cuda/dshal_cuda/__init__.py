"""dshal's CUDA backend (entry point ``cuda`` in ``dshal.backends``): the NVIDIA facts of
``plugin`` bound to the shared CuPy host code of ``dshal_cupy``."""

__version__ = "0.1.0"
