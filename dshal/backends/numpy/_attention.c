/* dshal.backends.numpy._attention: the compiled float32 attention of the numpy backend, its
 * forward (DESIGN 3.1) and its backward (DESIGN 3.1b).
 *
 * Both are key-major: they walk the key blocks of one (batch, kv head) and, for each block,
 * the query rows allowed keys of it (the rows whose selection holds it: its visible keys; the
 * rows whose window reaches it: the part inside the window; dense attention: every row that
 * sees it), in ascending row order, in batches of rows that share their key range. The block's
 * keys and values (and, backward, their gradients) stay in cache while its rows pass, and each
 * batch is a few small register-tiled products (_attention_tiles.h). Keys a row is not allowed
 * never enter its results: their NaN/Inf reach nothing. No Lq x Lk buffer exists.
 *
 * Forward, per row h (a query head of the kv head) and block, an online softmax in base 2:
 *   s[h, j] = scale * log2(e) * q[h] . k[j],  m' = max(m, max_j s),  a = 2**(m - m')
 *   p = 2**(s - m'),  l = a l + sum_j p,  o = a o + sum_j p v[j]
 * (a row's blocks come in ascending order); the caller divides o by l and takes
 * lse = (m + log2 l) ln 2. Rows whose scores so far are all -inf add nothing (their NaN
 * scores still do), so a row's first finite score starts its sums.
 *
 * Backward (FlashAttention-2 style), per row h and block, probabilities recomputed from the
 * forward's log-sum-exp:
 *   p[h, j]  = 2**(s[h, j] - lse[h] * log2(e))
 *   dp[h, j] = grad_out[h] . v[j]
 *   ds[h, j] = p * (dp - delta[h] + grad_lse[h]),  delta[h] = grad_out[h] . out[h] (given)
 *   dq[h] += scale * sum_j ds k[j];  dk[j] += scale * sum_h ds q[h];  dv[j] += sum_h p dO[h]
 * One backward call serves key blocks [b0, b1): it adds the whole gradient of those blocks'
 * keys into dk and dv (no other call touches those rows) and their part of dq into the dq
 * given (the caller gives each concurrent call of a kv head its own and sums them in a fixed
 * order). A forward call serves a range of query rows (all key blocks), so its rows' results
 * do not depend on how the caller splits them.
 *
 * Everything is float32 (the Python side converts fp16/bf16 inputs; float64 is not served
 * here). The GIL is released while a call runs, so the backend's thread pool runs calls in
 * parallel. Compiled with -ffp-contract=fast (FMAs) and OpenMP SIMD; on x86-64 the tiles are
 * built for a baseline, AVX2 + FMA and AVX-512, one picked for the CPU at load.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


/* The tiles (_attention_tiles.h) are built for a baseline and, on x86-64 with GCC or Clang,
 * for AVX2 + FMA and AVX-512, one of which is picked for the CPU at run time. */
#if defined(__x86_64__) && defined(__GNUC__)
#define X86_BUILDS 1
#define INLINE static inline __attribute__((always_inline))
#else
#define X86_BUILDS 0
#define INLINE static inline
#endif
#define EXP2_INLINE INLINE
#include "_exp2.h"
#include "_buffer.h"

#define LOG2E 1.4426950408889634f

/* One (batch, kv head) of a call: C-contiguous float32 views. Query row i sits at key
 * position i + pos0 (pos0 = Lk - Lq for a whole call; a forward over a range of rows passes
 * the range's first position). */
