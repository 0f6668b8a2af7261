"""``quantize`` and ``gemm`` on the device (kernels/quantize.cl, kernels/gemm.cl).

gemm: float inputs at fp8/int8 are first quantised on the device exactly as ``quantize`` does
(a by row, b by block); the pack kernels decode, round or scale the operands into panels; the
tile kernel accumulates in fp32 (int8: exact int32 per scale group) and adds the bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from dshal.calls import GemmCall, QuantizeCall
from dshal.dtypes import QUANTIZED_PRECISIONS, STORAGE_DTYPE
from dshal_kernels import GemmDefines, QuantizeDefines
from dshal_opencl.device import Runtime, Session
from dshal_opencl.programs import programs

#: elements per partial maximum of a tensor-granularity amax
_TENSOR_SLICE = 4096
_NUMPY = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
          "int8": np.int8, "bfloat16": ml_dtypes.bfloat16}
_KERNEL_FLOATS = ("float32", "float16", "bfloat16")
_I32, _F32 = np.int32, np.float32


def _dtype(x: np.ndarray) -> str:
    return np.dtype(x.dtype).name


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


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
        if granularity == "tensor":
            size = math.prod(shape)
            return cls(1, size, 1, max(size, 1), ())
        if granularity == "block":
            return cls(shape[0], shape[1], g, g, (_ceil(shape[0], g), _ceil(shape[1], g)))
        return cls(math.prod(shape[:-1]), shape[-1], 1, g, (*shape[:-1], _ceil(shape[-1], g)))


def quantize_on_device(s: Session, x: Any, dtype: str, grouping: Grouping, precision: str
                       ) -> tuple[Any, Any]:
    """Codes and float32 scales of the device array ``x`` ([R, C] of ``dtype``): buffers."""
    prg = programs().get(QuantizeDefines.make(dtype, precision))
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


def quantize(call: QuantizeCall) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``quantize``: ``(values, scales)`` as numpy arrays."""
    x = np.asarray(call.x)
    dtype, shape = _dtype(x), x.shape
    if call.precision not in QUANTIZED_PRECISIONS:
        out_dtype = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}.get(call.precision,
                                                                          np.float32)
        if x.size == 0:
            return np.zeros(shape, out_dtype), None
        with Runtime.get().session("quantize") as s:
            prg = programs().get(QuantizeDefines.make(dtype, call.precision))
            out = s.alloc(x.size * np.dtype(out_dtype).itemsize, "rounded values")
            s.run(prg.quant_round, (x.size,), s.upload(x, "x"), out, _I32(x.size))
            return s.download(out, shape, out_dtype), None
    gp = Grouping.of(shape, call.granularity, call.group_size)
    storage = _NUMPY[STORAGE_DTYPE[call.precision]]
    if x.size == 0:
        return np.zeros(shape, storage), np.ones(gp.shape, np.float32)
    with Runtime.get().session("quantize") as s:
        codes, scales = quantize_on_device(s, s.upload(x, "x"), dtype, gp, call.precision)
        return (s.download(codes, shape, storage),
                s.download(scales, gp.shape, np.float32))


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
        return (self.buf, _I32(self.rs), _I32(self.cs), _I32(self.rdiv), _I32(self.cdiv))


def _scale_map(s: Session, scale: Any, K: int, N: int | None, g: int, what: str) -> ScaleMap:
    """The map of a given scale (None, scalar or array; shapes as ``dshal.ops.gemm``) of a
    ([rows, K]: ``N`` None) or b ([K, N])."""
    if scale is None or np.ndim(scale) == 0:
        value = 1.0 if scale is None else float(np.asarray(scale, np.float64))
        return ScaleMap(s.upload(np.array([value], _F32), what))
    arr = np.asarray(scale, _F32)
    if N is None:  # a: [..., M, 1] per row or [..., M, ceil(K/g)] per row group
        width = arr.shape[-1]
        buf = s.upload(arr, what)
        return ScaleMap(buf, 1) if width == 1 else ScaleMap(buf, width, 1, 1, g, True)
    buf = s.upload(arr, what)  # b: [1, N] per column or [ceil(K/g), ceil(N/g)] per block
    if arr.shape == (1, N):
        return ScaleMap(buf, 0, 1)
    return ScaleMap(buf, arr.shape[1], 1, g, g, arr.shape[0] > 1)


