"""``gemm(precision="auto")``: the cheapest precision whose error on *these* inputs meets a budget.

The error of a candidate precision p is the relative Frobenius error of the product of the
p-rounded (or p-quantised) operands against the exact product of the unrounded ones:

    err(p) = || Â B̂ - A B ||_F / || A B ||_F,   Â B̂ - A B = (Â - A) B̂ + A (B̂ - B)

Small problems compute it exactly in float64. Large ones estimate both norms with one Gaussian
sketch (``||X||_F^2 = E ||X w||^2`` for w ~ N(0, I)), shared between numerator and denominator,
and multiply the ratio by :data:`SAFETY`; the sketch costs O(s (MK + KN)) instead of O(MKN).
Every estimate adds the fp32 accumulator's contribution as a random walk over the partial sums,
``u_acc sqrt(K) (||A B||_F + rss)`` with ``rss^2 = sum_ijk (a_ik b_kj)^2`` (exactly computable
in O(MK + KN)); this is a probabilistic model of blocked BLAS summation, not a worst case
(which is ``u_acc K sum |a||b|`` and would make every budget below ~1e-4 unreachable).
The operands are formed by :func:`dshal.reference.gemm_operand`, exactly as gemm defines them.

Memory: the float64 operands are never formed whole. a is walked in blocks of rows and b in
slabs of rows (whole quantisation groups), each block's float64 temporaries about
:data:`BLOCK_BYTES`; the extra memory of an estimate is bounded by about
``6 x BLOCK_BYTES`` (96 MiB; ``benchmarks/auto_memory.py`` measures it) plus
``O((K + N) x PROBES)`` float64 values, whatever the inputs' size (a non-contiguous batched
``a`` is first made contiguous by numpy's reshape, in its own dtype).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from dshal.dtypes import QUANTIZED_PRECISIONS
from dshal.errors import UnsupportedError

#: sketch width (probes) and the safety factor applied to a sketched ratio
PROBES = 48
SAFETY = 2.0
#: problems with at most this many multiply-adds get the exact error (when b's float64 copy
#: also fits in a block)
EXACT_LIMIT = 1 << 25
U_ACC = 2.0**-24
#: float64 bytes of one block of a's rows or one slab of b's rows
BLOCK_BYTES = 16 << 20


def _blocks(rows: int, row_bytes: int, multiple: int = 1) -> Iterator[slice]:
    """Slices of ``rows`` whose float64 size is about :data:`BLOCK_BYTES` (whole multiples of
    ``multiple`` rows)."""
    step = max(1, BLOCK_BYTES // max(row_bytes, 1) // multiple) * multiple
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def estimate_error(a: np.ndarray, b: np.ndarray, precision: str, group_size: int) -> float:
    """Estimated relative Frobenius error of ``gemm(a, b, precision=precision)`` (>= the true
    error with overwhelming probability for sketched sizes, exact plus the accumulator bound for
    small ones), in bounded extra memory (module docstring)."""
    from dshal.reference import gemm_operand

    K, N = b.shape
    M = math.prod(a.shape[:-1])
    a2 = np.reshape(a, (M, K))
    exact = M * K * N <= EXACT_LIMIT and 8 * K * N <= BLOCK_BYTES
    # b's side, a slab of whole quantisation groups at a time: what each of a's blocks needs
    bsq = np.zeros(K)  # sum_j b̂_kj^2
    if exact:
        B = np.asarray(b, dtype=np.float64)
        b_hat = gemm_operand(b, "b", precision, group_size)
        if not np.isfinite(b_hat).all():
            return math.inf  # the format overflows on these inputs (e.g. fp16 beyond 65504)
        bsq[:] = np.sum(b_hat**2, axis=1)
    else:
        w = np.random.default_rng(0x5EED).standard_normal((N, PROBES))
        bw, dbw, Bw = (np.empty((K, PROBES)) for _ in range(3))
        # block quantisation groups g x g tiles of b: a slab holds whole tiles' rows
        tiles = min(group_size, K) if precision in QUANTIZED_PRECISIONS else 1
        for rows in _blocks(K, 8 * max(N, PROBES), tiles):
            B_s = np.asarray(b[rows], dtype=np.float64)
            b_s = gemm_operand(b[rows], "b", precision, group_size)
            if not np.isfinite(b_s).all():
                return math.inf
            bw[rows], Bw[rows] = b_s @ w, B_s @ w
            dbw[rows] = (b_s - B_s) @ w
            bsq[rows] = np.sum(b_s**2, axis=1)
    err2 = den2 = 0.0
    asq = np.zeros(K)  # sum_i â_ik^2
    for rows in _blocks(M, 8 * max(K, N if exact else PROBES)):
        A = np.asarray(a2[rows], dtype=np.float64)
        a_hat = gemm_operand(a2[rows], "a", precision, group_size)
        if not np.isfinite(a_hat).all():
            return math.inf
        asq += np.sum(a_hat**2, axis=0)
        if exact:
            ref = A @ B
            err2 += float(np.sum((a_hat @ b_hat - ref) ** 2))
            den2 += float(np.sum(ref**2))
        else:
            err2 += float(np.sum(((a_hat - A) @ bw + A @ dbw) ** 2))
            den2 += float(np.sum((A @ Bw) ** 2))
    err, den = math.sqrt(err2), math.sqrt(den2)
    safety = 1.0
    if not exact:
        err, den, safety = err / math.sqrt(PROBES), den / math.sqrt(PROBES), SAFETY
    # root-sum-square of the products a_ik b_kj over all (i, j, k), exactly, in O(MK + KN)
    rss = math.sqrt(float(np.sum(asq * bsq)))
    # fp32 accumulation: rounding errors of a length-K sum behave like a random walk over the
    # partial sums, which grow like |y| (same-sign terms) or like rss (cancelling terms)
    acc = U_ACC * (den + rss) * (1.0 if precision == "int8" else math.sqrt(K))
    if den == 0.0:
        return 0.0 if err == 0.0 and acc == 0.0 else math.inf
    return float(safety * err / den + acc / den)


def choose_precision(a: np.ndarray, b: np.ndarray, candidates: Sequence[str], tolerance: float,
                     group_size: int) -> tuple[str, float]:
    """The first of ``candidates`` whose estimated error is <= ``tolerance``.

    :raises UnsupportedError: when none meets it; the message lists every estimate.
    """
    estimates = {}
    for precision in candidates:
        est = estimate_error(a, b, precision, group_size)
        if est <= tolerance:
            return precision, est
        estimates[precision] = est
    shown = ", ".join(f"{p}: {e:.3g}" for p, e in estimates.items())
    raise UnsupportedError(
        f"gemm(precision='auto'): no candidate meets tolerance={tolerance:g} on these inputs "
        f"(estimated errors: {shown}); raise the tolerance or add a more precise candidate")
