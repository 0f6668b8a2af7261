"""Helpers shared by the kernels: operand rounding and the interpreter's bf16 ``tl.dot``.

Roundings are done on the float32 bit pattern (nearest even) before any narrowing cast, so the
cast only ever sees a value of the narrow grid and is exact: compiled casts round to nearest
even anyway, but Triton's interpreter (3.x) truncates fp32 -> bf16 and mis-rounds fp32 -> fp8
near the top of a binade (125.2 -> 64 in e4m3), and a certification under the interpreter must
see the arithmetic the GPU does.

Triton's interpreter (3.x) stores bfloat16 as uint16 and its ``tl.dot`` multiplies those bit
patterns as integers (a 64x64 product errs by ~1e11). :func:`dot_operand` therefore upcasts
bfloat16 tiles to float32 when ``UPCAST`` is set (only under the interpreter): bf16 -> fp32 is
exact and the GPU's bf16 tensor-core products are exact in its fp32 accumulator, so the
interpreted kernel computes the same products. Compiled kernels never take that branch.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: operand modes of the gemm kernels
IEEE, TF32, BF16, FP16, STORED = 0, 1, 2, 3, 4


#: 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude <= 2**22 to an integer,
#: ties to even
RINT = tl.constexpr(12582912.0)


@triton.jit
def round_bits(x, DROP: tl.constexpr):
    """float32 ``x`` with its ``DROP`` lowest mantissa bits rounded off, nearest even (13: TF32,
    16: bfloat16); a carry into the exponent is the next binade or Inf, as it should be; NaN
    and Inf are kept."""
    bits = x.to(tl.int32, bitcast=True)
    kept = (bits + (((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1))) & (-(1 << DROP))
    return tl.where(tl.abs(x) < float("inf"), kept.to(tl.float32, bitcast=True), x)


@triton.jit
def round_fp8_grid(v, MANT: tl.constexpr, EMIN: tl.constexpr):
    """Finite float32 ``v`` (already within the format's range) rounded to the grid of an fp8
    format with ``MANT`` mantissa bits and smallest normal exponent ``EMIN``, nearest even:
    the spacing is 2**(max(exponent, EMIN) - MANT), a power of two, so the scaling is exact."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    ue = tl.maximum(e, EMIN) - MANT
    ulp = ((ue + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - ue) << 23).to(tl.float32, bitcast=True)
    return (((v * inv) + RINT) - RINT) * ulp


@triton.jit
def to_precision(x, MODE: tl.constexpr):
    """A loaded tile as the tensor cores take it for ``MODE`` (fp32, tf32-rounded fp32, bf16,
    fp16 rounded through fp32, or the stored values as they are)."""
    if MODE == 0:
        x = widen(x)
    elif MODE == 1:
        x = round_bits(widen(x), 13)
    elif MODE == 2:
        if x.dtype != tl.bfloat16:
            x = to_bf16(widen(x))
    elif MODE == 3:
        x = widen(x).to(tl.float16)
    return x


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """``x`` for ``tl.dot``: bfloat16 upcast to float32 under the interpreter (see above)."""
    if UPCAST:  # noqa: SIM102 (two constexpr tests: a combined one is a runtime and)
        if x.dtype == tl.bfloat16:
            x = widen(x)
    return x


@triton.jit
def to_bf16(x):
    """float32 ``x`` as bfloat16, nearest even on the bit pattern (subnormals kept, NaN stays
    a quiet NaN), narrowed by taking the high half of the bits: the interpreter's fp32 ->
    bf16 cast truncates and flushes subnormals, so no narrowing cast is used at all."""
    r = round_bits(x, 16).to(tl.int32, bitcast=True)
    r = tl.where(x != x, r | 0x00400000, r)
    return (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def widen(x):
    """``x`` as float32, exactly; bfloat16 by its bits (the interpreter's bf16 -> fp32 cast
    mangles subnormals)."""
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def narrow(x, ty: tl.constexpr):
    """float32 ``x`` stored as ``ty``: bfloat16 through :func:`to_bf16` (nearest even in
    both interpreter and compiled mode), any other dtype by its cast."""
    if x.dtype == ty:
        y = x
    elif ty == tl.bfloat16:
        y = to_bf16(widen(x))
    else:
        y = widen(x).to(ty)
    return y


@triton.jit
def load_zeroed(ptrs, mask):
    """``tl.load`` with 0 where ``mask`` is off. fp8 tiles are loaded as their bytes and
    reinterpreted (Triton's interpreter cannot cast the 0 to fp8; the bits of +0 are 0)."""
    ty = ptrs.dtype.element_ty
    if ty.is_fp8():
        x = tl.load(ptrs.to(tl.pointer_type(tl.uint8)), mask=mask, other=0).to(ty, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0)
    return x
