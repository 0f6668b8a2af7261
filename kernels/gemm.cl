/* gemm: C[M,N] = A[M,K] . B[K,N] (+ bias), fp32 accumulation (int8: exact int32 per group).
 *
 * Two passes. The pack kernels read the caller's storage format, decode it (float16, bfloat16,
 * fp8, int8), round it to the precision (tf32/bf16/fp16), apply fp8 scales, and lay A out as
 * panels Ap[M/TM][K][TM] and B as Bp[N/TN][K][TN] (zero padded). The tile kernel then computes
 * one TM x TN register tile per work-item from two contiguous panels: no bounds checks and no
 * cache-set aliasing in the inner loop, which a CPU runtime (PoCL) turns into vector FMAs.
 *
 * Defines (dshal_kernels.GemmDefines): TM, TN tile; MODE 0 float / 1 fp8 / 2 int8; A_T, A_LOAD,
 * B_T, B_LOAD storage type and decoder; ROUND rounding to the precision; PK_T packed element
 * type (float, or int for int8); OUT_T, OUT_STORE result type; BIAS_T, BIAS_LOAD.
 */
#include "inc_vendor.h"

#define MODE_FLOAT 0
#define MODE_FP8 1
#define MODE_INT8 2

/* scale of element (r, c): s[(r / rdiv) * rs + (c / cdiv) * cs]; strides 0 broadcast */
DEVICE float pick_scale(GLOBAL const float* s, int rs, int cs, int rdiv, int cdiv, int r, int c) {
    return s[(i64)(r / rdiv) * rs + (i64)(c / cdiv) * cs];
}

DEVICE PK_T convert_elem(float v, GLOBAL const float* s, int rs, int cs, int rdiv, int cdiv,
                         int r, int c) {
#if MODE == MODE_FLOAT
    return ROUND(v);
#elif MODE == MODE_FP8
    return v * pick_scale(s, rs, cs, rdiv, cdiv, r, c);
#else
    return (PK_T)v; /* int8 values are exact integers */
#endif
}

/* A [M, K] row-major -> Ap[ceil(M/TM)][K][TM]; work-item (k, m), m up to the padded M */
KERNEL void gemm_pack_a(GLOBAL const A_T* RESTRICT a, GLOBAL PK_T* RESTRICT ap,
                        GLOBAL const float* RESTRICT sa, int rs, int cs, int rdiv, int cdiv,
                        int M, int K, int Mp) {
    int k = GLOBAL_ID(0), m = GLOBAL_ID(1);
    if (k >= K || m >= Mp) return;
    PK_T v = (PK_T)0;
    if (m < M) v = convert_elem(A_LOAD(a[(i64)m * K + k]), sa, rs, cs, rdiv, cdiv, m, k);
    ap[((i64)(m / TM) * K + k) * TM + m % TM] = v;
}

/* B [K, N] row-major -> Bp[ceil(N/TN)][K][TN]; work-item (n, k), n up to the padded N */
KERNEL void gemm_pack_b(GLOBAL const B_T* RESTRICT b, GLOBAL PK_T* RESTRICT bp,
                        GLOBAL const float* RESTRICT sb, int rs, int cs, int rdiv, int cdiv,
                        int K, int N, int Np) {
    int n = GLOBAL_ID(0), k = GLOBAL_ID(1);
    if (n >= Np || k >= K) return;
    PK_T v = (PK_T)0;
    if (n < N) v = convert_elem(B_LOAD(b[(i64)k * N + n]), sb, rs, cs, rdiv, cdiv, k, n);
    bp[((i64)(n / TN) * K + k) * TN + n % TN] = v;
}

/* B given transposed as rows W[cols[n], :] of a [*, K] matrix (gated_channels' open weight
 * rows: only the listed rows are ever read) -> Bp[ceil(N/TN)][K][TN] */
