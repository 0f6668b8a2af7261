"""Block-sparse attention on the CPU: selected key blocks plus a banded sliding window.

No Lq x Lk matrix is ever formed when ``top_k``/``indices`` or ``window`` restrict the keys
(MoBA-style). The queries of each (batch, kv head) are cut into ranges, the units of work. Per
range, the selection (1. below) runs in numpy; the attention itself runs, for float32 (and
float16/bfloat16, computed in float32), in the compiled tiles of ``_attention.c`` where they are
built (key-major: per key block, the range's rows allowed keys of it, in batches sharing a key
range, each row's online softmax taken in the block's keys in ascending block order; a row's
result does not depend on how the rows are cut into ranges), and otherwise (float64, or the
extension not built) in the numpy passes 2. and 3.:

1. **Selection** (``top_k``): the ``n x n_blocks`` matrix of scores
   ``scale * (sum of the group's query heads) . mean(key block)`` (block means in float64,
   the product in the compute dtype: float32, or float64 for float64 inputs), the candidates
   (other blocks whose keys are all visible), a per-row top-k by a sort and a threshold (ties to
   the lower block index, non-finite scores last), plus the forced own block.
2. **Band pass**: the sliding window (or dense attention when nothing is selected) over query
   tiles: a tile of T queries (all g heads of the group stacked) against the keys any of them
   may see, ``T x (T + window - 1)`` for a causal window, in key chunks for dense rows.
3. **Block pass**: for each key block, the queries that selected it are gathered and scored
   against the block with one BLAS call; keys the band pass covered (the window) or that are
   not visible are masked only in the few rows where the block is partial, so no key is counted
   twice.

Both passes fold their products into per-query state with an online softmax in float32
(float64 for float64 inputs), in base 2 (``exp2`` was 2.5x faster than ``exp`` in numpy; in
float32 the compiled loop of :mod:`.native` runs it, within 2 ulp, where numpy's is scalar), that
rescales lazily: scores are shifted by a per-row reference (initially the score of the query's
own position, a key the query is allowed), carried as an extra query column against a column
of ones on the keys so the shift costs no pass, and the values carry a column of ones so the
softmax denominator comes out of the same BLAS call. A row is rescaled to its true max only when
a product's exp-sum exceeds 2**32 or is NaN. Scores so large that float32 cannot resolve the
shift (beyond 2**31 in log2 units) can leave a row with no mass at all; such a unit is rerun
with references taken from computed maxima only, so every row with a finite score holds a term
of exactly 1.

Masked scores become -inf through ``np.where`` (or an added -inf bias when the keys involved are
finite) and non-finite values of masked keys are kept out of the products explicitly, so
NaN/Inf outside a query's allowed set never reach its output.

Threads: BLAS is held to one thread during a call (``threadpoolctl``), and large calls run their
units on a pool of Python threads, one per CPU or ``DSHAL_NUM_THREADS`` (numpy releases the GIL
in its loops and in BLAS). Without ``threadpoolctl`` everything runs on the calling thread with
the BLAS as configured. Results do not depend on which thread runs a unit: reruns are bitwise
equal.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal.backends.numpy import native
from dshal.calls import AttentionCall, resolve_count

#: query rows (queries x heads of the group) per unit of work: bounds the per-unit state
#: (about 260 bytes per row for Dv = 64) and is the grain of threading
_RANGE = 32768
#: rows (query x head) per BLAS product in the block pass
_BLOCK_ROWS = 2048
#: queries per window-band tile, times sqrt(g): balances per-tile overhead (~40 us) against the
#: tile's wasted scores (a tile of T queries computes T + window - 1 keys for each)
_WINDOW_TILE = 96
#: rows and keys per dense product (query tile x key chunk)
_DENSE_ROWS, _DENSE_KEYS = 512, 512
#: query rows per selection-score tile
_SELECT_ROWS = 2048
#: an exp-sum of one product above this means the row's softmax reference must be raised
_LIMIT = 2.0**32
#: below this many score elements (B * Hq * Lq * Lk) a call runs on the calling thread
_THREADING_MIN = 1 << 22

NEG_INF = -np.inf
_LOG2E, _LN2 = float(np.log2(np.e)), float(np.log(2.0))
#: a fraction times a count this little above an integer counts as that integer


def sparse_attention(call: AttentionCall) -> tuple[np.ndarray, np.ndarray | None,
                                                   np.ndarray | None]:
    """Run ``sparse_attention`` (DESIGN 3.1) on numpy arrays; returns ``(out, indices, lse)``."""
    q, k, v = call.q, call.k, call.v
    B, Hq, Lq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    out = np.zeros((B, Hq, Lq, Dv), q.dtype)
    lse = np.full((B, Hq, Lq), NEG_INF, np.float32) if call.return_lse else None
    idx = call.indices
    tasks = [Task(q[b], k[b], v[b], None, None if idx is None else idx[b], out[b],
                  None if lse is None else lse[b]) for b in range(B)]
    picked = run_tasks(call, tasks)
    indices = _pad_indices(picked, B, Hkv, Lq) if call.return_indices else None
    return out, indices, lse


@dataclass(slots=True)
class Task:
    """One independent attention problem (a batch entry, or one sequence of a varlen or paged
    call): q [Hq, Lq, D], k [Hkv, Lk, D], v [Hkv, Lk, Dv], optional block summaries
    [Hkv, n_blocks, D] and caller's indices [Hkv, Lq, n]; results go to the views ``out``
    [Hq, Lq, Dv] and ``lse`` [Hq, Lq]."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    block_keys: np.ndarray | None
    indices: np.ndarray | None
    out: np.ndarray
    lse: np.ndarray | None