typedef struct {
    const float *q, *k, *v;                   /* [g,Lq,D] [Lk,D] [Lk,Dv] */
    const int64_t *idx;                       /* [Lq, n_idx], rows ascending; or NULL */
    const uint8_t *sel;                       /* or [Lq, n_blocks], 1 = selected; or NULL */
    /* backward */
    const float *lse, *delta, *go, *glse;     /* [g,Lq] [g,Lq] [g,Lq,Dv] [g,Lq] */
    float *dq, *dk, *dv;                      /* [g,Lq,D] [Lk,D] [Lk,Dv] added into */
    /* forward */
    float *o, *m, *l;                         /* [g,Lq,Dv] [g,Lq] [g,Lq] online state */
    Py_ssize_t g, Lq, Lk, D, Dv, n_idx, bs, window, pos0;
    int causal, dense;                        /* dense: no selection and no window */
    float scale;
} problem;

/* The keys query row i may see: [0, vis) (causal: up to its position p = i + pos0). */
INLINE Py_ssize_t visible(const problem *a, Py_ssize_t i) {
    const Py_ssize_t p = i + a->pos0;
    return a->causal ? (p + 1 < a->Lk ? p + 1 : a->Lk) : a->Lk;
}

/* Row i's window [lo, hi) (empty when there is none), within its visible keys. */
INLINE void window_of(const problem *a, Py_ssize_t i, Py_ssize_t *lo, Py_ssize_t *hi) {
    const Py_ssize_t p = i + a->pos0, vis = visible(a, i);
    *lo = p - a->window + 1 > 0 ? p - a->window + 1 : 0;
    *hi = p + a->window < vis ? p + a->window : vis;
    if (!a->window || *hi <= *lo) *lo = *hi = 0;
}

/* Which rows selected which blocks of [b0, b1): per block (relative to b0) the rows in
 * ascending order, rows[start[b] .. start[b + 1]); from the indices (a row's duplicates and -1
 * entries skipped; each index row is ascending) or the selection matrix. 0, or -1 when out of
 * memory. */
typedef struct {
    Py_ssize_t *start;
    int32_t *rows;
} row_lists;

/* Runs STMT for each row i and each block b of [b0, b1) the row selected. */
#define FOR_EACH_SELECTED(a, b0, b1, STMT)                                                   \
    for (Py_ssize_t i = 0; i < (a)->Lq; i++) {                                              \
        if ((a)->sel) {                                                                     \
            const uint8_t *row = (a)->sel + i * (a)->n_idx;                                 \
            for (Py_ssize_t b = (b0); b < (b1); b++)                                        \
                if (row[b]) { STMT; }                                                       \
        } else {                                                                            \
            const int64_t *row = (a)->idx + i * (a)->n_idx;                                 \
            int64_t prev = -1;                                                              \
            for (Py_ssize_t c = 0; c < (a)->n_idx; c++) {                                   \
                const int64_t b = row[c];                                                   \
                if (b < (b0) || b == prev) continue;                                        \
                prev = b;                                                                   \
                if (b >= (b1)) break;                                                       \
                STMT;                                                                       \
            }                                                                               \
        }                                                                                   \
    }

static int build_row_lists(const problem *a, Py_ssize_t b0, Py_ssize_t b1, row_lists *out) {
    const Py_ssize_t nb = b1 - b0;
    out->start = calloc((size_t)nb + 1, sizeof(Py_ssize_t));
    out->rows = NULL;
    if (!out->start) return -1;
    FOR_EACH_SELECTED(a, b0, b1, out->start[b - b0 + 1]++)
    for (Py_ssize_t b = 0; b < nb; b++) out->start[b + 1] += out->start[b];
    Py_ssize_t *fill = malloc(((size_t)nb + 1) * sizeof(Py_ssize_t));
    out->rows = malloc(((size_t)out->start[nb] + 1) * sizeof(int32_t));
    if (!fill || !out->rows) return free(fill), -1;
    memcpy(fill, out->start, (size_t)nb * sizeof(Py_ssize_t));
    FOR_EACH_SELECTED(a, b0, b1, out->rows[fill[b - b0]++] = (int32_t)i)
    free(fill);
    return 0;
}

static void free_row_lists(row_lists *l) { free(l->start), free(l->rows); }

INLINE Py_ssize_t round_up(Py_ssize_t n, Py_ssize_t m) { return (n + m - 1) / m * m; }

