"""``quantize`` on the triton backend: scales and codes from :mod:`.kernels.quantize`, bitwise
:func:`dshal.reference.quantize` (correctly rounded divisions, rtne codes)."""

from __future__ import annotations

import math

import torch
import triton

from dshal.calls import QuantizeCall
from dshal.dtypes import QMAX, QUANTIZED_PRECISIONS
from dshal_triton.kernels.common import BF16, FP16, IEEE, TF32
from dshal_triton.kernels.quantize import quantize_kernel, round_kernel

#: torch storage dtype of each quantised precision
STORAGE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8}
#: mantissa bits and smallest normal exponent of each fp8 format (int8: unused)
FP8_GRID = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14), "int8": (0, 0)}
#: round_kernel's mode and result dtype per float precision
ROUNDING = {"fp32": (IEEE, torch.float32), "tf32": (TF32, torch.float32),
            "bf16": (BF16, torch.bfloat16), "fp16": (FP16, torch.float16)}
#: rows per program of row-granularity quantisation; columns per tile
_ROWS, _COLS = 16, 128
_ROUND_BLOCK = 1024


def quantize(call: QuantizeCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``quantize``: ``(values, scales)``, scales ``None`` for the float precisions."""
    if call.precision not in QUANTIZED_PRECISIONS:
        return round_float(call.x, call.precision), None
    return quantize_values(call.x, call.precision, call.granularity, call.group_size)


def round_float(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` rounded to fp32 / tf32 / bf16 / fp16 (nearest even, through float32)."""
    mode, dtype = ROUNDING[precision]
    src = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = src.numel()
    if n:
        round_kernel[(triton.cdiv(n, _ROUND_BLOCK),)](src, out, n, MODE=mode,
                                                                 BLOCK=_ROUND_BLOCK)
    return out


def quantize_values(x: torch.Tensor, precision: str, granularity: str, g: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8/int8 codes (x's shape) and float32 scales for ``granularity`` ``row``
    ([..., ceil(K/g)]), ``block`` (2-D x: [ceil(K/g), ceil(N/g)]) or ``tensor`` (shape ())."""
    if x.dtype == torch.float64:  # codes come from x / scale in float32, as the reference's
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x holds values beyond float32's range (infinite once rounded "
                             "to float32): cannot quantize")
    C = x.shape[-1] if x.ndim else 1
    R = math.prod(x.shape[:-1]) if x.ndim else 1
    x2 = x.reshape(R, C)
    codes = torch.empty((R, C), dtype=STORAGE[precision], device=x.device)
    if granularity == "row":
        per_row, gh, gw = True, 1, g
        scales = torch.empty((R, triton.cdiv(C, g)), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(R, _ROWS), scales.shape[1])
    elif granularity == "block":
        per_row, gh, gw = False, g, g
        scales = torch.empty((triton.cdiv(R, g), triton.cdiv(C, g)), dtype=torch.float32,
                             device=x.device)
        grid = tuple(scales.shape)
    elif granularity == "tensor":
        per_row, gh, gw = False, max(R, 1), max(C, 1)
        scales = torch.empty((1, 1), dtype=torch.float32, device=x.device)
        grid = (1, 1)
    else:
        raise ValueError(f"granularity={granularity!r} (allowed: row, block, tensor)")
    if R * C == 0:
        scales.fill_(1.0)
    else:
        quantize_kernel[grid](
            x2, codes, scales, R, C, gh, gw, *x2.stride(), *codes.stride(), *scales.stride(),
            QMAX=QMAX[precision], INT=precision == "int8", MANT=FP8_GRID[precision][0],
            EMIN=FP8_GRID[precision][1], PER_ROW=per_row,
            BR=_ROWS if per_row else min(_ROWS, triton.next_power_of_2(gh)),
            BC=min(_COLS, triton.next_power_of_2(gw)))
    codes = codes.reshape(x.shape)
    if granularity == "row":
        return codes, scales.reshape(*x.shape[:-1], scales.shape[1])
    if granularity == "tensor":
        return codes, scales.reshape(())
    return codes, scales
