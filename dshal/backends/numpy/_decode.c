/* Decode attention over gathered key rows, fused: dshal.backends.numpy._decode.
 *
 * One query position per (sequence, kv head), its g query heads, and the rows of the key and
 * value pools it attends (-1 = padding): scores, softmax and the weighted values in one pass
 * over the pools, reading each attended row once and nothing else. Padding rows are never
 * read, so NaN/Inf in unattended keys or values cannot reach an output. float32 throughout
 * (exp as 2**(x log2 e) by _exp2.h's polynomial, within 2 ulp, so it vectorises);
 * the loops run over the g heads (scores) and the value dimension (sums) innermost, so they
 * vectorise without reassociating any sum: on x86-64 an AVX2 build of the loop (picked at run
 * time when the CPU has AVX2) computes bitwise what the baseline build computes. The GIL is
 * released, so the caller may run ranges of the (sequence, kv head) pairs on several threads. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_buffer.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define AVX2_BUILD 1
#define BODY static inline __attribute__((always_inline))
#else
#define AVX2_BUILD 0
#define BODY static inline
#endif
#define EXP2_INLINE BODY
#include "_exp2.h"

#define LOG2E 1.4426950408889634f

/* One (sequence, kv head): qt [D][g] (scaled, transposed), rows [N], out [g][Dv], lse [g];
 * scratch: s [(N + 3) * g] (scores, then weights), live [N] (the attended rows). */
BODY int one_body(const float *qt, int g, Py_ssize_t D, const float *k, const float *v,
                  Py_ssize_t Dv, Py_ssize_t R, const int64_t *rows, Py_ssize_t N, float *s,
                  int64_t *live, float *out, float *lse) {
    float m[64], sum[64];
    for (int h = 0; h < g; h++) { m[h] = -INFINITY; sum[h] = 0.0f; }
    memset(out, 0, sizeof(float) * (size_t)g * (size_t)Dv);
    Py_ssize_t used = 0; /* the attended rows, in order */
    for (Py_ssize_t j = 0; j < N; j++) {
        if (rows[j] < 0) continue;
        if (rows[j] >= R) return -1;
        live[used++] = rows[j];
    }
    if (used == 0) {
        for (int h = 0; h < g; h++) lse[h] = -INFINITY;
        return 0;
    }
    /* scores, four rows at a time: four independent sums per head, each still adding its D
     * terms in order (a short last group repeats its first row into s's spare rows) */
    for (Py_ssize_t u = 0; u < used; u += 4) {
        const float *kr[4];
        for (int t = 0; t < 4; t++) kr[t] = k + live[u + t < used ? u + t : u] * D;
        float *restrict s0 = s + u * g, *restrict s1 = s0 + g, *restrict s2 = s1 + g,
              *restrict s3 = s2 + g;
        for (int h = 0; h < g; h++) s0[h] = s1[h] = s2[h] = s3[h] = 0.0f;
        for (Py_ssize_t d = 0; d < D; d++) {
            const float k0 = kr[0][d], k1 = kr[1][d], k2 = kr[2][d], k3 = kr[3][d];
            const float *restrict qd = qt + d * g;
            for (int h = 0; h < g; h++) {
                s0[h] += qd[h] * k0, s1[h] += qd[h] * k1;
                s2[h] += qd[h] * k2, s3[h] += qd[h] * k3;
            }
        }
    }
    for (Py_ssize_t u = 0; u < used; u++)
        for (int h = 0; h < g; h++)
            if (s[u * g + h] > m[h]) m[h] = s[u * g + h];
    for (int h = 0; h < g; h++)  /* every allowed score -inf (or NaN): NaN, as the softmax */
        if (m[h] == -INFINITY) m[h] = NAN;
    /* the weights, in place of the scores: exp(x) as 2**(x log2 e), across the heads */
    for (Py_ssize_t u = 0; u < used; u++) {
        float *restrict su = s + u * g;
        for (int h = 0; h < g; h++) {
            su[h] = exp2_poly((su[h] - m[h]) * LOG2E);
            sum[h] += su[h];
        }
    }
    /* out[h] += w v, the rows in order, four per pass over out (same order of additions) */
    Py_ssize_t u = 0;
    for (; u + 4 <= used; u += 4) {
        const float *v0 = v + live[u] * Dv, *v1 = v + live[u + 1] * Dv,
                    *v2 = v + live[u + 2] * Dv, *v3 = v + live[u + 3] * Dv;
        const float *restrict w = s + u * g;
        for (int h = 0; h < g; h++) {
            float *restrict oh = out + h * Dv;
            const float w0 = w[h], w1 = w[g + h], w2 = w[2 * g + h], w3 = w[3 * g + h];
            for (Py_ssize_t d = 0; d < Dv; d++)
                oh[d] = (((oh[d] + w0 * v0[d]) + w1 * v1[d]) + w2 * v2[d]) + w3 * v3[d];
        }
    }
    for (; u < used; u++) {
        const float *vr = v + live[u] * Dv, *restrict w = s + u * g;
        for (int h = 0; h < g; h++) {
            float *restrict oh = out + h * Dv;
            for (Py_ssize_t d = 0; d < Dv; d++) oh[d] += w[h] * vr[d];
        }
    }
    for (int h = 0; h < g; h++) {
        float *oh = out + h * Dv;
        for (Py_ssize_t d = 0; d < Dv; d++) oh[d] /= sum[h];
        lse[h] = m[h] + logf(sum[h]);
    }
    return 0;
}

