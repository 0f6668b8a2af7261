"""Sparse attention forward (DESIGN 3.1): block selection scores, and attention over the
selected blocks plus the window, in fla-org/native-sparse-attention's layout.

``block_scores_kernel``: scores[b, t, i, blk] = scale * (sum of the g query heads of kv head
t at query i) . mean(k[t, keys of blk]), one program per (BM queries, BN blocks, batch x kv
head); the sum over the group is taken while loading, so the selection is GQA-shared. Ranking
(ties to the lower block) is done by the launcher.

``attention_fwd_kernel``: one program per (query, batch x kv head) holding the g query heads of
the group as the rows of one tile [BG, D] (BG = g padded to the tensor cores' 16). It walks
the query's key *range* (the window, or every visible key for dense attention) in RN-key tiles,
then its selected blocks in BN-key tiles, skipping the range's keys there, so no key counts
twice. Each key tile is loaded once for all g heads: ``tl.dot`` gives the [BG, N] logits in
fp32, an online softmax in base 2 keeps the running max and sum, and ``tl.dot`` of the
probabilities (in the inputs' dtype, as FlashAttention does) with the value tile accumulates in
fp32. Keys that are not allowed are masked at the load: their keys and values never enter a
register, so NaN/Inf there cannot reach the output; an allowed key's or value's NaN/Inf
makes the row's sum NaN and is kept (a row is empty only where its sum is exactly 0).
lse is returned in natural log.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dshal_triton.kernels.common import dot_operand, narrow, widen

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def block_scores_kernel(q, kmean, out, Lq, NB, Hkv, scale,
                        s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kn, s_kd, s_ob, s_oh, s_ol, s_on,
                        G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, LOWP: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    bh = tl.program_id(2)
    bi = bh // Hkv
    t = bh % Hkv
    rows = pm * BM + tl.arange(0, BM)
    blks = pn * BN + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    qm = (rows < Lq)[:, None] & (dd < D)[None, :]
    qs = tl.zeros((BM, BD), dtype=tl.float32)
    for h in range(G):
        qs += widen(tl.load(q + bi * s_qb + (t * G + h) * s_qh + rows[:, None] * s_ql
                            + dd[None, :] * s_qd, mask=qm, other=0))
    km = tl.load(kmean + bi * s_kb + t * s_kh + blks[None, :] * s_kn + dd[:, None] * s_kd,
                 mask=(blks < NB)[None, :] & (dd < D)[:, None], other=0)
    if LOWP:  # 16-bit inputs: tf32 tensor cores stay within the selection's tolerance
        s = tl.dot(qs, km, input_precision="tf32")
    else:
        s = tl.dot(qs, km, input_precision="ieee")
    tl.store(out + bi * s_ob + t * s_oh + rows[:, None] * s_ol + blks[None, :] * s_on,
             s * scale, mask=(rows < Lq)[:, None] & (blks < NB)[None, :])


@triton.jit
def _attend(qt, kp, vp, js, ok, m, l, acc, s_kl, s_kd, s_vl, s_vd, scale2,
            D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
            IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile ``js`` (allowed where ``ok``) folded into the running (max, sum, acc)."""
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    kt = tl.load(kp + js[None, :] * s_kl + dd[:, None] * s_kd,
                 mask=ok[None, :] & (dd < D)[:, None], other=0)
    if IEEE:
        s = tl.dot(dot_operand(qt, UPCAST), dot_operand(kt, UPCAST), input_precision="ieee")
    else:
        s = tl.dot(dot_operand(qt, UPCAST), dot_operand(kt, UPCAST))
    s = tl.where(ok[None, :], s * scale2, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    vt = tl.load(vp + js[:, None] * s_vl + dv[None, :] * s_vd,
                 mask=ok[:, None] & (dv < DV)[None, :], other=0)
    pv = dot_operand(p.to(vt.dtype), UPCAST)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(pv, dot_operand(vt, UPCAST), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(pv, dot_operand(vt, UPCAST))
    return m_new, l, acc


@triton.jit
def attention_fwd_kernel(q, k, v, o, lse, idx, Lq, Lk, NSEL, Hkv, BS, window, scale2,
                         s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd,
                         s_vb, s_vh, s_vl, s_vd, s_ob, s_oh, s_ol, s_od,
                         s_lb, s_lh, s_ll, s_ib, s_ih, s_il, s_in,
                         G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                         DV: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                         RN: tl.constexpr, CAUSAL: tl.constexpr, RANGE: tl.constexpr,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``RANGE``: 0 none (selection only), 1 the window, 2 every visible key (dense)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // Hkv
    t = bh % Hkv
    p = i + Lk - Lq  # bottom-right alignment
    hs = tl.arange(0, BG)
    heads = t * G + hs
    dd = tl.arange(0, BD)
    qt = tl.load(q + bi * s_qb + heads[:, None] * s_qh + i * s_ql + dd[None, :] * s_qd,
                 mask=(hs < G)[:, None] & (dd < D)[None, :], other=0)
    kp = k + bi * s_kb + t * s_kh
    vp = v + bi * s_vb + t * s_vh
    if RANGE == 2:
        lo = 0
        hi = Lk
    elif RANGE == 1:
        lo = p - window + 1
        hi = p + window
    else:
        lo = 0
        hi = 0
    if CAUSAL:
        hi = tl.minimum(hi, p + 1)
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, Lk)
    m = tl.full((BG,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BG,), dtype=tl.float32)
    acc = tl.zeros((BG, BDV), dtype=tl.float32)
    for j0 in range(lo, hi, RN):
        js = j0 + tl.arange(0, RN)
        m, l, acc = _attend(qt, kp, vp, js, js < hi, m, l, acc, s_kl, s_kd, s_vl, s_vd, scale2,
                            D, DV, BD, BDV, IEEE, UPCAST)
    ip = idx + bi * s_ib + t * s_ih + i * s_il
    for n in range(NSEL):
        blk = tl.load(ip + n * s_in)
        start = blk * BS
        end = tl.minimum(start + BS, Lk)
        if CAUSAL:
            end = tl.minimum(end, p + 1)
        end = tl.where(blk >= 0, end, start)
        for j0 in range(start, end, BN):
            js = j0 + tl.arange(0, BN)
            ok = (js < end) & ((js < lo) | (js >= hi))
            m, l, acc = _attend(qt, kp, vp, js, ok, m, l, acc, s_kl, s_kd, s_vl, s_vd, scale2,
                                D, DV, BD, BDV, IEEE, UPCAST)
    has = l != 0  # a NaN sum (a non-finite allowed key or value) is kept: it must propagate
    out = tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0)
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    row_lse = tl.where(has, (m_fin + tl.log2(tl.where(has, l, 1.0))) * LN2, float("-inf"))
    dv = tl.arange(0, BDV)
    tl.store(o + bi * s_ob + heads[:, None] * s_oh + i * s_ol + dv[None, :] * s_od,
             narrow(out, o.dtype.element_ty), mask=(hs < G)[:, None] & (dv < DV)[None, :])
    tl.store(lse + bi * s_lb + heads * s_lh + i * s_ll, row_lse, mask=hs < G)
