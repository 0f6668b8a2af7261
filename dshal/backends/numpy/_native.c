/* dshal.backends.numpy._native: fused elementwise loops of the numpy backend.
 *
 * numpy runs one pass over memory per operation, so quantising to fp8 (group max, divide,
 * clip, round onto the grid, shift out the code: about 11 passes) costs several times a
 * copy. These loops do the same arithmetic, operation for operation, in one pass per group
 * while the group is in cache: results are bitwise those of the numpy code in gemm.py (the
 * tests compare the two on every path), only faster.
 *
 * Arrays come through the buffer protocol (no numpy headers at build time): 2-D, the last
 * axis contiguous, rows at any stride. The GIL is released while a loop runs, so the
 * backend's thread pool runs spans of rows in parallel. Compiled with -ffp-contract=off (a
 * multiply-add must round twice, as numpy's two passes do) and -fno-trapping-math (so that
 * the clipping compares become vector min/max; no result changes, only exception flags). On
 * x86-64 Linux each loop is compiled twice (AVX2 and baseline) and the loader picks one for
 * the CPU. The module also holds the int8 gemm's integer kernel (int8_panel, AVX2 only: see
 * its section), whose results are bitwise those of the float32 BLAS products it replaces.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_exp2.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---- formats ------------------------------------------------------------------------- */

enum { INT8 = 0, E4M3 = 1, E5M2 = 2 };          /* quantised formats */
enum { TF32 = 0, BF16 = 1, FP16 = 2 };          /* float formats rounded in float32 */
enum { CODES = 0, VALUES = 1, DEQUANT = 2 };    /* what quantize writes */

static const float QMAX[] = {127.0f, 448.0f, 57344.0f};
static const int MBITS[] = {0, 3, 2};
static const int BIAS[] = {0, 7, 15};

/* x (finite, |x| <= qmax) rounded to nearest even onto the fp8 grid, +0.0 where it rounds to
 * zero: adding 1.5 * 2**23 * q (q the grid spacing at x, at least the subnormal spacing)
 * makes float32 round to a multiple of q; subtracting it again is exact. */
static inline float fp8_grid(float x, uint32_t min_exp, uint32_t add) {
    uint32_t e = f2u(x) & 0x7F800000u;
    e = e > min_exp ? e : min_exp;
    float m = u2f(e + add);
    return (x + m) - m;
}

/* x (finite, |x| <= 127) rounded to nearest even, sign kept (np.rint). */
static inline float rint_small(float x) {
    const float m = 12582912.0f; /* 1.5 * 2**23 */
    return copysignf((x + m) - m, x);
}

/* ---- group max ----------------------------------------------------------------------- */

/* max |x| over rows r0..r1, columns c0..c1, as float32 bits (non-negative floats order like
 * their bits; NaN and Inf compare above every finite value). */
CLONES static uint32_t amax_bits(const char *x, Py_ssize_t stride, Py_ssize_t r0,
                                 Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1) {
    uint32_t m = 0;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint32_t *row = (const uint32_t *)(x + r * stride);
        for (Py_ssize_t c = c0; c < c1; c++) {
            uint32_t a = row[c] & 0x7FFFFFFFu;
            m = a > m ? a : m;
        }
    }
    return m;
}

/* ---- encoding one group -------------------------------------------------------------- */

/* x / s clipped to +-q (a no-op unless s is subnormal: with a normal scale |x| / s rounds to
 * at most qmax anyway). */
static inline float divided(float x, float s, float q) {
    float v = x / s;
    v = v > q ? q : v;
    return v < -q ? -q : v;
}

/* One row segment x[0..n) divided by scale s, clipped and rounded into out: codes (int8 or
 * fp8 bits), float32 values, or float32 values times s. Each `what` has its own loop, so that
 * every loop vectorises. */
CLONES static void encode_int8(const float *restrict x, void *restrict out, Py_ssize_t n,
                               float s, int what) {
    const float q = QMAX[INT8];
    if (what == CODES) {
        int8_t *o = out;
        for (Py_ssize_t i = 0; i < n; i++) o[i] = (int8_t)rint_small(divided(x[i], s, q));
    } else if (what == VALUES) {
        float *o = out;
        for (Py_ssize_t i = 0; i < n; i++) o[i] = rint_small(divided(x[i], s, q));
    } else {
        float *o = out;
        for (Py_ssize_t i = 0; i < n; i++) o[i] = rint_small(divided(x[i], s, q)) * s;
    }
}

