"""Canonical dtype and precision names, and the numpy view of the low-precision formats.

dshal names dtypes the way numpy/ml_dtypes spell them (``"float32"``, ``"bfloat16"``,
``"float8_e4m3fn"``...), whatever library the array comes from. Precisions of ``gemm`` and
``quantize`` have their own short names (``"fp32"``, ``"bf16"``, ``"fp8_e4m3"``...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
QUANT_DTYPES = (*FP8_DTYPES, "int8")
INDEX_DTYPES = ("int32", "int64")

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8")
GEMM_PRECISIONS = (*PRECISIONS, "auto")
QUANTIZED_PRECISIONS = ("fp8_e4m3", "fp8_e5m2", "int8")
ROUNDED_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")

#: storage dtype of the values of each quantised precision
STORAGE_DTYPE = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "int8": "int8"}
#: dtype of the values of each float precision (tf32 values are float32)
ROUNDED_DTYPE = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: precision implied by a quantised storage dtype
PRECISION_OF_STORAGE = {v: k for k, v in STORAGE_DTYPE.items()}
#: largest finite magnitude of each quantised format (int8 saturates symmetrically to +-127)
QMAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0}
#: unit roundoff (half an ulp at 1.0) of each precision's input rounding
UNIT_ROUNDOFF = {
    "fp64": 2.0**-53,
    "fp32": 2.0**-24,
    "tf32": 2.0**-11,
    "fp16": 2.0**-11,
    "bf16": 2.0**-8,
    "fp8_e4m3": 2.0**-4,
    "fp8_e5m2": 2.0**-3,
    "int8": 0.5 / 127.0,
}
#: unit roundoff of each float dtype
DTYPE_UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
GRANULARITIES = ("row", "block", "tensor")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a canonical dtype name (bfloat16 and float8 come from ml_dtypes)."""
    import numpy as np

    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)
