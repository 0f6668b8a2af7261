/* dshal vendor header: the one place that knows which compiler reads a kernel.
 *
 * Every kernel in kernels/ is a single portable source that includes this header and compiles
 * as OpenCL C (1.2+), CUDA (NVRTC) and HIP (hipcc/hiprtc). The compiler is detected once
 * (IS_OPENCL / IS_CUDA / IS_HIP); kernels never test vendor identity, only features that the
 * host passes as -D defines (HAS_CR_DIV, tile sizes, dtypes...). Unknown compilers hit #error.
 *
 * Contents: compiler detection, one qualifier table, thread-index shims (defined once for CUDA
 * and HIP together), math and bit-cast macros, and exact conversions between float32 and the
 * storage formats (float16, bfloat16, float8 e4m3fn/e5m2) written as bit operations, so every
 * target rounds identically (nearest even) and the PoCL tests exercise the code a GPU runs.
 */
#ifndef DSHAL_VENDOR_H
#define DSHAL_VENDOR_H

/* ---- 1. which compiler --------------------------------------------------------------------- */
#if defined(__HIP__) || defined(__HIPCC__) || defined(__HIPCC_RTC__)
#define IS_HIP 1
#elif defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define IS_CUDA 1
#elif defined(__OPENCL_VERSION__) || defined(__OPENCL_C_VERSION__)
#define IS_OPENCL 1
#else
#error "dshal kernels: unknown compiler (expected OpenCL C, CUDA/NVRTC or HIP)"
#endif

#if defined(IS_CUDA) || defined(IS_HIP)
#define IS_CUDA_OR_HIP 1
#endif

#if defined(IS_HIP) && !defined(__HIPCC_RTC__)
#include <hip/hip_runtime.h>
#endif

/* ---- 2. qualifiers and scalar types -------------------------------------------------------- */
#if defined(IS_OPENCL)
#pragma OPENCL FP_CONTRACT ON /* a * b + c may become one correctly rounded fma, as in C/CUDA */
#define KERNEL __kernel
#define GLOBAL __global
#define LOCAL __local
#define DEVICE static inline
#define RESTRICT restrict
typedef long i64;
typedef char schar;
#else
#define KERNEL extern "C" __global__
#define GLOBAL
#define LOCAL __shared__
#define DEVICE static __device__ __forceinline__
#define RESTRICT __restrict__
typedef long long i64;
typedef signed char schar;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
#endif

/* ---- 3. thread indices and barriers --------------------------------------------------------- */
#if defined(IS_OPENCL)
#define GLOBAL_ID(d) ((int)get_global_id(d))
#define LOCAL_ID(d) ((int)get_local_id(d))
#define GROUP_ID(d) ((int)get_group_id(d))
#define LOCAL_SIZE(d) ((int)get_local_size(d))
#define BARRIER() barrier(CLK_LOCAL_MEM_FENCE)
#else /* CUDA and HIP share the spelling */
#define DSHAL_DIM3(v, d) ((d) == 0 ? (int)(v).x : (d) == 1 ? (int)(v).y : (int)(v).z)
#define LOCAL_ID(d) DSHAL_DIM3(threadIdx, d)
#define GROUP_ID(d) DSHAL_DIM3(blockIdx, d)
#define LOCAL_SIZE(d) DSHAL_DIM3(blockDim, d)
#define GLOBAL_ID(d) (GROUP_ID(d) * LOCAL_SIZE(d) + LOCAL_ID(d))
#define BARRIER() __syncthreads()
#endif

/* ---- 4. math and bit casts ------------------------------------------------------------------ */
#if defined(IS_OPENCL)
#define EXPF(x) exp(x)
#define LOGF(x) log(x)
#define RINTF(x) rint(x)
#define FABSF(x) fabs(x)
#define AS_UINT(x) as_uint(x)
#define AS_FLOAT(x) as_float(x)
#else
#define EXPF(x) expf(x)
#define LOGF(x) logf(x)
#define RINTF(x) rintf(x)
#define FABSF(x) fabsf(x)
#define AS_UINT(x) __float_as_uint(x)
#define AS_FLOAT(x) __uint_as_float(x)
#endif