/* The query rows that meet key block kb, in ascending order, each with the keys [lo, hi) of
 * the block it is allowed: a row whose selection holds the block sees the block's visible
 * keys; a row whose window reaches it, the part inside the window; under dense attention
 * every row sees the block's visible keys. */
typedef struct {
    const int32_t *list;   /* the rows that selected the block */
    Py_ssize_t ns, s;      /* their count, the next one */
    Py_ssize_t dense_row;  /* dense attention: the next row (Lq: none) */
    Py_ssize_t wi, wb;     /* rows [wi, wb) may have the block in their window */
    Py_ssize_t j0, j1;     /* the block's keys */
} row_walk;

INLINE void walk_start(row_walk *r, const problem *a, Py_ssize_t kb, Py_ssize_t b0,
                       const row_lists *sel) {
    const Py_ssize_t shift = a->pos0;
    r->j0 = kb * a->bs, r->j1 = r->j0 + a->bs < a->Lk ? r->j0 + a->bs : a->Lk;
    r->wi = r->wb = 0;
    if (a->window) { /* positions p with p - window + 1 < j1 and p + window > j0 */
        const Py_ssize_t wa = (a->causal ? r->j0 : r->j0 - a->window + 1) - shift;
        const Py_ssize_t wb = r->j1 + a->window - 1 - shift;
        r->wi = wa < 0 ? 0 : wa, r->wb = wb < a->Lq ? wb : a->Lq;
    }
    r->list = NULL, r->ns = r->s = 0, r->dense_row = a->Lq;
    if (a->dense)
        r->dense_row = a->causal ? (r->j0 - shift > 0 ? r->j0 - shift : 0) : 0;
    else if (a->idx || a->sel)
        r->list = sel->rows + sel->start[kb - b0],
        r->ns = sel->start[kb - b0 + 1] - sel->start[kb - b0];
}

/* The next row meeting the block with a non-empty key range: 1, or 0 when there is none. */
INLINE int walk_next(row_walk *r, const problem *a, Py_ssize_t *i, Py_ssize_t *lo,
                     Py_ssize_t *hi) {
    const Py_ssize_t far = a->Lq;
    for (;;) {
        const Py_ssize_t next_sel = a->dense ? r->dense_row : r->s < r->ns ? r->list[r->s] : far;
        const Py_ssize_t next_win = r->wi < r->wb ? r->wi : far;
        const Py_ssize_t row = next_sel < next_win ? next_sel : next_win;
        if (row >= far) return 0;
        const int selected = row == next_sel;
        if (selected) {
            if (a->dense) r->dense_row++;
            else r->s++;
        }
        if (row == next_win) r->wi++;
        if (selected) {
            const Py_ssize_t vis = visible(a, row);
            *lo = r->j0, *hi = r->j1 < vis ? r->j1 : vis;
        } else {
            Py_ssize_t wlo, whi;
            window_of(a, row, &wlo, &whi);
            *lo = wlo > r->j0 ? wlo : r->j0, *hi = whi < r->j1 ? whi : r->j1;
        }
        if (*hi > *lo) return *i = row, 1;
    }
}

/* Query rows run together against a block: they share their key range [c0, c1) (relative
 * to the block's first key). */
typedef struct {
    const Py_ssize_t *rows;
    Py_ssize_t n, c0, c1;
} batch;

/* A call's scratch (see _attention_tiles.h for the layouts): the prepared block, a batch's
 * packed rows and products, the block's gradients. */
typedef struct {
    float *Kp, *KT, *VT, *Vp, *Qb, *Gb, *S, *dP, *dQb, *dKp, *dVp;
    float *mlse, *shift; /* per batch row: backward lse (log2 units) and delta - grad_lse;
                            the forward's rescale factors use shift */
    Py_ssize_t *meet_row, *meet_c0, *meet_c1; /* the rows meeting a block, their key ranges */
    Py_ssize_t Dp, Dvp, Np, max_rows;
} block;

