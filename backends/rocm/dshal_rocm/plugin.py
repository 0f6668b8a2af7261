"""The ``rocm`` backend: AMD GPUs through CuPy's ROCm (HIP) build (DLPack device type 10).

Wavefronts of 64 threads; float gemm through hipBLAS sgemm on operands rounded to the
precision (the bf16/fp16 hipBLAS paths are not enabled until certified on AMD hardware).
"""

from __future__ import annotations

from dshal_cupy.hooks import CupyBackend
from dshal_cupy.vendor import Vendor

ROCM = Vendor(name="rocm", label="ROCm", device_type=10, hip=True, warp=64,
              blas_low_precision=False,
              install='pip install "dshal-rocm[rocm7]" (CuPy for ROCm 7; the ROCm runtime '
                      "must be installed on the system)")

#: the entry point's object: ``rocm = "dshal_rocm.plugin:hooks"``
hooks = CupyBackend(ROCM)
