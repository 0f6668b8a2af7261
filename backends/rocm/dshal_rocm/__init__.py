"""dshal's ROCm backend (entry point ``rocm`` in ``dshal.backends``): the AMD facts of
``plugin`` bound to the shared CuPy host code of ``dshal_cupy``."""

__version__ = "0.1.0"
