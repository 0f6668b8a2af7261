/* sparse_attention: block selection, then attention with an online softmax (DESIGN 3.1).
 *
 * Selection (top_k): attn_block_means (mean key per block), attn_scores (per query: the g query
 * heads of its kv head summed, dotted with every block mean, times scale: an Lq x n_blocks
 * matrix, never Lq x Lk), attn_topk (per query: the forced own block plus the top `want`
 * candidates, descending score, ties to the lower block, non-finite scores last). Or
 * attn_idx_mask from the caller's indices. The selection is a byte mask [B*Hkv, Lq, n_blocks];
 * attn_compact turns it into sorted, -1 padded block indices.
 *
 * attn_prep converts k (transposed in chunks of KC keys) and v to float32 once. attn_fwd: one
 * work-item per (query, kv head, tile of HPW query heads). It walks the query's allowed keys
 * only, window first, then each selected block minus the window, so no key counts twice; keys
 * that share a chunk with allowed ones are scored but dropped by selection before any exp or
 * product, so NaN/Inf outside the allowed set cannot leak. Each key is loaded once for the HPW
 * heads that share it (GQA); softmax state per head in float32.
 *
 * The serving forms (DESIGN 3.1a: varlen, paged, block_keys) run on attn_seq_means,
 * attn_seq_scores, attn_seq_topk and attn_seq_fwd, one launch each for all of a call's
 * sequences (see their section below).
 *
 * Defines (dshal_kernels.AttentionDefines): D, DV head dims (>= 1); HPW heads per work-item;
 * KC keys per chunk; X_T, X_LOAD, X_STORE the dtype of q, k, v, out; HAS_SEL 1 when a
 * selection mask is used.
 */
#include "inc_vendor.h"

/* mean key of block (GLOBAL_ID(0)) of (batch, kv head) GLOBAL_ID(1) -> kmean [BH, nb, D] */
KERNEL void attn_block_means(GLOBAL const X_T* RESTRICT k, GLOBAL float* RESTRICT kmean,
                             int BH, int Lk, int nb, int bs) {
    int blk = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (blk >= nb || bh >= BH) return;
    int j0 = blk * bs, j1 = MIN(Lk, j0 + bs);
    GLOBAL const X_T* kb = k + (i64)bh * Lk * D;
    for (int d = 0; d < D; d++) {
        float s = 0.0f;
        for (int j = j0; j < j1; j++) s += X_LOAD(kb[(i64)j * D + d]);
        kmean[((i64)bh * nb + blk) * D + d] = s / (float)(j1 - j0);
    }
}

/* qs = the sum of the g query heads of query i of (batch, kv head) bh: heads t*g .. t*g+g-1
 * of batch b are rows (bh*g + h) of q viewed as [B*Hq, Lq, D] */
DEVICE void group_query_sum(GLOBAL const X_T* RESTRICT q, int bh, int g, int Lq, int i,
                            float* qs) {
    for (int d = 0; d < D; d++) qs[d] = 0.0f;
    for (int h = 0; h < g; h++) {
        GLOBAL const X_T* qr = q + (((i64)bh * g + h) * Lq + i) * D;
        for (int d = 0; d < D; d++) qs[d] += X_LOAD(qr[d]);
    }
}

/* scores [BH, Lq, nb] of query GLOBAL_ID(0) of (batch, kv head) GLOBAL_ID(1) */
KERNEL void attn_scores(GLOBAL const X_T* RESTRICT q, GLOBAL const float* RESTRICT kmean,
                        GLOBAL float* RESTRICT scores, int BH, int Hkv, int g, int Lq, int nb,
                        float scale) {
    int i = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (i >= Lq || bh >= BH) return;
    float qs[D];
    group_query_sum(q, bh, g, Lq, i, qs);
    GLOBAL float* out = scores + ((i64)bh * Lq + i) * nb;
    for (int b = 0; b < nb; b++) {
        GLOBAL const float* km = kmean + ((i64)bh * nb + b) * D;
        float s = 0.0f;
        for (int d = 0; d < D; d++) s += qs[d] * km[d];
        out[b] = s * scale;
    }
}

/* block a ranks before block b: finite scores first, descending; ties to the lower index */
DEVICE int ranks_before(float sa, int a, float sb, int b) {
    int fa = ISFINITE(sa), fb = ISFINITE(sb);
    if (fa != fb) return fa;
    if (!fa) return a < b;
    return sa > sb || (sa == sb && a < b);
}

/* the selection mask row m (width entries, nb blocks) of the query at key position p of a
 * sequence of Lk keys, from its score row s; want[n] is how many of n candidates top_k takes
 * (the host applies the count/fraction rule) */
