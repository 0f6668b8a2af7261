"""``quantize`` and ``gemm`` on the CPU with numpy/OpenBLAS.

quantize works in cache-sized chunks of rows (cast to float32, group absolute max on the bit
patterns, divide, round) so that the pipeline costs a few passes over the input; fp8 values are
encoded with vector integer operations (bitwise ml_dtypes' round-to-nearest-even cast, about 3x
faster than that cast) and decoded through a 256-entry table. Large inputs are quantised in
chunks on every CPU. gemm multiplies in float32 BLAS
for every precision:

- fp32 / tf32 / bf16 / fp16: the operands are rounded to the format, then multiplied in fp32;
- fp8: the operands are dequantised to float32 (value * scale), then multiplied;
- int8: exact integer accumulation. Any int8 dot product of length <= 1024 is exact in float32
  (|sum| <= 128 * 128 * 1024 = 2**24), so K is cut into chunks of at most 1024 (within each
  quantisation group), each multiplied by float32 BLAS and accumulated in float64 (exact), and
  the scales are applied per group in float64. numpy's integer matmul is never used: it wraps.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from dshal.backends.numpy.attention import parallel_spans
from dshal.calls import GemmCall, QuantizeCall
from dshal.dtypes import QMAX, QUANTIZED_PRECISIONS, STORAGE_DTYPE
from dshal.validate import ceil_div

#: float32 elements per cache-resident chunk of the quantize pipeline
_CHUNK = 1 << 19
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
    """
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


# --- quantize ---------------------------------------------------------------------------------


def quantize(call: QuantizeCall) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``quantize``: ``(values, scales)`` (scales ``None`` for float precisions)."""
    x = np.asarray(call.x)
    if call.precision not in QUANTIZED_PRECISIONS:
        return round_float(x, call.precision), None
    return quantize_values(x, call.precision, call.granularity, call.group_size)


def quantize_values(x: np.ndarray, precision: str, granularity: str, g: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """fp8/int8 values and float32 scales of ``x`` (scale = amax / qmax per group, 1 where 0).

    Chunks are independent (they write disjoint values and scales), so large inputs are split
    over the CPUs (:func:`parallel_spans`); results do not depend on the split.
    """
    qmax = np.float32(QMAX[precision])
    values = np.empty(x.shape, _STORAGE[precision])
    if granularity == "tensor":
        flat, vflat = x.reshape(1, x.size), values.reshape(1, x.size)
        parts: list[np.ndarray] = []

        def span_amax(a: int, z: int) -> None:
            m = np.zeros((), np.float32)
            for r0 in range(a, z, _CHUNK):
                m = np.maximum(m, _amax(_padded(flat[:, r0:min(z, r0 + _CHUNK)], 0), (0, 1)))
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
    vrows = values.reshape(rows.shape)
    scales = np.ones((rows.shape[0], nk), np.float32)
    step = max(1, _CHUNK // max(1, nk * g))

    def span_rows(a: int, z: int) -> None:
        for r0 in range(a, z, step):
            r1 = min(z, r0 + step)
            src, fresh = _as_float32(rows[r0:r1], nk * g)
            shape = (r1 - r0, nk, g)
            scales[r0:r1] = s = _scale(_amax(src.reshape(shape), (2,)), qmax)
            c = _divided(src, fresh, s[..., None], shape)
            _encode(c[:, :K], vrows[r0:r1], precision, s)

    if nk:
        parallel_spans(span_rows, rows.shape[0], x.size, step)
    return values, scales.reshape(*x.shape[:-1], nk)


def _padded(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` [r, n] as a fresh float32 [r, max(n, width)] (zero padded on the right)."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range: caught by _scale
        if x.shape[1] >= width:
            return x.astype(np.float32)
        out = np.zeros((x.shape[0], width), np.float32)
        out[:, : x.shape[1]] = x
        return out


def _as_float32(x: np.ndarray, width: int) -> tuple[np.ndarray, bool]:
    """``(x as float32 [r, max(n, width)], whether that is a fresh copy)``: x itself when it is
    float32 and wide enough, so that the division can write straight into new memory."""
    if x.dtype == np.float32 and x.shape[1] >= width:
        return x, False
    return _padded(x, width), True


def _divided(x: np.ndarray, fresh: bool, s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 ``x / s`` (``s`` broadcast over x viewed as ``shape``): in place when ``x`` is a
    ``fresh`` copy, else into a new array (no copy of x first)."""
    out = x if fresh else np.empty(x.shape, np.float32)
    np.divide(x.reshape(shape), s, out=out.reshape(shape))
    return out


