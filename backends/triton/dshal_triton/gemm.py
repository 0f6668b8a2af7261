"""``gemm`` on the triton backend: every precision through :func:`.kernels.matmul.gemm_kernel`.

- fp32: IEEE fp32 products and sums (``input_precision="ieee"``: never TF32);
- tf32 / bf16 / fp16: operands rounded to the format in the kernel (nearest even), products on
  the tensor cores, fp32 accumulation; inputs already in the format are used as they are;
- fp8 / int8: stored (or quantised on the fly by :mod:`.quantize`: a by row, b by block)
  values on the tensor cores, one fp32 (int32: exact) partial sum per scale group, scaled by
  the group's a and b scales and added in fp32. Scales arrive as DESIGN 3.2 shapes them and
  are expanded to [rows, groups] and [groups, N] views (stride 0 where they broadcast).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton

from dshal.calls import GemmCall
from dshal.dtypes import QUANTIZED_PRECISIONS
from dshal_triton.config import gemm_tiles
from dshal_triton.device import family, upcast_bf16
from dshal_triton.kernels.common import BF16, FP16, IEEE, STORED, TF32
from dshal_triton.kernels.matmul import gemm_kernel
from dshal_triton.quantize import STORAGE, quantize_values

DTYPES = {name: getattr(torch, name) for name in
          ("float16", "bfloat16", "float32", "float64")}
_MODES = {"fp32": IEEE, "tf32": TF32, "bf16": BF16, "fp16": FP16}
_NATIVE = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: an int32 partial sum of int8 products is exact up to 2**31 / 128**2 = 131072 terms
_INT8_SPAN = 65536


def gemm(call: GemmCall) -> torch.Tensor:
    """Run ``gemm`` at ``call.precision``: out [..., M, N] in ``call.out_dtype``."""
    a, b, prec, g = call.a, call.b, call.precision, call.group_size
    *lead, M, K = a.shape
    N = b.shape[1]
    rows = math.prod(lead) * M
    out_dtype = DTYPES[call.out_dtype]
    store = torch.float32 if out_dtype == torch.float64 else out_dtype
    out = torch.empty((rows, N), dtype=store, device=a.device)
    if rows == 0 or N == 0 or K == 0:  # an empty sum: 0, plus the bias
        out.zero_()
        if call.bias is not None:
            out += call.bias.to(torch.float32).to(store)
        return out.reshape(*lead, M, N).to(out_dtype)
    if prec in QUANTIZED_PRECISIONS:
        av, sa = _operand(a, call.a_scale, prec, "row", g)
        bv, sb = _operand(b, call.b_scale, prec, "block", g)
        a2 = av.reshape(rows, K)
        grouped = _grouped(sa, sb)
        span = g if grouped else (min(K, _INT8_SPAN) if prec == "int8" else K)
        groups = triton.cdiv(K, span) if K else 0
        row_s = _row_scales(sa, a2, rows, groups)
        col_s = _col_scales(sb, bv, g, groups)
        mode, kind = STORED, "8"
    else:
        a2, bv = a.reshape(rows, K), b
        native = _NATIVE.get(prec)
        mode = STORED if native is not None and a.dtype == native == b.dtype else _MODES[prec]
        kind = "fp32" if prec == "fp32" else "16"
        span, groups = K, (1 if K else 0)
        row_s = col_s = a2  # unused (SCALED=False)
    tiles = gemm_tiles(family(a), kind)
    bk = tiles.BK
    if prec in QUANTIZED_PRECISIONS and span < bk:  # small groups: a K step within one
        bk = max(32, triton.next_power_of_2(span))
    bias = call.bias if call.bias is not None else out
    grid = (triton.cdiv(rows, tiles.BM) * triton.cdiv(N, tiles.BN),)
    gemm_kernel[grid](
        a2, bv, out, bias, row_s, col_s, rows, N, K, span, groups,
        *a2.stride(), *bv.stride(), *out.stride(), *row_s.stride(), *col_s.stride(),
        MODE=mode, INT=prec == "int8", SCALED=prec in QUANTIZED_PRECISIONS,
        HAS_BIAS=call.bias is not None, UPCAST=upcast_bf16(a),
        BM=tiles.BM, BN=tiles.BN, BK=bk, GM=tiles.GM,
        **launch_options(a, tiles.num_warps, tiles.num_stages))
    return out.reshape(*lead, M, N).to(out_dtype)


def launch_options(x: torch.Tensor, num_warps: int, num_stages: int) -> dict[str, int]:
    """Compiler options of a launch (the interpreter takes none)."""
    return {} if family(x) == "interpreter" else {"num_warps": num_warps,
                                                   "num_stages": num_stages}


def _operand(x: torch.Tensor, scale: Any, prec: str, granularity: str, g: int
             ) -> tuple[torch.Tensor, Any]:
    """Stored values and their scale (``None`` = 1): as given, or quantised on the fly."""
    if x.dtype == STORAGE[prec]:
        return x, scale
    return quantize_values(x, prec, granularity, g)


def _grouped(sa: Any, sb: Any) -> bool:
    """Whether either scale changes along K (then K is walked one group at a time)."""
    a_groups = isinstance(sa, torch.Tensor) and sa.ndim > 0 and sa.shape[-1] > 1
    b_groups = isinstance(sb, torch.Tensor) and sb.ndim == 2 and sb.shape[0] > 1
    return a_groups or b_groups


def _as_tensor(scale: Any, like: torch.Tensor) -> torch.Tensor:
    if scale is None:
        scale = 1.0
    if isinstance(scale, torch.Tensor):
        return scale.to(device=like.device, dtype=torch.float32)
    return torch.full((), float(scale), dtype=torch.float32, device=like.device)


def _row_scales(sa: Any, a2: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """a_scale (scalar, [..., M, 1] or [..., M, groups]) as a [rows, groups] view."""
    s = _as_tensor(sa, a2)
    s = s.reshape(1, 1) if s.ndim == 0 else s.reshape(rows, s.shape[-1])
    return s.expand(rows, max(groups, 1))


def _col_scales(sb: Any, b: torch.Tensor, g: int, groups: int) -> torch.Tensor:
    """b_scale (scalar, [1, N] or [ceil(K/g), ceil(N/g)]) as a [groups, N] view."""
    N = b.shape[1]
    s = _as_tensor(sb, b)
    if s.ndim == 0:
        s = s.reshape(1, 1)
    elif not (s.shape[0] == 1 and s.shape[1] in (1, N)):  # per block: expand along N
        s = s.repeat_interleave(g, dim=1)[:, :N]
    return s.expand(max(groups, 1), N) if s.shape[0] == 1 else s