/* Copies the block's nk keys from key j0 into the layouts a direction reads (zero padded):
 * KT and Vp for the forward; Kp, KT and VT for the backward, which also zeroes dKp and dVp. */
INLINE void prepare_block(const problem *a, Py_ssize_t j0, Py_ssize_t nk, const block *w,
                          int forward) {
    const Py_ssize_t D = a->D, Dv = a->Dv, Dp = w->Dp, Dvp = w->Dvp, Np = w->Np;
    memset(w->KT, 0, (size_t)(Dp * Np) * 4);
    if (forward) {
        memset(w->Vp, 0, (size_t)(Np * Dvp) * 4);
    } else {
        memset(w->Kp, 0, (size_t)(Np * Dp) * 4), memset(w->VT, 0, (size_t)(Dvp * Np) * 4);
        memset(w->dKp, 0, (size_t)(Np * Dp) * 4), memset(w->dVp, 0, (size_t)(Np * Dvp) * 4);
    }
    for (Py_ssize_t j = 0; j < nk; j++) {
        const float *kj = a->k + (j0 + j) * D, *vj = a->v + (j0 + j) * Dv;
        for (Py_ssize_t d = 0; d < D; d++) w->KT[d * Np + j] = kj[d];
        if (forward) {
            memcpy(w->Vp + j * Dvp, vj, (size_t)Dv * 4);
        } else {
            memcpy(w->Kp + j * Dp, kj, (size_t)D * 4);
            for (Py_ssize_t d = 0; d < Dv; d++) w->VT[d * Np + j] = vj[d];
        }
    }
}

/* Asks the cache for the rows a batch reads and writes (q, and o or grad_out and dq). */
INLINE void prefetch_rows(const problem *a, const Py_ssize_t *rows, Py_ssize_t n, int forward) {
#if defined(__GNUC__)
    for (Py_ssize_t r = 0; r < n; r++)
        for (Py_ssize_t h = 0; h < a->g; h++) {
            const Py_ssize_t row = h * a->Lq + rows[r];
            for (Py_ssize_t d = 0; d < a->D; d += 16) __builtin_prefetch(a->q + row * a->D + d);
            for (Py_ssize_t d = 0; d < a->Dv; d += 16) {
                if (forward) {
                    __builtin_prefetch(a->o + row * a->Dv + d, 1);
                } else {
                    __builtin_prefetch(a->go + row * a->Dv + d);
                }
            }
            if (!forward)
                for (Py_ssize_t d = 0; d < a->D; d += 16)
                    __builtin_prefetch(a->dq + row * a->D + d, 1);
        }
#else
    (void)a, (void)rows, (void)n, (void)forward;
#endif
}

/* Adds the block's gradients into dk and dv. */
INLINE void finish_block(const problem *a, Py_ssize_t j0, Py_ssize_t nk, const block *w) {
    for (Py_ssize_t j = 0; j < nk; j++) {
        float *dk = a->dk + (j0 + j) * a->D, *dv = a->dv + (j0 + j) * a->Dv;
        const float *gk = w->dKp + j * w->Dp, *gv = w->dVp + j * w->Dvp;
        for (Py_ssize_t d = 0; d < a->D; d++) dk[d] += gk[d];
        for (Py_ssize_t d = 0; d < a->Dv; d++) dv[d] += gv[d];
    }
}

/* ---- the tiles, per instruction set -------------------------------------------------- */

/* Which build runs: the best the CPU has, or the one asked for. */
enum { ISA_BASE, ISA_AVX2, ISA_AVX512, N_ISA };
static const char *const ISA_NAMES[N_ISA] = {"baseline", "avx2", "avx512"};

/* Tile sizes: accumulators fill about half the vector registers. */
typedef struct {
    int vw, tm, tj, tq, td;
} tiling;

