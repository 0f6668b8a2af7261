"""fp8/int8 values times their scales, in torch: the operands gemm multiplies.

Scales come as DESIGN 3.2 shapes them: ``a_scale`` a scalar, [..., M, 1] or
[..., M, ceil(K/g)]; ``b_scale`` a scalar, [1, N] or [ceil(K/g), ceil(N/g)]; ``None`` means 1.
Shared by the torch backend's gemm and the straight-through backward of ``torch.ops.dshal.gemm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _expand_groups(s: Tensor, g: int, size: int, dim: int) -> Tensor:
    """Per-group scales along ``dim`` -> per element (``size`` elements)."""
    return s.repeat_interleave(g, dim=dim).narrow(dim, 0, size)


def _dequantize(values: Tensor, scale: Tensor | float | None, cdt: torch.dtype,
                expand: Any) -> Tensor:
    """``values * scale`` in ``cdt``; a scale array is first expanded to values' shape by
    ``expand(scale, values)``."""
    x = values.to(cdt)
    if scale is None:
        return x
    if not isinstance(scale, Tensor):
        return x * scale
    s = scale.to(cdt)
    return x * (s if s.ndim == 0 else expand(s, x))


def dequantize_a(values: Tensor, scale: Tensor | float | None, g: int, cdt: torch.dtype
                 ) -> Tensor:
    """``values * a_scale`` for a [..., M, K]: scale scalar, [..., M, 1] or [..., M, ceil(K/g)]."""
    return _dequantize(values, scale, cdt, lambda s, a: s if s.shape[-1] == 1 else
                       _expand_groups(s, g, a.shape[-1], -1))


def dequantize_b(values: Tensor, scale: Tensor | float | None, g: int, cdt: torch.dtype
                 ) -> Tensor:
    """``values * b_scale`` for b [K, N]: scale scalar, [1, N] or [ceil(K/g), ceil(N/g)]."""

    def expand(s: Tensor, b: Tensor) -> Tensor:
        K, N = b.shape
        if s.shape[0] == 1 and s.shape[1] in (1, N):  # per column (or one value)
            return s
        return _expand_groups(_expand_groups(s, g, K, 0), g, N, 1)  # per block

    return _dequantize(values, scale, cdt, expand)