DEVICE void topk_row(GLOBAL const float* RESTRICT s, GLOBAL uchar* RESTRICT m,
                     GLOBAL const int* RESTRICT want, int p, int Lk, int nb, int width, int bs,
                     int causal) {
    int own = (p >= 0 && p < Lk) ? p / bs : -1;
    /* candidates: every block but the own one, or with causal the blocks before it */
    int hi = causal ? MAX(own, 0) : nb;
    int ncand = causal ? hi : (own >= 0 ? nb - 1 : nb);
    int take = want[ncand];
    for (int b = 0; b < width; b++) m[b] = 0;
    if (take > ncand - take) { /* take all, then drop the ncand - take last-ranked */
        for (int b = 0; b < hi; b++) m[b] = (uchar)(b != own);
        for (int it = take; it < ncand; it++) {
            int worst = -1;
            for (int b = 0; b < hi; b++)
                if (m[b] && (worst < 0 || ranks_before(s[worst], worst, s[b], b))) worst = b;
            m[worst] = 0;
        }
    } else {
        for (int it = 0; it < take; it++) {
            int best = -1;
            for (int b = 0; b < hi; b++)
                if (b != own && !m[b] && (best < 0 || ranks_before(s[b], b, s[best], best)))
                    best = b;
            m[best] = 1;
        }
    }
    if (own >= 0) m[own] = 1;
}

/* the selection mask row of query GLOBAL_ID(0) of (batch, kv head) GLOBAL_ID(1) */
KERNEL void attn_topk(GLOBAL const float* RESTRICT scores, GLOBAL const int* RESTRICT want,
                      GLOBAL uchar* RESTRICT mask, int BH, int Lq, int Lk, int nb, int bs,
                      int causal) {
    int i = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (i >= Lq || bh >= BH) return;
    i64 row = ((i64)bh * Lq + i) * nb;
    topk_row(scores + row, mask + row, want, i + Lk - Lq, Lk, nb, nb, bs, causal);
}

/* the caller's block indices [BH, Lq, n] (-1 ignored, duplicates once) -> mask row */
KERNEL void attn_idx_mask(GLOBAL const int* RESTRICT idx, GLOBAL uchar* RESTRICT mask, int BH,
                          int Lq, int n, int nb) {
    int i = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (i >= Lq || bh >= BH) return;
    GLOBAL uchar* m = mask + ((i64)bh * Lq + i) * nb;
    GLOBAL const int* r = idx + ((i64)bh * Lq + i) * n;
    for (int b = 0; b < nb; b++) m[b] = 0;
    for (int e = 0; e < n; e++)
        if (r[e] >= 0) m[r[e]] = 1;
}

/* mask row -> selected blocks ascending, -1 padded to width */
KERNEL void attn_compact(GLOBAL const uchar* RESTRICT mask, GLOBAL int* RESTRICT out, int BH,
                         int Lq, int nb, int width) {
    int i = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (i >= Lq || bh >= BH) return;
    GLOBAL const uchar* m = mask + ((i64)bh * Lq + i) * nb;
    GLOBAL int* o = out + ((i64)bh * Lq + i) * width;
    int c = 0;
    for (int b = 0; b < nb && c < width; b++)
        if (m[b]) o[c++] = b;
    for (; c < width; c++) o[c] = -1;
}

/* keys of (batch, kv head) bh as float32 in chunks of KC, transposed within a chunk:
 * kt[bh][chunk][d][c] = k[bh][chunk*KC + c][d] (zero past Lk); and v as float32 vf[bh][j][e]
 * (float32 inputs skip this: the host passes v itself). One work-item per (key, bh). */
KERNEL void attn_prep(GLOBAL const X_T* RESTRICT k, GLOBAL const X_T* RESTRICT v,
                      GLOBAL float* RESTRICT kt, GLOBAL float* RESTRICT vf, int convert_v,
                      int BH, int Lk, int chunks) {
    int j = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (j >= chunks * KC || bh >= BH) return;
    GLOBAL float* dst = kt + ((i64)bh * chunks + j / KC) * D * KC + j % KC;
    GLOBAL const X_T* src = k + ((i64)bh * Lk + j) * D;
    for (int d = 0; d < D; d++) dst[d * KC] = j < Lk ? X_LOAD(src[d]) : 0.0f;
    if (convert_v && j < Lk)
        for (int e = 0; e < DV; e++)
            vf[((i64)bh * Lk + j) * DV + e] = X_LOAD(v[((i64)bh * Lk + j) * DV + e]);
}

/* the keys query i may attend besides its selected blocks: keys [0, vis) are visible (causal),
 * the window (or, with neither window nor selection, every visible key) is [w0, w1) */
typedef struct {
    int vis, w0, w1;
} attn_span;

DEVICE attn_span attn_span_of(int i, int Lq, int Lk, int window, int causal) {
    attn_span sp;
    int p = i + Lk - Lq;
    sp.vis = causal ? MIN(p + 1, Lk) : Lk;
    sp.w0 = 0;
    sp.w1 = 0;
    if (window > 0) {
        sp.w0 = MAX(0, p - window + 1);
        sp.w1 = MAX(sp.w0, MIN(sp.vis, p + window));
    } else if (!HAS_SEL) {
        sp.w1 = MAX(sp.vis, 0); /* dense */
    }
    return sp;
}

typedef struct {
    float q[HPW][D], acc[HPW][DV], m[HPW], l[HPW];
    int seen;
} attn_state;

