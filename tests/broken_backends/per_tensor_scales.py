"""Per-tensor instead of per-group scales: quantize (and gemm's on-the-fly quantisation)
computes one amax for the whole tensor and repeats it in every group's scale."""

from dataclasses import replace

import numpy as np

from dshal.calls import QuantizeCall
from dshal.dtypes import FLOAT_DTYPES, QUANTIZED_PRECISIONS
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class PerTensorScales(Wrapped):
    """per-tensor instead of per-group scales"""

    name = "bb_per_tensor_scales"

    @hookimpl
    def dshal_quantize_run(self, call):
        if call.precision not in QUANTIZED_PRECISIONS:
            return super().dshal_quantize_run(call)
        values, scale = super().dshal_quantize_run(replace(call, granularity="tensor"))
        x, g = call.x, call.group_size
        shape = {"row": (*x.shape[:-1], -(-x.shape[-1] // g)),
                 "block": (-(-x.shape[0] // g), -(-x.shape[-1] // g)) if x.ndim == 2 else (),
                 "tensor": ()}[call.granularity]
        return values, np.full(shape, scale, np.float32)  # one amax repeated in every group

    @hookimpl
    def dshal_gemm_run(self, call):
        if call.precision in QUANTIZED_PRECISIONS:
            for name in ("a", "b"):
                x = getattr(call, name)
                if str(x.dtype) in FLOAT_DTYPES:
                    values, scale = super().dshal_quantize_run(
                        QuantizeCall(x, call.precision, "tensor", call.group_size))
                    call = replace(call, **{name: values, f"{name}_scale": float(scale)})
        return super().dshal_gemm_run(call)


plugin = PerTensorScales()