#define ISA_NAME(x) x##_base
#define ISA_ATTR
#if defined(__GNUC__)
#define VW 8 /* SSE pairs on x86-64, NEON pairs on arm64 */
#else
#define VW 1
#endif
#define TM 4
#define TJ 2
#define TD 2
#define TQ 4
#define TR 4
#include "_attention_tiles.h"

#if X86_BUILDS
#define ISA_NAME(x) x##_avx2
#define ISA_ATTR __attribute__((target("avx2,fma")))
#define VW 8
#define TM 4
#define TJ 2
#define TD 2
#define TQ 4
#define TR 4
#include "_attention_tiles.h"

#define ISA_NAME(x) x##_avx512
#define ISA_ATTR __attribute__((target("avx512f,avx512vl,fma")))
#define VW 16
#define TM 4
#define TJ 4
#define TD 2
#define TQ 8
#define TR 8
#include "_attention_tiles.h"
#endif

/* The builds this CPU runs, best last. */
static int isa_supported(int isa) {
    switch (isa) {
    case ISA_BASE: return 1;
#if X86_BUILDS
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_AVX512: return __builtin_cpu_supports("avx512f") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#endif
    default: return 0;
    }
}

static int best_isa(void) {
    for (int isa = N_ISA - 1; isa > 0; isa--)
        if (isa_supported(isa)) return isa;
    return ISA_BASE;
}

static tiling tiling_of(int isa) {
#if X86_BUILDS
    if (isa == ISA_AVX512) return tiling_avx512;
    if (isa == ISA_AVX2) return tiling_avx2;
#endif
    (void)isa;
    return tiling_base;
}

static void run_isa(int isa, const problem *a, Py_ssize_t b0, Py_ssize_t b1,
                    const row_lists *l, const block *w, int forward) {
#if X86_BUILDS
    if (isa == ISA_AVX512) return walk_blocks_avx512(a, b0, b1, l, w, forward);
    if (isa == ISA_AVX2) return walk_blocks_avx2(a, b0, b1, l, w, forward);
#endif
    (void)isa;
    walk_blocks_base(a, b0, b1, l, w, forward);
}

/* Rows per batch: about 32 (query row, head) rows, at least one query row. */
enum { BATCH_HEAD_ROWS = 32 };

/* Allocates the scratch of `a` for the build `t` (one block). 0, or -1 out of memory. */
static int block_alloc(const problem *a, tiling t, block *w) {
    const Py_ssize_t mult = (Py_ssize_t)t.vw * t.td;
    const Py_ssize_t g = a->g ? a->g : 1;
    w->Dp = round_up(a->D ? a->D : 1, mult), w->Dvp = round_up(a->Dv ? a->Dv : 1, mult);
    w->Np = round_up(a->bs, (Py_ssize_t)t.vw * t.tj);
    w->max_rows = BATCH_HEAD_ROWS / g > 1 ? BATCH_HEAD_ROWS / g : 1;
    const Py_ssize_t Mp = round_up(w->max_rows * g, t.tm > t.tq ? t.tm : t.tq);
    const Py_ssize_t Dp = w->Dp, Dvp = w->Dvp, Np = w->Np;
    const Py_ssize_t sizes[] = {Np * Dp, Dp * Np, Dvp * Np, Np * Dvp, Mp * Dp, Mp * Dvp, Mp * Np,
                                Mp * Np, Mp * (Dp > Dvp ? Dp : Dvp), Np * Dp, Np * Dvp, Mp, Mp};
    Py_ssize_t total = 0;
    for (size_t n = 0; n < sizeof sizes / sizeof *sizes; n++) total += sizes[n];
    float *base = malloc((size_t)total * sizeof(float));
    w->meet_row = malloc((size_t)(3 * (a->Lq ? a->Lq : 1)) * sizeof(Py_ssize_t));
    if (!base || !w->meet_row)
        return free(base), free(w->meet_row), w->meet_row = NULL, w->Kp = NULL, -1;
    w->meet_c0 = w->meet_row + a->Lq, w->meet_c1 = w->meet_c0 + a->Lq;
    float **parts[] = {&w->Kp, &w->KT, &w->VT, &w->Vp, &w->Qb, &w->Gb, &w->S, &w->dP,
                       &w->dQb, &w->dKp, &w->dVp, &w->mlse, &w->shift};
    for (size_t n = 0; n < sizeof sizes / sizeof *sizes; n++) *parts[n] = base, base += sizes[n];
    return 0;
}

