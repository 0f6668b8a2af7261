"""Tiled matrix products on tensor cores: the gemm kernel (every precision, fine-grained scales)
and the gated linear kernel (only the open output channels' weight rows are read).

``gemm_kernel``: C[M, N] = A[M, K] @ B[K, N] (+ bias), one program per BM x BN output tile,
programs ordered in groups of GM tile rows so neighbouring programs share A and B tiles in L2.
K is walked one scale group at a time (``GROUP`` columns, ``NG`` groups): each group's product
is accumulated on the tensor cores in a fresh fp32 (int32 for int8: exact) tile, then scaled by
the rows' a scales and the columns' b scales of that group and added to the fp32 result on the
CUDA cores. This is DeepGEMM's promotion of fp8 partial sums every 128 K (and Hopper's fp8
``wgmma`` partial sums are promoted to fp32 after every instruction, where Triton's default
lets them stay in the reduced-precision accumulator for 2**30 terms), and it applies
DESIGN 3.2's 1 x g activation and g x g weight scales exactly. Unscaled precisions use one
group spanning K.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dshal_triton.kernels.common import dot_operand, load_zeroed, narrow, to_precision, widen

#: fp8 products Hopper's wgmma may sum in its reduced-precision accumulator before they are
#: added to the fp32 one: one instruction's K (32). 0 (promote always) makes Triton drop wgmma
#: altogether (make kernels-check shows it); Triton's default is 2**30 (never promote)
IMPRECISE = tl.constexpr(32)


@triton.jit
def _tile_dot(x, y, part, MODE: tl.constexpr, INT: tl.constexpr, UPCAST: tl.constexpr):
    """``part + x @ y`` at the operand mode's precision (fp32 or int32 accumulation)."""
    x = dot_operand(to_precision(x, MODE), UPCAST)
    y = dot_operand(to_precision(y, MODE), UPCAST)
    if INT:
        part = tl.dot(x, y, part, out_dtype=tl.int32)
    elif MODE == 0:
        part = tl.dot(x, y, part, input_precision="ieee")
    elif MODE == 1:
        part = tl.dot(x, y, part, input_precision="tf32")
    else:  # fp8 on sm_90: promote to fp32 after every instruction (IMPRECISE)
        part = tl.dot(x, y, part, max_num_imprecise_acc=IMPRECISE)
    return part


@triton.jit
def gemm_kernel(a, b, c, bias, sa, sb, M, N, K, GROUP, NG,
                s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_sam, s_sag, s_sbg, s_sbn,
                MODE: tl.constexpr, INT: tl.constexpr, SCALED: tl.constexpr,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GM * tiles_n
    first = (pid // per_group) * GM
    rows_here = tl.minimum(tiles_m - first, GM)
    pm = first + (pid % per_group) % rows_here
    pn = (pid % per_group) // rows_here
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    in_m = rm < M
    in_n = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for gi in range(NG):
        k0 = gi * GROUP
        k1 = tl.minimum(k0 + GROUP, K)
        if INT:
            part = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            part = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k0, k1, BK):
            ks = kk + rk
            in_k = ks < k1
            x = load_zeroed(a + rm[:, None] * s_am + ks[None, :] * s_ak,
                            in_m[:, None] & in_k[None, :])
            y = load_zeroed(b + ks[:, None] * s_bk + rn[None, :] * s_bn,
                            in_k[:, None] & in_n[None, :])
            part = _tile_dot(x, y, part, MODE, INT, UPCAST)
        if SCALED:
            row_s = tl.load(sa + rm * s_sam + gi * s_sag, mask=in_m, other=0)
            col_s = tl.load(sb + gi * s_sbg + rn * s_sbn, mask=in_n, other=0)
            acc += part.to(tl.float32) * row_s[:, None] * col_s[None, :]
        else:
            acc += part.to(tl.float32)
    if HAS_BIAS:
        acc += widen(tl.load(bias + rn, mask=in_n, other=0))[None, :]
    tl.store(c + rm[:, None] * s_cm + rn[None, :] * s_cn, narrow(acc, c.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


@triton.jit
def gated_linear_kernel(x, w, y, bias, gate, mask, cols, R, NOPEN, K,
                        s_xr, s_xk, s_wc, s_wk, s_yr, s_yc, s_gr, s_gc, s_mr, s_mc,
                        MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                        ROW_MASK: tl.constexpr, UPCAST: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[r, cols[j]] = gate * (x[r] . w[cols[j]] + bias[cols[j]]) for the open channels listed
    in ``cols`` (a compacted list: closed channels' weight rows are never loaded), 0 where a
    per-row mask closes the channel. ``y`` is zero-filled by the launcher."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rj = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    in_m = rm < R
    in_j = rj < NOPEN
    ch = tl.load(cols + rj, mask=in_j, other=0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + rk
        in_k = ks < K
        xt = tl.load(x + rm[:, None] * s_xr + ks[None, :] * s_xk,
                     mask=in_m[:, None] & in_k[None, :], other=0)
        wt = tl.load(w + ch[None, :] * s_wc + ks[:, None] * s_wk,
                     mask=in_k[:, None] & in_j[None, :], other=0)
        acc = _tile_dot(xt, wt, acc, MODE, False, UPCAST)
    if HAS_BIAS:
        acc += widen(tl.load(bias + ch, mask=in_j, other=0))[None, :]
    both = in_m[:, None] & in_j[None, :]
    if HAS_GATE:
        acc *= tl.load(gate + rm[:, None] * s_gr + ch[None, :] * s_gc, mask=both, other=0)
    if ROW_MASK:
        is_open = tl.load(mask + rm[:, None] * s_mr + ch[None, :] * s_mc, mask=both, other=0)
        acc = tl.where(is_open != 0, acc, 0.0)
    tl.store(y + rm[:, None] * s_yr + ch[None, :] * s_yc, narrow(acc, y.dtype.element_ty),
             mask=both)