#define DEFINE_ENCODE_FP8(NAME, FMT)                                                        \
    CLONES static void NAME(const float *restrict x, void *restrict out, Py_ssize_t n,      \
                            float s, int what) {                                            \
        const float q = QMAX[FMT];                                                          \
        const uint32_t min_exp = (uint32_t)(128 - BIAS[FMT]) << 23;                         \
        const uint32_t add = ((uint32_t)(23 - MBITS[FMT]) << 23) | (1u << 22);              \
        const float rebias = u2f((uint32_t)BIAS[FMT] << 23); /* 2**(bias - 127) */          \
        if (what == CODES) {                                                                \
            uint8_t *o = out;                                                               \
            for (Py_ssize_t i = 0; i < n; i++) {                                            \
                float v = divided(x[i], s, q);                                              \
                uint32_t code = f2u(fp8_grid(v, min_exp, add) * rebias) >> (23 - MBITS[FMT]); \
                o[i] = (uint8_t)((code & 0x7Fu) | ((f2u(v) >> 24) & 0x80u));                \
            }                                                                               \
        } else if (what == VALUES) {                                                        \
            float *o = out;                                                                 \
            for (Py_ssize_t i = 0; i < n; i++) {                                            \
                float v = divided(x[i], s, q);                                              \
                o[i] = copysignf(fp8_grid(v, min_exp, add), v);                             \
            }                                                                               \
        } else {                                                                            \
            float *o = out;                                                                 \
            for (Py_ssize_t i = 0; i < n; i++) {                                            \
                float v = divided(x[i], s, q);                                              \
                o[i] = copysignf(fp8_grid(v, min_exp, add), v) * s;                         \
            }                                                                               \
        }                                                                                   \
    }
DEFINE_ENCODE_FP8(encode_e4m3, E4M3)
DEFINE_ENCODE_FP8(encode_e5m2, E5M2)

typedef void (*encode_fn)(const float *, void *, Py_ssize_t, float, int);
static const encode_fn ENCODE[] = {encode_int8, encode_e4m3, encode_e5m2};

/* ---- buffers ------------------------------------------------------------------------- */

/* A 2-D buffer argument; `held` while its view must be released (see release). */
typedef struct {
    Py_buffer view;
    int held;
    char *data;
    Py_ssize_t rows, cols, stride, itemsize;
} matrix;

/* The end of the span of `size` starting at `start` within `n`. */
static inline Py_ssize_t span_end(Py_ssize_t start, Py_ssize_t size, Py_ssize_t n) {
    return start + size < n ? start + size : n;
}

/* A 2-D buffer with its last axis contiguous (itemsize bytes per element). */
static int get_matrix(PyObject *obj, matrix *m, int writable, Py_ssize_t itemsize,
                      const char *name) {
    int flags = PyBUF_STRIDES | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &m->view, flags) < 0) return -1;
    Py_buffer *v = &m->view;
    if (v->ndim != 2 || v->itemsize != itemsize ||
        (v->shape[1] > 1 && v->strides[1] != v->itemsize)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a 2-D array of %zd-byte elements, contiguous along its last "
                     "axis", name, itemsize);
        PyBuffer_Release(v);
        return -1;
    }
    m->held = 1;
    m->data = (char *)v->buf;
    m->rows = v->shape[0];
    m->cols = v->shape[1];
    m->stride = v->strides[0];
    m->itemsize = itemsize;
    return 0;
}

/* Release the views of the matrices that hold one: every function's one exit path. */
static void release(matrix *ms, int n) {
    for (int i = 0; i < n; i++)
        if (ms[i].held) PyBuffer_Release(&ms[i].view);
}

/* float32 x and a writable out of the same shape (out_size-byte elements) into m[0] and m[1]
 * for an elementwise loop over rows; -1 with the error set (the caller releases m). */
static int elementwise_pair(PyObject *xo, PyObject *oo, matrix m[2], Py_ssize_t out_size,
                            const char *fn) {
    if (get_matrix(xo, &m[0], 0, 4, "x") < 0 || get_matrix(oo, &m[1], 1, out_size, "out") < 0)
        return -1;
    if (m[0].rows != m[1].rows || m[0].cols != m[1].cols) {
        PyErr_Format(PyExc_ValueError, "%s: x and out shapes disagree", fn);
        return -1;
    }
    return 0;
}

/* ---- quantize ------------------------------------------------------------------------ */