static void block_free(block *w) { free(w->Kp), free(w->meet_row); }

/* Runs key blocks [b0, b1) of `a` (forward or backward) on build `isa` (-1: the best) with the
 * GIL released. 0, or -1 with the error set. */
static int run_problem(problem *a, Py_ssize_t b0, Py_ssize_t b1, int isa, int forward,
                       const char *name) {
    if (isa < 0) isa = best_isa();
    if (isa >= N_ISA || !isa_supported(isa)) {
        PyErr_Format(PyExc_ValueError, "%s: isa %d is not built or not supported by this CPU",
                     name, isa);
        return -1;
    }
    a->dense = !a->idx && !a->sel && !a->window;
    block w = {0};
    row_lists lists = {0};
    if (block_alloc(a, tiling_of(isa), &w) < 0 ||
        ((a->idx || a->sel) && build_row_lists(a, b0, b1, &lists) < 0)) {
        block_free(&w), free_row_lists(&lists);
        PyErr_NoMemory();
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    run_isa(isa, a, b0, b1, &lists, &w, forward);
    Py_END_ALLOW_THREADS
    block_free(&w), free_row_lists(&lists);
    return 0;
}

/* ---- the module ---------------------------------------------------------------------- */

/* The n array arguments o[]: C-contiguous, ndims[i]-D, of float32 items or (index `wide`)
 * `wide_size`-byte ones; from `first_out` on writable; None allowed where bit i of `optional`
 * is set. Fills views, shapes and held (1 = a view to release). 0, or -1 with the error set. */
static int hold_buffers(PyObject *const *o, int n, const char *const *names, const int *ndims,
                        int wide, Py_ssize_t wide_size, int first_out, unsigned optional,
                        Py_buffer *views, Py_ssize_t (*shapes)[3], int *held) {
    for (int i = 0; i < n; i++) {
        if (o[i] == Py_None && (optional >> i & 1u)) continue;
        if (get_buffer(o[i], &views[i], ndims[i], i == wide ? wide_size : 4, i >= first_out,
                       names[i]) < 0)
            return -1;
        held[i] = 1;
        for (int d = 0; d < ndims[i]; d++) shapes[i][d] = views[i].shape[d];
    }
    return 0;
}

PyDoc_STRVAR(attention_backward_doc,
"attention_backward(q, k, v, lse, delta, grad_out, grad_lse, indices, dq, dk, dv, b0, b1,\n"
"                   block_size, window, causal, scale, isa=-1) -> None\n\n"
"Gradients of sparse_attention from key blocks [b0, b1) of one (batch, kv head), float32,\n"
"C-contiguous: q [g, Lq, D], k [Lk, D], v [Lk, Dv], lse and delta (rowsum(grad_out * out))\n"
"[g, Lq], grad_out [g, Lq, Dv], grad_lse [g, Lq] or None, indices int64 [Lq, n] (each row\n"
"ascending, -1 = none) or None (no selection). Adds into dq [g, Lq, D] the blocks' part and\n"
"into dk [Lk, D] and dv [Lk, Dv] the blocks' rows (their whole gradient). isa picks the\n"
"build (an index of ISAS; -1: the best this CPU runs, BEST).");

static PyObject *attention_backward(PyObject *self, PyObject *args) {
    (void)self;
    enum { NARR = 11, GLSE = 6, IDX = 7, OUT0 = 8 };
    PyObject *o[NARR];
    Py_ssize_t b0, b1, bs, window;
    int causal, isa = -1;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOnnnnpd|i", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &b0, &b1, &bs, &window,
                          &causal, &scale, &isa))
        return NULL;
    static const char *names[] = {"q", "k", "v", "lse", "delta", "grad_out", "grad_lse",
                                  "indices", "dq", "dk", "dv"};
    static const int ndims[] = {3, 2, 2, 2, 2, 3, 2, 2, 3, 2, 2};
    Py_buffer views[NARR];
    Py_ssize_t shapes[NARR][3];
    int held[NARR] = {0};
    PyObject *result = NULL;
    if (hold_buffers(o, NARR, names, ndims, IDX, 8, OUT0, 1u << GLSE | 1u << IDX, views, shapes,
                     held) < 0)
        goto done;
    problem a = {0};
    a.g = shapes[0][0], a.Lq = shapes[0][1], a.D = shapes[0][2];
    a.Lk = shapes[1][0], a.Dv = shapes[2][1];
    a.n_idx = held[IDX] ? shapes[IDX][1] : 0;
    const size_t two = 2 * sizeof(Py_ssize_t);
    int ok = shapes[1][1] == a.D && shapes[2][0] == a.Lk && shapes[3][0] == a.g &&
             shapes[3][1] == a.Lq && memcmp(shapes[4], shapes[3], two) == 0 &&
             shapes[5][0] == a.g && shapes[5][1] == a.Lq && shapes[5][2] == a.Dv &&
             memcmp(shapes[8], shapes[0], sizeof shapes[0]) == 0 &&
             memcmp(shapes[9], shapes[1], two) == 0 && memcmp(shapes[10], shapes[2], two) == 0 &&
             (!held[GLSE] || memcmp(shapes[GLSE], shapes[3], two) == 0) &&
             (!held[IDX] || shapes[IDX][0] == a.Lq) && bs >= 1 && window >= 0 &&
             a.Lq < INT32_MAX;
    const Py_ssize_t n_blocks = (a.Lk + bs - 1) / (bs >= 1 ? bs : 1);
    if (!ok || b0 < 0 || b0 > b1 || b1 > n_blocks) {
        PyErr_SetString(PyExc_ValueError,
                        "attention_backward: shapes, key blocks or options disagree");
        goto done;
    }
    a.q = views[0].buf, a.k = views[1].buf, a.v = views[2].buf, a.lse = views[3].buf;
    a.delta = views[4].buf, a.go = views[5].buf;
    a.glse = held[GLSE] ? views[GLSE].buf : NULL;
    a.idx = held[IDX] ? views[IDX].buf : NULL;
    a.dq = views[8].buf, a.dk = views[9].buf, a.dv = views[10].buf;
    a.bs = bs, a.window = window, a.causal = causal, a.scale = (float)scale;
    a.pos0 = a.Lk - a.Lq;
    if (run_problem(&a, b0, b1, isa, 0, "attention_backward") < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    for (int n = 0; n < NARR; n++)
        if (held[n]) PyBuffer_Release(&views[n]);
    return result;
}