/* fold the KC scores s (unscaled dot products) of one head h into the online softmax state:
 * entries outside [c0, c1) are dropped before any exp, so whatever they hold never reaches the
 * state; on return s holds the probabilities (0 outside [c0, c1)) and acc[h] is rescaled, so
 * the caller adds p * v of the chunk's keys [c0, c1) */
DEVICE void fold_scores(attn_state* st, int h, float* s, int c0, int c1, float scale) {
    float m = st->m[h], mn = m;
#pragma unroll
    for (int c = 0; c < KC; c++) {
        float x = (c >= c0 && c < c1) ? s[c] * scale : -DSHAL_INF;
        s[c] = x;
        mn = x > mn ? x : mn; /* a NaN score keeps the max, and poisons l below */
    }
    float corr = mn == m ? 1.0f : dshal_exp_le0(m - mn), sum = 0.0f;
#pragma unroll
    for (int c = 0; c < KC; c++) {
        float p = s[c] == -DSHAL_INF ? 0.0f : dshal_exp_le0(s[c] - mn);
        s[c] = p;
        sum += p;
    }
    st->m[h] = mn;
    st->l[h] = st->l[h] * corr + sum;
#pragma unroll
    for (int e = 0; e < DV; e++) st->acc[h][e] *= corr;
}

/* a chunk's scores s[h][c] (the HPW heads of a work-item, KC keys): zeroed, then each head
 * dimension d added as q[h][d] * kd[c] (independent accumulators along the chunk) */
DEVICE void chunk_zero(float s[HPW][KC]) {
    for (int h = 0; h < HPW; h++)
#pragma unroll
        for (int c = 0; c < KC; c++) s[h][c] = 0.0f;
}

DEVICE void chunk_add_dim(const attn_state* st, float s[HPW][KC], const float* kd, int d) {
    for (int h = 0; h < HPW; h++) {
        float qd = st->q[h][d];
#pragma unroll
        for (int c = 0; c < KC; c++) s[h][c] += qd * kd[c];
    }
}

/* fold keys [j0, j1) of one (batch, kv head) into the state, a chunk of KC keys at a time:
 * scores for the whole chunk (independent accumulators along the chunk, so they vectorize),
 * keys outside [j0, j1) then dropped by fold_scores */
DEVICE void attend(attn_state* st, GLOBAL const float* RESTRICT kt,
                   GLOBAL const float* RESTRICT vf, int j0, int j1, float scale) {
    if (j1 <= j0) return;
    for (int cb = j0 / KC; cb * KC < j1; cb++) {
        int c0 = MAX(j0 - cb * KC, 0), c1 = MIN(j1 - cb * KC, KC);
        GLOBAL const float* kc = kt + (i64)cb * D * KC;
        float s[HPW][KC];
        chunk_zero(s);
        for (int d = 0; d < D; d++) {
            float kd[KC];
#pragma unroll
            for (int c = 0; c < KC; c++) kd[c] = kc[d * KC + c];
            chunk_add_dim(st, s, kd, d);
        }
        for (int h = 0; h < HPW; h++) {
            fold_scores(st, h, s[h], c0, c1, scale);
            for (int c = c0; c < c1; c++) {
                float p = s[h][c];
                GLOBAL const float* vr = vf + (i64)(cb * KC + c) * DV;
    #pragma unroll
                for (int e = 0; e < DV; e++) st->acc[h][e] += p * vr[e];
            }
        }
    }
    st->seen += j1 - j0;
}

/* the state of HPW query heads (rows h0.. of q viewed as [B*Hq, Lq, D]) at query i */
DEVICE void attn_init(attn_state* st, GLOBAL const X_T* RESTRICT q, int h0, int Lq, int i) {
    for (int h = 0; h < HPW; h++) {
        GLOBAL const X_T* qr = q + ((i64)(h0 + h) * Lq + i) * D;
        for (int d = 0; d < D; d++) st->q[h][d] = X_LOAD(qr[d]);
        for (int e = 0; e < DV; e++) st->acc[h][e] = 0.0f;
        st->m[h] = -DSHAL_INF;
        st->l[h] = 0.0f;
    }
    st->seen = 0;
}

/* out (and lse when write_lse) of the state's heads: 0 and -inf where nothing was allowed */
DEVICE void attn_store(const attn_state* st, GLOBAL X_T* RESTRICT out, GLOBAL float* RESTRICT lse,
                       int write_lse, int h0, int Lq, int i) {
    for (int h = 0; h < HPW; h++) {
        i64 row = (i64)(h0 + h) * Lq + i;
        float l = st->l[h];
        for (int e = 0; e < DV; e++)
            out[row * DV + e] = X_STORE(st->seen ? st->acc[h][e] / l : 0.0f);
        if (write_lse) {
            float r = st->m[h] + LOGF(l);
            if (!st->seen) r = -DSHAL_INF;
            else if (l == 0.0f) r = AS_FLOAT(0x7fc00000u); /* every allowed score was -inf */
            lse[row] = r;
        }
    }
}

