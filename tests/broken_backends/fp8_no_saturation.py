"""fp8 quantisation without saturation: x / scale is cast straight to fp8, so a value that
rounds above the format's largest finite value becomes NaN (e4m3) or Inf (e5m2)."""

from dataclasses import replace

import numpy as np

from dshal.backends.numpy.gemm import quantize_values
from dshal.calls import QuantizeCall
from dshal.dtypes import FLOAT_DTYPES
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped

FP8 = ("fp8_e4m3", "fp8_e5m2")


def unsaturated(x, precision, granularity, g):
    values, scales = quantize_values(np.asarray(x), precision, granularity, g)
    s = np.asarray(scales, np.float32)
    if granularity == "row" and s.ndim:
        s = s[..., np.arange(x.shape[-1]) // g]
    elif granularity == "block":
        s = s[np.arange(x.shape[0]) // g][:, np.arange(x.shape[1]) // g]
    with np.errstate(all="ignore"):
        return (np.asarray(x, np.float32) / s).astype(values.dtype), scales  # no clip


class Fp8NoSaturation(Wrapped):
    """fp8 without saturation"""

    name = "bb_fp8_no_saturation"

    @hookimpl
    def dshal_quantize_run(self, call: QuantizeCall):
        if call.precision not in FP8:
            return super().dshal_quantize_run(call)
        return unsaturated(call.x, call.precision, call.granularity, call.group_size)

    @hookimpl
    def dshal_gemm_run(self, call):
        if call.precision in FP8:
            g = call.group_size
            if str(call.a.dtype) in FLOAT_DTYPES:
                call = replace(call, a=(q := unsaturated(call.a, call.precision, "row", g))[0],
                               a_scale=q[1])
            if str(call.b.dtype) in FLOAT_DTYPES:
                call = replace(call, b=(q := unsaturated(call.b, call.precision, "block", g))[0],
                               b_scale=q[1])
        return super().dshal_gemm_run(call)


plugin = Fp8NoSaturation()