PyDoc_STRVAR(quantize_doc,
"quantize(x, out, scales, group_rows, group_cols, fmt, what, given) -> None\n\n"
"Quantise float32 x [R, K] in groups of group_rows x group_cols elements into out [R, K]:\n"
"fmt 0 int8, 1 fp8 e4m3, 2 fp8 e5m2; what 0 codes (int8 or uint8), 1 float32 values, 2\n"
"float32 values times their scale. scales [ceil(R/group_rows), ceil(K/group_cols)] float32\n"
"receives amax / qmax (1 where 0) per group, or with given=True holds the scales to use.\n"
"Raises ValueError when a group holds a value beyond float32's range (Inf or NaN).");

static PyObject *quantize(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *xo, *oo, *so;
    Py_ssize_t gr, gc;
    int fmt, what, given;
    if (!PyArg_ParseTuple(args, "OOOnniip", &xo, &oo, &so, &gr, &gc, &fmt, &what, &given))
        return NULL;
    if (fmt < 0 || fmt > 2 || what < 0 || what > 2 || gr < 1 || gc < 1) {
        PyErr_SetString(PyExc_ValueError, "quantize: fmt/what/group sizes out of range");
        return NULL;
    }
    matrix m[3] = {{.held = 0}}, x, out, sc;
    PyObject *result = NULL;
    if (get_matrix(xo, &m[0], 0, 4, "x") < 0 ||
        get_matrix(oo, &m[1], 1, what == CODES ? 1 : 4, "out") < 0 ||
        get_matrix(so, &m[2], 1, 4, "scales") < 0)
        goto done;
    x = m[0], out = m[1], sc = m[2];
    Py_ssize_t nr = (x.rows + gr - 1) / gr, nc = (x.cols + gc - 1) / gc;
    if (out.rows != x.rows || out.cols != x.cols || sc.rows != nr || sc.cols != nc) {
        PyErr_SetString(PyExc_ValueError, "quantize: x, out and scales shapes disagree");
        goto done;
    }
    const float qmax = QMAX[fmt];
    const encode_fn encode = ENCODE[fmt];
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Row group by row group, each pass along the rows (a block row's tiles are strided;
     * sweeping whole rows keeps the reads sequential): the groups' maxima (as bits, in the
     * scales' own storage), then their scales, then the encoding. */
    for (Py_ssize_t i = 0; i < nr && !bad; i++) {
        Py_ssize_t r0 = i * gr, r1 = span_end(r0, gr, x.rows);
        float *srow = (float *)(sc.data + i * sc.stride);
        if (!given) {
            uint32_t *m = (uint32_t *)srow;
            for (Py_ssize_t j = 0; j < nc; j++) m[j] = 0;
            for (Py_ssize_t r = r0; r < r1; r++)
                for (Py_ssize_t j = 0; j < nc; j++) {
                    uint32_t a = amax_bits(x.data, x.stride, r, r + 1, j * gc,
                                           span_end(j * gc, gc, x.cols));
                    m[j] = a > m[j] ? a : m[j];
                }
            for (Py_ssize_t j = 0; j < nc; j++) {
                if (m[j] >= 0x7F800000u) { bad = 1; break; }
                float sj = u2f(m[j]) / qmax;
                srow[j] = sj == 0.0f ? 1.0f : sj;
            }
            if (bad) break;
        }
        for (Py_ssize_t r = r0; r < r1; r++) {
            const float *xr = (const float *)(x.data + r * x.stride);
            char *or_ = out.data + r * out.stride;
            for (Py_ssize_t j = 0; j < nc; j++) {
                Py_ssize_t c0 = j * gc;
                encode(xr + c0, or_ + c0 * out.itemsize, span_end(c0, gc, x.cols) - c0, srow[j],
                       what);
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (bad)
        PyErr_SetString(PyExc_ValueError,
                        "x holds values beyond float32's range: cannot quantize");
    else
        result = Py_NewRef(Py_None);
done:
    release(m, 3);
    return result;
}

PyDoc_STRVAR(amax_doc,
"amax(x) -> float\n\nmax |x| of float32 x [R, K] (Inf or NaN when x holds one).");

static PyObject *amax(PyObject *self, PyObject *arg) {
    (void)self;
    matrix x = {.held = 0};
    if (get_matrix(arg, &x, 0, 4, "x") < 0) return NULL;
    uint32_t m;
    Py_BEGIN_ALLOW_THREADS
    m = amax_bits(x.data, x.stride, 0, x.rows, 0, x.cols);
    Py_END_ALLOW_THREADS
    release(&x, 1);
    return PyFloat_FromDouble((double)u2f(m));
}

/* ---- rounding to a float format in float32 ------------------------------------------- */

/* Round to nearest even on the float32 bits, dropping the low `drop` mantissa bits: a carry
 * into the exponent is the next binade (or Inf); NaN and Inf pass through. */
static inline uint32_t round_bits(uint32_t u, int drop) {
    uint32_t r = (u + ((1u << (drop - 1)) - 1) + ((u >> drop) & 1u)) & ~((1u << drop) - 1);
    return (u & 0x7FFFFFFFu) >= 0x7F800000u ? u : r;
}

/* fp16's grid in float32: normals round their mantissa to 10 bits (above 65504 they become
 * Inf), below 2**-14 the spacing is 2**-24 (adding 0.75 rounds to it), NaN and Inf pass. */
static inline uint32_t fp16_bits(uint32_t u) {
    uint32_t a = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
    uint32_t normal = round_bits(a, 13);
    normal = (normal > 0x477FE000u && a < 0x7F800000u) ? 0x7F800000u : normal;
    uint32_t sub = f2u((u2f(a) + 0.75f) - 0.75f);
    return sign | (a >= 0x38800000u ? normal : sub);
}

CLONES static void round_row(const uint32_t *restrict x, uint32_t *restrict out, Py_ssize_t n,
                             int fmt) {
    if (fmt == TF32) {
        for (Py_ssize_t i = 0; i < n; i++) out[i] = round_bits(x[i], 13);
    } else if (fmt == BF16) {
        for (Py_ssize_t i = 0; i < n; i++) out[i] = round_bits(x[i], 16);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) out[i] = fp16_bits(x[i]);
    }
}

/* The storage codes of bf16 and fp16: the rounded float32 bits' upper half for bf16 (NaN
 * becomes the quiet NaN 0x7FC0 with x's sign, as ml_dtypes does); for fp16 the exponent
 * rebiased, subnormals counted in units of 2**-24, NaN keeping its upper payload bits (and
 * staying a NaN), as numpy does. */
CLONES static void code_row(const uint32_t *restrict x, uint16_t *restrict out, Py_ssize_t n,
                            int fmt) {
    if (fmt == BF16) {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t u = x[i];
            uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
            out[i] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : round_bits(u, 16) >> 16);
        }
        return;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t r = fp16_bits(x[i]); /* on fp16's grid: the code is a rewrite of its bits */
        uint32_t a = r & 0x7FFFFFFFu, sign = (r >> 16) & 0x8000u;
        uint32_t normal = (a - 0x38000000u) >> 13; /* exponent rebiased from 127 to 15 */
        /* below 2**-14, a = k * 2**-24: adding 0.75 is exact and its bits are 0.75's plus k */
        uint32_t sub = f2u(u2f(a) + 0.75f) - 0x3F400000u;
        uint32_t payload = 0x7C00u + ((a & 0x007FFFFFu) >> 13); /* Inf: 0x7C00 */
        payload += (uint32_t)((a > 0x7F800000u) & (payload == 0x7C00u)); /* NaN stays NaN */
        uint32_t finite = a >= 0x38800000u ? normal : sub;
        out[i] = (uint16_t)(sign | (a >= 0x7F800000u ? payload : finite));
    }
}