/* out [B, Hq, Lq, DV], lse [B, Hq, Lq] for query GLOBAL_ID(0) and head tile GLOBAL_ID(1) of
 * (batch b, kv head t): heads t*g + tile*HPW .. + HPW. kt, vf as attn_prep writes them. */
KERNEL void attn_fwd(GLOBAL const X_T* RESTRICT q, GLOBAL const float* RESTRICT kt,
                     GLOBAL const float* RESTRICT vf, GLOBAL const uchar* RESTRICT mask,
                     GLOBAL X_T* RESTRICT out, GLOBAL float* RESTRICT lse, int write_lse,
                     int BH, int g, int Lq, int Lk, int nb, int bs, int window, int causal,
                     float scale) {
    int i = GLOBAL_ID(0), tile = GLOBAL_ID(1);
    int tiles = g / HPW, bh = tile / tiles;
    if (i >= Lq || bh >= BH) return;
    int h0 = bh * g + (tile % tiles) * HPW; /* row of q viewed as [B*Hq, Lq, D] */
    int chunks = (Lk + KC - 1) / KC;
    GLOBAL const float* kb = kt + (i64)bh * chunks * D * KC;
    GLOBAL const float* vb = vf + (i64)bh * Lk * DV;
    attn_state st;
    attn_init(&st, q, h0, Lq, i);
    attn_span sp = attn_span_of(i, Lq, Lk, window, causal);
    int vis = sp.vis, w0 = sp.w0, w1 = sp.w1;
    attend(&st, kb, vb, w0, w1, scale);
#if HAS_SEL
    GLOBAL const uchar* m = mask + ((i64)bh * Lq + i) * nb;
    for (int b = 0; b < nb; b++) {
        if (!m[b]) continue;
        int j0 = b * bs, j1 = MIN(vis, j0 + bs);
        attend(&st, kb, vb, j0, MIN(j1, w0), scale);
        attend(&st, kb, vb, MAX(j0, w1), j1, scale);
    }
#endif
    attn_store(&st, out, lse, write_lse, h0, Lq, i);
}

/* ---- the serving forms (DESIGN 3.1a) in one launch per stage ----
 *
 * A call holds S sequences. Query row (b, i) of q [B, Hq, Lq, D] belongs to sequence
 * s = rowseq[b * Lq + i]; seqs[s] holds SEQ_FIELDS ints: its first query row q0, its lq
 * queries and lk keys, its key offset k0, and where its block summaries live (sb, so, below).
 * Key j (< lk) of sequence s and kv head t is row ((page * Hkv + t) * LKP + k0 + j % PS) of
 * k [*, Hkv, LKP, D], page = tab[s * TP + j / PS]: a paged cache has PS = page size and tab its
 * block_table; packed (varlen) or batched keys have one entry per sequence (its batch row) and
 * PS larger than any length. Every rule (alignment, blocks, window, selection) is the
 * contiguous one of the sequence's own rows and keys; no key at or past lk is ever read, so
 * whatever page slots past seqlens_k and unused pages hold cannot leak.
 *
 * Summaries (the selection score's block keys, float32 [*, Hkv, NBP, D]): block c of sequence s
 * is row ((tab[s * TP + c / SBP] * Hkv + t) * NBP + c % SBP) when paged (SBP blocks per page),
 * else row ((sb * Hkv + t) * NBP + so + c). The caller's block_keys, or the block means that
 * attn_seq_means writes (sb = 0, so = the blocks of the sequences before). With block_keys no
 * key is read for ranking; attn_seq_fwd reads only the allowed keys (window and selected
 * blocks), straight from the pages, KC keys at a time. Sequences whose keys are each read by
 * many queries (prefill; the host decides, kto >= 0) are first converted by attn_seq_prep into
 * the chunked float32 layout of attn_prep, at chunk offset kto of kt [Hkv, NCH, D, KC] and vf
 * [Hkv, NCH * KC, DV], and attended from there as in attn_fwd. */
#define SEQ_FIELDS 7

typedef struct {
    int s, i, lq, lk, k0, sb, so, kto;
} seq_row;

/* the sequence of query row i of batch b, with i counted from the sequence's first row */
DEVICE seq_row seq_row_of(GLOBAL const int* RESTRICT rowseq, GLOBAL const int* RESTRICT seqs,
                          int b, int i, int Lq) {
    seq_row r;
    r.s = rowseq[(i64)b * Lq + i];
    GLOBAL const int* f = seqs + (i64)r.s * SEQ_FIELDS;
    r.i = i - f[0];
    r.lq = f[1];
    r.lk = f[2];
    r.k0 = f[3];
    r.sb = f[4];
    r.so = f[5];
    r.kto = f[6];
    return r;
}

/* where the keys of one sequence and kv head live (see above) */
typedef struct {
    GLOBAL const int* tab;
    i64 base; /* s * TP */
    int t, Hkv, PS, LKP, k0;
} seq_keys;

