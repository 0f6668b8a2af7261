/* dshal.backends.numpy._backward: the compiled backward of sparse_attention (DESIGN 3.1b).
 *
 * FlashAttention-2 style, selection-aware: for each query row the probabilities are
 * recomputed from the forward's log-sum-exp over that row's allowed keys only (its window and
 * the blocks its selection holds, causal-clipped), so no Lq x Lk buffer exists and keys that
 * are not allowed are never read: their NaN/Inf reach nothing. Per row, with the g query
 * heads of one kv head together (they share the allowed set):
 *
 *   p[h, j]  = 2**(s[h, j] * log2(e) - lse[h] * log2(e)),  s = scale * q[h] . k[j]
 *   dp[h, j] = grad_out[h] . v[j]
 *   ds[h, j] = p * (dp - delta[h] + grad_lse[h]),  delta[h] = sum_j p * dp  (= dO . O)
 *   dq[h] = scale * sum_j ds k[j];  dk[j] += scale * sum_h ds q[h];  dv[j] += sum_h p dO[h]
 *
 * Everything is float32 (the Python side converts fp16/bf16 inputs; float64 is not declared).
 * One call serves query rows [i0, i1) of one (batch, kv head): dq rows are written, dk and dv
 * accumulated into the arrays given (the caller gives each concurrent call its own when two
 * calls share a kv head, and sums them in a fixed order: results do not depend on threads).
 * The GIL is released while a call runs, so the backend's thread pool runs calls in parallel.
 * Compiled with -ffp-contract=fast (FMAs) and OpenMP SIMD reductions; on x86-64 Linux the
 * kernel is compiled for Haswell (AVX2 + FMA) and baseline, picked for the CPU at load.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


/* The kernel is inlined (INLINE) into a baseline build and, on x86-64 with GCC or Clang, an
 * AVX2 + FMA build (FAST) chosen at run time when the CPU has both. */
#if defined(__x86_64__) && defined(__GNUC__)
#define FAST_BUILD 1
#define INLINE static inline __attribute__((always_inline))
#define FAST __attribute__((target("avx2,fma")))
#else
#define FAST_BUILD 0
#define INLINE static inline
#endif
#define EXP2_INLINE INLINE
#include "_exp2.h"
#include "_buffer.h"

#define LOG2E 1.4426950408889634f

/* One (batch, kv head) of a backward call: C-contiguous float32 views. */
typedef struct {
    const float *q, *k, *v, *lse, *go, *glse; /* [g,Lq,D] [Lk,D] [Lk,Dv] [g,Lq] [g,Lq,Dv] [g,Lq] */
    const int64_t *idx;                       /* [Lq, n_idx], each row ascending; or NULL */
    float *dq, *dk, *dv;                      /* [g,Lq,D] written; [Lk,D] [Lk,Dv] accumulated */
    Py_ssize_t g, Lq, Lk, D, Dv, n_idx, bs, window;
    int causal;
    float scale;
} problem;

/* The allowed keys of query row i as disjoint ranges [lo, hi): the window, then each selected
 * block (duplicates once, -1 skipped) minus the window, clipped to the visible keys; dense
 * attention (no selection, no window) is every visible key. Returns the number of ranges
 * (at most 1 + 2 * n_idx). */
INLINE Py_ssize_t key_ranges(const problem *a, Py_ssize_t i, Py_ssize_t *lo, Py_ssize_t *hi) {
    const Py_ssize_t p = i + a->Lk - a->Lq;
    const Py_ssize_t vis = a->causal ? (p + 1 < a->Lk ? p + 1 : a->Lk) : a->Lk;
    if (vis <= 0) return 0;
    if (!a->idx && !a->window) {
        lo[0] = 0, hi[0] = vis;
        return 1;
    }
    Py_ssize_t n = 0, wlo = 0, whi = 0;
    if (a->window) {
        wlo = p - a->window + 1 > 0 ? p - a->window + 1 : 0;
        whi = p + a->window < vis ? p + a->window : vis;
        if (whi > wlo) lo[n] = wlo, hi[n] = whi, n++;
        else wlo = whi = 0;
    }
    if (!a->idx) return n;
    const int64_t *row = a->idx + i * a->n_idx;
    int64_t prev = -1;
    for (Py_ssize_t c = 0; c < a->n_idx; c++) {
        const int64_t b = row[c];
        if (b < 0 || b == prev) continue;
        prev = b;
        const Py_ssize_t j0 = (Py_ssize_t)b * a->bs;
        const Py_ssize_t j1 = j0 + a->bs < vis ? j0 + a->bs : vis;
        if (j1 <= j0) break; /* ascending: every later block starts past the visible keys */
        if (j0 < whi && j1 > wlo) { /* the part the window does not cover */
            if (j0 < wlo) lo[n] = j0, hi[n] = wlo, n++;
            if (j1 > whi) lo[n] = whi, hi[n] = j1, n++;
        } else {
            lo[n] = j0, hi[n] = j1, n++;
        }
    }
    return n;
}

