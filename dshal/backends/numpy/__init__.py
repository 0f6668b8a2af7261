"""The built-in ``numpy`` backend: a fast CPU path on numpy and its BLAS.

``plugin`` holds the hook implementations; ``attention``, ``gemm`` and ``gating`` the operators.
It is independent of :mod:`dshal.reference`, which certifies it.
"""
