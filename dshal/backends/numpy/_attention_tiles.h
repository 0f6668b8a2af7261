/* The tiles of the numpy backend's compiled attention (_attention.c), written once and
 * included once per instruction set. The includer defines:
 *   ISA_NAME(x)  x with the instruction set's suffix (the names this file defines)
 *   ISA_ATTR     the functions' attribute (a target), or nothing
 *   VW           floats per vector (1: plain C floats, no vector extension)
 *   TM, TJ       row and vector tile of the score products (TM x TJ accumulators)
 *   TD           vectors of a head dimension per tile (the dims are padded to TD * VW)
 *   TQ, TR       row tile of dq, key tile of dk and dv (TQ x TD, TR x TD accumulators)
 * and gets back ISA_NAME(tiling) (these sizes) and ISA_NAME(walk_blocks); the parameters are
 * undefined at the end, ready for the next build.
 *
 * Layouts (floats, padded with zeros): a block's keys Kp [Np][Dp], values Vp [Np][Dvp] and
 * their transposes KT [Dp][Np], VT [Dvp][Np]; a batch's query rows Qb [Mp][Dp] and grad_out
 * rows Gb [Mp][Dvp]; scores S and dP [Mp][Np]; dQb [Mp][Dp or Dvp] (dq's part, or the forward's
 * P V); the block's gradients dKp [Np][Dp], dVp [Np][Dvp].
 * Np is a multiple of TJ * VW, Dp and Dvp of TD * VW, Mp of TM and TQ.
 */

#if VW > 1
typedef float ISA_NAME(vf) __attribute__((vector_size(VW * 4), aligned(4)));
#else
typedef float ISA_NAME(vf);
#endif
#define VF ISA_NAME(vf)
#define LD(p) (*(const VF *)(p))
#define ST(p, x) (*(VF *)(p) = (x))

/* C[m][j] = sum_d A[m][d] BT[d][j] for every m < Mp and the column tiles that cover
 * [c0, c1) (an outer product per d: TJ vectors of BT times TM broadcast elements of A). */
ISA_ATTR static void ISA_NAME(scores)(float *restrict C, const float *restrict A,
                                      const float *restrict BT, Py_ssize_t Mp, Py_ssize_t Np,
                                      Py_ssize_t Dk, Py_ssize_t c0, Py_ssize_t c1) {
    const Py_ssize_t step = TJ * VW;
    for (Py_ssize_t m0 = 0; m0 < Mp; m0 += TM)
        for (Py_ssize_t j0 = c0 / step * step; j0 < c1; j0 += step) {
            VF acc[TM][TJ];
            for (int t = 0; t < TM; t++)
                for (int u = 0; u < TJ; u++) acc[t][u] = (VF){0};
            for (Py_ssize_t d = 0; d < Dk; d++) {
                VF b[TJ];
                for (int u = 0; u < TJ; u++) b[u] = LD(BT + d * Np + j0 + u * VW);
                for (int t = 0; t < TM; t++) {
                    const float a = A[(m0 + t) * Dk + d];
                    for (int u = 0; u < TJ; u++) acc[t][u] += a * b[u];
                }
            }
            for (int t = 0; t < TM; t++)
                for (int u = 0; u < TJ; u++) ST(C + (m0 + t) * Np + j0 + u * VW, acc[t][u]);
        }
}

/* Y[m] = sum_{j in [c0, c1)} W[m][j] X[j] for every m < Mp (Y [Mp][Dx], W [Mp][Np],
 * X [Np][Dx]): dq's part of a batch. */