PyDoc_STRVAR(round_float_doc,
"round_float(x, out, fmt, codes=False) -> None\n\n"
"float32 x [R, K] rounded to nearest even onto the grid of fmt (0 tf32, 1 bf16, 2 fp16)\n"
"into out [R, K]: float32 (may be x; what rounding to the format and back gives, NaN kept a\n"
"NaN, overflow to Inf), or with codes=True (bf16, fp16) 2-byte storage codes (bitwise\n"
"ml_dtypes' bfloat16 and numpy's float16 casts).");

static PyObject *round_float(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *xo, *oo;
    int fmt, codes = 0;
    if (!PyArg_ParseTuple(args, "OOi|p", &xo, &oo, &fmt, &codes)) return NULL;
    if (fmt < 0 || fmt > 2 || (codes && fmt == TF32)) {
        PyErr_SetString(PyExc_ValueError,
                        "round_float: fmt must be 0, 1 or 2 (codes only for 1 and 2)");
        return NULL;
    }
    matrix m[2] = {{.held = 0}}, x, out;
    PyObject *result = NULL;
    if (elementwise_pair(xo, oo, m, codes ? 2 : 4, "round_float") < 0) goto done;
    x = m[0], out = m[1];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < x.rows; r++) {
        const uint32_t *row = (const uint32_t *)(x.data + r * x.stride);
        if (out.itemsize == 2) code_row(row, (uint16_t *)(out.data + r * out.stride), x.cols, fmt);
        else round_row(row, (uint32_t *)(out.data + r * out.stride), x.cols, fmt);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(m, 2);
    return result;
}