DEVICE seq_keys seq_keys_of(GLOBAL const int* tab, int s, int TP, int t, int Hkv, int PS,
                            int LKP, int k0) {
    seq_keys sk;
    sk.tab = tab;
    sk.base = (i64)s * TP;
    sk.t = t;
    sk.Hkv = Hkv;
    sk.PS = PS;
    sk.LKP = LKP;
    sk.k0 = k0;
    return sk;
}

/* the row of key j in k [*, Hkv, LKP, D] */
DEVICE i64 key_row(const seq_keys* sk, int j) {
    i64 page = sk->tab[sk->base + j / sk->PS];
    return (page * sk->Hkv + sk->t) * sk->LKP + sk->k0 + j % sk->PS;
}

/* block means of block GLOBAL_ID(0) of (sequence s, kv head t) = GLOBAL_ID(1) = s * Hkv + t
 * -> means [Hkv, NBP, D] at row (t * NBP + so + block); a block never straddles pages */
KERNEL void attn_seq_means(GLOBAL const X_T* RESTRICT k, GLOBAL const int* RESTRICT tab,
                           GLOBAL const int* RESTRICT seqs, GLOBAL float* RESTRICT means,
                           int S, int Hkv, int TP, int PS, int LKP, int NBP, int NBM, int bs) {
    int blk = GLOBAL_ID(0), st = GLOBAL_ID(1);
    if (blk >= NBM || st >= S * Hkv) return;
    int s = st / Hkv, t = st % Hkv;
    GLOBAL const int* f = seqs + (i64)s * SEQ_FIELDS;
    int lk = f[2], j0 = blk * bs, n = MIN(lk, j0 + bs) - j0;
    if (n <= 0) return;
    seq_keys sk = seq_keys_of(tab, s, TP, t, Hkv, PS, LKP, f[3]);
    GLOBAL const X_T* kb = k + key_row(&sk, j0) * D;
    GLOBAL float* mr = means + ((i64)t * NBP + f[5] + blk) * D;
    for (int d = 0; d < D; d++) {
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += X_LOAD(kb[(i64)j * D + d]);
        mr[d] = acc / (float)n;
    }
}

/* selection scores [B*Hkv, Lq, NBM] of query GLOBAL_ID(0) of (batch, kv head) GLOBAL_ID(1):
 * scale * (sum of the g query heads) . summary, for the blocks of the query's sequence */
KERNEL void attn_seq_scores(GLOBAL const X_T* RESTRICT q, GLOBAL const float* RESTRICT summ,
                            GLOBAL const int* RESTRICT tab, GLOBAL const int* RESTRICT rowseq,
                            GLOBAL const int* RESTRICT seqs, GLOBAL float* RESTRICT scores,
                            int BH, int Hkv, int g, int Lq, int NBM, int bs, int TP,
                            int sum_paged, int SBP, int NBP, float scale) {
    int i = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (i >= Lq || bh >= BH) return;
    int t = bh % Hkv;
    seq_row r = seq_row_of(rowseq, seqs, bh / Hkv, i, Lq);
    int nb = (r.lk + bs - 1) / bs;
    float qs[D];
    group_query_sum(q, bh, g, Lq, i, qs);
    GLOBAL float* out = scores + ((i64)bh * Lq + i) * NBM;
    for (int c = 0; c < nb; c++) {
        i64 row = sum_paged
            ? ((i64)tab[(i64)r.s * TP + c / SBP] * Hkv + t) * NBP + c % SBP
            : ((i64)r.sb * Hkv + t) * NBP + r.so + c;
        GLOBAL const float* km = summ + row * D;
        float acc = 0.0f;
        for (int d = 0; d < D; d++) acc += qs[d] * km[d];
        out[c] = acc * scale;
    }
}

/* the selection mask row [B*Hkv, Lq, NBM] of query GLOBAL_ID(0) of (batch, kv head)
 * GLOBAL_ID(1), aligned bottom-right within its sequence */
KERNEL void attn_seq_topk(GLOBAL const float* RESTRICT scores, GLOBAL const int* RESTRICT want,
                          GLOBAL const int* RESTRICT rowseq, GLOBAL const int* RESTRICT seqs,
                          GLOBAL uchar* RESTRICT mask, int BH, int Hkv, int Lq, int NBM, int bs,
                          int causal) {
    int i = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (i >= Lq || bh >= BH) return;
    seq_row r = seq_row_of(rowseq, seqs, bh / Hkv, i, Lq);
    i64 row = ((i64)bh * Lq + i) * NBM;
    topk_row(scores + row, mask + row, want, r.i + r.lk - r.lq, r.lk, (r.lk + bs - 1) / bs,
             NBM, bs, causal);
}

/* key GLOBAL_ID(0) of (sequence s, kv head t) = GLOBAL_ID(1) = s * Hkv + t, for the
 * sequences with kto >= 0: kt[t][kto + j / KC][d][j % KC] = k (zero past lk) and
 * vf[t][kto * KC + j][e] = v, both float32 */