ISA_ATTR static void ISA_NAME(rows_times_keys)(float *restrict Y, const float *restrict W,
                                               const float *restrict X, Py_ssize_t Mp,
                                               Py_ssize_t Np, Py_ssize_t Dx, Py_ssize_t c0,
                                               Py_ssize_t c1) {
    for (Py_ssize_t m0 = 0; m0 < Mp; m0 += TQ)
        for (Py_ssize_t d0 = 0; d0 < Dx; d0 += TD * VW) {
            VF acc[TQ][TD];
            for (int t = 0; t < TQ; t++)
                for (int u = 0; u < TD; u++) acc[t][u] = (VF){0};
            for (Py_ssize_t j = c0; j < c1; j++) {
                VF x[TD];
                for (int u = 0; u < TD; u++) x[u] = LD(X + j * Dx + d0 + u * VW);
                for (int t = 0; t < TQ; t++) {
                    const float w = W[(m0 + t) * Np + j];
                    for (int u = 0; u < TD; u++) acc[t][u] += w * x[u];
                }
            }
            for (int t = 0; t < TQ; t++)
                for (int u = 0; u < TD; u++) ST(Y + (m0 + t) * Dx + d0 + u * VW, acc[t][u]);
        }
}

/* Y[j] += sum_{m < M} W[m][j] X[m] for every key j in [c0, c1) (Y [Np][Dx], W [Mp][Np],
 * X [Mp][Dx]): a batch's part of dk (W = dS, X = q) or dv (W = P, X = grad_out). Keys run
 * TR at a time, then one at a time; each key sums its rows in order m = 0, 1, ... */
ISA_ATTR static void ISA_NAME(keys_times_rows)(float *restrict Y, const float *restrict W,
                                               const float *restrict X, Py_ssize_t M,
                                               Py_ssize_t Np, Py_ssize_t Dx, Py_ssize_t c0,
                                               Py_ssize_t c1) {
    Py_ssize_t j0 = c0;
    for (; j0 + TR <= c1; j0 += TR)
        for (Py_ssize_t d0 = 0; d0 < Dx; d0 += TD * VW) {
            VF acc[TR][TD];
            for (int t = 0; t < TR; t++)
                for (int u = 0; u < TD; u++) acc[t][u] = LD(Y + (j0 + t) * Dx + d0 + u * VW);
            for (Py_ssize_t m = 0; m < M; m++) {
                VF x[TD];
                for (int u = 0; u < TD; u++) x[u] = LD(X + m * Dx + d0 + u * VW);
                for (int t = 0; t < TR; t++) {
                    const float w = W[m * Np + j0 + t];
                    for (int u = 0; u < TD; u++) acc[t][u] += w * x[u];
                }
            }
            for (int t = 0; t < TR; t++)
                for (int u = 0; u < TD; u++) ST(Y + (j0 + t) * Dx + d0 + u * VW, acc[t][u]);
        }
    for (; j0 < c1; j0++)
        for (Py_ssize_t d0 = 0; d0 < Dx; d0 += TD * VW) {
            VF acc[TD];
            for (int u = 0; u < TD; u++) acc[u] = LD(Y + j0 * Dx + d0 + u * VW);
            for (Py_ssize_t m = 0; m < M; m++) {
                const float w = W[m * Np + j0];
                for (int u = 0; u < TD; u++) acc[u] += w * LD(X + m * Dx + d0 + u * VW);
            }
            for (int u = 0; u < TD; u++) ST(Y + j0 * Dx + d0 + u * VW, acc[u]);
        }
}

/* Packs the batch's rows (query row r's g heads as rows m = r * g + h; padding rows zero) of
 * x [g, Lq, Dx] into X [Mp][Dxp]. */
ISA_ATTR static void ISA_NAME(pack_rows)(float *restrict X, const float *restrict x,
                                         const problem *a, const batch *b, Py_ssize_t Mp,
                                         Py_ssize_t Dx, Py_ssize_t Dxp) {
    const Py_ssize_t g = a->g, M = b->n * g;
    for (Py_ssize_t m = 0; m < Mp; m++) {
        float *xm = X + m * Dxp;
        memset(xm, 0, (size_t)Dxp * 4);
        if (m < M)
            memcpy(xm, x + ((m % g) * a->Lq + b->rows[m / g]) * Dx, (size_t)Dx * 4);
    }
}