/* ---- int8 gemm: one scale group's product into the sum ----------------------------- */

CLONES static void scale_add_row(float *restrict acc, const float *restrict part,
                                 const float *restrict scale, Py_ssize_t n, Py_ssize_t width,
                                 int first) {
    if (width == 1) {
        if (first) for (Py_ssize_t j = 0; j < n; j++) acc[j] = part[j] * scale[j];
        else for (Py_ssize_t j = 0; j < n; j++) acc[j] += part[j] * scale[j];
        return;
    }
    for (Py_ssize_t j0 = 0; j0 < n; j0 += width) {
        const float s = scale[j0 / width];
        Py_ssize_t j1 = span_end(j0, width, n);
        if (first) for (Py_ssize_t j = j0; j < j1; j++) acc[j] = part[j] * s;
        else for (Py_ssize_t j = j0; j < j1; j++) acc[j] += part[j] * s;
    }
}

PyDoc_STRVAR(scale_add_doc,
"scale_add(acc, part, scale, width, first) -> None\n\n"
"acc [R, N] (float32) = part * scale (first=True) or acc + part * scale, each product and\n"
"sum rounded to float32: scale [R or 1, ceil(N/width)] holds one float32 per row (or for\n"
"every row) and width columns.");

static PyObject *scale_add(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ao, *po, *so;
    Py_ssize_t width;
    int first;
    if (!PyArg_ParseTuple(args, "OOOnp", &ao, &po, &so, &width, &first)) return NULL;
    matrix m[3] = {{.held = 0}}, acc, part, sc;
    PyObject *result = NULL;
    if (get_matrix(ao, &m[0], 1, 4, "acc") < 0 || get_matrix(po, &m[1], 0, 4, "part") < 0 ||
        get_matrix(so, &m[2], 0, 4, "scale") < 0)
        goto done;
    acc = m[0], part = m[1], sc = m[2];
    if (width < 1 || part.rows != acc.rows || part.cols != acc.cols ||
        (sc.rows != 1 && sc.rows != acc.rows) || sc.cols != (acc.cols + width - 1) / width) {
        PyErr_SetString(PyExc_ValueError, "scale_add: acc, part and scale shapes disagree");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < acc.rows; r++)
        scale_add_row((float *)(acc.data + r * acc.stride),
                      (const float *)(part.data + r * part.stride),
                      (const float *)(sc.data + (sc.rows == 1 ? 0 : r) * sc.stride),
                      acc.cols, width, first);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(m, 3);
    return result;
}

/* ---- int8 gemm: exact integer products of each scale group ---------------------------- */

/* The int8 gemm's products are exact integers: each K span's sum of int8 x int8 terms is
 * accumulated in int32 with AVX2's vpmaddwd (pairs of int16 products summed into int32
 * lanes, twice the multiply-adds per instruction of a float32 FMA), then converted and
 * scaled exactly as scale_add does (product and sum each rounded to float32; spans longer
 * than EXACT_K terms, whose sums float32 cannot hold exactly, as float64 products rounded
 * once to float32, as the numpy path's float64 sums are).
 *
 * b is packed once per gemm into NR-column panels of K pairs ([NB, Kp * 2 * NR] int16:
 * panel, pair, column, the pair's two k); a panel of rows is int16 [rows padded to MR,
 * K padded to even] with the two k of a pair adjacent, so one 32-bit broadcast loads them. */

enum { MR = 6, NR = 16, EXACT_K = 1024, INT32_K = 131071 }; /* 131071 * 128 * 128 < 2**31 */

PyDoc_STRVAR(pack_b_doc,
"pack_b(b, out) -> None\n\n"
"Pack integer-valued float32 b [K, N] (|b| <= 128) into int16 out [ceil(N/16),\n"
"ceil(K/2) * 32] for int8_panel: out[j, 32 p + 2 c + h] = b[2 p + h, 16 j + c], 0 beyond b.");

