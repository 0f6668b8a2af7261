"""The arithmetic every operator of the torch backend builds on, exact wherever DESIGN §3 is.

- :func:`round_float`: rounding to fp32 / tf32 / bf16 / fp16, nearest even, through float32
  first (as :func:`dshal.reference.round_to_precision`); tf32 on the float32 bit pattern.
- :func:`true_divide`: IEEE division by a tensor on the dividend's device. torch's CUDA kernel
  computes ``a / s`` for a CPU scalar ``s`` (a Python number or a 0-d CPU tensor) as
  ``a * (1 / s)``, which is not correctly rounded; a divisor on the device is divided by.
- :func:`~dshal.torch.precision.matmul_fp32` and :func:`~dshal.torch.precision.ieee_fp32`
  (dshal's torch integration, shared with the autograd backward passes): float32 matmuls in
  IEEE fp32 whatever TF32/HF32 settings the caller made.
"""

from __future__ import annotations

import torch

from dshal.torch.precision import ieee_fp32, matmul_fp32

__all__ = ["DTYPES", "ieee_fp32", "matmul_fp32", "round_float", "true_divide"]

#: torch dtypes by canonical dshal name
DTYPES = {name: getattr(torch, name) for name in
          ("float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8")}
#: the float precisions stored in a narrower dtype
_NARROW = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: 0xFFFFE000 as int32: the sign, exponent and 10 mantissa bits TF32 keeps
_TF32_KEEP = -0x2000


def round_float(x: torch.Tensor, precision: str, *, copy: bool = True) -> torch.Tensor:
    """``x`` rounded to ``fp32`` / ``tf32`` / ``bf16`` / ``fp16``, nearest even, via float32.

    fp32 and tf32 come back as float32 (tf32: the mantissa rounded to 10 bits), bf16 as
    bfloat16, fp16 as float16; values beyond a format's range become +-inf, NaN/Inf stay.
    A new tensor, except that ``copy=False`` lets fp32 return a float32 ``x`` itself.
    """
    if precision in _NARROW:
        return x.to(torch.float32).to(_NARROW[precision])
    x32 = x.to(torch.float32, copy=copy or precision == "tf32")
    if precision == "fp32":
        return x32
    if precision != "tf32":
        raise ValueError(f"precision={precision!r} is not a float precision "
                         "(fp32, tf32, bf16, fp16)")
    # round half to even on the bits: add 0xFFF plus the lowest kept bit, clear the 13 below.
    # int32 arithmetic equals uint32 arithmetic here: only NaN patterns could overflow
    bits = x32.view(torch.int32)
    rounded = (bits + (0x0FFF + ((bits >> 13) & 1))) & _TF32_KEEP
    return torch.where(torch.isfinite(x32), rounded.view(torch.float32), x32)


def true_divide(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b``, correctly rounded on every device: ``b`` is made a tensor on ``a``'s device
    (a CPU scalar divisor would let CUDA multiply by its reciprocal instead)."""
    if not isinstance(b, torch.Tensor):
        b = torch.full((), b, dtype=a.dtype, device=a.device)
    elif b.device != a.device:
        b = b.to(a.device)
    return torch.div(a, b)