def _amax(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """Max of |x| over ``axis``: on the bit patterns, where int max is a fast SIMD reduction
    (non-negative floats order like their bits)."""
    bits = np.bitwise_and(x.view(np.int32), np.int32(0x7FFFFFFF))
    return bits.max(axis=axis, initial=0).view(np.float32)


def _scale(amax: np.ndarray, qmax: np.float32) -> np.ndarray:
    """float32 ``amax / qmax``, 1 where that is 0."""
    if not np.isfinite(amax).all():
        raise ValueError("x holds values beyond float32's range: cannot quantize")
    s = np.asarray(amax / qmax, np.float32)
    return np.where(s == 0, np.float32(1), s).astype(np.float32)


def _encode(scaled: np.ndarray, out: np.ndarray, precision: str, scales: np.ndarray) -> None:
    """Saturate and round float32 ``x / scale`` (``scaled``, overwritten) to nearest even into
    ``out``.

    With normal (not subnormal) scales ``|x| / scale <= qmax * (1 + 2u)``, which rounds to at
    most qmax, so the saturation pass is needed only when a scale is subnormal (clipping to the
    integer qmax before rounding gives what rounding first would).
    """
    qmax = np.float32(QMAX[precision])
    if (scales < _TINY).any():
        np.clip(scaled, -qmax, qmax, out=scaled)
    if precision == "int8":
        np.rint(scaled, out=out, casting="unsafe")
    else:
        mbits, bias = _FP8_LAYOUT[precision]
        _encode_fp8(scaled, out.view(np.uint8), mbits, bias)


def _encode_fp8(x: np.ndarray, out: np.ndarray, mbits: int, bias: int) -> None:
    """Bit codes of float32 ``x`` (finite, within the format's range) rounded to nearest even
    into an fp8 format with ``mbits`` mantissa bits and exponent ``bias`` (bitwise what
    ml_dtypes' cast gives, about 3x faster since it runs as vector integer ops)."""
    u = np.ascontiguousarray(x).view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)
    shift = 23 - mbits
    # normal numbers: round the mantissa to mbits (ties to even), re-bias the exponent
    r = (a >> np.uint32(shift)) & np.uint32(1)
    r += a
    r += np.uint32(((1 << (shift - 1)) - 1 - ((127 - bias) << 23)) % (1 << 32))
    r >>= np.uint32(shift)
    sub = a < np.uint32((128 - bias) << 23)  # below the smallest normal 2**(1 - bias)
    if sub.any():  # subnormals: multiples of 2**(1 - bias - mbits), rounded to even
        s = np.abs(x) * np.float32(2.0 ** (bias - 1 + mbits))
        np.rint(s, out=s)
        np.copyto(r, s, casting="unsafe", where=sub)
    r |= (u >> np.uint32(24)) & np.uint32(0x80)
    np.copyto(out, r, casting="unsafe")


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
        av, sa = _operand(a, call.a_scale, prec, "row", g)
        bv, sb = _operand(b, call.b_scale, prec, "block", g)
        out = _matmul(_dequant_a(av, sa, g), _dequant_b(bv, sb, g))
    else:
        out = _matmul(round_float(a, prec, copy=False).astype(np.float32, copy=False),
                      round_float(b, prec, copy=False).astype(np.float32, copy=False))
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


def _operand(x: np.ndarray, scale, prec: str, granularity: str, g: int):
    """Storage values and their scale (``None`` = 1): given, or quantised on the fly."""
    if x.dtype in _STORAGE_PRECISION:
        return x, scale
    return quantize_values(x, prec, granularity, g)


def _expand_last(s: np.ndarray, g: int, k: int) -> np.ndarray:
    """Per-group scales [..., ceil(K/g)] -> per-element [..., K]."""
    return np.repeat(s, g, axis=-1)[..., :k]


def _dequant_a(values: np.ndarray, scale, g: int) -> np.ndarray:
    a = decode(values)
    if scale is None:
        return a
    s = np.asarray(scale, np.float32)
    if s.ndim and s.shape[-1] != 1:
        s = _expand_last(s, g, a.shape[-1])
    a *= s
    return a


def _dequant_b(values: np.ndarray, scale, g: int) -> np.ndarray:
    b = decode(values)
    if scale is None:
        return b
    s = np.asarray(scale, np.float32)
    if s.ndim and (s.shape[0] != 1 or s.shape[1] not in (1, b.shape[1])):  # per block
        s = _expand_last(np.repeat(s, g, axis=0)[: b.shape[0]], g, b.shape[1])
    b *= s
    return b


def _int8_gemm(a: np.ndarray, b: np.ndarray, call: GemmCall) -> np.ndarray:
    """Exact integer products of int8 values, scaled per quantisation group, float64."""
    g = call.group_size
    av, sa = _operand(a, call.a_scale, "int8", "row", g)
    bv, sb = _operand(b, call.b_scale, "int8", "block", g)
    *lead, M, K = av.shape
    N = bv.shape[1]
    if K == 0:
        return np.zeros((*lead, M, N), np.float64)
    a2 = av.reshape(math.prod(av.shape[:-1]), K).astype(np.float32)
    b2 = bv.astype(np.float32)
    sa = np.ones((1, 1)) if sa is None else np.asarray(sa, np.float64)
    sa = sa.reshape(1, 1) if sa.ndim == 0 else sa.reshape(-1, sa.shape[-1])
    sb = np.ones((1, 1)) if sb is None else np.asarray(sb, np.float64)
    sb = sb.reshape(1, 1) if sb.ndim == 0 else sb
    if sb.shape[0] > 1 or sb.shape[1] not in (1, N):
        sb = _expand_last(sb, g, N)  # [ceil(K/g), ceil(N/g)] -> [ceil(K/g), N]
    grouped = sa.shape[1] > 1 or sb.shape[0] > 1
    bounds = [(k0, min(K, k0 + g)) for k0 in range(0, K, g)] if grouped else [(0, K)]
    acc = np.zeros((a2.shape[0], N), np.float64)
    for gi, (k0, k1) in enumerate(bounds):
        part = _exact_dot(a2[:, k0:k1], b2[k0:k1])
        if grouped:
            part *= sa[:, gi if sa.shape[1] > 1 else 0, None]
            part *= sb[gi if sb.shape[0] > 1 else 0]
        acc += part
    if not grouped:
        acc *= sa
        acc *= sb
    return acc.reshape(*lead, M, N)


def _exact_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact float64 product of integer-valued float32 matrices (|entries| <= 128)."""
    k = a.shape[1]
    if k <= EXACT_K:
        return (a @ b).astype(np.float64)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float64)
    for k0 in range(0, k, EXACT_K):
        acc += a[:, k0:k0 + EXACT_K] @ b[k0:k0 + EXACT_K]
    return acc
