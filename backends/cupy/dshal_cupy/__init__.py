"""Host code shared by dshal's CuPy backends (``dshal_cuda``, ``dshal_rocm``).

A backend plugin is a :class:`~dshal_cupy.vendor.Vendor` record (name, DLPack device type,
warp size, which gemm precisions the vendor BLAS serves) bound to
:class:`~dshal_cupy.hooks.CupyBackend`, whose instance is the entry point's object.

Modules: ``vendor`` (the per-vendor facts), ``capabilities`` (the declaration), ``device``
(probe, per-device runtime, launch shapes, the call :class:`~dshal_cupy.device.Session`),
``programs`` (kernels through ``cupy.RawModule``), ``blas`` (float gemm through
cuBLAS/hipBLAS), ``errors``. Nothing imports cupy at module import time.
"""

__version__ = "0.1.0"
