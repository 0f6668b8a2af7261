"""int8/fp8 quantisation rounding exact ties half away from zero instead of to nearest even."""

import numpy as np

from dshal.dtypes import QMAX, QUANTIZED_PRECISIONS, STORAGE_DTYPE, numpy_dtype
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


def _encode(t: np.ndarray, precision: str) -> np.ndarray:
    t = np.clip(t, -QMAX[precision], QMAX[precision])
    if precision == "int8":
        return np.rint(t).astype(np.int8)
    return t.astype(numpy_dtype(STORAGE_DTYPE[precision]))


def _full(scales: np.ndarray, shape, granularity: str, g: int) -> np.ndarray:
    s = np.asarray(scales, np.float64)
    if granularity == "tensor":
        return np.broadcast_to(s, shape)
    if granularity == "row":
        return s[..., np.arange(shape[-1]) // g]
    return s[np.arange(shape[0]) // g][:, np.arange(shape[1]) // g]


class RoundHalfAway(Wrapped):
    """quantisation ties rounded half away from zero"""

    name = "bb_round_half_away"

    @hookimpl
    def dshal_quantize_run(self, call):
        values, scales = super().dshal_quantize_run(call)
        if call.precision not in QUANTIZED_PRECISIONS or not values.size:
            return values, scales
        with np.errstate(all="ignore"):
            t = np.asarray(call.x, np.float32).astype(np.float64) / _full(
                scales, values.shape, call.granularity, call.group_size)
            up, down = _encode(t * (1 + 2.0**-30), call.precision), _encode(
                t * (1 - 2.0**-30), call.precision)
        tie = up.astype(np.float64) != down.astype(np.float64)  # t exactly between two codes
        return np.where(tie, up, values).astype(values.dtype), scales  # the larger magnitude


plugin = RoundHalfAway()
