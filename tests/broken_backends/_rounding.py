"""Helpers of the broken backends that round the wrong way."""

import numpy as np

from dshal.dtypes import numpy_dtype


def truncate(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x32`` rounded toward zero to ``dtype`` (float16/bfloat16); results that
    overflow stay infinite."""
    x32 = np.asarray(x32, np.float32)
    if dtype not in ("float16", "bfloat16"):
        return x32.astype(numpy_dtype(dtype))
    with np.errstate(over="ignore", invalid="ignore"):
        r = x32.astype(numpy_dtype(dtype))
        wider = np.isfinite(r) & (np.abs(r.astype(np.float32)) > np.abs(x32))
    bits = r.view(np.uint16).copy()
    bits[wider] -= np.uint16(1)  # sign-magnitude: one ulp toward zero
    return bits.view(r.dtype)