/* Backward of one batch: the rows of `b` (all allowed keys [c0, c1) of the block, relative to
 * its first key) against the prepared block of `w`. */
ISA_ATTR static void ISA_NAME(backward_batch)(const problem *a, const batch *b, const block *w) {
    const Py_ssize_t g = a->g, Lq = a->Lq, D = a->D;
    const Py_ssize_t M = b->n * g, Mp = round_up(M, TM > TQ ? TM : TQ);
    const Py_ssize_t Dp = w->Dp, Dvp = w->Dvp, Np = w->Np, c0 = b->c0, c1 = b->c1;
    const float sl2 = a->scale * LOG2E;
    float *restrict S = w->S, *restrict dP = w->dP;
    ISA_NAME(pack_rows)(w->Qb, a->q, a, b, Mp, D, Dp);
    ISA_NAME(pack_rows)(w->Gb, a->go, a, b, Mp, a->Dv, Dvp);
    for (Py_ssize_t m = 0; m < M; m++) {
        const Py_ssize_t row = (m % g) * Lq + b->rows[m / g];
        const float lse = a->lse[row];
        w->mlse[m] = isfinite(lse) ? lse * LOG2E : 0.0f;
        w->shift[m] = a->delta[row] - (a->glse ? a->glse[row] : 0.0f);
    }
    ISA_NAME(scores)(S, w->Qb, w->KT, Mp, Np, Dp, c0, c1);
    ISA_NAME(scores)(dP, w->Gb, w->VT, Mp, Np, Dvp, c0, c1);
    /* P (into S) from lse; dS = P (dP - delta + grad_lse), carrying the scale (into dP) */
    for (Py_ssize_t m = 0; m < M; m++) {
        float *restrict sm = S + m * Np, *restrict dm = dP + m * Np;
        const float mm = w->mlse[m], sh = w->shift[m], scale = a->scale;
#pragma omp simd
        for (Py_ssize_t j = c0; j < c1; j++) {
            const float p = exp2_poly(sm[j] * sl2 - mm);
            sm[j] = p;
            dm[j] = p * (dm[j] - sh) * scale;
        }
    }
    /* dq rows += dS K (padding rows computed, not used) */
    ISA_NAME(rows_times_keys)(w->dQb, dP, w->Kp, Mp, Np, Dp, c0, c1);
    for (Py_ssize_t m = 0; m < M; m++) {
        float *restrict dq = a->dq + ((m % g) * Lq + b->rows[m / g]) * D;
        const float *restrict add = w->dQb + m * Dp;
        for (Py_ssize_t d = 0; d < D; d++) dq[d] += add[d];
    }
    ISA_NAME(keys_times_rows)(w->dKp, dP, w->Qb, M, Np, Dp, c0, c1);
    ISA_NAME(keys_times_rows)(w->dVp, S, w->Gb, M, Np, Dvp, c0, c1);
}