PyDoc_STRVAR(attention_forward_doc,
"attention_forward(q, k, v, selected, o, m, l, pos0, block_size, window, causal, scale,\n"
"                  isa=-1) -> None\n\n"
"The online-softmax sums of sparse_attention for the query rows of q of one (batch, kv\n"
"head), float32, C-contiguous: q [g, n, D] (row i at key position pos0 + i), k [Lk, D],\n"
"v [Lk, Dv], selected uint8 [n, n_blocks] (1 = the row selected the block) or None (no\n"
"selection: window, or dense attention without one). Updates o [g, n, Dv] (sum of p v), m\n"
"[g, n] (the max score, log2 units) and l [g, n] (sum of p), which start as 0, -inf, 0: out\n"
"is o / l and lse (m + log2 l) ln 2. isa as for attention_backward.");

static PyObject *attention_forward(PyObject *self, PyObject *args) {
    (void)self;
    enum { NARR = 7, SEL = 3, OUT0 = 4 };
    PyObject *o[NARR];
    Py_ssize_t pos0, bs, window;
    int causal, isa = -1;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOOOnnnpd|i", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6], &pos0, &bs, &window, &causal, &scale, &isa))
        return NULL;
    static const char *names[] = {"q", "k", "v", "selected", "o", "m", "l"};
    static const int ndims[] = {3, 2, 2, 2, 3, 2, 2};
    Py_buffer views[NARR];
    Py_ssize_t shapes[NARR][3];
    int held[NARR] = {0};
    PyObject *result = NULL;
    if (hold_buffers(o, NARR, names, ndims, SEL, 1, OUT0, 1u << SEL, views, shapes, held) < 0)
        goto done;
    problem a = {0};
    a.g = shapes[0][0], a.Lq = shapes[0][1], a.D = shapes[0][2];
    a.Lk = shapes[1][0], a.Dv = shapes[2][1];
    const Py_ssize_t n_blocks = (a.Lk + bs - 1) / (bs >= 1 ? bs : 1);
    const size_t two = 2 * sizeof(Py_ssize_t);
    const int ok = shapes[1][1] == a.D && shapes[2][0] == a.Lk && shapes[4][0] == a.g &&
                   shapes[4][1] == a.Lq && shapes[4][2] == a.Dv && shapes[5][0] == a.g &&
                   shapes[5][1] == a.Lq && memcmp(shapes[6], shapes[5], two) == 0 &&
                   (!held[SEL] || (shapes[SEL][0] == a.Lq && shapes[SEL][1] == n_blocks)) &&
                   bs >= 1 && window >= 0 && a.Lq < INT32_MAX;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "attention_forward: shapes or options disagree");
        goto done;
    }
    a.q = views[0].buf, a.k = views[1].buf, a.v = views[2].buf;
    a.sel = held[SEL] ? views[SEL].buf : NULL, a.n_idx = held[SEL] ? n_blocks : 0;
    a.o = views[4].buf, a.m = views[5].buf, a.l = views[6].buf;
    a.bs = bs, a.window = window, a.causal = causal, a.scale = (float)scale, a.pos0 = pos0;
    if (run_problem(&a, 0, n_blocks, isa, 1, "attention_forward") < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    for (int n = 0; n < NARR; n++)
        if (held[n]) PyBuffer_Release(&views[n]);
    return result;
}

