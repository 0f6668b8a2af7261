/* 2**x for float32 within 2 ulp, shared by the numpy backend's compiled modules (_native.c's
 * attention forward tiles, _backward.c's recomputed probabilities).
 *
 * numpy's float32 exp2 is scalar libm on CPUs without AVX-512 (~5 ns per element). Here:
 * x = n + f with n = rint(x) and |f| <= 1/2, 2**f by its degree-7 Taylor polynomial in f ln 2
 * (truncation below 1e-8 relative), 2**n added to the exponent. Results below 2**-125 flush
 * to +0 (the attention sums they enter hold a term >= 1, or are probabilities that small),
 * x >= 128 gives +inf, -inf gives 0, NaN stays NaN. Branch-free, so loops over it vectorise.
 */
#ifndef DSHAL_EXP2_H
#define DSHAL_EXP2_H

#include <stdint.h>
#include <string.h>

static const float EXP2_C[] = {1.0f, 0.693147180559945f, 0.240226506959101f,
                               0.0555041086648216f, 0.00961812910762848f,
                               0.00133335581464284f, 0.000154035303933816f,
                               1.52527338040598e-05f};

#ifndef EXP2_INLINE
#define EXP2_INLINE static inline
#endif
EXP2_INLINE float exp2_poly(float v) {
    float c = v < -125.0f ? -125.0f : v;
    c = c > 127.99999f ? 127.99999f : c; /* rint 128 only with f < 0: still finite */
    const float r = (c + 12582912.0f) - 12582912.0f; /* rint: |c| < 2**22 */
    const float f = c - r;
    float p = EXP2_C[7];
    for (int k = 6; k >= 0; k--) p = p * f + EXP2_C[k];
    uint32_t u;
    memcpy(&u, &p, 4);
    u += (uint32_t)(int32_t)r << 23;
    float y;
    memcpy(&y, &u, 4);
    y = v < -125.0f ? 0.0f : y;
    y = v >= 128.0f ? INFINITY : y;
    return v != v ? v : y;
}

#endif
