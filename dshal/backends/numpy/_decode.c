/* Decode attention over gathered key rows, fused: dshal.backends.numpy._decode.
 *
 * One query position per (sequence, kv head), its g query heads, and the rows of the key and
 * value pools it attends (-1 = padding): scores, softmax and the weighted values in one pass
 * over the pools, reading each attended row once and nothing else. Padding rows are never
 * read, so NaN/Inf in unattended keys or values cannot reach an output. float32 throughout;
 * the loops run over the g heads (scores) and the value dimension (sums) innermost, so they
 * vectorise without reassociating any sum. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_buffer.h"

/* One (sequence, kv head): qt [D][g] (scaled, transposed), rows [N], out [g][Dv], lse [g]. */
static int one(const float *qt, int g, Py_ssize_t D, const float *k, const float *v,
               Py_ssize_t Dv, Py_ssize_t R, const int64_t *rows, Py_ssize_t N, float *s,
               float *out, float *lse) {
    float m[64], sum[64];
    for (int h = 0; h < g; h++) { m[h] = -INFINITY; sum[h] = 0.0f; }
    memset(out, 0, sizeof(float) * (size_t)g * (size_t)Dv);
    Py_ssize_t used = 0;
    for (Py_ssize_t j = 0; j < N; j++) {
        int64_t r = rows[j];
        if (r < 0) continue;
        if (r >= R) return -1;
        const float *kr = k + r * D;
        float *sj = s + used * g;
        for (int h = 0; h < g; h++) sj[h] = 0.0f;
        for (Py_ssize_t d = 0; d < D; d++) {
            const float kd = kr[d];
            const float *qd = qt + d * g;
            for (int h = 0; h < g; h++) sj[h] += qd[h] * kd;
        }
        for (int h = 0; h < g; h++) if (sj[h] > m[h]) m[h] = sj[h];
        used++;
    }
    if (used == 0) {
        for (int h = 0; h < g; h++) lse[h] = -INFINITY;
        return 0;
    }
    for (int h = 0; h < g; h++)  /* every allowed score -inf (or NaN): NaN, as the softmax */
        if (m[h] == -INFINITY) m[h] = NAN;
    used = 0;
    for (Py_ssize_t j = 0; j < N; j++) {
        int64_t r = rows[j];
        if (r < 0) continue;
        const float *vr = v + r * Dv;
        const float *sj = s + used * g;
        for (int h = 0; h < g; h++) {
            const float e = expf(sj[h] - m[h]);
            float *oh = out + h * Dv;
            sum[h] += e;
            for (Py_ssize_t d = 0; d < Dv; d++) oh[d] += e * vr[d];
        }
        used++;
    }
    for (int h = 0; h < g; h++) {
        float *oh = out + h * Dv;
        for (Py_ssize_t d = 0; d < Dv; d++) oh[d] /= sum[h];
        lse[h] = m[h] + logf(sum[h]);
    }
    return 0;
}

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
            float *s = malloc(sizeof(float) * (size_t)(N > 0 ? N : 1) * (size_t)g);
            int bad = s == NULL;
            if (!bad) {
                Py_BEGIN_ALLOW_THREADS
                for (Py_ssize_t i = 0; i < M && !bad; i++)
                    bad = one((const float *)b[0].buf + i * D * g, (int)g, D,
                              (const float *)b[1].buf, (const float *)b[2].buf, Dv, R,
                              (const int64_t *)b[3].buf + i * N, N, s,
                              (float *)b[4].buf + i * g * Dv, (float *)b[5].buf + i * g) != 0;
                Py_END_ALLOW_THREADS
                free(s);
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