#define DSHAL_INF AS_FLOAT(0x7f800000u)
#define ISNAN(x) ((x) != (x))
#define ISFINITE(x) ((AS_UINT(x) & 0x7f800000u) != 0x7f800000u)
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Correctly rounded float32 division. CUDA (NVRTC's default -prec-div=true) and HIP divide
 * correctly rounded; OpenCL only with -cl-fp32-correctly-rounded-divide-sqrt, which the host
 * passes together with -DHAS_CR_DIV=1 when the device supports it. Otherwise one Markstein
 * step corrects the quotient (exact for the normal-range quotients quantisation needs). */
#if defined(IS_OPENCL) && !(defined(HAS_CR_DIV) && HAS_CR_DIV)
DEVICE float dshal_div_rn(float a, float b) {
    float q = a / b;
    float r = fma(-q, b, a);
    return fma(r, 1.0f / b, q);
}
#define DIV_RN(a, b) dshal_div_rn((a), (b))
#else
#define DIV_RN(a, b) ((a) / (b))
#endif

/* exp(x) for the softmax's x <= 0 (and NaN): Cody-Waite reduction and Cephes' degree-6
 * polynomial, within 2 ulp of expf; 0 below -87.3 (where expf is subnormal or 0). Plain
 * arithmetic with selects, so compilers vectorize loops of it (a libm call does not). */
DEVICE float dshal_exp_le0(float x) {
    float n = RINTF(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    float e = AS_FLOAT((uint)((int)MAX(n, -126.0f) + 127) << 23);
    float y = p * e;
    y = x < -87.3f ? 0.0f : y;
    return ISNAN(x) ? x : y;
}

/* ---- 5. storage formats <-> float32 (bit exact, round to nearest even) ----------------------- */

DEVICE float dshal_f16_to_f32(ushort h) {
    uint sign = ((uint)h & 0x8000u) << 16, e = ((uint)h >> 10) & 0x1fu, m = (uint)h & 0x3ffu;
    if (e == 0u) /* zero and subnormals: m * 2^-24 */
        return AS_FLOAT(AS_UINT((float)m * 5.9604644775390625e-8f) | sign);
    if (e == 31u) return AS_FLOAT(sign | 0x7f800000u | (m << 13));
    return AS_FLOAT(sign | ((e + 112u) << 23) | (m << 13));
}

DEVICE ushort dshal_f32_to_f16(float f) {
    uint u = AS_UINT(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (ushort)(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (a >= 0x477ff000u) return (ushort)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (a < 0x38800000u) /* below 2^-14: a subnormal multiple of 2^-24, rounded to even */
        return (ushort)(sign | (uint)RINTF(AS_FLOAT(a) * 16777216.0f));
    a += 0xfffu + ((a >> 13) & 1u);
    return (ushort)(sign | ((a >> 13) - (112u << 10)));
}

DEVICE float dshal_bf16_to_f32(ushort b) { return AS_FLOAT((uint)b << 16); }

DEVICE ushort dshal_f32_to_bf16(float f) {
    uint u = AS_UINT(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (ushort)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (ushort)(u >> 16);
}

/* tf32: float32 with the low 13 mantissa bits rounded away (NaN/Inf unchanged) */
DEVICE float dshal_round_tf32(float f) {
    uint u = AS_UINT(f);
    if ((u & 0x7f800000u) == 0x7f800000u) return f;
    return AS_FLOAT((u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u);
}
DEVICE float dshal_round_bf16(float f) { return dshal_bf16_to_f32(dshal_f32_to_bf16(f)); }
DEVICE float dshal_round_f16(float f) { return dshal_f16_to_f32(dshal_f32_to_f16(f)); }
DEVICE float dshal_round_f32(float f) { return f; }

/* float8 e4m3fn (bias 7, no inf, 0x7f/0xff NaN) and e5m2 (the high byte of a float16) */
DEVICE float dshal_e4m3_to_f32(uchar v) {
    uint sign = ((uint)v & 0x80u) << 24, e = ((uint)v >> 3) & 0xfu, m = (uint)v & 7u;
    if (e == 15u && m == 7u) return AS_FLOAT(sign | 0x7fc00000u);
    if (e == 0u) return AS_FLOAT(AS_UINT((float)m * 0.001953125f) | sign); /* m * 2^-9 */
    return AS_FLOAT(sign | ((e + 120u) << 23) | (m << 20));
}
DEVICE float dshal_e5m2_to_f32(uchar v) { return dshal_f16_to_f32((ushort)((uint)v << 8)); }

/* float32 already saturated to the format's range -> fp8 code, nearest even. mbits mantissa
 * bits, exponent bias; `sub_scale` = 2^(bias - 1 + mbits) turns a subnormal into its code. */
DEVICE uchar dshal_f32_to_fp8(float x, uint mbits, uint bias, float sub_scale) {
    uint u = AS_UINT(x), a = u & 0x7fffffffu, shift = 23u - mbits, r;
    if (a < ((128u - bias) << 23)) {
        r = (uint)RINTF(AS_FLOAT(a) * sub_scale);
    } else {
        r = a + ((a >> shift) & 1u) + ((1u << (shift - 1u)) - 1u) - ((127u - bias) << 23);
        r >>= shift;
    }
    return (uchar)(r | ((u >> 24) & 0x80u));
}
DEVICE uchar dshal_f32_to_e4m3(float x) { return dshal_f32_to_fp8(x, 3u, 7u, 512.0f); }
DEVICE uchar dshal_f32_to_e5m2(float x) { return dshal_f32_to_fp8(x, 2u, 15u, 65536.0f); }

/* load/store adapters named by dtype: the host's define table picks them per argument,
 * e.g. -DX_T=ushort -DX_LOAD=dshal_ld_f16 */
DEVICE float dshal_ld_f32(float v) { return v; }
DEVICE float dshal_ld_f16(ushort v) { return dshal_f16_to_f32(v); }
DEVICE float dshal_ld_bf16(ushort v) { return dshal_bf16_to_f32(v); }
DEVICE float dshal_ld_e4m3(uchar v) { return dshal_e4m3_to_f32(v); }
DEVICE float dshal_ld_e5m2(uchar v) { return dshal_e5m2_to_f32(v); }
DEVICE float dshal_ld_i8(schar v) { return (float)v; }
DEVICE float dshal_st_f32(float v) { return v; }
DEVICE ushort dshal_st_f16(float v) { return dshal_f32_to_f16(v); }
DEVICE ushort dshal_st_bf16(float v) { return dshal_f32_to_bf16(v); }

#endif /* DSHAL_VENDOR_H */
