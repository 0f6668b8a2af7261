/* gated_channels: open masks, gates, and the gated output (closed channels exactly 0).
 *
 * With a weight matrix the host packs only the open channels' weight rows (gemm_pack_bt), runs
 * gemm_tile on them and finishes here (gated_finish): closed rows are never read. Without a
 * weight, gated_apply gates x directly. Closed channels are written as 0 by selection, never by
 * multiplying, so NaN/Inf there cannot leak.
 *
 * Defines (dshal_kernels.GatedDefines): X_T, X_LOAD, X_STORE the dtype of x, bias and y;
 * L_T, L_LOAD the dtype of the logits; GATE 0 hard / 1 soft / 2 soft_hard; KEEP 1 when the
 * top-`take` logits per row are open (ties to the lower index, NaN last) instead of
 * logit >= thr (thr is the smallest float32 above the caller's threshold, so the test equals
 * logit > threshold in any precision).
 */
#include "inc_vendor.h"

DEVICE float sigmoid(float z) {
    float e = EXPF(-FABSF(z));
    return z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

DEVICE float gate_of(float z) {
#if GATE == 0
    return 1.0f;
#else
    return sigmoid(z);
#endif
}

/* logit a (index ia) ranks before logit b (index ib): descending, NaN last, ties lower index */
DEVICE int ranks_before(float a, int ia, float b, int ib) {
    if (ISNAN(a)) return ISNAN(b) && ia < ib;
    if (ISNAN(b)) return 1;
    return a > b || (a == b && ia < ib);
}

/* mask[r, c] of logits [rows, C] (static gates: rows = 1) */
KERNEL void gated_mask(GLOBAL const L_T* RESTRICT logits, GLOBAL uchar* RESTRICT mask,
                       int rows, int C, float thr, int take) {
    int c = GLOBAL_ID(0), r = GLOBAL_ID(1);
    if (c >= C || r >= rows) return;
    GLOBAL const L_T* row = logits + (i64)r * C;
    float z = L_LOAD(row[c]);
#if GATE == 1
    int open = 1;
#elif KEEP
    int rank = 0;
    for (int o = 0; o < C && rank < take; o++) rank += ranks_before(L_LOAD(row[o]), o, z, c);
    int open = rank < take;
#else
    int open = z >= thr;
#endif
    mask[(i64)r * C + c] = (uchar)open;
}

/* y = gate * x on open channels, 0 on closed ones; x, y [rows, C] */
KERNEL void gated_apply(GLOBAL const X_T* RESTRICT x, GLOBAL const L_T* RESTRICT logits,
                        GLOBAL const uchar* RESTRICT mask, GLOBAL X_T* RESTRICT y, int rows,
                        int C, int static_gates) {
    int c = GLOBAL_ID(0), r = GLOBAL_ID(1);
    if (c >= C || r >= rows) return;
    i64 at = (i64)r * C + c, gi = static_gates ? (i64)c : at;
    float v = 0.0f;
    if (mask[gi]) v = gate_of(L_LOAD(logits[gi])) * X_LOAD(x[at]);
    y[at] = X_STORE(v);
}

/* y[r, cols[j]] = gate * (t[r, j] + bias[cols[j]]) where open, else 0; t [rows, ldt] holds the
 * products x . weight[cols[j]] of the open channels; y [rows, Cout] was zero filled */
KERNEL void gated_finish(GLOBAL const float* RESTRICT t, int ldt,
                         GLOBAL const int* RESTRICT cols, GLOBAL const L_T* RESTRICT logits,
                         GLOBAL const uchar* RESTRICT mask, GLOBAL const X_T* RESTRICT bias,
                         int has_bias, GLOBAL X_T* RESTRICT y,
                         int rows, int ncols, int Cout, int static_gates) {
    int j = GLOBAL_ID(0), r = GLOBAL_ID(1);
    if (j >= ncols || r >= rows) return;
    int c = cols[j];
    i64 at = (i64)r * Cout + c, gi = static_gates ? (i64)c : at;
    float v = 0.0f;
    if (mask[gi]) {
        float pre = t[(i64)r * ldt + j];
        if (has_bias) pre += X_LOAD(bias[c]);
        v = gate_of(L_LOAD(logits[gi])) * pre;
    }
    y[at] = X_STORE(v);
}