KERNEL void attn_seq_prep(GLOBAL const X_T* RESTRICT k, GLOBAL const X_T* RESTRICT v,
                          GLOBAL const int* RESTRICT tab, GLOBAL const int* RESTRICT seqs,
                          GLOBAL float* RESTRICT kt, GLOBAL float* RESTRICT vf, int S, int Hkv,
                          int TP, int PS, int LKP, int NCH) {
    int j = GLOBAL_ID(0), st = GLOBAL_ID(1);
    if (st >= S * Hkv) return;
    int s = st / Hkv, t = st % Hkv;
    GLOBAL const int* f = seqs + (i64)s * SEQ_FIELDS;
    int lk = f[2], kto = f[6];
    if (kto < 0 || j >= (lk + KC - 1) / KC * KC) return;
    GLOBAL float* dst = kt + ((i64)t * NCH + kto + j / KC) * D * KC + j % KC;
    if (j >= lk) {
        for (int d = 0; d < D; d++) dst[d * KC] = 0.0f;
        return;
    }
    seq_keys sk = seq_keys_of(tab, s, TP, t, Hkv, PS, LKP, f[3]);
    i64 row = key_row(&sk, j);
    for (int d = 0; d < D; d++) dst[d * KC] = X_LOAD(k[row * D + d]);
    GLOBAL float* vd = vf + ((i64)t * NCH * KC + (i64)kto * KC + j) * DV;
    for (int e = 0; e < DV; e++) vd[e] = X_LOAD(v[row * DV + e]);
}

/* fold keys [j0, j1) of one sequence and kv head into the state, read through its pages, KC
 * at a time: a chunk's slots past j1 repeat key j0 (read, then dropped by fold_scores), so
 * no key outside [j0, j1) is ever loaded */
DEVICE void attend_seq(attn_state* st, GLOBAL const X_T* RESTRICT k,
                       GLOBAL const X_T* RESTRICT v, const seq_keys* sk, int j0, int j1,
                       float scale) {
    for (int j = j0; j < j1; j += KC) {
        int n = MIN(KC, j1 - j);
        i64 rows[KC];
#pragma unroll
        for (int c = 0; c < KC; c++) rows[c] = key_row(sk, c < n ? j + c : j0);
        float s[HPW][KC];
        chunk_zero(s);
        for (int d = 0; d < D; d++) {
            float kd[KC];
#pragma unroll
            for (int c = 0; c < KC; c++) kd[c] = X_LOAD(k[rows[c] * D + d]);
            chunk_add_dim(st, s, kd, d);
        }
        for (int h = 0; h < HPW; h++) fold_scores(st, h, s[h], 0, n, scale);
        for (int c = 0; c < n; c++) {
            GLOBAL const X_T* vr = v + rows[c] * DV;
            for (int e = 0; e < DV; e++) {
                float ve = X_LOAD(vr[e]);
                for (int h = 0; h < HPW; h++) st->acc[h][e] += s[h][c] * ve;
            }
        }
    }
    st->seen += MAX(j1 - j0, 0);
}

/* keys [j0, j1) of the row's sequence: from the converted chunks when it has them, else
 * through its pages */
DEVICE void attend_any(attn_state* st, GLOBAL const X_T* RESTRICT k,
                       GLOBAL const X_T* RESTRICT v, const seq_keys* sk,
                       GLOBAL const float* RESTRICT kt, GLOBAL const float* RESTRICT vf,
                       int prepped, int j0, int j1, float scale) {
    if (prepped) attend(st, kt, vf, j0, j1, scale);
    else attend_seq(st, k, v, sk, j0, j1, scale);
}

/* out [B, Hq, Lq, DV], lse [B, Hq, Lq] of query GLOBAL_ID(0) and head tile GLOBAL_ID(1) (as
 * attn_fwd): its keys from kt/vf when attn_seq_prep converted its sequence, else read from k/v
 * through the sequence's pages */
KERNEL void attn_seq_fwd(GLOBAL const X_T* RESTRICT q, GLOBAL const X_T* RESTRICT k,
                         GLOBAL const X_T* RESTRICT v, GLOBAL const float* RESTRICT kt,
                         GLOBAL const float* RESTRICT vf, GLOBAL const int* RESTRICT tab,
                         GLOBAL const int* RESTRICT rowseq, GLOBAL const int* RESTRICT seqs,
                         GLOBAL const uchar* RESTRICT mask, GLOBAL X_T* RESTRICT out,
                         GLOBAL float* RESTRICT lse, int write_lse, int BH, int Hkv, int g,
                         int Lq, int NBM, int bs, int TP, int PS, int LKP, int NCH, int window,
                         int causal, float scale) {
    int i = GLOBAL_ID(0), tile = GLOBAL_ID(1);
    int tiles = g / HPW, bh = tile / tiles;
    if (i >= Lq || bh >= BH) return;
    int h0 = bh * g + (tile % tiles) * HPW, t = bh % Hkv;
    seq_row r = seq_row_of(rowseq, seqs, bh / Hkv, i, Lq);
    seq_keys sk = seq_keys_of(tab, r.s, TP, t, Hkv, PS, LKP, r.k0);
    int prepped = r.kto >= 0, kto = MAX(r.kto, 0);
    GLOBAL const float* kc = kt + ((i64)t * NCH + kto) * D * KC;
    GLOBAL const float* vc = vf + ((i64)t * NCH + kto) * KC * DV;
    attn_state st;
    attn_init(&st, q, h0, Lq, i);
    attn_span sp = attn_span_of(r.i, r.lq, r.lk, window, causal);
    attend_any(&st, k, v, &sk, kc, vc, prepped, sp.w0, sp.w1, scale);
#if HAS_SEL
    GLOBAL const uchar* m = mask + ((i64)bh * Lq + i) * NBM;
    int nb = (r.lk + bs - 1) / bs;
    for (int b = 0; b < nb; b++) {
        if (!m[b]) continue;
        int j0 = b * bs, j1 = MIN(sp.vis, j0 + bs);
        attend_any(&st, k, v, &sk, kc, vc, prepped, j0, MIN(j1, sp.w0), scale);
        attend_any(&st, k, v, &sk, kc, vc, prepped, MAX(j0, sp.w1), j1, scale);
    }
#endif
    attn_store(&st, out, lse, write_lse, h0, Lq, i);
}

