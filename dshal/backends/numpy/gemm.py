"""``quantize`` and ``gemm`` on the CPU with numpy/OpenBLAS.

quantize works in cache-sized chunks of rows (cast to float32, group absolute max on the bit
patterns, divide, round) so that the pipeline costs a few passes over the input, with its
temporaries in per-thread scratch (:mod:`.scratch`); fp8 values are rounded onto the grid in
float32 and their codes read off the bits (bitwise ml_dtypes' round-to-nearest-even cast,
several times faster than that cast) and decoded through a 256-entry table. Large inputs
are quantised in chunks on every CPU. Where the compiled loops of :mod:`.native` are built,
they run the same arithmetic fused, one pass per group in cache (bitwise the same results).
gemm multiplies in float32 BLAS for every precision:

- fp32 / tf32 / bf16 / fp16: the operands are rounded to the format, then multiplied in fp32;
- fp8: the operands are dequantised to float32 (value * scale), then multiplied; float inputs
  are rounded onto the fp8 grid in float32 arithmetic (:func:`round_fp8`, no codes), bitwise
  what quantize then decode gives;
- int8: exact integer accumulation within each scale group. Any int8 dot product of length
  <= 1024 is exact in float32 (|sum| <= 128 * 128 * 1024 = 2**24), so each group is one float32
  BLAS product (longer groups sum chunks of 1024 in float64), scaled by its rank-1 (row x
  column block) scale and summed across groups in float32 (float64 for float64 output), in
  panels of rows on every CPU. On x86-64 with AVX2 the compiled int32 kernel
  (:class:`_IntKernel`) computes the same group sums in integer arithmetic and rounds their
  scaling alike: bitwise the same results, at about fp32's speed instead of 1.4x its time.
  numpy's integer matmul is never used: it wraps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from dshal.backends.numpy import native
from dshal.backends.numpy.attention import parallel_spans
from dshal.backends.numpy.scratch import scratch
from dshal.calls import GemmCall, QuantizeCall
from dshal.dtypes import QMAX, QUANTIZED_PRECISIONS, STORAGE_DTYPE
from dshal.validate import ceil_div

#: float32 elements per cache-resident chunk of the quantize pipeline
_CHUNK = 1 << 19
#: elements of one int8 gemm panel (rows x N): its product and sum stay in cache
_PANEL = 1 << 19
#: longest int8 dot product that float32 accumulates exactly (128 * 128 * 1024 = 2**24)
EXACT_K = 1024

_STORAGE = {p: np.dtype(getattr(ml_dtypes, d, d)) for p, d in STORAGE_DTYPE.items()}
_STORAGE_PRECISION = {v: k for k, v in _STORAGE.items()}
_TINY = np.finfo(np.float32).tiny
#: (mantissa bits, exponent bias) of the fp8 formats
_FP8_LAYOUT = {"fp8_e4m3": (3, 7), "fp8_e5m2": (2, 15)}
#: every fp8 code's float32 value
_FP8_TABLE = {_STORAGE[p]: np.arange(256, dtype=np.uint8).view(_STORAGE[p]).astype(np.float32)
              for p in _FP8_LAYOUT}


#: the float precisions stored in a narrower dtype
_NARROW = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}


# --- rounding to a float precision ------------------------------------------------------------


def round_float(x: np.ndarray, precision: str, *, copy: bool = True) -> np.ndarray:
    """``x`` rounded to fp32 / tf32 / bf16 / fp16 (nearest even, through float32 first).

    fp32 and tf32 come back as float32 (tf32: mantissa rounded to 10 bits), bf16 as
    ``ml_dtypes.bfloat16``, fp16 as float16. ``copy=False`` lets fp32 return ``x`` itself.
    The compiled loops, where built, round tf32/bf16/fp16 in one pass.
    """
    if native.NATIVE is not None and precision in native.FLOAT_FORMAT:
        return _round_native(native.NATIVE, x, precision, codes=True)
    with np.errstate(over="ignore"):
        if precision in _NARROW:  # the cast makes the new array: no float32 copy first
            return np.asarray(x, np.float32).astype(_NARROW[precision])
        x32 = np.array(x, dtype=np.float32, copy=copy or x.dtype != np.float32)
        if precision == "fp32":
            return x32
    if precision != "tf32":
        raise ValueError(f"precision={precision!r} is not a float precision")
    if x32 is x:
        x32 = x32.copy()
    special = ~np.isfinite(x32)
    kept = x32[special] if special.any() else None
    bits = x32.view(np.uint32)
    lsb = (bits >> np.uint32(13)) & np.uint32(1)
    bits += np.uint32(0x0FFF)
    bits += lsb
    bits &= np.uint32(0xFFFFE000)
    if kept is not None:  # NaN/Inf pass through unchanged
        x32[special] = kept
    return x32


def rounded_fp32(x: np.ndarray, precision: str) -> np.ndarray:
    """``x`` rounded to a float precision, as float32 (``x`` itself for float32 ``x`` at
    fp32): gemm's operands. The compiled loops round in float32 in one pass (spans of rows on
    every CPU); without them, :func:`round_float` and a cast back."""
    lib = native.NATIVE
    if lib is None or precision == "fp32":
        return round_float(x, precision, copy=False).astype(np.float32, copy=False)
    return _round_native(lib, x, precision, codes=False)


def _round_native(lib, x: np.ndarray, precision: str, *, codes: bool) -> np.ndarray:
    """``x`` rounded to tf32/bf16/fp16 by the compiled loops (spans of rows on every CPU):
    float32 grid values, or with ``codes=True`` bf16/fp16 in their storage dtype."""
    with np.errstate(over="ignore"):
        src = np.asarray(x, np.float32, order="C")
    codes = codes and precision in _NARROW
    out = np.empty(src.shape, _NARROW[precision] if codes else np.float32)
    if not out.size:
        return out
    width = src.shape[-1] if src.ndim else 1
    rows = src.reshape(-1, width)
    orows = (out.view(np.uint16) if codes else out).reshape(-1, width)
    fmt = native.FLOAT_FORMAT[precision]
    parallel_spans(lambda a, z: lib.round_float(rows[a:z], orows[a:z], fmt, codes),
                   rows.shape[0], src.size)
    return out


# --- quantize ---------------------------------------------------------------------------------


def quantize(call: QuantizeCall) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``quantize``: ``(values, scales)`` (scales ``None`` for float precisions)."""
    x = np.asarray(call.x)
    if call.precision not in QUANTIZED_PRECISIONS:
        return round_float(x, call.precision), None
    return quantize_values(x, call.precision, call.granularity, call.group_size)