/* Rows 2p and 2p+1 of b (r1 NULL past K) into pair p of every panel (`pstride` apart). */
CLONES static void pack_pairs(const float *restrict r0, const float *restrict r1,
                              Py_ssize_t n, int16_t *restrict dst, Py_ssize_t pstride) {
    for (Py_ssize_t j0 = 0; j0 < n; j0 += NR, dst += pstride) {
        if (j0 + NR <= n && r1) {
            for (int c = 0; c < NR; c++) {
                dst[2 * c] = (int16_t)r0[j0 + c];
                dst[2 * c + 1] = (int16_t)r1[j0 + c];
            }
            continue;
        }
        for (int c = 0; c < NR; c++) {
            int in = j0 + c < n;
            dst[2 * c] = in ? (int16_t)r0[j0 + c] : 0;
            dst[2 * c + 1] = in && r1 ? (int16_t)r1[j0 + c] : 0;
        }
    }
}

static PyObject *pack_b(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *bo, *oo;
    if (!PyArg_ParseTuple(args, "OO", &bo, &oo)) return NULL;
    matrix m[2] = {{.held = 0}}, b, out;
    PyObject *result = NULL;
    if (get_matrix(bo, &m[0], 0, 4, "b") < 0 || get_matrix(oo, &m[1], 1, 2, "out") < 0)
        goto done;
    b = m[0], out = m[1];
    Py_ssize_t kp = (b.rows + 1) / 2;
    if (out.rows != (b.cols + NR - 1) / NR || out.cols != kp * 2 * NR) {
        PyErr_SetString(PyExc_ValueError, "pack_b: out must be [ceil(N/16), ceil(K/2) * 32]");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t p = 0; p < kp; p++) {
        const float *r0 = (const float *)(b.data + 2 * p * b.stride);
        const float *r1 = 2 * p + 1 < b.rows ? (const float *)(b.data + (2 * p + 1) * b.stride)
                                             : NULL;
        pack_pairs(r0, r1, b.cols, (int16_t *)out.data + p * 2 * NR, out.stride / 2);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(m, 2);
    return result;
}

/* The scale of columns n0..n0+NR of one scale row (ncols entries, `width` columns each). */
static inline void column_scales(const float *srow, Py_ssize_t n0, Py_ssize_t n,
                                 Py_ssize_t width, float s[NR]) {
    for (int c = 0; c < NR; c++) {
        Py_ssize_t col = n0 + c < n ? n0 + c : n - 1;
        s[c] = srow[col / width];
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_INT8_KERNEL 1

static inline int32_t load_pair(const int16_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* The MR x NR int32 tile sum over pairs p0..p1 of rows a[0..MR) (`astride` apart) times the
 * b panel, into t: twelve named accumulators, so that they stay in registers. */
__attribute__((target("avx2"))) static inline void int8_tile(
    const int16_t *a, Py_ssize_t astride, const int16_t *panel, Py_ssize_t p0, Py_ssize_t p1,
    __m256i t[2 * MR]) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int16_t *a0 = a, *a1 = a + astride, *a2 = a + 2 * astride, *a3 = a + 3 * astride,
                  *a4 = a + 4 * astride, *a5 = a + 5 * astride;
#define ROW(r)                                                                  \
    {                                                                           \
        const __m256i x = _mm256_set1_epi32(load_pair(a##r + 2 * p));           \
        c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(x, b0));          \
        c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(x, b1));          \
    }
    for (Py_ssize_t p = p0; p < p1; p++) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(panel + p * 2 * NR));
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(panel + p * 2 * NR + NR));
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
    }
#undef ROW
    t[0] = c00, t[1] = c01, t[2] = c10, t[3] = c11, t[4] = c20, t[5] = c21;
    t[6] = c30, t[7] = c31, t[8] = c40, t[9] = c41, t[10] = c50, t[11] = c51;
}

/* acc[R, N] (float32) = the scaled sum over the K spans of a [R, K] @ b [K, N]; see
 * int8_panel_doc. `a` rows are `astride` int16 apart, `bp` panels `bstride`. */
