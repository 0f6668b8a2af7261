"""Float gemm (fp32, tf32, bf16, fp16) through the vendor BLAS, with fp32 accumulation.

The result is the exact product of the inputs rounded to the precision (nearest even, by the
``quant_round`` kernel), accumulated in fp32, plus the bias:

- CUDA (``Vendor.blas_low_precision``): ``cublasGemmEx`` with an fp32 output. bf16 / fp16
  operands run on tensor cores with ``CUBLAS_COMPUTE_32F``; tf32 operands are rounded to tf32
  first and run with ``CUBLAS_COMPUTE_32F_FAST_TF32`` (the hardware's own conversion then has
  nothing left to round); fp32 uses ``CUBLAS_COMPUTE_32F_PEDANTIC``, so neither
  ``NVIDIA_TF32_OVERRIDE`` nor ``CUPY_TF32`` can turn it into tf32 silently.
- ROCm: the rounded operands as float32 through ``cupy.matmul`` (hipBLAS sgemm): the same
  exact-product result, on fp32 units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal.calls import GemmCall
from dshal.capabilities import DeviceInfo, Signature
from dshal.dtypes import numpy_dtype
from dshal_kernels.host.gemm import ROUNDED_DTYPE, round_to
from dshal_kernels.host.session import Session


@dataclass(frozen=True)
class BlasPlan:
    """How one precision runs: operand ``storage`` dtype, the cuBLAS data type of that
    storage and the compute type (attribute names of CuPy's runtime / cublas modules), or
    ``compute=""`` for float32 operands through ``cupy.matmul``."""

    storage: str
    data_type: str = ""
    compute: str = ""


_GEMM_EX = {
    "fp32": BlasPlan("float32", "CUDA_R_32F", "CUBLAS_COMPUTE_32F_PEDANTIC"),
    "tf32": BlasPlan("float32", "CUDA_R_32F", "CUBLAS_COMPUTE_32F_FAST_TF32"),
    "bf16": BlasPlan("bfloat16", "CUDA_R_16BF", "CUBLAS_COMPUTE_32F"),
    "fp16": BlasPlan("float16", "CUDA_R_16F", "CUBLAS_COMPUTE_32F"),
}
_MATMUL = BlasPlan("float32")


#: ``DeviceInfo.details`` key of the CUDA probe: compute capability per device ("8.0, 9.0")
CC_KEY = "compute capabilities"
#: the lowest compute capability whose cuBLAS runs gemmEx on each operand format
MIN_CC = {"bf16": (8, 0)}


def arch_reasons(signature: Signature, device: DeviceInfo | None) -> list[str]:
    """Why a gemm precision cannot run in cuBLAS on the call's device (bf16 needs sm_80+)."""
    need = MIN_CC.get(signature.precision or "") if signature.op == "gemm" else None
    found = (device.details.get(CC_KEY, "") if device is not None else "").split(", ")
    index = signature.device[1]
    if need is None or index >= len(found) or not found[index]:
        return []
    have = tuple(int(x) for x in found[index].split("."))
    if have >= need:
        return []
    return [f"precision={signature.precision} needs compute capability >= {need[0]}.{need[1]} "
            f"in cuBLAS; device {index} has {found[index]}"]


def blas_plan(precision: str, low_precision: bool) -> BlasPlan:
    """The plan of a float ``precision``; ``low_precision``: the vendor BLAS runs gemmEx."""
    if precision not in _GEMM_EX:
        raise ValueError(f"precision={precision!r} has no BLAS path (allowed: "
                         f"{', '.join(_GEMM_EX)})")
    return _GEMM_EX[precision] if low_precision else _MATMUL


def _operand(s: Session, x: Any, precision: str, plan: BlasPlan) -> Any:
    """``x`` rounded to ``precision``, stored as ``plan.storage``, C-contiguous."""
    xp, dtype = s.xp, np.dtype(x.dtype).name
    if dtype != ROUNDED_DTYPE[precision] or precision == "tf32":
        x = round_to(s, x, precision)
    return xp.ascontiguousarray(x.astype(numpy_dtype(plan.storage), copy=False))


def _gemm_ex(a: Any, b: Any, c: Any, plan: BlasPlan) -> None:
    """c[M, N] = a[M, K] @ b[K, N] (row-major) on the current stream: column-major cuBLAS
    computes c^T = b^T a^T, i.e. (m, n, k) = (N, M, K) with b first."""
    import cupy
    from cupy.cuda import device, runtime
    from cupy_backends.cuda.libs import cublas

    (M, K), N = a.shape, b.shape[1]
    dtype, compute = getattr(runtime, plan.data_type), getattr(cublas, plan.compute)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    handle = device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, N, M, K,
                      one.ctypes.data, b.data.ptr, dtype, N, a.data.ptr, dtype, K,
                      zero.ctypes.data, c.data.ptr, runtime.CUDA_R_32F, N, compute,
                      cublas.CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)


def gemm(s: Session, call: GemmCall, low_precision: bool) -> Any:
    """``gemm`` at a float precision through the vendor BLAS: out [..., M, N]."""
    xp, a, b = s.xp, call.a, call.b
    *lead, M, K = a.shape
    N, rows = b.shape[1], math.prod(lead) * M
    out = numpy_dtype(call.out_dtype)
    if rows == 0 or N == 0 or K == 0:
        c = xp.zeros((rows, N), np.float32)
    else:
        plan = blas_plan(call.precision, low_precision)
        a2 = _operand(s, a.reshape(rows, K), call.precision, plan)
        b2 = _operand(s, b, call.precision, plan)
        if plan.compute:
            c = xp.empty((rows, N), np.float32)
            _gemm_ex(a2, b2, c, plan)
        else:
            c = xp.matmul(a2, b2)
    if call.bias is not None:
        c += call.bias.astype(np.float32)
    return c.reshape(*lead, M, N).astype(out, copy=False)