def quantize_values(x: np.ndarray, precision: str, granularity: str, g: int,
                    dtype: np.dtype | None = None, *, dequantize: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """fp8/int8 values and float32 scales of ``x`` (scale = amax / qmax per group, 1 where 0).

    The values come in the storage dtype, or with ``dtype=float32`` as the float32 numbers
    they stand for (what :func:`decode` gives, without the codes: gemm's on-the-fly operands),
    and with ``dequantize=True`` too those numbers times their scales (float32 products).

    Chunks are independent (they write disjoint values and scales), so large inputs are split
    over the CPUs (:func:`parallel_spans`); results do not depend on the split.
    """
    values = np.empty(x.shape, dtype or _STORAGE[precision])
    if dequantize and values.dtype != np.float32:
        raise ValueError("dequantize=True needs float32 values")
    lib = native.NATIVE
    if lib is not None:
        return _quantize_native(lib, x, values, precision, granularity, g, dequantize)
    values, scales = _quantize_numpy(x, values, precision, granularity, g)
    if dequantize:
        values = _scaled_b(values, scales, g) if granularity == "block" else \
            _scaled_a(values, scales, g)
    return values, scales


def _quantize_numpy(x: np.ndarray, values: np.ndarray, precision: str, granularity: str,
                    g: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_values` in numpy passes, chunk by chunk."""
    qmax = np.float32(QMAX[precision])
    if granularity == "tensor":
        flat, vflat = x.reshape(1, x.size), values.reshape(1, x.size)
        parts: list[np.ndarray] = []

        def span_amax(a: int, z: int) -> None:
            m = np.zeros((), np.float32)
            for r0 in range(a, z, _CHUNK):
                chunk = _as_float32(flat[:, r0:min(z, r0 + _CHUNK)], 0)[0]
                m = np.maximum(m, _amax(chunk, (0, 1)))
            parts.append(m)

        parallel_spans(span_amax, x.size, x.size, _CHUNK)
        scale = _scale(np.maximum.reduce(parts, initial=np.float32(0)), qmax)

        def span_tensor(a: int, z: int) -> None:
            for r0 in range(a, z, _CHUNK):
                r1 = min(z, r0 + _CHUNK)
                c = _divided(*_as_float32(flat[:, r0:r1], 0), scale, (1, r1 - r0))
                _encode(c, vflat[:, r0:r1], precision, scale)

        parallel_spans(span_tensor, x.size, x.size, _CHUNK)
        return values, scale
    if granularity == "block":
        K, N = x.shape
        nk, nn = ceil_div(K, g), ceil_div(N, g)
        scales = np.ones((nk, nn), np.float32)
        cols = max(1, _CHUNK // (g * g))  # column tiles per chunk

        def span_block(a: int, z: int) -> None:
            for kb in range(a, z):
                for nb in range(0, nn, cols):
                    ne = min(nn, nb + cols)
                    rows, span = slice(kb * g, (kb + 1) * g), slice(nb * g, min(N, ne * g))
                    c = _padded(x[rows, span], (ne - nb) * g)
                    tiles = c.reshape(c.shape[0], ne - nb, g)
                    scales[kb, nb:ne] = s = _scale(_amax(tiles, (0, 2)), qmax)
                    tiles /= s[None, :, None]
                    _encode(c[:, : span.stop - span.start], values[rows, span], precision, s)

        parallel_spans(span_block, nk, x.size)
        return values, scales
    K = x.shape[-1]
    nk = ceil_div(K, g)
    rows = x.reshape(math.prod(x.shape[:-1]), K)
    scales = np.ones((rows.shape[0], nk), np.float32)
    if nk:
        parallel_spans(lambda a, z: quantize_rows(rows[a:z], values.reshape(rows.shape)[a:z],
                                                  scales[a:z], precision, g),
                       rows.shape[0], x.size, _row_step(K, g))
    return values, scales.reshape(*x.shape[:-1], nk)


def _quantize_native(lib, x: np.ndarray, values: np.ndarray, precision: str,
                     granularity: str, g: int, dequantize: bool,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_values` through the compiled loops: each group's max, scale and
    encoding in one pass while the group is in cache; spans of rows on every CPU."""
    fmt = native.QUANTIZED_FORMAT[precision]
    out, what = _native_target(values, dequantize)
    if granularity == "tensor":
        flat, oflat = x.reshape(1, x.size), out.reshape(1, x.size)
        parts: list[float] = []
        parallel_spans(lambda a, z: parts.extend(
            lib.amax(_as_float32(flat[:, r0:min(z, r0 + _CHUNK)], 0)[0])
            for r0 in range(a, z, _CHUNK)), x.size, x.size, _CHUNK)
        scale = _scale(np.float32(max(parts, default=0.0)), np.float32(QMAX[precision]))

        def span_tensor(a: int, z: int) -> None:
            for r0 in range(a, z, _CHUNK):
                r1 = min(z, r0 + _CHUNK)
                lib.quantize(_as_float32(flat[:, r0:r1], 0)[0], oflat[:, r0:r1],
                             scale.reshape(1, 1), 1, r1 - r0, fmt, what, True)

        parallel_spans(span_tensor, x.size, x.size, _CHUNK)
        return values, scale
    if granularity == "block":
        K, N = x.shape
        scales = np.ones((ceil_div(K, g), ceil_div(N, g)), np.float32)

        def span_block(a: int, z: int) -> None:
            for kb in range(a, z):  # one block row (g rows of x) per call
                rows = slice(kb * g, (kb + 1) * g)
                lib.quantize(_as_float32(x[rows], 0)[0], out[rows], scales[kb:kb + 1], g, g,
                             fmt, what, False)

        parallel_spans(span_block, scales.shape[0], x.size)
        return values, scales
    K = x.shape[-1]
    R = math.prod(x.shape[:-1])
    rows, out_rows = x.reshape(R, K), out.reshape(R, K)
    scales = np.ones((R, ceil_div(K, g)), np.float32)
    if scales.size:
        parallel_spans(lambda a, z: _native_rows(lib, rows[a:z], out_rows[a:z], scales[a:z],
                                                 fmt, what, g),
                       R, x.size, _row_step(K, g))
    return values, scales.reshape(*x.shape[:-1], scales.shape[1])


def _native_target(values: np.ndarray, dequantize: bool = False) -> tuple[np.ndarray, int]:
    """What ``_native.quantize`` writes into for ``values``, and which ``what``: fp8/int8
    storage as byte codes, float32 as values (times their scales with ``dequantize``)."""
    if values.dtype != np.float32:
        return values.view(np.uint8), native.CODES
    return values, native.DEQUANT if dequantize else native.VALUES


def _native_rows(lib, rows: np.ndarray, out: np.ndarray, scales: np.ndarray, fmt: int,
                 what: int, g: int) -> None:
    """Row quantisation through the compiled loops: float32 rows in one call, other dtypes
    converted to float32 chunk by chunk first."""
    if rows.dtype == np.float32 and (rows.shape[1] < 2 or rows.strides[1] == 4):
        lib.quantize(rows, out, scales, 1, g, fmt, what, False)
        return
    step = _row_step(rows.shape[1], g)
    for r0 in range(0, rows.shape[0], step):
        r1 = min(rows.shape[0], r0 + step)
        src = _as_float32(rows[r0:r1], 0)[0]
        lib.quantize(src, out[r0:r1], scales[r0:r1], 1, g, fmt, what, False)


def _row_step(K: int, g: int) -> int:
    """Rows per chunk of row quantisation."""
    return max(1, _CHUNK // max(1, ceil_div(K, g) * g))


def quantize_rows(rows: np.ndarray, values: np.ndarray, scales: np.ndarray, precision: str,
                  g: int) -> None:
    """Row quantisation of ``rows`` [R, K] into ``values`` [R, K] and ``scales``
    [R, ceil(K/g)], chunk by chunk on the calling thread."""
    lib = native.NATIVE
    if lib is not None:
        out, what = _native_target(values)
        _native_rows(lib, rows, out, scales, native.QUANTIZED_FORMAT[precision], what, g)
        return
    K = rows.shape[1]
    nk, step = ceil_div(K, g), _row_step(K, g)
    qmax = np.float32(QMAX[precision])
    for r0 in range(0, rows.shape[0], step):
        r1 = min(rows.shape[0], r0 + step)
        src, fresh = _as_float32(rows[r0:r1], nk * g)
        shape = (r1 - r0, nk, g)
        scales[r0:r1] = s = _scale(_amax(src.reshape(shape), (2,)), qmax)
        c = _divided(src, fresh, s[..., None], shape)
        _encode(c[:, :K], values[r0:r1], precision, s)


def _padded(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` [r, n] as float32 [r, max(n, width)] (zero padded on the right), in the calling
    thread's chunk scratch (overwritten by the next chunk)."""
    out = scratch("chunk", (x.shape[0], max(x.shape[1], width)), np.float32)
    with np.errstate(over="ignore"):  # float64 beyond float32's range: caught by _scale
        np.copyto(out[:, : x.shape[1]], x, casting="unsafe")
    out[:, x.shape[1]:] = 0
    return out


def _as_float32(x: np.ndarray, width: int) -> tuple[np.ndarray, bool]:
    """``(x as float32 [r, max(n, width)], whether that is a scratch copy)``: x itself when it
    is float32, wide enough and contiguous along its rows, so that the division (or a
    compiled loop) can read it where it is."""
    if x.dtype == np.float32 and x.shape[1] >= width and (x.shape[1] < 2 or x.strides[1] == 4):
        return x, False
    return _padded(x, width), True


def _divided(x: np.ndarray, fresh: bool, s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 ``x / s`` (``s`` broadcast over x viewed as ``shape``): in place when ``x`` is a
    scratch copy, else into scratch (no copy of x first)."""
    out = x if fresh else scratch("divided", x.shape, np.float32)
    np.divide(x.reshape(shape), s, out=out.reshape(shape))
    return out


def _amax(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """Max of |x| over ``axis``: on the bit patterns, where int max is a fast SIMD reduction
    (non-negative floats order like their bits)."""
    bits = np.bitwise_and(x.view(np.int32), np.int32(0x7FFFFFFF),
                          out=scratch("amax", x.shape, np.int32))
    return bits.max(axis=axis, initial=0).view(np.float32)


def _scale(amax: np.ndarray, qmax: np.float32) -> np.ndarray:
    """float32 ``amax / qmax``, 1 where that is 0."""
    if not np.isfinite(amax).all():
        raise ValueError("x holds values beyond float32's range: cannot quantize")
    s = np.asarray(amax / qmax, np.float32)
    return np.where(s == 0, np.float32(1), s).astype(np.float32)


def _encode(scaled: np.ndarray, out: np.ndarray, precision: str, scales: np.ndarray) -> None:
    """Saturate and round float32 ``x / scale`` (``scaled``, overwritten) to nearest even into
    ``out``: storage codes, or float32 numbers when ``out`` is float32.

    With normal (not subnormal) scales ``|x| / scale <= qmax * (1 + 2u)``, which rounds to at
    most qmax, so the saturation pass is needed only when a scale is subnormal (clipping to the
    integer qmax before rounding gives what rounding first would).
    """
    qmax = np.float32(QMAX[precision])
    if (scales < _TINY).any():
        np.clip(scaled, -qmax, qmax, out=scaled)
    if precision == "int8":
        np.rint(scaled, out=out, casting="unsafe")
    elif out.dtype == np.float32:
        round_fp8(scaled, out, *_FP8_LAYOUT[precision])
    else:
        _encode_fp8(scaled, out.view(np.uint8), *_FP8_LAYOUT[precision])


def _encode_fp8(x: np.ndarray, out: np.ndarray, mbits: int, bias: int) -> None:
    """Bit codes of float32 ``x`` (finite, within the format's range) rounded to nearest even
    into an fp8 format with ``mbits`` mantissa bits and exponent ``bias`` (bitwise what
    ml_dtypes' cast gives, several times faster).

    ``x`` is rounded onto the grid in float32 (:func:`_round_to_grid`), then multiplied by
    ``2**(bias - 127)``: exact, it turns float32's exponent field into the fp8 one and the fp8
    subnormals into float32 subnormals with the same mantissa bits (this relies on gradual
    underflow, numpy's default), so the code is the float32 bits shifted right by
    ``23 - mbits`` (the sign lands above the low byte and is put back from ``x``).
    """
    grid = scratch("fp8-grid", x.shape, np.float32)
    _round_to_grid(x, grid, mbits, bias)
    grid *= np.float32(2.0 ** (bias - 127))
    codes = grid.view(np.uint32)
    codes >>= np.uint32(23 - mbits)
    np.copyto(out, codes, casting="unsafe")
    sign = np.signbit(x, out=scratch("fp8-sign", x.shape, bool)).view(np.uint8)
    sign <<= np.uint8(7)
    out |= sign


def round_fp8(x: np.ndarray, out: np.ndarray, mbits: int, bias: int) -> None:
    """float32 ``x`` (finite, within the format's range) rounded to nearest even onto the grid
    of an fp8 format (``mbits`` mantissa bits, exponent ``bias``), as float32 into ``out``:
    bitwise the decoded :func:`_encode_fp8` codes, -0.0 included."""
    _round_to_grid(x, out, mbits, bias)
    np.copysign(out, x, out=out)


def _round_to_grid(x: np.ndarray, out: np.ndarray, mbits: int, bias: int) -> None:
    """``x`` rounded to nearest even onto the fp8 grid into ``out`` (float32), except that
    what rounds to zero comes out +0.0.

    Adding ``1.5 * 2**23 * q`` (an even multiple of ``q``, the grid's spacing at ``x``: ``x``'s
    power of two over ``2**mbits``, at least the subnormal spacing ``2**(1 - bias - mbits)``)
    makes float32 round ``x`` to a multiple of ``q``, ties to even; subtracting it again is
    exact.
    """
    magic = np.bitwise_and(x.view(np.uint32), np.uint32(0x7F800000), out=out.view(np.uint32))
    np.maximum(magic, np.uint32((128 - bias) << 23), out=magic)  # the subnormal binade's
    magic += np.uint32(((23 - mbits) << 23) | (1 << 22))  # 2**e -> 1.5 * 2**(e + 23 - mbits)
    m = magic.view(np.float32)
    total = np.add(x, m, out=scratch("fp8-sum", x.shape, np.float32))
    np.subtract(total, m, out=out)


def decode(values: np.ndarray) -> np.ndarray:
    """fp8/int8 storage values as float32 (exact; fp8 through a 256-entry table)."""
    table = _FP8_TABLE.get(values.dtype)
    if table is None:
        return values.astype(np.float32)
    return table[values.view(np.uint8)]


# --- gemm -------------------------------------------------------------------------------------


def gemm(call: GemmCall) -> np.ndarray:
    """Run ``gemm`` at ``call.precision``: out [..., M, N] in ``call.out_dtype``."""
    a, b, prec, g = np.asarray(call.a), np.asarray(call.b), call.precision, call.group_size
    if prec == "int8":
        out = _int8_gemm(a, b, call)
    elif prec in QUANTIZED_PRECISIONS:
        av, sa = _float_operand(a, call.a_scale, prec, "row", g, scaled=True)
        bv, sb = _float_operand(b, call.b_scale, prec, "block", g, scaled=True)
        out = _matmul(_scaled_a(av, sa, g), _scaled_b(bv, sb, g))
    else:
        out = _matmul(rounded_fp32(a, prec), rounded_fp32(b, prec))
    if out.dtype == np.float64 and call.out_dtype != "float64":
        out = out.astype(np.float32)  # int8 sums stay float64 (exact) only for float64 output
    if call.bias is not None:
        out += np.asarray(call.bias).astype(out.dtype)
    with np.errstate(over="ignore"):  # a float16 output overflows to inf, as documented
        return out.astype(call.out_dtype, copy=False)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [..., M, K] @ b [K, N] as one BLAS call when the batch folds into M."""
    if a.ndim > 2 and a.flags.c_contiguous:
        rows = math.prod(a.shape[:-1])
        return (a.reshape(rows, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[1])
    return np.matmul(a, b)


def _float_operand(x: np.ndarray, scale, prec: str, granularity: str, g: int, *,
                   scaled: bool = False):
    """The fp8/int8 values as a fresh float32 array and their scale (``None`` = 1): given
    storage values decoded, or float inputs quantised on the fly straight into float32
    (``scaled=True``: already multiplied by their scales, returned as ``None``)."""
    if x.dtype in _STORAGE_PRECISION:
        return decode(x), scale
    values, scales = quantize_values(x, prec, granularity, g, np.dtype(np.float32),
                                     dequantize=scaled)
    return values, None if scaled else scales


def _expand_last(s: np.ndarray, g: int, k: int) -> np.ndarray:
    """Per-group scales [..., ceil(K/g)] -> per-element [..., K]."""
    return np.repeat(s, g, axis=-1)[..., :k]


def _scaled_a(a: np.ndarray, scale, g: int) -> np.ndarray:
    """``a`` [..., M, K] times its scale (scalar, [..., M, 1] or [..., M, ceil(K/g)]), in
    place."""
    if scale is None:
        return a
    s = np.asarray(scale, np.float32)
    K = a.shape[-1]
    if s.ndim and s.shape[-1] != 1:
        if K % g == 0 and a.flags.c_contiguous:  # per group: a view [..., M, K/g, g]
            view = a.reshape(*a.shape[:-1], K // g, g)
            view *= s[..., None]
            return a
        s = _expand_last(s, g, K)
    a *= s
    return a


def _scaled_b(b: np.ndarray, scale, g: int) -> np.ndarray:
    """``b`` [K, N] times its scale (scalar, [1, N] or [ceil(K/g), ceil(N/g)]), in place."""
    if scale is None:
        return b
    s = np.asarray(scale, np.float32)
    K, N = b.shape
    if s.ndim and (s.shape[0] != 1 or s.shape[1] not in (1, N)):  # per block
        if K % g == 0 and N % g == 0 and b.flags.c_contiguous:  # a view [K/g, g, N/g, g]
            view = b.reshape(K // g, g, N // g, g)
            view *= s[:, None, :, None]
            return b
        s = _expand_last(np.repeat(s, g, axis=0)[:K], g, N)
    b *= s
    return b


def _int8_gemm(a: np.ndarray, b: np.ndarray, call: GemmCall) -> np.ndarray:
    """Exact integer products per scale group, scaled and summed across the groups.

    Each group's product of the integer-valued operands is exact: in int32 in the compiled
    kernel (:class:`_IntKernel`, where it is built), else in float32 BLAS (at most
    :data:`EXACT_K` terms; longer groups sum their chunks in float64). It is multiplied by
    the group's rank-1 scale (row scale x column scale, one product per row and column block)
    and added to the sum, in float64 for float64 output and in float32 otherwise (as the OpenCL
    backend does); both ways round alike, so the results are bitwise the same. Panels of rows
    of ``a`` run on every CPU (BLAS on one thread each); a panel is quantised (or converted)
    where it is used, and its product and sum stay in cache between the passes.
    """
    g = call.group_size
    bv, sb = _float_operand(b, call.b_scale, "int8", "block", g)
    *lead, M, K = a.shape
    N = bv.shape[1]
    rows_of_a = _RowsOfA(a.reshape(math.prod(a.shape[:-1]), K), call.a_scale, g)
    acc_dtype = np.dtype(np.float64 if call.out_dtype == "float64" else np.float32)
    out = np.zeros((rows_of_a.a.shape[0], N), acc_dtype)
    if K and out.size:
        plan = _GroupScales.build(rows_of_a.groups, sb, K, N, g, acc_dtype)
        kernel = _IntKernel.build(bv, plan, g)
        rows = kernel.rows if kernel is not None else max(8, min(512, _PANEL // N))
        # even spans in whole kernel tiles: aligning them to whole panels would leave one
        # thread up to a panel more rows than the other
        align = kernel.TILE_ROWS if kernel is not None else rows
        parallel_spans(lambda r0, r1: _int8_rows(rows_of_a, bv, plan, kernel, out, r0, r1,
                                                 rows),
                       out.shape[0], out.size * len(plan.bounds), align)
    return out.reshape(*lead, M, N)


class _IntKernel:
    """The compiled int8 kernel (``_native.int8_panel``, x86-64 with AVX2) for one gemm: b
    packed once into int16 column panels, a's panels converted to int16 where they are used.
    The products are exact int32 sums; the scaling rounds as :func:`_int8_rows`' float path."""

    #: bytes of a's int16 panel (rows x K) that stay in cache next to one panel of b
    PANEL_BYTES = 1 << 20
    #: the kernel's row tile (panels hold a multiple of it) and the most terms per int32 sum
    TILE_ROWS, MAX_SPAN = 6, (1 << 17) - 1  # 131071 * 128 * 128 < 2**31

    def __init__(self, packed: np.ndarray, K: int, span: int, width: int) -> None:
        self.packed, self.span, self.width = packed, span, width
        tile = self.TILE_ROWS
        self.rows = max(tile, min(384, self.PANEL_BYTES // (2 * K) // tile * tile))

    @classmethod
    def build(cls, bv: np.ndarray, plan: _GroupScales, g: int) -> _IntKernel | None:
        """The kernel for this gemm, or None where it does not apply: not built, switched off
        (``native.INT8_KERNEL``), float64 sums, or spans it cannot hold (odd group sizes
        between spans, sums of more than 131071 terms)."""
        lib = native.NATIVE
        K, N = bv.shape
        span = K if len(plan.bounds) == 1 else g
        if lib is None or not native.INT8_KERNEL or plan.dtype != np.float32 \
                or span > cls.MAX_SPAN or (span < K and span % 2):
            return None
        if bv.shape[1] > 1 and bv.strides[1] != bv.itemsize:  # packing reads rows of b
            bv = np.ascontiguousarray(bv)
        packed = np.empty((ceil_div(N, 16), ceil_div(K, 2) * 32), np.int16)
        parallel_spans(lambda j0, j1: lib.pack_b(bv[:, j0 * 16:j1 * 16], packed[j0:j1]),
                       packed.shape[0], bv.size)
        return cls(packed, K, span, plan.width)

    def run(self, out: np.ndarray, a: np.ndarray, scales: np.ndarray) -> None:
        """``out`` [rows, N] = the panel's scaled sum: ``a`` [rows, K] integer-valued float32,
        ``scales`` [spans, rows or 1, N // width] float32."""
        rows, K = a.shape
        tile = self.TILE_ROWS
        a16 = scratch("gemm-a16", (ceil_div(rows, tile) * tile, ceil_div(K, 2) * 2), np.int16)
        np.copyto(a16[:rows, :K], a, casting="unsafe")  # exact: integers, |a| <= 128
        a16[rows:] = 0
        a16[:rows, K:] = 0
        native.NATIVE.int8_panel(out, a16, self.packed, K, self.span,
                                 scales.reshape(-1, scales.shape[-1]), self.width)


class _RowsOfA:
    """Panels of rows of ``a`` [R, K] as integer-valued float32 with their scales: int8 storage
    converted, float rows quantised by row, in the calling thread's scratch."""

    def __init__(self, a: np.ndarray, scale, g: int) -> None:
        self.a, self.g = a, g
        self.stored = a.dtype in _STORAGE_PRECISION
        if self.stored:
            s = np.ones((1, 1)) if scale is None else np.asarray(scale, np.float64)
            # explicit row count: reshape(-1, 0) is ambiguous for [M, 0] (K = 0, no groups)
            self.scales = s.reshape(1, 1) if s.ndim == 0 else s.reshape(
                math.prod(s.shape[:-1]), s.shape[-1])
        #: scales per row: one per group of K, or one for the whole row
        self.groups = self.scales.shape[1] if self.stored else ceil_div(a.shape[1], g)

    def panel(self, m0: int, m1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``m0:m1`` (valid until the thread's next panel) and their scales
        [rows or 1, groups]."""
        values = scratch("gemm-a", (m1 - m0, self.a.shape[1]), np.float32)
        if self.stored:
            np.copyto(values, self.a[m0:m1], casting="unsafe")
            return values, self.scales if self.scales.shape[0] == 1 else self.scales[m0:m1]
        scales = scratch("gemm-a-scales", (m1 - m0, self.groups), np.float32)
        quantize_rows(self.a[m0:m1], values, scales, "int8", self.g)
        return values, scales


@dataclass(frozen=True)
class _GroupScales:
    """The K spans of an int8 gemm and b's scales: ``cols[j]`` (one per ``width`` columns,
    [nj, N // width], float64) scales span ``j``; the products with a's scales are applied in
    ``dtype``."""

    bounds: list[tuple[int, int]]
    cols: np.ndarray
    width: int
    dtype: np.dtype

    @classmethod
    def build(cls, a_groups: int, sb, K: int, N: int, g: int, dtype: np.dtype) -> _GroupScales:
        """The spans (groups of g when a or b has per-group scales, else all of K) and b's
        scale forms of DESIGN 3.2 (scalar, per column or per block) normalised."""
        cols = np.ones((1, 1)) if sb is None else np.asarray(sb, np.float64)
        cols, width = cols.reshape(1, 1) if cols.ndim == 0 else cols, N
        if cols.shape[0] > 1 or cols.shape[1] not in (1, N):  # per block
            cols, width = (cols, g) if N % g == 0 else (_expand_last(cols, g, N), 1)
        elif cols.shape[1] == N:  # per column
            width = 1
        grouped = a_groups > 1 or cols.shape[0] > 1
        bounds = [(k0, min(K, k0 + g)) for k0 in range(0, K, g)] if grouped else [(0, K)]
        return cls(bounds, cols, width, dtype)

    def panel(self, rows: np.ndarray) -> list[np.ndarray]:
        """The scale of every span given the panel's row scales ``rows`` [rows or 1, groups]:
        [rows or 1, N // width] each, in ``dtype`` unless rounding the product to float32
        would lose it (it overflows, or underflows into the subnormals): then in float64."""
        wide, scale, kept = self._products(rows)
        return [scale[i] if kept[i] else wide[i] for i in range(len(self.bounds))]

    def stacked(self, rows: np.ndarray) -> np.ndarray | None:
        """The same scales as one float32 [spans, rows or 1, N // width] array, or None when
        a span needs them in float64 (float64 sums, or a product float32 would lose)."""
        if self.dtype != np.float32:
            return None
        _, scale, kept = self._products(rows)
        return scale if kept.all() else None

    def _products(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self.bounds)
        r = rows[:, np.arange(n) if rows.shape[1] > 1 else np.zeros(n, np.intp)]
        c = self.cols[np.arange(n) if self.cols.shape[0] > 1 else np.zeros(n, np.intp)]
        wide = r.T.astype(np.float64)[:, :, None] * c[:, None, :]  # [spans, rows, N // width]
        with np.errstate(over="ignore", invalid="ignore"):  # a lost product stays float64
            scale = wide.astype(self.dtype)
            kept = ((np.abs(scale) >= _TINY) & np.isfinite(scale) | (wide == 0)).all(axis=(1, 2))
        return wide, scale, kept


def _int8_rows(rows_of_a: _RowsOfA, b: np.ndarray, plan: _GroupScales,
               kernel: _IntKernel | None, out: np.ndarray, r0: int, r1: int, rows: int) -> None:
    """``out[r0:r1]`` of the int8 gemm, in panels of ``rows`` rows: through the compiled
    kernel where it applies, else float32 BLAS products scaled and summed span by span."""
    N, w = b.shape[1], plan.width
    lib = native.NATIVE
    for m0 in range(r0, r1, rows):
        m1 = min(r1, m0 + rows)
        a, a_scales = rows_of_a.panel(m0, m1)
        scales = plan.stacked(a_scales) if kernel is not None else None
        if scales is not None:
            kernel.run(out[m0:m1], a, scales)
            continue
        buf = scratch("gemm-product", (m1 - m0, N), np.float32)
        wide = buf if out.dtype == buf.dtype else scratch("gemm-scaled", buf.shape, out.dtype)
        acc = out[m0:m1].reshape(m1 - m0, N // w, w)
        scaled = wide.reshape(acc.shape)
        for i, ((k0, k1), scale) in enumerate(zip(plan.bounds, plan.panel(a_scales))):
            part = _exact_dot(a[:, k0:k1], b[k0:k1], buf)
            if lib is not None and part.dtype == scale.dtype == out.dtype == np.float32:
                lib.scale_add(out[m0:m1], part, scale, w, i == 0)  # one pass, same roundings
                continue
            np.multiply(part.reshape(acc.shape), scale[:, :, None],
                        out=acc if i == 0 else scaled)
            if i:
                acc += scaled


def _exact_dot(a: np.ndarray, b: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Exact product of integer-valued float32 matrices (|entries| <= 128): float32 in ``buf``
    up to :data:`EXACT_K` terms, else float64 sums of such chunks."""
    k = a.shape[1]
    if k <= EXACT_K:
        return np.matmul(a, b, out=buf)
    acc = np.zeros(buf.shape, np.float64)
    for k0 in range(0, k, EXACT_K):
        acc += np.matmul(a[:, k0:k0 + EXACT_K], b[k0:k0 + EXACT_K], out=buf)
    return acc
