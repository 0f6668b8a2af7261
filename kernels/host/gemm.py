"""``quantize`` and the kernel path of ``gemm`` (kernels/quantize.cl, kernels/gemm.cl), for any
:class:`Session`.

gemm: float inputs at fp8/int8 are first quantised on the device exactly as ``quantize`` does
(a by row, b by block); the pack kernels decode, round or scale the operands into panels; the
tile kernel accumulates in fp32 (int8: exact int32 per scale group) and adds the bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal.calls import GemmCall, QuantizeCall
from dshal.capabilities import Signature
from dshal.dtypes import QUANTIZED_PRECISIONS, STORAGE_DTYPE, numpy_dtype
from dshal_kernels import GemmDefines, QuantizeDefines
from dshal_kernels.host.session import Session

#: elements per partial maximum of a tensor-granularity amax
_TENSOR_SLICE = 4096
#: largest K of an int8 gemm: exact int32 sums need 128 * 128 * K < 2**31
INT8_MAX_K = (2**31 - 1) // (128 * 128)
KERNEL_FLOATS = ("float32", "float16", "bfloat16")
#: the dtype quant_round writes for each float precision
ROUNDED_DTYPE = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_I32, _F32 = np.int32, np.float32


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def int8_k_reasons(signature: Signature) -> list[str]:
    """Why an int8 gemm call is refused: K above :data:`INT8_MAX_K` (else none)."""
    k = dict(signature.sizes).get("k", 0)
    if signature.op == "gemm" and signature.precision == "int8" and k > INT8_MAX_K:
        return [f"k={k} exceeds {INT8_MAX_K} for precision=int8 (exact int32 accumulation "
                "needs 128*128*k < 2**31)"]
    return []


# --- quantize ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grouping:
    """x viewed as [R, C] in groups of gr x gc (ngr x ngc groups); ``shape`` of the scales."""

    R: int
    C: int
    gr: int
    gc: int
    shape: tuple[int, ...]

    @property
    def ngr(self) -> int:
        return _ceil(self.R, self.gr)

    @property
    def ngc(self) -> int:
        return _ceil(self.C, self.gc)

    @classmethod
    def of(cls, shape: tuple[int, ...], granularity: str, g: int) -> Grouping:
        """The grouping of an array of ``shape`` at ``granularity`` (row, block, tensor)."""
        if granularity == "tensor":
            size = math.prod(shape)
            return cls(1, size, 1, max(size, 1), ())
        if granularity == "block":
            return cls(shape[0], shape[1], g, g, (_ceil(shape[0], g), _ceil(shape[1], g)))
        return cls(math.prod(shape[:-1]), shape[-1], 1, g, (*shape[:-1], _ceil(shape[-1], g)))


def quantize_on_device(s: Session, x: Any, dtype: str, grouping: Grouping, precision: str
                       ) -> tuple[Any, Any]:
    """Codes and float32 scales of the device buffer ``x`` ([R, C] of ``dtype``)."""
    prg = s.program(QuantizeDefines.make(dtype, precision))
    gp = grouping
    n_scales = gp.ngr * gp.ngc
    scales = s.alloc(4 * n_scales, "quantisation scales")
    if gp.shape == ():  # tensor: partial maxima of slices, reduced by quant_scale
        parts = _ceil(gp.C, _TENSOR_SLICE)
        amax = s.alloc(4 * parts, "partial maxima")
        s.run(prg.quant_amax, (parts, 1), x, amax, _I32(1), _I32(gp.C), _I32(1),
              _I32(_TENSOR_SLICE), _I32(1), _I32(parts))
        s.run(prg.quant_scale, (1,), amax, scales, _I32(1), _I32(parts))
    else:
        amax = s.alloc(4 * n_scales, "group maxima")
        s.run(prg.quant_amax, (gp.ngc, gp.ngr), x, amax, _I32(gp.R), _I32(gp.C), _I32(gp.gr),
              _I32(gp.gc), _I32(gp.ngr), _I32(gp.ngc))
        s.run(prg.quant_scale, (n_scales,), amax, scales, _I32(n_scales), _I32(1))
    codes = s.alloc(gp.R * gp.C, "quantised values")
    s.run(prg.quant_encode, (gp.C, gp.R), x, scales, codes, _I32(gp.R), _I32(gp.C),
          _I32(gp.gr), _I32(gp.gc), _I32(gp.ngc))
    return codes, scales


def round_to(s: Session, x: Any, precision: str) -> Any:
    """``x`` rounded to a float ``precision`` (nearest even), as an array of
    :data:`ROUNDED_DTYPE` (float32 for fp32/tf32)."""
    out_dtype = numpy_dtype(ROUNDED_DTYPE[precision])
    if x.size == 0:
        return s.xp.zeros(x.shape, out_dtype)
    prg = s.program(QuantizeDefines.make(np.dtype(x.dtype).name, precision))
    out = s.alloc(x.size * out_dtype.itemsize, "rounded values")
    s.run(prg.quant_round, (x.size,), s.upload(x, "x"), out, _I32(x.size))
    return s.download(out, x.shape, out_dtype)


def quantize(s: Session, call: QuantizeCall) -> tuple[Any, Any]:
    """Run ``quantize`` in session ``s``: ``(values, scales)`` (scales None for rounding)."""
    x = call.x
    if call.precision not in QUANTIZED_PRECISIONS:
        return round_to(s, x, call.precision), None
    gp = Grouping.of(x.shape, call.granularity, call.group_size)
    storage = numpy_dtype(STORAGE_DTYPE[call.precision])
    if x.size == 0:
        return s.xp.zeros(x.shape, storage), s.xp.ones(gp.shape, np.float32)
    codes, scales = quantize_on_device(s, s.upload(x, "x"), np.dtype(x.dtype).name, gp,
                                       call.precision)
    return s.download(codes, x.shape, storage), s.download(scales, gp.shape, np.float32)


# --- gemm -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleMap:
    """Where the scale of element (r, c) lives: ``s[(r // rdiv) * rs + (c // cdiv) * cs]``;
    ``along_k``: it changes along K (int8 then sums each K group separately)."""

    buf: Any
    rs: int = 0
    cs: int = 0
    rdiv: int = 1
    cdiv: int = 1
    along_k: bool = False

    def args(self) -> tuple:
        """The kernel arguments ``(buffer, rs, cs, rdiv, cdiv)``."""
        return (self.buf, _I32(self.rs), _I32(self.cs), _I32(self.rdiv), _I32(self.cdiv))


def scale_layout(shape: tuple[int, ...] | None, K: int, N: int | None, g: int
                 ) -> tuple[int, int, int, int, bool]:
    """``(rs, cs, rdiv, cdiv, along_k)`` of a given scale of ``shape`` (None or () for one
    scalar) of a ([rows, K]: ``N`` None) or b ([K, N]), shapes as ``dshal.ops.gemm``."""
    if not shape:
        return 0, 0, 1, 1, False
    if N is None:  # a: [..., M, 1] per row or [..., M, ceil(K/g)] per row group
        width = shape[-1]
        return (1, 0, 1, 1, False) if width == 1 else (width, 1, 1, g, True)
    if tuple(shape) == (1, N):  # b: [1, N] per column or [ceil(K/g), ceil(N/g)] per block
        return 0, 1, 1, 1, False
    return shape[1], 1, g, g, shape[0] > 1


def _scale_map(s: Session, scale: Any, K: int, N: int | None, g: int, what: str) -> ScaleMap:
    shape = None if scale is None else tuple(getattr(scale, "shape", ()))
    if not shape:
        value = 1.0 if scale is None else float(scale)
        return ScaleMap(s.upload(np.array([value], _F32), what))
    return ScaleMap(s.upload(scale, what, np.float32), *scale_layout(shape, K, N, g))


def _operand(s: Session, x: Any, scale: Any, precision: str, b_cols: int | None,
             g: int, what: str) -> tuple[Any, str, ScaleMap]:
    """(device values, their dtype, their scale map) of a [rows, K] or b [K, N]: float
    inputs at fp8/int8 are quantised on the device (a by row, b by block)."""
    dtype = np.dtype(x.dtype).name
    K = x.shape[-1] if b_cols is None else x.shape[0]
    if precision in QUANTIZED_PRECISIONS and dtype in KERNEL_FLOATS:
        gp = Grouping.of(x.shape, "row" if b_cols is None else "block", g)
        codes, scales = quantize_on_device(s, s.upload(x, what), dtype, gp, precision)
        return codes, STORAGE_DTYPE[precision], ScaleMap(scales, gp.ngc, 1, gp.gr, gp.gc,
                                                         _ceil(K, g) > 1)
    if dtype == "float64":  # rounded to float32 first, as every precision's rounding does
        x, dtype = x.astype(np.float32), "float32"
    return s.upload(x, what), dtype, _scale_map(s, scale, K, b_cols, g, f"{what}_scale")


def gemm(s: Session, call: GemmCall) -> Any:
    """Run ``gemm`` at ``call.precision`` on the gemm kernels: out [..., M, N] in
    ``call.out_dtype``."""
    a, b, prec, g = call.a, call.b, call.precision, call.group_size
    *lead, M, K = a.shape
    N = b.shape[1]
    rows = math.prod(lead) * M
    kernel_out = call.out_dtype if call.out_dtype in KERNEL_FLOATS else "float32"
    out_np = numpy_dtype(kernel_out)
    if rows == 0 or N == 0:
        return s.xp.zeros((*lead, M, N), numpy_dtype(call.out_dtype))
    tm, tn = GemmDefines.TM, GemmDefines.TN
    Mp, Np = _ceil(rows, tm) * tm, _ceil(N, tn) * tn
    av, adt, sa = _operand(s, a.reshape(rows, K), call.a_scale, prec, None, g, "a")
    bv, bdt, sb = _operand(s, b, call.b_scale, prec, N, g, "b")
    bias, bias_dt = call.bias, "float32"
    if bias is not None:
        bias_dt = np.dtype(bias.dtype).name
        if bias_dt not in KERNEL_FLOATS:
            bias, bias_dt = bias.astype(np.float32), "float32"
    prg = s.program(GemmDefines.make(adt, bdt, prec, kernel_out, bias_dt, tm, tn))
    ap = s.alloc(4 * Mp * K, "packed a")  # float or int32 panels
    bp = s.alloc(4 * Np * K, "packed b")
    s.run(prg.gemm_pack_a, (K, Mp), av, ap, *sa.args(), _I32(rows), _I32(K), _I32(Mp))
    s.run(prg.gemm_pack_b, (Np, K), bv, bp, *sb.args(), _I32(K), _I32(N), _I32(Np))
    out = s.alloc(Mp * Np * out_np.itemsize, "out")  # padded to whole tiles
    bias_buf = s.upload(bias, "bias") if bias is not None else s.alloc(4, "no bias")
    kg = g if prec == "int8" and (sa.along_k or sb.along_k) else max(K, 1)
    s.run(prg.gemm_tile, (Np // tn, Mp // tm), ap, bp, out, bias_buf, _I32(bias is not None),
          *sa.args(), *sb.args(), _I32(rows), _I32(N), _I32(K), _I32(kg), _I32(Np))
    result = s.download_corner(out, (Mp, Np), (rows, N), out_np)
    return result.reshape(*lead, M, N).astype(numpy_dtype(call.out_dtype), copy=False)