/* ---- the backward (DESIGN 3.1b): gradients over the forward's allowed keys only ----
 *
 * attn_bwd_delta: delta = rowsum(dout * out) - grad_lse (FlashAttention-2's D; the lse term
 * folds in because d lse / d s_j = p_j). attn_bwd_dq: one work-item per (query, kv head, tile
 * of HPW query heads) walks the query's allowed keys as attn_fwd does, recomputing
 * p = exp(scale q.k - lse) and ds = p (dout.v - delta). attn_bwd_dkv: one work-item per
 * (key, kv head) visits every query (and each of the g heads) whose allowed set holds the key
 * and sums dv += p dout, dk += ds q. Keys outside a query's allowed set are never read for it,
 * rows with nothing allowed (lse = -inf) add nothing; float32 throughout, gradients stored in
 * X_T. The selection is the mask of attn_idx_mask. */

/* delta [rows] of rows = B*Hq*Lq (out, dout [rows, DV]; glse [rows] when has_glse) */
KERNEL void attn_bwd_delta(GLOBAL const X_T* RESTRICT out, GLOBAL const X_T* RESTRICT dout,
                           GLOBAL const float* RESTRICT glse, int has_glse,
                           GLOBAL float* RESTRICT delta, int rows) {
    int r = GLOBAL_ID(0);
    if (r >= rows) return;
    float s = 0.0f;
    for (int e = 0; e < DV; e++)
        s += X_LOAD(dout[(i64)r * DV + e]) * X_LOAD(out[(i64)r * DV + e]);
    delta[r] = has_glse ? s - glse[r] : s;
}

typedef struct {
    float q[HPW][D], go[HPW][DV], dq[HPW][D], lse[HPW], delta[HPW];
} bwd_state;

/* add the keys [j0, j1) of one (batch, kv head) into dq of the state's HPW heads */
DEVICE void bwd_dq_keys(bwd_state* st, GLOBAL const X_T* RESTRICT kb,
                        GLOBAL const X_T* RESTRICT vb, int j0, int j1, float scale) {
    for (int j = j0; j < j1; j++) {
        GLOBAL const X_T* kr = kb + (i64)j * D;
        GLOBAL const X_T* vr = vb + (i64)j * DV;
        float s[HPW], dp[HPW];
        for (int h = 0; h < HPW; h++) {
            s[h] = 0.0f;
            dp[h] = 0.0f;
        }
        for (int d = 0; d < D; d++) {
            float kd = X_LOAD(kr[d]);
            for (int h = 0; h < HPW; h++) s[h] += st->q[h][d] * kd;
        }
        for (int e = 0; e < DV; e++) {
            float ve = X_LOAD(vr[e]);
            for (int h = 0; h < HPW; h++) dp[h] += st->go[h][e] * ve;
        }
        for (int h = 0; h < HPW; h++) {
            float p = st->lse[h] == -DSHAL_INF ? 0.0f : EXPF(s[h] * scale - st->lse[h]);
            s[h] = p * (dp[h] - st->delta[h]); /* ds */
        }
        for (int d = 0; d < D; d++) {
            float kd = X_LOAD(kr[d]);
            for (int h = 0; h < HPW; h++) st->dq[h][d] += s[h] * kd;
        }
    }
}

