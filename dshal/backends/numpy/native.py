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


# --- the compiled float32 attention, forward and backward (_attention.c) ----------------------


def _load_attention() -> tuple[ModuleType | None, int, str]:
    if os.environ.get("DSHAL_NUMPY_NATIVE", "1").strip() == "0":
        return None, -1, "not built (compiled loops switched off: DSHAL_NUMPY_NATIVE=0)"
    try:
        from dshal.backends.numpy import _attention
    except ImportError as exc:
        return None, -1, f"not built ({exc})"
    isa, asked = _attention.BEST, os.environ.get("DSHAL_NUMPY_ATTENTION_ISA", "").strip()
    note = ""
    if asked in _attention.SUPPORTED:
        isa = _attention.ISAS.index(asked)
    elif asked:
        note = (f"; DSHAL_NUMPY_ATTENTION_ISA={asked!r} ignored: this CPU runs "
                f"{', '.join(_attention.SUPPORTED)}")
    return _attention, isa, (f"compiled float32 tiles (dshal.backends.numpy._attention, "
                             f"{_attention.ISAS[isa]}{note})")


#: the compiled float32 attention (forward and backward of sparse_attention), or None: the
#: forward then runs in numpy passes and the numpy backend does not declare the backward
#: (another backend that declares it serves it). :data:`ATTENTION_ISA` is the build of its
#: tiles that runs (the best this CPU runs, or ``DSHAL_NUMPY_ATTENTION_ISA``: baseline, avx2 or
#: avx512); :data:`ATTENTION_STATUS` says which
ATTENTION, ATTENTION_ISA, ATTENTION_STATUS = _load_attention()