def run_tasks(call: AttentionCall, tasks: list[Task]) -> dict[tuple[int, int, int], np.ndarray]:
    """Run every task (the options of ``call`` apply to each) on the units-of-work pool;
    returns the selections by (task, kv head, first query) when ``call.return_indices``."""
    cdt = np.dtype(np.float64 if call.q.dtype == np.float64 else np.float32)
    picked: dict[tuple[int, int, int], np.ndarray] = {}
    size = sum(x.q.shape[0] * x.q.shape[1] * x.k.shape[1] for x in tasks)
    threads = _workers() if size >= _THREADING_MIN else 1
    units = []
    for n, x in enumerate(tasks):
        Hq, Lq = x.q.shape[:2]
        Hkv = x.k.shape[0]
        g = Hq // Hkv if Hkv else 1
        parts = max(-(-Lq * g // _RANGE), -(-threads // max(1, len(tasks) * Hkv)))
        step = max(1, -(-Lq // parts))
        units += [(n, t, qa, min(Lq, qa + step)) for t in range(Hkv) for qa in range(0, Lq, step)]
    cache = _KVCache(call, tasks, cdt, units)

    def work(unit: tuple[int, int, int, int]) -> None:
        with np.errstate(all="ignore"):  # NaN/Inf inputs are legal; they must not warn
            _unit(call, tasks[unit[0]], unit, cache, picked, cdt)

    _parallel(work, units, threads)
    return picked


# --- units of work and threads ----------------------------------------------------------------


def _workers() -> int:
    """Threads to use: ``DSHAL_NUM_THREADS`` or the CPUs this process may run on."""
    env = os.environ.get("DSHAL_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_CONTROLLER: Any = None


def _blas_single_threaded() -> AbstractContextManager | None:
    """A context holding BLAS to one thread while it is open (threadpoolctl), or None when
    that is impossible (threadpoolctl missing, or no BLAS it knows).

    The products here are many and small. A multithreaded BLAS gains little on them, and its
    workers, put to sleep between calls while numpy runs the elementwise work, can cost
    milliseconds per call to wake (measured: a 0.4 s call now and then took 5-10 s). Called
    from several Python threads at once it also oversubscribes the cores. So BLAS runs single
    threaded, and the cores are used by running units of work on parallel Python threads.
    """
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    with _POOL_LOCK:
        if _CONTROLLER is None:
            _CONTROLLER = ThreadpoolController()
        controller = _CONTROLLER
    if not controller.select(user_api="blas").lib_controllers:
        return None
    return controller.limit(limits=1, user_api="blas")


def _parallel(fn, units: list, threads: int, blas: bool = True) -> None:
    """Run ``fn`` on every unit, on a pool of ``threads`` when BLAS can be held to one thread
    meanwhile (else in order: a multithreaded BLAS called from several threads is slower).
    ``blas=False``: ``fn`` makes no BLAS call (a compiled kernel), so the pool runs it without
    holding BLAS (threadpoolctl's limit costs ~0.3 ms a call)."""
    global _POOL
    limit = _blas_single_threaded() if blas else None
    with limit or nullcontext():
        if (blas and limit is None) or threads <= 1 or len(units) <= 1:
            for unit in units:
                fn(unit)
            return
        with _POOL_LOCK:
            if _POOL is None or _POOL._max_workers < threads:
                if _POOL is not None:
                    _POOL.shutdown(wait=False)
                _POOL = ThreadPoolExecutor(threads, thread_name_prefix="dshal-numpy")
            pool = _POOL
        for _ in pool.map(fn, units):
            pass


#: below this many elements an elementwise pipeline (quantize, gates) runs on the calling thread
PARALLEL_MIN = 1 << 21


def parallel_spans(fn: Callable[[int, int], None], n: int, size: int, align: int = 1,
                   minimum: int = PARALLEL_MIN, blas: bool = True) -> None:
    """Call ``fn(a, z)`` on contiguous spans covering ``[0, n)`` (bounds multiples of
    ``align``): one span per thread when the work (``size`` elements) is at least ``minimum``,
    else one span on the calling thread. Spans write disjoint outputs, so results do not depend
    on the threads. ``blas`` as for :func:`_parallel`."""
    threads = _workers() if size >= minimum else 1
    if threads == 1:  # no pool, no BLAS limit to set: small calls pay nothing
        fn(0, n)
        return
    step = -(-max(1, -(-n // threads)) // align) * align
    spans = [(a, min(n, a + step)) for a in range(0, n, step)]
    _parallel(lambda span: fn(*span), spans, threads, blas)


class _KV:
    """Keys and values of one (task, kv head), prepared once for all its query ranges: as
    float32 arrays for the compiled tiles (``compiled``), else as the numpy passes' operands."""

    def __init__(self, call: AttentionCall, task: Task, t: int, cdt: np.dtype) -> None:
        k, v = task.k[t], task.v[t]
        self.lk = k.shape[0]
        self.n_blocks = -(-self.lk // call.block_size)
        self.compiled = native.ATTENTION is not None and cdt == np.float32
        if self.compiled:
            self.k32 = np.ascontiguousarray(k, np.float32)
            self.v32 = np.ascontiguousarray(v, np.float32)
        else:
            self._numpy_operands(k, v, cdt)
        # scale * block means (or the caller's summaries), transposed, for the selection
        # scores (in the compute dtype)
        self.kmean_t = None
        if call.top_k is not None:
            means = _block_means(k, call.block_size) if task.block_keys is None else \
                np.asarray(task.block_keys[t], np.float64)
            self.kmean_t = (means * call.scale).T.astype(cdt)

    def _numpy_operands(self, k: np.ndarray, v: np.ndarray, cdt: np.dtype) -> None:
        d = k.shape[1]
        self.kx = np.empty((self.lk, d + 1), cdt)  # [keys | 1]: the column meets -reference
        self.kx[:, :d] = k
        self.kx[:, d] = 1
        self.kbad = np.concatenate(([0], np.cumsum(~np.isfinite(self.kx).all(axis=1))))
        self.vt = np.asarray(v, dtype=cdt)
        self.vbad = ~np.isfinite(self.vt).all(axis=1)
        self.vx = np.ones((self.lk, v.shape[1] + 1), cdt)  # [values | 1], non-finite zeroed
        self.vx[:, :-1] = np.where(self.vbad[:, None], 0, self.vt) if self.vbad.any() else v


class _KVCache:
    """Builds each (task, kv head)'s :class:`_KV` on first use, drops it after its last unit."""

    def __init__(self, call: AttentionCall, tasks: list[Task], cdt: np.dtype, units: list
                 ) -> None:
        self._call, self._tasks, self._cdt = call, tasks, cdt
        self._left = Counter((b, t) for b, t, _, _ in units)
        self._built: dict[tuple[int, int], _KV] = {}
        self._lock = threading.Lock()

    def get(self, b: int, t: int) -> _KV:
        with self._lock:
            kv = self._built.get((b, t))
            if kv is None:
                kv = self._built[b, t] = _KV(self._call, self._tasks[b], t, self._cdt)
            return kv

    def done(self, b: int, t: int) -> None:
        with self._lock:
            self._left[b, t] -= 1
            if not self._left[b, t]:
                self._built.pop((b, t), None)


def _unit(call: AttentionCall, task: Task, unit: tuple[int, int, int, int], cache: _KVCache,
          picked: dict[tuple[int, int, int], np.ndarray], cdt: np.dtype) -> None:
    """Queries [qa, qz) of (task b, kv head t): selection, attention, results in place."""
    b, t, qa, qz = unit
    Hq, Lq = task.q.shape[:2]
    g = Hq // task.k.shape[0]
    heads = slice(t * g, (t + 1) * g)
    kv = cache.get(b, t)
    try:
        off = kv.lk - Lq + qa  # key position of query qa
        sel = None
        if call.top_k is not None or call.indices is not None:
            sel = _selection(call, task, t, qa, qz, kv)
            if call.return_indices:
                picked[b, t, qa] = _compact(sel)
        if kv.lk == 0 or g == 0:
            return
        every_key = call.indices is None and _selects_every_block(call.top_k, kv.n_blocks)
        empty = ~_has_keys(call, sel, qz - qa, off, kv.lk)
        if kv.compiled:
            o, den, m = _compiled(call, task.q[heads, qa:qz], kv, off, sel, every_key)
        else:
            o, den, m = _numpy_passes(call, task.q[heads, qa:qz], kv, off, sel, every_key, cdt)
        # rows with nothing allowed give 0 / -inf; rows whose allowed scores are all -inf
        # give NaN, as the softmax itself does
        view = task.out[heads, qa:qz]
        np.divide(o, den[..., None], out=view, casting="unsafe")
        view[:, empty] = 0
        if task.lse is not None:
            row_lse = (m + np.log2(den)) * _LN2
            row_lse[den == 0] = np.nan  # allowed keys, all scoring -inf (as out)
            row_lse[:, empty] = NEG_INF
            task.lse[heads, qa:qz] = row_lse
    finally:
        cache.done(b, t)


def _compiled(call: AttentionCall, q: np.ndarray, kv: _KV, off: int, sel: np.ndarray | None,
              every_key: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The compiled tiles' sums for queries q [g, n, D] at key positions off, off + 1, ...:
    o [g, n, Dv] (sum of p v), l [g, n] (sum of p) and m [g, n] (the max score, log2 units)."""
    q = np.ascontiguousarray(q, np.float32)
    g, n = q.shape[:2]
    o = np.zeros((g, n, kv.v32.shape[1]), np.float32)
    m, den = np.full((g, n), NEG_INF, np.float32), np.zeros((g, n), np.float32)
    selected = None if sel is None or every_key else np.ascontiguousarray(sel).view(np.uint8)
    native.ATTENTION.attention_forward(q, kv.k32, kv.v32, selected, o, m, den, off,
                                       call.block_size, 0 if every_key else call.window,
                                       call.causal, call.scale, native.ATTENTION_ISA)
    return o, den, m


def _numpy_passes(call: AttentionCall, q: np.ndarray, kv: _KV, off: int, sel: np.ndarray | None,
                  every_key: bool, cdt: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The numpy passes' sums (as :func:`_compiled`, in the compute dtype; m is each row's
    softmax reference)."""
    head = _Head(call, q, kv, off, cdt)
    head.run(sel, every_key)
    den = head.acc[..., -1]
    if ((den == 0) & np.isfinite(head.m)).any():
        # a finite reference yet no mass: the scores are so large (|score| beyond 2**31
        # in log2 units) that the shift folded into the product lost the reference key
        # itself; rerun with references taken from each row's computed maxima only
        head = _Head(call, q, kv, off, cdt)
        head.run(sel, every_key, own_reference=False)
        den = head.acc[..., -1]
    return head.acc[..., :-1].transpose(1, 0, 2), den.T, head.m.T


def _has_keys(call: AttentionCall, sel: np.ndarray | None, n: int, off: int, lk: int
              ) -> np.ndarray:
    """bool [n]: the query at position off + i has at least one allowed key."""
    p = np.arange(n) + off
    w = call.window
    if sel is None and not w:
        return p >= 0 if call.causal else np.full(n, lk > 0)
    res = (p >= 0) if call.causal else (p + w - 1 >= 0)
    res &= w > 0
    if sel is not None:
        if call.causal:
            first = np.where(sel.any(axis=1), sel.argmax(axis=1), sel.shape[1])
            res |= first * call.block_size <= p
        else:
            res |= sel.any(axis=1)
    return res


# --- selection --------------------------------------------------------------------------------


def _block_means(kt: np.ndarray, bs: int) -> np.ndarray:
    """Mean key of every block, float64 [n_blocks, D]."""
    lk, d = kt.shape
    full = lk // bs
    parts = [np.zeros((0, d))]
    if full:
        parts.append(kt[: full * bs].reshape(full, bs, d).mean(axis=1, dtype=np.float64))
    if lk % bs:
        parts.append(kt[full * bs:].mean(axis=0, dtype=np.float64)[None])
    return np.concatenate(parts)


def _selection(call: AttentionCall, task: Task, t: int, qa: int, qz: int, kv: _KV
               ) -> np.ndarray:
    """Blocks attended through selection by queries [qa, qz), bool [n, n_blocks] (the forced
    own block included)."""
    nb = kv.n_blocks
    sel = np.zeros((qz - qa, nb), bool)
    if call.indices is not None:
        idx = np.asarray(task.indices[t, qa:qz])
        rows, cols = np.nonzero(idx >= 0)
        sel[rows, idx[rows, cols]] = True
        return sel
    if nb == 0:
        return sel
    bs, off = call.block_size, kv.lk - task.q.shape[1]
    g = task.q.shape[0] // task.k.shape[0]
    for i0 in range(qa, qz, _SELECT_ROWS):
        i1 = min(qz, i0 + _SELECT_ROWS)
        p = np.arange(i0, i1) + off
        own = np.where(p >= 0, p // bs, -1)
        qsum = task.q[t * g:(t + 1) * g, i0:i1].sum(axis=0, dtype=kv.kmean_t.dtype)
        part = sel[i0 - qa:i1 - qa]
        _top(qsum @ kv.kmean_t, own, call.causal, call.top_k, part)
        rows = np.nonzero(own >= 0)[0]
        part[rows, own[rows]] = True
    return sel


def _top(score: np.ndarray, own: np.ndarray, causal: bool, top_k: int | float,
         out: np.ndarray) -> None:
    """Mark in ``out`` each row's ``top_k`` best candidates: descending score, ties to the lower
    block, non-finite scores after finite ones. Candidates: blocks before the own block
    (causal; none when it is -1), or every block but the own one. ``score`` is overwritten."""
    n, nb = score.shape
    if causal:
        n_cand = np.maximum(own, 0)
    else:
        n_cand = np.where(own >= 0, nb - 1, nb)
    want = resolve_count(top_k, n_cand)
    kmax = int(want.max(initial=0))
    if kmax == 0:
        return
    if causal:  # only blocks before the last row's own block can be candidates
        cols = int(own.max()) if own.size else 0
        score, out = score[:, :cols], out[:, :cols]
    key = np.negative(score, out=score)  # ascending key = descending score
    if not np.isfinite(key).all():
        key[~np.isfinite(key)] = np.inf  # ranks after every finite score
    if causal:  # non-candidates sort last (NaN): the blocks from each row's own block on
        lo = max(0, int(own.min()))
        np.copyto(key[:, lo:], np.nan, where=np.arange(lo, key.shape[1])[None, :] >= own[:, None])
    else:
        rows = np.nonzero(own >= 0)[0]
        key[rows, own[rows]] = np.nan
    best = np.sort(key, axis=1)  # a sort beats np.partition here (NaN handling)
    rows = np.nonzero(want > 0)[0]
    thr = np.full(n, -np.inf, key.dtype)
    thr[rows] = best[rows, want[rows] - 1]
    # every candidate strictly better than the threshold is in; equals fill the rest in order
    chosen = key < thr[:, None]
    tie = key == thr[:, None]
    need = want - chosen.sum(axis=1)
    over = np.nonzero(tie.sum(axis=1) > need)[0]
    if over.size:
        tie[over] &= np.cumsum(tie[over], axis=1) <= need[over, None]
    out |= chosen
    out |= tie


def _selects_every_block(top_k: int | float | None, n_blocks: int) -> bool:
    """Whether ``top_k`` picks every candidate block of every query (see :func:`_top`)."""
    if top_k is None:
        return False
    return top_k >= 1.0 if isinstance(top_k, float) else top_k >= n_blocks


def _compact(sel: np.ndarray) -> np.ndarray:
    """Selected block numbers per row, ascending, -1 padded: int64 [Lq, max count]."""
    rows, cols = np.nonzero(sel)
    counts = np.bincount(rows, minlength=sel.shape[0])
    n = int(counts.max()) if counts.size else 0
    res = np.full((sel.shape[0], n), -1, np.int64)
    starts = np.cumsum(counts) - counts
    res[rows, np.arange(rows.size) - starts[rows]] = cols
    return res


def _pad_indices(picked: dict[tuple[int, int, int], np.ndarray], B: int, H: int, lq: int
                 ) -> np.ndarray:
    """The selections of every unit of work, -1 padded to the widest: [B, H, Lq, n]."""
    n = max((x.shape[1] for x in picked.values()), default=0)
    res = np.full((B, H, lq, n), -1, np.int64)
    for (b, t, qa), x in picked.items():
        res[b, t, qa:qa + x.shape[0], : x.shape[1]] = x
    return res


# --- attention passes -------------------------------------------------------------------------


class _Head:
    """Attention of one query range of one (batch, kv head), and its online-softmax state.

    ``qx`` [n, g, D + 1] holds the scaled queries and, in the last column, minus the row's
    reference, so ``qx @ kx.T`` gives shifted scores. ``acc`` [n, g, Dv + 1] holds the sums of
    ``exp(score - reference) * [v | 1]``. ``m`` [n, g] is the reference: -inf while unset (the
    column is then 0), otherwise a score the row is allowed, never above the row's true max.
    """

    def __init__(self, call: AttentionCall, q: np.ndarray, kv: _KV, off: int, cdt: np.dtype
                 ) -> None:
        g, n, d = q.shape
        self.call, self.kv, self.off, self.g = call, kv, off, g
        self.qx = np.empty((n, g, d + 1), cdt)  # scores in log2 units: exp2 is the fast exp
        np.multiply(q.transpose(1, 0, 2), call.scale * _LOG2E, out=self.qx[..., :d], dtype=cdt)
        self.qx[..., d] = 0
        self.m = np.full((n, g), NEG_INF, cdt)
        self.acc = np.zeros((n, g, kv.vx.shape[1]), cdt)
        self.rows = np.arange(n)

    def run(self, sel: np.ndarray | None, every_key: bool = False, own_reference: bool = True
            ) -> None:
        """Both passes, leaving the sums in ``acc`` and the references in ``m``.

        ``every_key``: the selection holds every block a query may see (``top_k`` at least the
        number of blocks), so the call is dense attention and runs as such, in key chunks
        (the block pass would gather every query for every block). ``own_reference=False``
        leaves the references unset, so each row's first product sets it to its computed max
        (a term of exactly 1 in every row that has a finite score).
        """
        if every_key:
            sel = None
        w = 0 if every_key else self.call.window
        if own_reference:
            self._init_reference(sel if w == 0 and self.call.indices is not None else None)
        if sel is None or w > 0:
            _band_pass(self, w, dense=sel is None and w == 0)
        if sel is not None:
            _block_pass(self, sel)

    def _init_reference(self, sel: np.ndarray | None) -> None:
        """Reference = the score of each query's own position: a key every query may see with
        a window, dense attention or top_k (own block forced); with ``indices`` alone
        (``sel``), only the queries whose own block is selected."""
        a = max(0, -self.off)
        z = max(a, min(self.rows.size, self.kv.lk - self.off))
        q, k = self.qx[a:z, :, :-1], self.kv.kx[a + self.off:z + self.off, :-1]
        diag = np.matmul(q, k[:, :, None])[..., 0]
        ok = np.isfinite(diag)
        if sel is not None:
            ok &= sel[np.arange(a, z), (np.arange(a, z) + self.off) // self.call.block_size
                      ][:, None]
        self.m[a:z] = np.where(ok, diag, NEG_INF)
        self.qx[a:z, :, -1] = np.where(ok, -diag, 0)

    def merge(self, rows: Any, s: np.ndarray, j0: int, j1: int, mask: np.ndarray | None
              ) -> None:
        """Fold shifted scores ``s`` [n*g, j1-j0] (masked with -inf) of queries ``rows``.

        ``mask`` [n, j1-j0] (True = allowed) is needed only to keep non-finite values of masked
        keys out of the products; ``None`` means every unmasked key is allowed.
        """
        g = self.g
        mref = self.m[rows].reshape(-1)
        p = _exp2(s)
        pv = self._pv(p, j0, j1, mask)
        bad = np.nonzero(~(pv[:, -1] <= _LIMIT) | (mref == NEG_INF))[0]
        if bad.size:  # unset or too low a reference (or NaN): rescale to the true max
            m_old = mref[bad]
            sb = s[bad] + np.where(m_old == NEG_INF, 0, m_old)[:, None]
            m_new = np.maximum(m_old, sb.max(axis=1))
            m_safe = np.where(m_new == NEG_INF, 0, m_new)
            sb -= m_safe[:, None]
            np.exp2(sb, out=sb)
            pv[bad] = self._pv(sb, j0, j1, None if mask is None else mask[bad // g])
            qi, hi = self.rows[rows][bad // g], bad % g
            self.acc[qi, hi] *= np.exp2(m_old - m_safe)[:, None]
            self.m[qi, hi] = m_new
            self.qx[qi, hi, -1] = -m_safe
        self.acc[rows] += pv.reshape(-1, g, pv.shape[1])

    def _pv(self, p: np.ndarray, j0: int, j1: int, mask: np.ndarray | None) -> np.ndarray:
        """``p @ [v | 1]`` where non-finite values reach only the rows allowed to see them."""
        kv = self.kv
        bad = kv.vbad[j0:j1]
        if not bad.any():
            return p @ kv.vx[j0:j1]
        if mask is None:  # every key allowed: NaN/Inf values belong in the product
            vx = kv.vx[j0:j1].copy()
            vx[:, :-1] = kv.vt[j0:j1]
            return p @ vx
        pv = p @ kv.vx[j0:j1]
        rowmask = np.repeat(mask, p.shape[0] // mask.shape[0], axis=0)
        for j in np.nonzero(bad)[0]:
            pv[:, :-1] += np.where(rowmask[:, j, None], p[:, j, None] * kv.vt[j0 + j], 0)
        return pv


def _exp2(s: np.ndarray) -> np.ndarray:
    """``2**s`` of a score tile: the compiled loop for float32 where it is built (within 2 ulp
    of numpy's, 5x faster on CPUs where numpy's float32 exp2 is scalar libm), else numpy."""
    lib = native.NATIVE
    if lib is None or s.dtype != np.float32 or s.ndim != 2 or not s.flags.c_contiguous:
        return np.exp2(s)
    p = np.empty_like(s)
    lib.exp2(s, p)
    return p


def _band_pass(head: _Head, w: int, dense: bool) -> None:
    """Window (or dense) attention by query tiles: keys visible and |p - j| < w (any if dense)."""
    qx, kv, causal = head.qx, head.kv, head.call.causal
    n, g, d1 = qx.shape
    lk = kv.lk
    if dense:
        tile, kchunk = max(1, min(n, _DENSE_ROWS // g)), _DENSE_KEYS
    else:
        tile, kchunk = max(1, min(n, max(8, int(_WINDOW_TILE / g**0.5)))), lk
    masks: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        p0, p1 = i0 + head.off, i1 - 1 + head.off
        lo = 0 if dense else max(0, p0 - w + 1)
        hi = min(lk, p1 + 1) if causal else lk if dense else min(lk, p1 + w)
        qt = qx[i0:i1].reshape(-1, d1)
        for j0 in range(lo, hi, kchunk):
            j1 = min(hi, j0 + kchunk)
            s = qt @ kv.kx[j0:j1].T
            mask = None
            if not dense or (causal and j1 - 1 > p0):
                key = (i1 - i0, j0 - p0, j1 - p0)  # interior tiles share one pattern
                if key not in masks:
                    mask = _band_mask(p0, i1 - i0, j0, j1, 0 if dense else w, causal)
                    masks[key] = mask, np.repeat(np.where(mask, 0, NEG_INF), g, axis=0
                                                 ).astype(s.dtype)
                mask, bias = masks[key]
                if kv.kbad[j1] - kv.kbad[j0]:  # non-finite keys: never add to them
                    s = np.where(bias == 0, s, NEG_INF)
                else:
                    s += bias
            head.merge(slice(i0, i1), s, j0, j1, mask)


def _band_mask(p0: int, n: int, j0: int, j1: int, w: int, causal: bool) -> np.ndarray:
    """bool [n, j1 - j0]: key j allowed for query position p0 + r (window w; 0 = no window)."""
    d = np.arange(p0, p0 + n)[:, None] - np.arange(j0, j1)[None, :]
    mask = (d < w) & (d > -w) if w else np.ones(d.shape, bool)
    if causal:
        mask &= d >= 0
    return mask


def _block_pass(head: _Head, sel: np.ndarray) -> None:
    """Selected blocks: per block, the queries that chose it, minus keys the band pass covered."""
    qx, kv, call = head.qx, head.kv, head.call
    g, d1 = qx.shape[1], qx.shape[2]
    bs, w, causal = call.block_size, call.window, call.causal
    nb = sel.shape[1]
    flat = np.flatnonzero(sel)  # by query; regroup by block (a radix sort for small ints)
    blk = (flat % nb).astype(np.int16 if nb < 2**15 else np.int64)
    order = np.argsort(blk, kind="stable")
    qi, blk = flat[order] // nb, blk[order]
    bounds = np.searchsorted(blk, np.arange(nb + 1))
    per = max(1, _BLOCK_ROWS // g)
    for c in range(nb):
        a, z = bounds[c], bounds[c + 1]
        if a == z:
            continue
        c0, c1 = c * bs, min(kv.lk, (c + 1) * bs)
        rows = qi[a:z]
        p = rows + head.off
        # this pass's keys in the block: j <= p - w (causal; w = 0: j <= p), or for non-causal
        # windows j <= p - w or j >= p + w; all of them when neither restricts
        if causal:
            hi = p - w if w else p
            full, empty = hi >= c1 - 1, hi < c0
        elif w:
            full = (p - w >= c1 - 1) | (p + w <= c0)
            empty = (p - w < c0) & (p + w > c1 - 1)
        else:
            full = empty = None
        if empty is not None and empty.any():
            keep = ~empty
            rows, p, full = rows[keep], p[keep], full[keep]
        kb = kv.kx[c0:c1].T
        j = np.arange(c0, c1)
        bad_values = kv.vbad[c0:c1].any()
        for r0 in range(0, rows.size, per):
            rr = rows[r0:r0 + per]
            s = qx[rr].reshape(-1, d1) @ kb
            mask = None
            part = np.nonzero(~full[r0:r0 + per])[0] if full is not None else ()
            if len(part):  # the few rows where the block meets the window or the diagonal
                pp = p[r0:r0 + per][part, None]
                if causal:
                    allowed = j[None, :] <= (pp - w if w else pp)
                else:
                    allowed = (j[None, :] <= pp - w) | (j[None, :] >= pp + w)
                s3 = s.reshape(rr.size, g, -1)
                s3[part] = np.where(allowed[:, None, :], s3[part], NEG_INF)
                if bad_values:  # the full mask keeps masked NaN/Inf values out
                    mask = np.ones((rr.size, c1 - c0), bool)
                    mask[part] = allowed
            head.merge(rr, s, c0, c1, mask)