/* dq [B, Hq, Lq, D] for query GLOBAL_ID(0) and head tile GLOBAL_ID(1), tiles as attn_fwd */
KERNEL void attn_bwd_dq(GLOBAL const X_T* RESTRICT q, GLOBAL const X_T* RESTRICT k,
                        GLOBAL const X_T* RESTRICT v, GLOBAL const X_T* RESTRICT dout,
                        GLOBAL const float* RESTRICT lse, GLOBAL const float* RESTRICT delta,
                        GLOBAL const uchar* RESTRICT mask, GLOBAL X_T* RESTRICT dq, int BH,
                        int g, int Lq, int Lk, int nb, int bs, int window, int causal,
                        float scale) {
    int i = GLOBAL_ID(0), tile = GLOBAL_ID(1);
    int tiles = g / HPW, bh = tile / tiles;
    if (i >= Lq || bh >= BH) return;
    int h0 = bh * g + (tile % tiles) * HPW;
    GLOBAL const X_T* kb = k + (i64)bh * Lk * D;
    GLOBAL const X_T* vb = v + (i64)bh * Lk * DV;
    bwd_state st;
    int any = 0;
    for (int h = 0; h < HPW; h++) {
        i64 row = (i64)(h0 + h) * Lq + i;
        for (int d = 0; d < D; d++) {
            st.q[h][d] = X_LOAD(q[row * D + d]);
            st.dq[h][d] = 0.0f;
        }
        for (int e = 0; e < DV; e++) st.go[h][e] = X_LOAD(dout[row * DV + e]);
        st.lse[h] = lse[row];
        st.delta[h] = delta[row];
        any |= st.lse[h] != -DSHAL_INF;
    }
    if (any) {
        attn_span sp = attn_span_of(i, Lq, Lk, window, causal);
        bwd_dq_keys(&st, kb, vb, sp.w0, sp.w1, scale);
#if HAS_SEL
        GLOBAL const uchar* m = mask + ((i64)bh * Lq + i) * nb;
        for (int b = 0; b < nb; b++) {
            if (!m[b]) continue;
            int j0 = b * bs, j1 = MIN(sp.vis, j0 + bs);
            bwd_dq_keys(&st, kb, vb, j0, MIN(j1, sp.w0), scale);
            bwd_dq_keys(&st, kb, vb, MAX(j0, sp.w1), j1, scale);
        }
#endif
    }
    for (int h = 0; h < HPW; h++) {
        i64 row = (i64)(h0 + h) * Lq + i;
        for (int d = 0; d < D; d++) dq[row * D + d] = X_STORE(st.dq[h][d] * scale);
    }
}

/* dk [B, Hkv, Lk, D], dv [B, Hkv, Lk, DV] of key GLOBAL_ID(0) of (batch, kv head) GLOBAL_ID(1) */
KERNEL void attn_bwd_dkv(GLOBAL const X_T* RESTRICT q, GLOBAL const X_T* RESTRICT k,
                         GLOBAL const X_T* RESTRICT v, GLOBAL const X_T* RESTRICT dout,
                         GLOBAL const float* RESTRICT lse, GLOBAL const float* RESTRICT delta,
                         GLOBAL const uchar* RESTRICT mask, GLOBAL X_T* RESTRICT dk,
                         GLOBAL X_T* RESTRICT dv, int BH, int g, int Lq, int Lk, int nb, int bs,
                         int window, int causal, float scale) {
    int j = GLOBAL_ID(0), bh = GLOBAL_ID(1);
    if (j >= Lk || bh >= BH) return;
    i64 key = (i64)bh * Lk + j;
    float kj[D], vj[DV], gk[D], gv[DV];
    for (int d = 0; d < D; d++) {
        kj[d] = X_LOAD(k[key * D + d]);
        gk[d] = 0.0f;
    }
    for (int e = 0; e < DV; e++) {
        vj[e] = X_LOAD(v[key * DV + e]);
        gv[e] = 0.0f;
    }
    /* the queries that can see key j (query i sits at key position i + Lk - Lq) */
    int shift = Lk - Lq, i0 = causal ? MAX(0, j - shift) : 0, i1 = Lq;
    if (!HAS_SEL && window > 0) { /* the window alone: |position - j| < window */
        i0 = MAX(i0, j - window + 1 - shift);
        i1 = MIN(i1, j + window - shift);
    }
    for (int i = i0; i < i1; i++) {
        attn_span sp = attn_span_of(i, Lq, Lk, window, causal);
        int ok = j >= sp.w0 && j < sp.w1;
#if HAS_SEL
        ok = ok || (j < sp.vis && mask[((i64)bh * Lq + i) * nb + j / bs]);
#endif
        if (!ok) continue;
        for (int h = 0; h < g; h++) {
            i64 row = ((i64)bh * g + h) * Lq + i;
            float l = lse[row];
            if (l == -DSHAL_INF) continue;
            GLOBAL const X_T* qr = q + row * D;
            GLOBAL const X_T* gr = dout + row * DV;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < D; d++) s += X_LOAD(qr[d]) * kj[d];
            for (int e = 0; e < DV; e++) dp += X_LOAD(gr[e]) * vj[e];
            float p = EXPF(s * scale - l), ds = p * (dp - delta[row]);
            for (int e = 0; e < DV; e++) gv[e] += p * X_LOAD(gr[e]);
            for (int d = 0; d < D; d++) gk[d] += ds * X_LOAD(qr[d]);
        }
    }
    for (int d = 0; d < D; d++) dk[key * D + d] = X_STORE(gk[d] * scale);
    for (int e = 0; e < DV; e++) dv[key * DV + e] = X_STORE(gv[e]);
}
