"""The ``cuda`` backend: NVIDIA GPUs through CuPy's CUDA build (DLPack device type 2).

Warps of 32 threads; bf16/fp16/tf32 gemm on tensor cores through ``cublasGemmEx``.
"""

from __future__ import annotations

from dshal_cupy.hooks import CupyBackend
from dshal_cupy.vendor import Vendor

CUDA = Vendor(name="cuda", label="CUDA", device_type=2, hip=False, warp=32,
              blas_low_precision=True,
              install='pip install "dshal-cuda[cuda12]" or "dshal-cuda[cuda13]" (CuPy for '
                      "CUDA 12 / 13; the driver must support that CUDA version)")

#: the entry point's object: ``cuda = "dshal_cuda.plugin:hooks"``
hooks = CupyBackend(CUDA)