static PyMethodDef methods[] = {
    {"attention_forward", attention_forward, METH_VARARGS, attention_forward_doc},
    {"attention_backward", attention_backward, METH_VARARGS, attention_backward_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dshal.backends.numpy._attention",
    "The compiled float32 attention of the numpy backend (see _attention.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__attention(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *names = PyTuple_New(N_ISA);
    for (int isa = 0; names && isa < N_ISA; isa++)
        PyTuple_SET_ITEM(names, isa, PyUnicode_FromString(ISA_NAMES[isa]));
    PyObject *runs = PyList_New(0);
    for (int isa = 0; runs && names && isa < N_ISA; isa++)
        if (isa_supported(isa) && PyList_Append(runs, PyTuple_GET_ITEM(names, isa)) < 0)
            Py_CLEAR(runs);
    PyObject *supported = runs ? PyList_AsTuple(runs) : NULL;
    Py_XDECREF(runs);
    if (!names || !supported || PyModule_AddObjectRef(m, "ISAS", names) < 0 ||
        PyModule_AddObjectRef(m, "SUPPORTED", supported) < 0 ||
        PyModule_AddIntConstant(m, "BEST", best_isa()) < 0) {
        Py_XDECREF(names), Py_XDECREF(supported), Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(names), Py_DECREF(supported);
    return m;
}