#define ONE_ARGS                                                                            \
    const float *qt, int g, Py_ssize_t D, const float *k, const float *v, Py_ssize_t Dv,    \
    Py_ssize_t R, const int64_t *rows, Py_ssize_t N, float *s, int64_t *live, float *out,   \
    float *lse
static int one_base(ONE_ARGS) {
    return one_body(qt, g, D, k, v, Dv, R, rows, N, s, live, out, lse);
}
#if AVX2_BUILD
__attribute__((target("avx2"))) static int one_avx2(ONE_ARGS) {
    return one_body(qt, g, D, k, v, Dv, R, rows, N, s, live, out, lse);
}
#endif

PyDoc_STRVAR(decode_doc,
"decode(qt, k, v, rows, out, lse) -> None\n\n"
"qt float32 [M, D, g] (scaled queries, heads last; g <= 64), k float32 [R, D] and v float32\n"
"[R, Dv] (the pools' rows), rows int64 [M, N] (the pool rows each of the M (sequence, kv head)\n"
"pairs attends, -1 = none), out float32 [M, g, Dv] and lse float32 [M, g] written. A pair with\n"
"no row gives out 0 and lse -inf. ValueError for a row >= R.");

static PyObject *decode(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[6];
    if (!PyArg_ParseTuple(args, "OOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5]))
        return NULL;
    Py_buffer b[6];
    static const int nd[6] = {3, 2, 2, 2, 3, 2};
    static const Py_ssize_t size[6] = {4, 4, 4, 8, 4, 4};
    static const char *names[6] = {"qt", "k", "v", "rows", "out", "lse"};
    int got = 0;
    for (; got < 6; got++)
        if (get_buffer(o[got], &b[got], nd[got], size[got], got >= 4, names[got]) < 0) break;
    PyObject *result = NULL;
    if (got == 6) {
        Py_ssize_t M = b[0].shape[0], D = b[0].shape[1], g = b[0].shape[2];
        Py_ssize_t R = b[1].shape[0], Dv = b[2].shape[1], N = b[3].shape[1];
        if (g > 64 || b[1].shape[1] != D || b[2].shape[0] != R || b[3].shape[0] != M ||
            b[4].shape[0] != M || b[4].shape[1] != g || b[4].shape[2] != Dv ||
            b[5].shape[0] != M || b[5].shape[1] != g) {
            PyErr_SetString(PyExc_ValueError, "decode: shapes disagree (or g > 64)");
        } else {
            float *s = malloc(sizeof(float) * (size_t)(N + 3) * (size_t)(g > 0 ? g : 1));
            int64_t *live = malloc(sizeof(int64_t) * (size_t)(N > 0 ? N : 1));
            if (s == NULL || live == NULL) free(s), free(live), s = NULL, live = NULL;
            int bad = s == NULL;
            int (*one)(ONE_ARGS) = one_base;
#if AVX2_BUILD
            if (__builtin_cpu_supports("avx2")) one = one_avx2;
#endif
            if (!bad) {
                Py_BEGIN_ALLOW_THREADS
                for (Py_ssize_t i = 0; i < M && !bad; i++)
                    bad = one((const float *)b[0].buf + i * D * g, (int)g, D,
                              (const float *)b[1].buf, (const float *)b[2].buf, Dv, R,
                              (const int64_t *)b[3].buf + i * N, N, s, live,
                              (float *)b[4].buf + i * g * Dv, (float *)b[5].buf + i * g) != 0;
                Py_END_ALLOW_THREADS
                free(s), free(live);
            }
            if (s == NULL) PyErr_NoMemory();
            else if (bad) PyErr_SetString(PyExc_ValueError, "decode: a row is out of range");
            else result = Py_None;
        }
    }
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    Py_XINCREF(result);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_decode",
    "Fused decode attention over gathered pool rows (dshal's numpy backend).", -1, methods,
};

PyMODINIT_FUNC PyInit__decode(void) { return PyModule_Create(&module); }