def _operand(s: Session, x: np.ndarray, scale: Any, precision: str, b_cols: int | None,
             g: int, what: str) -> tuple[Any, str, ScaleMap]:
    """(device values, their dtype, their scale map) of a [rows, K] or b [K, N]: float
    inputs at fp8/int8 are quantised on the device (a by row, b by block)."""
    dtype = _dtype(x)
    if precision in QUANTIZED_PRECISIONS and dtype in _KERNEL_FLOATS:
        gp = Grouping.of(x.shape, "row" if b_cols is None else "block", g)
        codes, scales = quantize_on_device(s, s.upload(x, what), dtype, gp, precision)
        smap = ScaleMap(scales, gp.ngc, 1, gp.gr, gp.gc, _ceil(x.shape[-1 if b_cols is None
                                                                       else 0], g) > 1)
        return codes, STORAGE_DTYPE[precision], smap
    if dtype == "float64":  # rounded to float32 first, as every precision's rounding does
        x, dtype = x.astype(np.float32), "float32"
    return s.upload(x, what), dtype, _scale_map(s, scale, x.shape[-1] if b_cols is None
                                                else x.shape[0], b_cols, g, f"{what}_scale")


def gemm(call: GemmCall) -> np.ndarray:
    """Run ``gemm`` at ``call.precision``: out [..., M, N] in ``call.out_dtype``."""
    a, b, prec, g = np.asarray(call.a), np.asarray(call.b), call.precision, call.group_size
    *lead, M, K = a.shape
    N = b.shape[1]
    rows = math.prod(lead) * M
    kernel_out = call.out_dtype if call.out_dtype in _KERNEL_FLOATS else "float32"
    out_np = _NUMPY.get(kernel_out, np.dtype(kernel_out))
    if rows == 0 or N == 0:
        return np.zeros((*lead, M, N), call.out_dtype)
    tm, tn = GemmDefines.TM, GemmDefines.TN
    Mp, Np = _ceil(rows, tm) * tm, _ceil(N, tn) * tn
    with Runtime.get().session("gemm") as s:
        av, adt, sa = _operand(s, a.reshape(rows, K), call.a_scale, prec, None, g, "a")
        bv, bdt, sb = _operand(s, b, call.b_scale, prec, N, g, "b")
        bias, bias_dt = call.bias, "float32"
        if bias is not None:
            bias_dt = _dtype(np.asarray(bias))
            if bias_dt not in _KERNEL_FLOATS:
                bias, bias_dt = np.asarray(bias, np.float32), "float32"
        prg = programs().get(GemmDefines.make(adt, bdt, prec, kernel_out, bias_dt, tm, tn))
        ap = s.alloc(4 * Mp * K, "packed a")  # float or int32 panels
        bp = s.alloc(4 * Np * K, "packed b")
        s.run(prg.gemm_pack_a, (K, Mp), av, ap, *sa.args(), _I32(rows), _I32(K), _I32(Mp))
        s.run(prg.gemm_pack_b, (Np, K), bv, bp, *sb.args(), _I32(K), _I32(N), _I32(Np))
        out = s.alloc(Mp * Np * np.dtype(out_np).itemsize, "out")  # padded to whole tiles
        bias_buf = s.upload(bias, "bias") if bias is not None else s.alloc(4, "no bias")
        kg = g if prec == "int8" and (sa.along_k or sb.along_k) else max(K, 1)
        s.run(prg.gemm_tile, (Np // tn, Mp // tm), ap, bp, out, bias_buf,
              _I32(bias is not None), *sa.args(), *sb.args(), _I32(rows), _I32(N), _I32(K),
              _I32(kg), _I32(Np))
        result = s.download_corner(out, (Mp, Np), (rows, N), out_np)
    return result.reshape(*lead, M, N).astype(call.out_dtype, copy=False)
