/* quantize: per-group scales (amax / qmax) and fp8/int8 codes, or rounding to a float format.
 *
 * x is viewed as a 2-D [R, C] matrix cut into groups of gr x gc elements: row granularity is
 * gr = 1, gc = group_size; block is gr = gc = group_size; tensor is one group (its amax comes
 * from partial maxima of [1, 4096] slices, reduced by quant_scale). Scales are float32
 * amax / qmax, correctly rounded (DIV_RN), 1 where that is 0; codes are x / scale, saturated
 * and rounded to nearest even.
 *
 * Defines (dshal_kernels.QuantizeDefines): X_T, X_LOAD input type and decoder; QMAX; Q_KIND
 * 0 e4m3 / 1 e5m2 / 2 int8; Q_T code type; R_T, R_STORE rounded output (quant_round).
 */
#include "inc_vendor.h"

/* |x| maximum of group (GLOBAL_ID(1), GLOBAL_ID(0)) -> amax[row group * ngc + col group] */
KERNEL void quant_amax(GLOBAL const X_T* RESTRICT x, GLOBAL float* RESTRICT amax, int R, int C,
                       int gr, int gc, int ngr, int ngc) {
    int cg = GLOBAL_ID(0), rg = GLOBAL_ID(1);
    if (cg >= ngc || rg >= ngr) return;
    int r1 = MIN(R, (rg + 1) * gr), c1 = MIN(C, (cg + 1) * gc);
    float m = 0.0f;
    for (int r = rg * gr; r < r1; r++)
        for (int c = cg * gc; c < c1; c++) {
            float a = FABSF(X_LOAD(x[(i64)r * C + c]));
            m = a > m ? a : m;
        }
    amax[(i64)rg * ngc + cg] = m;
}

/* scale[g] = max(amax[g * parts .. g * parts + parts)) / QMAX, 1 where 0 */
KERNEL void quant_scale(GLOBAL const float* RESTRICT amax, GLOBAL float* RESTRICT scales,
                        int groups, int parts) {
    int g = GLOBAL_ID(0);
    if (g >= groups) return;
    float m = 0.0f;
    for (int p = 0; p < parts; p++) {
        float a = amax[(i64)g * parts + p];
        m = a > m ? a : m;
    }
    float s = DIV_RN(m, (float)QMAX);
    scales[g] = s == 0.0f ? 1.0f : s;
}

/* codes of element (GLOBAL_ID(1), GLOBAL_ID(0)) */
KERNEL void quant_encode(GLOBAL const X_T* RESTRICT x, GLOBAL const float* RESTRICT scales,
                         GLOBAL Q_T* RESTRICT out, int R, int C, int gr, int gc, int ngc) {
    int c = GLOBAL_ID(0), r = GLOBAL_ID(1);
    if (c >= C || r >= R) return;
    i64 at = (i64)r * C + c;
    float v = DIV_RN(X_LOAD(x[at]), scales[(i64)(r / gr) * ngc + c / gc]);
    v = MIN(MAX(v, -(float)QMAX), (float)QMAX);
#if Q_KIND == 0
    out[at] = dshal_f32_to_e4m3(v);
#elif Q_KIND == 1
    out[at] = dshal_f32_to_e5m2(v);
#else
    out[at] = (Q_T)RINTF(v);
#endif
}

/* x rounded to a float precision: float32 / tf32 (R_T float) or bfloat16 / float16 bits */
KERNEL void quant_round(GLOBAL const X_T* RESTRICT x, GLOBAL R_T* RESTRICT out, int n) {
    int i = GLOBAL_ID(0);
    if (i >= n) return;
    out[i] = R_STORE(X_LOAD(x[i]));
}