/* Forward of one batch: each row's online softmax state (m, l, o) takes in keys [c0, c1). */
ISA_ATTR static void ISA_NAME(forward_batch)(const problem *a, const batch *b, const block *w) {
    const Py_ssize_t g = a->g, Lq = a->Lq, Dv = a->Dv;
    const Py_ssize_t M = b->n * g, Mp = round_up(M, TM > TQ ? TM : TQ);
    const Py_ssize_t Np = w->Np, c0 = b->c0, c1 = b->c1;
    const float sl2 = a->scale * LOG2E;
    float *restrict S = w->S, *restrict alpha = w->shift;
    ISA_NAME(pack_rows)(w->Qb, a->q, a, b, Mp, a->D, w->Dp);
    ISA_NAME(scores)(S, w->Qb, w->KT, Mp, Np, w->Dp, c0, c1);
    for (Py_ssize_t m = 0; m < M; m++) {
        const Py_ssize_t row = (m % g) * Lq + b->rows[m / g];
        float *restrict sm = S + m * Np;
        float top = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : top)
        for (Py_ssize_t j = c0; j < c1; j++) { /* NaN scores never win the max */
            const float x = sm[j] * sl2;
            sm[j] = x;
            top = x > top ? x : top;
        }
        const float m_old = a->m[row], m_new = top > m_old ? top : m_old;
        if (m_new == -INFINITY) { /* no finite score yet: only NaN scores count */
            alpha[m] = 1.0f;
            for (Py_ssize_t j = c0; j < c1; j++) sm[j] = sm[j] != sm[j] ? sm[j] : 0.0f;
            for (Py_ssize_t j = c0; j < c1; j++) sum += sm[j];
        } else {
            alpha[m] = exp2_poly(m_old - m_new);
#pragma omp simd reduction(+ : sum)
            for (Py_ssize_t j = c0; j < c1; j++) {
                sm[j] = exp2_poly(sm[j] - m_new);
                sum += sm[j];
            }
        }
        a->l[row] = a->l[row] * alpha[m] + sum;
        a->m[row] = m_new;
    }
    /* o = alpha o + P V (padding rows computed, not used) */
    ISA_NAME(rows_times_keys)(w->dQb, S, w->Vp, Mp, Np, w->Dvp, c0, c1);
    for (Py_ssize_t m = 0; m < M; m++) {
        float *restrict o = a->o + ((m % g) * Lq + b->rows[m / g]) * Dv;
        const float *restrict pv = w->dQb + m * w->Dvp, am = alpha[m];
        for (Py_ssize_t d = 0; d < Dv; d++) o[d] = o[d] * am + pv[d];
    }
}

/* Key blocks [b0, b1) of one (batch, kv head): every row meeting a block (row_walk in
 * _attention.c) in batches of rows sharing a key range; the forward's or the backward's. The
 * rows of a block are listed first, so that each batch can prefetch the rows of the next
 * (a block's rows are scattered: the hardware prefetcher cannot guess them). */
ISA_ATTR static void ISA_NAME(walk_blocks)(const problem *a, Py_ssize_t b0, Py_ssize_t b1,
                                           const row_lists *sel, const block *w, int forward) {
    for (Py_ssize_t kb = b0; kb < b1; kb++) {
        const Py_ssize_t j0 = kb * a->bs, nk = j0 + a->bs < a->Lk ? a->bs : a->Lk - j0;
        row_walk walk;
        walk_start(&walk, a, kb, b0, sel);
        Py_ssize_t n = 0, i, lo, hi;
        while (walk_next(&walk, a, &i, &lo, &hi))
            w->meet_row[n] = i, w->meet_c0[n] = lo - j0, w->meet_c1[n] = hi - j0, n++;
        if (!n) continue;
        prepare_block(a, j0, nk, w, forward);
        prefetch_rows(a, w->meet_row, n < w->max_rows ? n : w->max_rows, forward);
        for (Py_ssize_t e = 0; e < n;) {
            batch b = {.rows = w->meet_row + e, .c0 = w->meet_c0[e], .c1 = w->meet_c1[e]};
            while (e + b.n < n && b.n < w->max_rows && w->meet_c0[e + b.n] == b.c0 &&
                   w->meet_c1[e + b.n] == b.c1)
                b.n++;
            e += b.n;
            const Py_ssize_t ahead = n - e < w->max_rows ? n - e : w->max_rows;
            prefetch_rows(a, w->meet_row + e, ahead, forward);
            if (forward) ISA_NAME(forward_batch)(a, &b, w);
            else ISA_NAME(backward_batch)(a, &b, w);
        }
        if (!forward) finish_block(a, j0, nk, w);
    }
}

static const tiling ISA_NAME(tiling) = {VW, TM, TJ, TQ, TD};

#undef VF
#undef LD
#undef ST
#undef ISA_NAME
#undef ISA_ATTR
#undef VW
#undef TM
#undef TJ
#undef TD
#undef TQ
#undef TR
