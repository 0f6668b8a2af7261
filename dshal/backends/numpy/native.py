"""The numpy backend's compiled loops (``_native.c``), when they are built and switched on.

Every function of :mod:`._native` computes bitwise what the backend's numpy passes compute,
so the backend uses it where it can and the numpy code stays the fallback (and the check the
tests compare it with). ``DSHAL_NUMPY_NATIVE=0`` switches it off; :data:`STATUS` says which
path runs (``dshal info`` prints it).
"""

from __future__ import annotations

import os
from types import ModuleType

#: codes of the quantised and float formats in ``_native``
QUANTIZED_FORMAT = {"int8": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}
FLOAT_FORMAT = {"tf32": 0, "bf16": 1, "fp16": 2}
#: what ``_native.quantize`` writes: storage codes, float32 values, float32 values x scale
CODES, VALUES, DEQUANT = 0, 1, 2


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("DSHAL_NUMPY_NATIVE", "1").strip() == "0":
        return None, "numpy passes (compiled loops switched off: DSHAL_NUMPY_NATIVE=0)"
    try:
        from dshal.backends.numpy import _native
    except ImportError as exc:
        return None, f"numpy passes (compiled loops not built: {exc})"
    return _native, "compiled loops (dshal.backends.numpy._native)"


#: the compiled module, or None when the numpy passes run instead
NATIVE, STATUS = _load()


def _int8_kernel() -> tuple[bool, str]:
    if NATIVE is None:
        return False, "float32 BLAS (exact in groups of at most 1024 terms)"
    if not getattr(NATIVE, "INT8_KERNEL", False):
        return False, "float32 BLAS (the int32 kernel needs an x86-64 CPU with AVX2)"
    if os.environ.get("DSHAL_NUMPY_INT8_KERNEL", "1").strip() == "0":
        return False, "float32 BLAS (int32 kernel switched off: DSHAL_NUMPY_INT8_KERNEL=0)"
    return True, "int32 kernel (AVX2, dshal.backends.numpy._native)"


#: whether the int8 gemm sums its exact products in the compiled int32 kernel (x86-64 with
#: AVX2) instead of float32 BLAS (bitwise the same results); ``DSHAL_NUMPY_INT8_KERNEL=0``
#: keeps BLAS. :data:`INT8_STATUS` says which (``dshal info`` prints it)
INT8_KERNEL, INT8_STATUS = _int8_kernel()


# --- the compiled backward of sparse_attention (_backward.c) ----------------------------------


def _load_backward() -> tuple[ModuleType | None, int, str]:
    if os.environ.get("DSHAL_NUMPY_NATIVE", "1").strip() == "0":
        return None, -1, "not served (compiled loops switched off: DSHAL_NUMPY_NATIVE=0)"
    try:
        from dshal.backends.numpy import _backward
    except ImportError as exc:
        return None, -1, f"not served (compiled backward not built: {exc})"
    isa, asked = _backward.BEST, os.environ.get("DSHAL_NUMPY_BACKWARD_ISA", "").strip()
    note = ""
    if asked in _backward.SUPPORTED:
        isa = _backward.ISAS.index(asked)
    elif asked:
        note = (f"; DSHAL_NUMPY_BACKWARD_ISA={asked!r} ignored: this CPU runs "
                f"{', '.join(_backward.SUPPORTED)}")
    return _backward, isa, (f"compiled kernel (dshal.backends.numpy._backward, "
                            f"{_backward.ISAS[isa]} tiles{note})")


#: the compiled backward of sparse_attention, or None: the numpy backend then does not declare
#: the backward (another backend that declares it serves it); :data:`BACKWARD_ISA` is the build
#: of its tiles that runs (the best this CPU runs, or ``DSHAL_NUMPY_BACKWARD_ISA``: baseline,
#: avx2 or avx512), :data:`BACKWARD_STATUS` says which
BACKWARD, BACKWARD_ISA, BACKWARD_STATUS = _load_backward()