__attribute__((target("avx2"))) static void int8_panel_avx2(
    float *acc, Py_ssize_t accstride, Py_ssize_t R, Py_ssize_t N, Py_ssize_t K,
    const int16_t *a, Py_ssize_t astride, const int16_t *bp, Py_ssize_t bstride,
    Py_ssize_t g, const float *scales, Py_ssize_t sstride, Py_ssize_t srows, Py_ssize_t width) {
    const Py_ssize_t kp = (K + 1) / 2, spans = (K + g - 1) / g;
    const int uniform = width % NR == 0 || width >= N; /* one scale per NR columns */
    for (Py_ssize_t n0 = 0; n0 < N; n0 += NR) {
        const int16_t *panel = bp + (n0 / NR) * bstride;
        const Py_ssize_t nc = span_end(n0, NR, N) - n0, col0 = uniform ? n0 / width : 0;
        for (Py_ssize_t m0 = 0; m0 < R; m0 += MR) {
            const Py_ssize_t mr = span_end(m0, MR, R) - m0;
            __m256 f[2 * MR];
            for (Py_ssize_t s = 0; s < spans; s++) {
                const Py_ssize_t p0 = s * g / 2, p1 = s == spans - 1 ? kp : (s + 1) * g / 2;
                __m256i c[2 * MR];
                int8_tile(a + m0 * astride, astride, panel, p0, p1, c);
                const Py_ssize_t len = span_end(s * g, g, K) - s * g;
                const int exact = len <= EXACT_K;
                float sc[NR];
                for (int r = 0; r < MR; r++) {
                    /* rows past R (the padding) reuse the last row's scales; never stored */
                    Py_ssize_t row = srows == 1 ? 0 : (m0 + r < R ? m0 + r : R - 1);
                    const float *srow = scales + (s * srows + row) * sstride;
                    __m256 s0, s1;
                    if (uniform) {
                        s0 = s1 = _mm256_set1_ps(srow[col0]);
                    } else if (width == 1 && nc == NR) {
                        s0 = _mm256_loadu_ps(srow + n0);
                        s1 = _mm256_loadu_ps(srow + n0 + 8);
                    } else {
                        column_scales(srow, n0, N, width, sc);
                        s0 = _mm256_loadu_ps(sc);
                        s1 = _mm256_loadu_ps(sc + 8);
                    }
                    __m256 t0, t1;
                    if (exact) { /* the sum is exact in float32: scale_add's roundings */
                        t0 = _mm256_mul_ps(_mm256_cvtepi32_ps(c[2 * r]), s0);
                        t1 = _mm256_mul_ps(_mm256_cvtepi32_ps(c[2 * r + 1]), s1);
                    } else { /* float64 product rounded once to float32 */
                        int32_t v[NR];
                        float t[NR];
                        _mm256_storeu_si256((__m256i *)v, c[2 * r]);
                        _mm256_storeu_si256((__m256i *)(v + 8), c[2 * r + 1]);
                        _mm256_storeu_ps(sc, s0);
                        _mm256_storeu_ps(sc + 8, s1);
                        for (int j = 0; j < NR; j++) t[j] = (float)((double)v[j] * (double)sc[j]);
                        t0 = _mm256_loadu_ps(t);
                        t1 = _mm256_loadu_ps(t + 8);
                    }
                    f[2 * r] = s == 0 ? t0 : _mm256_add_ps(f[2 * r], t0);
                    f[2 * r + 1] = s == 0 ? t1 : _mm256_add_ps(f[2 * r + 1], t1);
                }
            }
            for (Py_ssize_t r = 0; r < mr; r++) {
                float *dst = acc + (m0 + r) * accstride + n0;
                if (nc == NR) {
                    _mm256_storeu_ps(dst, f[2 * r]);
                    _mm256_storeu_ps(dst + 8, f[2 * r + 1]);
                } else {
                    float t[NR];
                    _mm256_storeu_ps(t, f[2 * r]);
                    _mm256_storeu_ps(t + 8, f[2 * r + 1]);
                    memcpy(dst, t, (size_t)nc * 4);
                }
            }
        }
    }
}
#else
#define HAVE_INT8_KERNEL 0
#endif

PyDoc_STRVAR(int8_panel_doc,
"int8_panel(acc, a, bp, K, g, scales, width) -> None\n\n"
"acc [R, N] float32 = sum over the K spans s of g (the last one shorter) of\n"
"(a[:, span] @ b[span, :]) * scale_s, the product exact in int32, each scaling and sum\n"
"rounded to float32 as scale_add's (spans over 1024 terms: float64 products rounded once).\n"
"a: int16 [R rounded up to 6, K rounded up to even], integer values |a| <= 128, zero\n"
"padding; bp: b as pack_b packs it; scales: float32 [spans * (R or 1), ceil(N / width)],\n"
"span s's scale rows at s * (R or 1). g must be even when there is more than one span and at\n"
"most 131071 (int32 sums). Raises NotImplementedError where the kernel is not built\n"
"(INT8_KERNEL False) or the CPU lacks AVX2.");

