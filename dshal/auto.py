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
The operands are formed by :func:`dshal.reference.gemm_operands`, exactly as gemm defines them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dshal.errors import UnsupportedError

#: sketch width (probes) and the safety factor applied to a sketched ratio
PROBES = 48
SAFETY = 2.0
#: problems with at most this many multiply-adds get the exact error
EXACT_LIMIT = 1 << 25
U_ACC = 2.0**-24


def estimate_error(a: np.ndarray, b: np.ndarray, precision: str, group_size: int) -> float:
    """Estimated relative Frobenius error of ``gemm(a, b, precision=precision)`` (>= the true
    error with overwhelming probability for sketched sizes, exact plus the accumulator bound for
    small ones)."""
    from dshal.reference import gemm_operands

    a_hat, b_hat = gemm_operands(a, b, precision, group_size=group_size)
    A = np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1])
    B = np.asarray(b, dtype=np.float64)
    a_hat = a_hat.reshape(A.shape)
    M, K = A.shape
    N = B.shape[1]
    if not (np.isfinite(a_hat).all() and np.isfinite(b_hat).all()):
        return math.inf  # the format overflows on these inputs (e.g. fp16 beyond 65504)
    if M * K * N <= EXACT_LIMIT:
        exact = A @ B
        err = np.linalg.norm(a_hat @ b_hat - exact)
        den = np.linalg.norm(exact)
        safety = 1.0
    else:
        w = np.random.default_rng(0x5EED).standard_normal((N, PROBES))
        err = np.linalg.norm((a_hat - A) @ (b_hat @ w) + A @ ((b_hat - B) @ w))
        den = np.linalg.norm(A @ (B @ w)) / math.sqrt(PROBES)
        err /= math.sqrt(PROBES)
        safety = SAFETY
    # root-sum-square of the products a_ik b_kj over all (i, j, k), exactly, in O(MK + KN)
    rss = math.sqrt(float(np.sum(np.sum(a_hat**2, axis=0) * np.sum(b_hat**2, axis=1))))
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
