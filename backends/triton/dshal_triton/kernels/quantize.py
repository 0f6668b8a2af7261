"""Quantisation kernels: per-group scales and fp8/int8 codes (DESIGN 3.2), and the rounding of
floats to tf32/bf16/fp16.

``quantize_kernel`` works on a 2-D view [R, C] whose groups are ``GH`` rows x ``GW`` columns:
row granularity is GH = 1, GW = g (one program per BR rows x one column group, a scale per
row); block granularity is GH = GW = g; tensor granularity one group of every element. A
program makes two passes over its group in BR x BC tiles: the amax, then the codes. The scale
is ``amax / qmax`` correctly rounded (``div_rn``; a plain ``/`` is approximate on NVIDIA), 1
where it is 0; codes are ``x / scale`` correctly rounded, clamped to +-qmax, then rounded to
nearest even: int8 by the 1.5 * 2**23 shift (exact for |v| <= 2**22), fp8 onto its grid in
float32 (:func:`~dshal_triton.kernels.common.round_fp8_grid`) before an exact cast.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dshal_triton.kernels.common import RINT, narrow, round_fp8_grid, to_precision, widen


@triton.jit
def _encode(v, QMAX: tl.constexpr, INT: tl.constexpr, MANT: tl.constexpr,
            EMIN: tl.constexpr, out_ty: tl.constexpr):
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if INT:
        code = ((v + RINT) - RINT).to(out_ty)
    else:
        code = round_fp8_grid(v, MANT, EMIN).to(out_ty, fp_downcast_rounding="rtne")
    return code


@triton.jit
def quantize_kernel(x, out, scales, R, C, GH, GW, s_xr, s_xc, s_or, s_oc, s_sr, s_sc,
                    QMAX: tl.constexpr, INT: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                    PER_ROW: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr):
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    c0 = pc * GW
    c1 = tl.minimum(c0 + GW, C)
    if PER_ROW:  # BR rows, each its own group
        r0 = pr * BR
        r1 = tl.minimum(r0 + BR, R)
    else:  # one group of GH rows
        r0 = pr * GH
        r1 = tl.minimum(r0 + GH, R)
    rb = tl.arange(0, BR)
    cb = tl.arange(0, BC)
    amax = tl.zeros((BR,), dtype=tl.float32)
    for rr in range(r0, r1, BR):
        rows = rr + rb
        for cc in range(c0, c1, BC):
            cs = cc + cb
            m = (rows < r1)[:, None] & (cs < c1)[None, :]
            t = tl.load(x + rows[:, None] * s_xr + cs[None, :] * s_xc, mask=m, other=0)
            amax = tl.maximum(amax, tl.max(tl.abs(widen(t)), axis=1))
    if PER_ROW:
        scale = tl.math.div_rn(amax, tl.full((BR,), QMAX, tl.float32))
        scale = tl.where(scale == 0, 1.0, scale)
        tl.store(scales + (r0 + rb) * s_sr + pc * s_sc, scale, mask=(r0 + rb) < r1)
    else:
        top = tl.max(amax, axis=0)
        scale = tl.math.div_rn(top, QMAX)
        scale = tl.where(scale == 0, 1.0, scale)
        tl.store(scales + pr * s_sr + pc * s_sc, scale)
    for rr in range(r0, r1, BR):
        rows = rr + rb
        for cc in range(c0, c1, BC):
            cs = cc + cb
            m = (rows < r1)[:, None] & (cs < c1)[None, :]
            t = tl.load(x + rows[:, None] * s_xr + cs[None, :] * s_xc, mask=m, other=0)
            t32 = widen(t)
            if PER_ROW:
                v = tl.math.div_rn(t32, scale[:, None] + tl.zeros_like(t32))
            else:
                v = tl.math.div_rn(t32, tl.zeros_like(t32) + scale)
            code = _encode(v, QMAX, INT, MANT, EMIN, out.dtype.element_ty)
            tl.store(out + rows[:, None] * s_or + cs[None, :] * s_oc, code, mask=m)


@triton.jit
def round_kernel(x, out, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Contiguous ``x`` rounded to the precision of ``MODE`` (0 fp32, 1 tf32, 2 bf16, 3 fp16)
    and stored in ``out``'s dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = tl.load(x + offs, mask=m, other=0)
    tl.store(out + offs, narrow(to_precision(t, MODE), out.dtype.element_ty), mask=m)