static PyObject *int8_panel(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ao, *xo, *bo, *so;
    Py_ssize_t K, g, width;
    if (!PyArg_ParseTuple(args, "OOOnnOn", &ao, &xo, &bo, &K, &g, &so, &width)) return NULL;
#if HAVE_INT8_KERNEL
    if (!__builtin_cpu_supports("avx2")) {
#endif
        PyErr_SetString(PyExc_NotImplementedError, "int8_panel needs an x86-64 CPU with AVX2");
        return NULL;
#if HAVE_INT8_KERNEL
    }
    matrix m[4] = {{.held = 0}}, acc, a, bp, sc;
    PyObject *result = NULL;
    if (get_matrix(ao, &m[0], 1, 4, "acc") < 0 || get_matrix(xo, &m[1], 0, 2, "a") < 0 ||
        get_matrix(bo, &m[2], 0, 2, "bp") < 0 || get_matrix(so, &m[3], 0, 4, "scales") < 0)
        goto done;
    acc = m[0], a = m[1], bp = m[2], sc = m[3];
    Py_ssize_t R = acc.rows, N = acc.cols, spans = g > 0 ? (K + g - 1) / g : 0;
    Py_ssize_t srows = spans ? sc.rows / spans : 0;
    if (K < 1 || g < 1 || g > INT32_K || (spans > 1 && g % 2) || width < 1 || R < 1 ||
        N < 1 || a.rows < (R + MR - 1) / MR * MR || a.cols != (K + 1) / 2 * 2 ||
        a.stride % 2 || bp.rows != (N + NR - 1) / NR || bp.cols != (K + 1) / 2 * 2 * NR ||
        bp.stride % 2 || acc.stride % 4 || sc.stride % 4 || (srows != 1 && srows != R) ||
        sc.rows != spans * srows || sc.cols != (N + width - 1) / width) {
        PyErr_SetString(PyExc_ValueError, "int8_panel: acc, a, bp, K, g, scales and width "
                        "disagree");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    int8_panel_avx2((float *)acc.data, acc.stride / 4, R, N, K, (const int16_t *)a.data,
                    a.stride / 2, (const int16_t *)bp.data, bp.stride / 2, g,
                    (const float *)sc.data, sc.stride / 4, srows, width);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(m, 4);
    return result;
#endif
}

/* ---- attention: 2**x ----------------------------------------------------------------- */

/* 2**x for float32 within 2 ulp: exp2_poly of _exp2.h (shared with _backward.c). */
CLONES static void exp2_row(const float *restrict x, float *restrict out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) out[i] = exp2_poly(x[i]);
}

PyDoc_STRVAR(exp2_doc,
"exp2(x, out) -> None\n\n"
"out = 2**x elementwise for float32 x [R, C] (within 2 ulp; below 2**-125 flushed to +0).");

static PyObject *exp2_(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *xo, *oo;
    if (!PyArg_ParseTuple(args, "OO", &xo, &oo)) return NULL;
    matrix m[2] = {{.held = 0}}, x, out;
    PyObject *result = NULL;
    if (elementwise_pair(xo, oo, m, 4, "exp2") < 0) goto done;
    x = m[0], out = m[1];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < x.rows; r++)
        exp2_row((const float *)(x.data + r * x.stride), (float *)(out.data + r * out.stride),
                 x.cols);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(m, 2);
    return result;
}

/* ---- module -------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"quantize", quantize, METH_VARARGS, quantize_doc},
    {"amax", amax, METH_O, amax_doc},
    {"round_float", round_float, METH_VARARGS, round_float_doc},
    {"scale_add", scale_add, METH_VARARGS, scale_add_doc},
    {"pack_b", pack_b, METH_VARARGS, pack_b_doc},
    {"int8_panel", int8_panel, METH_VARARGS, int8_panel_doc},
    {"exp2", exp2_, METH_VARARGS, exp2_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dshal.backends.numpy._native",
    "Fused elementwise loops of dshal's numpy backend (see _native.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *mod = PyModule_Create(&module);
    int kernel = 0;
#if HAVE_INT8_KERNEL
    kernel = __builtin_cpu_supports("avx2");
#endif
    /* whether int8_panel runs here (x86-64 with AVX2) */
    if (mod && PyModule_AddObjectRef(mod, "INT8_KERNEL", kernel ? Py_True : Py_False) < 0)
        Py_CLEAR(mod);
    return mod;
}
