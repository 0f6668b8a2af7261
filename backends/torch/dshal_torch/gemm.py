"""``gemm`` in torch primitives: the exact product of the (de)quantised operands, accumulated
in IEEE fp32 or exactly.

- fp32 / tf32 / bf16 / fp16: both operands rounded to the format
  (:func:`~dshal_torch.numerics.round_float`), upcast to float32 (exact) and multiplied in IEEE
  fp32 (:func:`~dshal_torch.numerics.matmul_fp32`). A native bf16/fp16 matmul is not used:
  its accumulation may be reduced-precision (cuBLAS split-K reductions, oneDNN), and its
  output is rounded to bf16/fp16 before the bias is added.
- fp8: the operands dequantised to float32 (``value * scale``), then multiplied in fp32.
- int8: exact integer accumulation. An int8 dot product of length <= 1024 is exact in float32
  (|sum| <= 128 * 128 * 1024 = 2**24, and integers below 2**24 add exactly whatever the order),
  so K is cut into such chunks (within each quantisation group), each one float32 matmul,
  summed in int64 and scaled per group in float64 (float32 on devices without float64).
Float inputs at a quantised precision are quantised on the fly as ``quantize`` does (a by row,
b by block); a missing scale is 1. Scales arrive as DESIGN §3.2 shapes them: a_scale a scalar,
[..., M, 1] or [..., M, ceil(K/g)]; b_scale a scalar, [1, N] or [ceil(K/g), ceil(N/g)].
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dshal.calls import GemmCall
from dshal.dtypes import QUANTIZED_PRECISIONS
from dshal.torch.dequant import dequantize_a, dequantize_b
from dshal_torch.numerics import DTYPES, matmul_fp32, round_float
from dshal_torch.quantize import STORAGE, quantize_values

#: longest int8 dot product that float32 accumulates exactly (128 * 128 * 1024 = 2**24)
EXACT_K = 1024
_STORAGE_DTYPES = frozenset(STORAGE.values())
#: torch device types without (or, on Ascend NPUs, without dependable) float64 arithmetic
NO_FLOAT64_DEVICES = frozenset({"mps", "npu"})


def gemm(call: GemmCall) -> torch.Tensor:
    """Run ``gemm`` at ``call.precision``: out [..., M, N] in ``call.out_dtype``."""
    a, b, prec, g = call.a, call.b, call.precision, call.group_size
    if prec == "int8":
        out = _int8_gemm(call)
    elif prec in QUANTIZED_PRECISIONS:
        av, sa = _operand(a, call.a_scale, prec, "row", g)
        bv, sb = _operand(b, call.b_scale, prec, "block", g)
        out = matmul_fp32(dequantize_a(av, sa, g, torch.float32),
                          dequantize_b(bv, sb, g, torch.float32))
    else:
        out = matmul_fp32(round_float(a, prec, copy=False).to(torch.float32),
                          round_float(b, prec, copy=False).to(torch.float32))
    if out.dtype == torch.float64 and call.out_dtype != "float64":
        out = out.to(torch.float32)  # int8 sums stay float64 (exact) only for float64 output
    if call.bias is not None:
        out = out + call.bias.to(out.dtype)
    return out.to(DTYPES[call.out_dtype])


def _operand(x: torch.Tensor, scale: Any, prec: str, granularity: str, g: int
             ) -> tuple[torch.Tensor, Any]:
    """Storage values and their scale (``None`` = 1): as given, or quantised on the fly."""
    if x.dtype in _STORAGE_DTYPES:
        return x, scale
    return quantize_values(x, prec, granularity, g)


def _scale_tensor(scale: Any, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A scale (None, a Python number or a tensor) as a tensor of ``dtype`` on ``like``'s
    device."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        return scale.to(device=like.device, dtype=dtype)
    return torch.full((), float(scale), dtype=dtype, device=like.device)


def _column_scales(scale: Any, b: torch.Tensor, g: int, dtype: torch.dtype
                   ) -> torch.Tensor | None:
    """b_scale broadcastable over b's columns [K or ceil(K/g), N]: a scalar, [1, N], or
    per-block scales expanded along N only (the int8 path applies them per K group)."""
    s = _scale_tensor(scale, b, dtype)
    N = b.shape[1]
    if s is None or s.ndim == 0 or (s.shape[0] == 1 and s.shape[1] in (1, N)):
        return s
    return s.repeat_interleave(g, dim=-1)[..., :N]


def _int8_gemm(call: GemmCall) -> torch.Tensor:
    """Exact integer products of int8 values, scaled per quantisation group."""
    g = call.group_size
    av, sa = _operand(call.a, call.a_scale, "int8", "row", g)
    bv, sb = _operand(call.b, call.b_scale, "int8", "block", g)
    *lead, M, K = av.shape
    N = bv.shape[1]
    acc_dtype = torch.float32 if av.device.type in NO_FLOAT64_DEVICES else torch.float64
    rows = math.prod(av.shape[:-1])
    if K == 0:
        return torch.zeros((*lead, M, N), dtype=acc_dtype, device=av.device)
    a2 = av.reshape(rows, K).to(torch.float32)
    b2 = bv.to(torch.float32)
    one = torch.ones((1, 1), dtype=acc_dtype, device=a2.device)
    sa_t = _scale_tensor(sa, a2, acc_dtype)
    sa_t = one if sa_t is None else sa_t.reshape(1, 1) if sa_t.ndim == 0 \
        else sa_t.reshape(rows, sa_t.shape[-1])  # [rows, 1] or [rows, ceil(K/g)]
    sb_t = _column_scales(sb, b2, g, acc_dtype)
    sb_t = one if sb_t is None else sb_t.reshape(1, 1) if sb_t.ndim == 0 else sb_t
    grouped = sa_t.shape[1] > 1 or sb_t.shape[0] > 1
    bounds = [(k0, min(K, k0 + g)) for k0 in range(0, K, g)] if grouped else [(0, K)]
    acc = torch.zeros((a2.shape[0], N), dtype=acc_dtype, device=a2.device)
    for gi, (k0, k1) in enumerate(bounds):
        part = _exact_dot(a2[:, k0:k1], b2[k0:k1]).to(acc_dtype)
        if grouped:
            part = part * sa_t[:, gi if sa_t.shape[1] > 1 else 0, None]
            part = part * sb_t[gi if sb_t.shape[0] > 1 else 0]
        acc += part
    if not grouped:
        acc = acc * sa_t * sb_t
    return acc.reshape(*lead, M, N)


def _exact_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact product of integer-valued float32 matrices (|entries| <= 128): float32 when
    K <= :data:`EXACT_K`, else int64 sums of exact float32 chunks."""
    k = a.shape[1]
    if k <= EXACT_K:
        return matmul_fp32(a, b)
    acc = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.int64, device=a.device)
    for k0 in range(0, k, EXACT_K):
        acc += matmul_fp32(a[:, k0:k0 + EXACT_K], b[k0:k0 + EXACT_K]).to(torch.int64)
    return acc