KERNEL void gemm_pack_bt(GLOBAL const B_T* RESTRICT w, GLOBAL const int* RESTRICT cols,
                         GLOBAL PK_T* RESTRICT bp, int K, int N, int Np) {
    int n = GLOBAL_ID(0), k = GLOBAL_ID(1);
    if (n >= Np || k >= K) return;
    PK_T v = (PK_T)0;
    if (n < N) v = convert_elem(B_LOAD(w[(i64)cols[n] * K + k]), 0, 0, 0, 1, 1, k, n);
    bp[((i64)(n / TN) * K + k) * TN + n % TN] = v;
}

/* one TM x TN tile of C per work-item (tile column GLOBAL_ID(0), tile row GLOBAL_ID(1)); C is
 * [ceil(M/TM)*TM, ldc] with ldc a multiple of TN >= N: the caller reads its [M, N] corner.
 * int8: exact int32 sums over K groups of kg, each scaled by sa(m, group) * sb(group, n). */
KERNEL void gemm_tile(GLOBAL const PK_T* RESTRICT ap, GLOBAL const PK_T* RESTRICT bp,
                      GLOBAL OUT_T* RESTRICT c, GLOBAL const BIAS_T* RESTRICT bias, int has_bias,
                      GLOBAL const float* RESTRICT sa, int a_rs, int a_cs, int a_rdiv,
                      int a_cdiv, GLOBAL const float* RESTRICT sb, int b_rs, int b_cs,
                      int b_rdiv, int b_cdiv, int M, int N, int K, int kg, int ldc) {
    int tn = GLOBAL_ID(0), tm = GLOBAL_ID(1);
    int m0 = tm * TM, n0 = tn * TN;
    if (m0 >= M || n0 >= ldc) return;
    GLOBAL const PK_T* pa = ap + (i64)tm * K * TM;
    GLOBAL const PK_T* pb = bp + (i64)tn * K * TN;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = 0.0f;
#if MODE == MODE_INT8
    for (int k0 = 0; k0 < K; k0 += kg) {
        int k1 = MIN(K, k0 + kg);
        int iacc[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; i++)
#pragma unroll
            for (int j = 0; j < TN; j++) iacc[i][j] = 0;
        for (int k = k0; k < k1; k++) {
            int av[TM], bv[TN];
#pragma unroll
            for (int i = 0; i < TM; i++) av[i] = pa[(i64)k * TM + i];
#pragma unroll
            for (int j = 0; j < TN; j++) bv[j] = pb[(i64)k * TN + j];
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) iacc[i][j] += av[i] * bv[j];
        }
#pragma unroll
        for (int i = 0; i < TM; i++) {
            float s_a = pick_scale(sa, a_rs, a_cs, a_rdiv, a_cdiv, MIN(m0 + i, M - 1), k0);
#pragma unroll
            for (int j = 0; j < TN; j++) {
                float s_b = pick_scale(sb, b_rs, b_cs, b_rdiv, b_cdiv, k0, MIN(n0 + j, N - 1));
                acc[i][j] += ((float)iacc[i][j] * s_a) * s_b;
            }
        }
    }
#else
    for (int k = 0; k < K; k++) {
        float av[TM], bv[TN];
#pragma unroll
        for (int i = 0; i < TM; i++) av[i] = pa[(i64)k * TM + i];
#pragma unroll
        for (int j = 0; j < TN; j++) bv[j] = pb[(i64)k * TN + j];
#pragma unroll
        for (int i = 0; i < TM; i++)
#pragma unroll
            for (int j = 0; j < TN; j++) acc[i][j] += av[i] * bv[j];
    }
#endif
    /* epilogue: c is padded to whole tiles (row pitch ldc), so every store is unconditional:
     * a store under a per-element bounds check makes the compiler keep acc in memory */
    float bj[TN];
#pragma unroll
    for (int j = 0; j < TN; j++)
        bj[j] = has_bias ? BIAS_LOAD(bias[MIN(n0 + j, N - 1)]) : 0.0f;
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++)
            c[(i64)(m0 + i) * ldc + n0 + j] =
                OUT_STORE(has_bias ? acc[i][j] + bj[j] : acc[i][j]);
}