/* Dot products of x with KB rows at once (KB independent accumulator chains keep the FMA
 * units busy), and y += sum_r a[r] rows[r] with y held in registers across the rows (loaded
 * and stored once instead of once per row). With GCC/Clang vector extensions: 8 floats per
 * vector (one AVX2 register in the FAST build, two SSE ones in the baseline). */
enum { KB = 8, VW = 8, YV = 8 };

#if defined(__GNUC__)
typedef float v8 __attribute__((vector_size(32), aligned(4))); /* unaligned loads allowed */

INLINE v8 load8(const float *x) { return *(const v8 *)x; }
INLINE float hsum8(v8 x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* out[r] = x . rows[r][0..n), r < KB */
INLINE void dot_rows(const float *restrict x, const float *const *rows, Py_ssize_t n,
                     float *restrict out) {
    v8 acc[KB] = {{0}};
    Py_ssize_t d = 0;
    for (; d + VW <= n; d += VW) {
        const v8 xd = load8(x + d);
        for (int r = 0; r < KB; r++) acc[r] += xd * load8(rows[r] + d);
    }
    for (int r = 0; r < KB; r++) {
        float t = hsum8(acc[r]);
        for (Py_ssize_t e = d; e < n; e++) t += x[e] * rows[r][e];
        out[r] = t;
    }
}

/* y[0..n) += sum_r a[r] * rows[r][0..n) */
INLINE void gemv_rows(float *restrict y, const float *restrict a, const float *const *rows,
                      Py_ssize_t m, Py_ssize_t n) {
    Py_ssize_t d0 = 0;
    for (; d0 + YV * VW <= n; d0 += YV * VW) {
        v8 acc[YV];
        for (int t = 0; t < YV; t++) acc[t] = load8(y + d0 + t * VW);
        for (Py_ssize_t r = 0; r < m; r++) {
            const float *xr = rows[r] + d0;
            const v8 ar = {a[r], a[r], a[r], a[r], a[r], a[r], a[r], a[r]};
            for (int t = 0; t < YV; t++) acc[t] += ar * load8(xr + t * VW);
        }
        for (int t = 0; t < YV; t++) *(v8 *)(y + d0 + t * VW) = acc[t];
    }
    for (; d0 + VW <= n; d0 += VW) {
        v8 acc = load8(y + d0);
        for (Py_ssize_t r = 0; r < m; r++) acc += a[r] * load8(rows[r] + d0);
        *(v8 *)(y + d0) = acc;
    }
    for (; d0 < n; d0++) {
        float acc = y[d0];
        for (Py_ssize_t r = 0; r < m; r++) acc += a[r] * rows[r][d0];
        y[d0] = acc;
    }
}
#else
INLINE void dot_rows(const float *restrict x, const float *const *rows, Py_ssize_t n,
                     float *restrict out) {
    for (int r = 0; r < KB; r++) {
        float t = 0.0f;
        for (Py_ssize_t d = 0; d < n; d++) t += x[d] * rows[r][d];
        out[r] = t;
    }
}

INLINE void gemv_rows(float *restrict y, const float *restrict a, const float *const *rows,
                      Py_ssize_t m, Py_ssize_t n) {
    for (Py_ssize_t r = 0; r < m; r++)
        for (Py_ssize_t d = 0; d < n; d++) y[d] += a[r] * rows[r][d];
}
#endif

INLINE float dot(const float *restrict x, const float *restrict y, Py_ssize_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (Py_ssize_t d = 0; d < n; d++) acc += x[d] * y[d];
    return acc;
}

/* Scratch of one call: per row the allowed keys' rows of k and v, the g heads' rows of q,
 * grad_out and dq, and p and ds [g, cap]. */
typedef struct {
    float *p, *ds, *col;
    const float **krow, **vrow, **qrow, **grow;
    float **dqrow;
    Py_ssize_t *lo, *hi, cap;
} scratch;

/* Rows [i0, i1) of one (batch, kv head). */
INLINE void backward_rows(const problem *a, Py_ssize_t i0, Py_ssize_t i1, const scratch *w) {
    const Py_ssize_t g = a->g, Lq = a->Lq, D = a->D, Dv = a->Dv, cap = w->cap;
    const float sl2 = a->scale * LOG2E;
    float *p = w->p, *ds = w->ds, *col = w->col;
    for (Py_ssize_t i = i0; i < i1; i++) {
        for (Py_ssize_t h = 0; h < g; h++) {
            const Py_ssize_t row = h * Lq + i;
            w->qrow[h] = a->q + row * D, w->grow[h] = a->go + row * Dv;
            w->dqrow[h] = a->dq + row * D;
            memset(w->dqrow[h], 0, (size_t)D * 4);
        }
        const Py_ssize_t nr = key_ranges(a, i, w->lo, w->hi);
        Py_ssize_t n = 0;
        for (Py_ssize_t r = 0; r < nr; r++)
            for (Py_ssize_t j = w->lo[r]; j < w->hi[r]; j++, n++)
                w->krow[n] = a->k + j * D, w->vrow[n] = a->v + j * Dv;
        if (n == 0) continue; /* nothing allowed: zero gradients */
        /* pass 1: scores (log2 units) and dp, KB keys at a time for every head */
        Py_ssize_t c = 0;
        for (; c + KB <= n; c += KB)
            for (Py_ssize_t h = 0; h < g; h++) {
                dot_rows(w->qrow[h], w->krow + c, D, p + h * cap + c);
                dot_rows(w->grow[h], w->vrow + c, Dv, ds + h * cap + c);
            }
        for (; c < n; c++)
            for (Py_ssize_t h = 0; h < g; h++) {
                p[h * cap + c] = dot(w->qrow[h], w->krow[c], D);
                ds[h * cap + c] = dot(w->grow[h], w->vrow[c], Dv);
            }
        /* probabilities from lse, delta = sum p dp (= dO . O), ds (carrying the scale) */
        for (Py_ssize_t h = 0; h < g; h++) {
            const Py_ssize_t row = h * Lq + i;
            const float lse = a->lse[row];
            const float m = isfinite(lse) ? lse * LOG2E : 0.0f;
            const float gl = a->glse ? a->glse[row] : 0.0f;
            float *ph = p + h * cap, *dsh = ds + h * cap;
            float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
            for (Py_ssize_t t = 0; t < n; t++) {
                ph[t] = exp2_poly(ph[t] * sl2 - m);
                delta += ph[t] * dsh[t];
            }
#pragma omp simd
            for (Py_ssize_t t = 0; t < n; t++) dsh[t] = ph[t] * (dsh[t] - delta + gl) * a->scale;
        }
        /* pass 2: dq[h] += ds[h, c] k[c] over chunks of keys (hot in L1 across the heads);
         * dk[c] += ds[:, c] q, dv[c] += p[:, c] dO over the heads */
        for (Py_ssize_t c0 = 0; c0 < n; c0 += 16) {
            const Py_ssize_t m = n - c0 < 16 ? n - c0 : 16;
            for (Py_ssize_t h = 0; h < g; h++)
                gemv_rows(w->dqrow[h], ds + h * cap + c0, w->krow + c0, m, D);
        }
        for (c = 0; c < n; c++) {
            float *dkc = a->dk + (w->krow[c] - a->k), *dvc = a->dv + (w->vrow[c] - a->v);
            for (Py_ssize_t h = 0; h < g; h++) col[h] = ds[h * cap + c];
            gemv_rows(dkc, col, w->qrow, g, D);
            for (Py_ssize_t h = 0; h < g; h++) col[h] = p[h * cap + c];
            gemv_rows(dvc, col, (const float *const *)w->grow, g, Dv);
        }
    }
}

static void backward_base(const problem *a, Py_ssize_t i0, Py_ssize_t i1, const scratch *w) {
    backward_rows(a, i0, i1, w);
}

#if FAST_BUILD
FAST static void backward_fast(const problem *a, Py_ssize_t i0, Py_ssize_t i1,
                               const scratch *w) {
    backward_rows(a, i0, i1, w);
}
#endif

/* ---- buffers ------------------------------------------------------------------------- */

PyDoc_STRVAR(attention_backward_doc,
"attention_backward(q, k, v, lse, grad_out, grad_lse, indices, dq, dk, dv, i0, i1,\n"
"                   block_size, window, causal, scale) -> None\n\n"
"Gradients of sparse_attention for query rows [i0, i1) of one (batch, kv head), float32,\n"
"C-contiguous: q [g, Lq, D], k [Lk, D], v [Lk, Dv], lse [g, Lq], grad_out [g, Lq, Dv],\n"
"grad_lse [g, Lq] or None, indices int64 [Lq, n] (each row ascending, -1 = none) or None\n"
"(no selection). Writes dq [g, Lq, D] rows i0..i1; adds into dk [Lk, D] and dv [Lk, Dv].");

static PyObject *attention_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[10];
    Py_ssize_t i0, i1, bs, window;
    int causal;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOnnnnpd", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6], &o[7], &o[8], &o[9], &i0, &i1, &bs, &window, &causal, &scale))
        return NULL;
    static const char *names[] = {"q", "k", "v", "lse", "grad_out", "grad_lse", "indices",
                                  "dq", "dk", "dv"};
    static const int ndims[] = {3, 2, 2, 2, 3, 2, 2, 3, 2, 2};
    Py_buffer views[10];
    Py_ssize_t shapes[10][3];
    int held[10] = {0};
    PyObject *result = NULL;
    for (int n = 0; n < 10; n++) {
        if (o[n] == Py_None && (n == 5 || n == 6)) continue;
        if (get_buffer(o[n], &views[n], ndims[n], n == 6 ? 8 : 4, n >= 7, names[n]) < 0)
            goto done;
        held[n] = 1;
        for (int d = 0; d < ndims[n]; d++) shapes[n][d] = views[n].shape[d];
    }
    problem a = {0};
    a.g = shapes[0][0], a.Lq = shapes[0][1], a.D = shapes[0][2];
    a.Lk = shapes[1][0], a.Dv = shapes[2][1];
    a.n_idx = held[6] ? shapes[6][1] : 0;
    int ok = shapes[1][1] == a.D && shapes[2][0] == a.Lk && shapes[3][0] == a.g &&
             shapes[3][1] == a.Lq && shapes[4][0] == a.g && shapes[4][1] == a.Lq &&
             shapes[4][2] == a.Dv && memcmp(shapes[7], shapes[0], sizeof shapes[0]) == 0 &&
             memcmp(shapes[8], shapes[1], 2 * sizeof(Py_ssize_t)) == 0 &&
             memcmp(shapes[9], shapes[2], 2 * sizeof(Py_ssize_t)) == 0 &&
             (!held[5] || memcmp(shapes[5], shapes[3], 2 * sizeof(Py_ssize_t)) == 0) &&
             (!held[6] || shapes[6][0] == a.Lq) && 0 <= i0 && i0 <= i1 && i1 <= a.Lq &&
             bs >= 1 && window >= 0;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "attention_backward: shapes, rows or options disagree");
        goto done;
    }
    a.q = views[0].buf, a.k = views[1].buf, a.v = views[2].buf, a.lse = views[3].buf;
    a.go = views[4].buf, a.glse = held[5] ? views[5].buf : NULL;
    a.idx = held[6] ? views[6].buf : NULL;
    a.dq = views[7].buf, a.dk = views[8].buf, a.dv = views[9].buf;
    a.bs = bs, a.window = window, a.causal = causal, a.scale = (float)scale;
    /* the most keys a row may be allowed: its window and selected blocks, or all of them */
    Py_ssize_t cap = a.Lk;
    if (a.idx || a.window) {
        Py_ssize_t most = 2 * a.window + a.n_idx * bs;
        cap = most < a.Lk ? most : a.Lk;
    }
    if (cap < 1) cap = 1;
    const Py_ssize_t nr = 1 + 2 * a.n_idx, g = a.g ? a.g : 1;
    scratch w = {.cap = cap};
    w.p = malloc((size_t)(2 * g * cap + g) * sizeof(float));
    w.krow = malloc((size_t)(2 * cap + 3 * g) * sizeof(float *));
    w.lo = malloc((size_t)(2 * nr) * sizeof(Py_ssize_t));
    if (!w.p || !w.krow || !w.lo) {
        free(w.p), free(w.krow), free(w.lo);
        PyErr_NoMemory();
        goto done;
    }
    w.ds = w.p + g * cap, w.col = w.ds + g * cap;
    w.vrow = w.krow + cap, w.qrow = w.vrow + cap, w.grow = w.qrow + g;
    w.dqrow = (float **)(w.grow + g);
    w.hi = w.lo + nr;
    Py_BEGIN_ALLOW_THREADS
#if FAST_BUILD
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        backward_fast(&a, i0, i1, &w);
    else
#endif
        backward_base(&a, i0, i1, &w);
    Py_END_ALLOW_THREADS
    free(w.p), free(w.krow), free(w.lo);
    result = Py_NewRef(Py_None);
done:
    for (int n = 0; n < 10; n++)
        if (held[n]) PyBuffer_Release(&views[n]);
    return result;
}

static PyMethodDef methods[] = {
    {"attention_backward", attention_backward, METH_VARARGS, attention_backward_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dshal.backends.numpy._backward",
    "The compiled backward of sparse_attention (see _backward.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__backward(void) { return PyModule_Create(&module); }
