"""The error gates: one backend output against its float64 reference (see :mod:`.tolerance`).

:func:`measure` applies the element gate and the aggregate gate to one output and returns a
:class:`Measurement`: the worst element with its bound, the aggregate ratio, a sample of
element ratios for quantiles, and the energies for the SQNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from dshal.dtypes import numpy_dtype
from dshal_conformance import tolerance as tol

#: element ratios kept per output for the quantiles of a certificate
SAMPLE = 1024


@dataclass(frozen=True)
class Bound:
    """What the gates need to judge one output.

    :param name: the output's name (``out``, ``lse``, ``y``...).
    :param ref: the float64 reference.
    :param mag: ``M`` of the bound (``Σ|a||b|``, ``Σ P|v|``...), broadcastable to ``ref``.
    :param k: accumulation length, broadcastable to ``ref``.
    :param u_in: unit roundoff of the intermediate roundings a backend may apply.
    :param acc: the accumulator's dtype (float32, or float64 for float64 inputs).
    :param dtype: the output dtype name.
    :param rss: the root-sum-square magnitude ``sqrt(Σ (a b)^2)`` that random rounding errors
        scale with (aggregate gate); ``None`` uses ``mag``.
    :param extra: an absolute error term already in final units (the attention logit term).
    :param extra_rss: its root-sum-square counterpart for the aggregate gate.
    :param exact: True where the output must be exactly zero (closed channels).
    :param ignore: True where the output is not judged (rows of an ambiguous selection).
    """

    name: str
    ref: np.ndarray
    mag: Any
    k: Any
    u_in: float
    acc: str
    dtype: str
    rss: Any = None
    extra: Any = 0.0
    extra_rss: Any = 0.0
    exact: np.ndarray | None = None
    ignore: np.ndarray | None = None

    @property
    def u_acc(self) -> float:
        """Unit roundoff of the accumulator."""
        return float(finfo(self.acc).eps) / 2

    @property
    def tiny(self) -> np.ndarray:
        """Gradual underflow in the accumulator: (K + 1) times its smallest subnormal."""
        return (np.asarray(self.k) + 1) * float(finfo(self.acc).smallest_subnormal)

    def scale(self) -> np.ndarray:
        """The element gate's analytic term ``(u_in + u_acc sqrt(K)) M + extra``."""
        with np.errstate(invalid="ignore", over="ignore"):
            return (self.u_in + self.u_acc * np.sqrt(self.k)) * self.mag + self.extra

    def sigma(self) -> np.ndarray:
        """The aggregate gate's per-element scale of random rounding errors:
        ``sqrt((u_out y)^2 + (u_in^2 + K u_acc^2) rss^2 + extra_rss^2)`` (+ underflow)."""
        u_out = float(finfo(self.dtype).eps) / 2
        rss = self.mag if self.rss is None else self.rss
        with np.errstate(invalid="ignore", over="ignore"):
            var = ((u_out * self.ref) ** 2
                   + (self.u_in ** 2 + np.asarray(self.k) * self.u_acc ** 2) * rss ** 2
                   + np.asarray(self.extra_rss) ** 2)
            return np.sqrt(var) + self.tiny


@dataclass
class Measurement:
    """The verdict of both gates on one output (ratios <= 1 pass)."""

    name: str
    n: int
    max_ratio: float
    agg_ratio: float
    worst: dict[str, Any] | None
    sample: np.ndarray = field(repr=False)
    sq_ref: float = 0.0
    sq_err: float = 0.0

    @property
    def passed(self) -> bool:
        """Both gates hold (ratios <= 1)."""
        return self.max_ratio <= 1.0 and self.agg_ratio <= 1.0

    def describe(self) -> str:
        """One line: the worst element against its bound, or the aggregate gate."""
        if self.worst and self.max_ratio > 1.0:
            w = self.worst
            return (f"{self.name}{list(w['index'])}: got {w['value']:.6g}, reference "
                    f"{w['reference']:.6g}, |err| {w['err']:.3g} > bound {w['bound']:.3g} "
                    f"(ratio {w['ratio']:.3g})")
        if self.agg_ratio > 1.0:
            return (f"{self.name}: aggregate error ||err||/||y|| exceeds the declared "
                    f"precision's gate (ratio {self.agg_ratio:.3g}): computed at a lower "
                    "precision than declared?")
        return f"{self.name}: max err/bound {self.max_ratio:.3g}, aggregate {self.agg_ratio:.3g}"


def finfo(dtype: str) -> ml_dtypes.finfo:
    """Machine limits of a dtype by name (bfloat16 included)."""
    return ml_dtypes.finfo(numpy_dtype(dtype))


def finite_abs(x: Any) -> np.ndarray:
    """|x| in float64 with NaN/Inf replaced by 0 (the magnitude of the finite part)."""
    a = np.abs(np.asarray(x).astype(np.float64))
    return np.where(np.isfinite(a), a, 0.0)


def first_index(mask: np.ndarray) -> str:
    """The index of the first True element, as text: ``[0, 3, 1]``."""
    return "[" + ", ".join(str(int(i)) for i in np.argwhere(mask)[0]) + "]"


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` at the magnitude ``|x|`` (its subnormal spacing at 0)."""
    info = finfo(dtype)
    mag = np.abs(np.asarray(x, dtype=np.float64))
    _, exp = np.frexp(mag)  # mag = m 2**exp, m in [0.5, 1)
    with np.errstate(over="ignore"):
        spacing = np.ldexp(float(info.eps), exp - 1)
    tiny = float(info.smallest_subnormal)
    return np.where(mag > 0, np.maximum(spacing, tiny), tiny)


def overflow_threshold(dtype: str) -> float:
    """Smallest magnitude that rounds to infinity in ``dtype`` (round to nearest)."""
    info = finfo(dtype)
    big = float(info.max)
    return big + float(ulp(np.float64(big), dtype)) / 2


def element_bound(b: Bound) -> np.ndarray:
    """The element gate's bound for every element of ``b.ref``."""
    with np.errstate(invalid="ignore", over="ignore"):
        bound = tol.C_ULP * ulp(b.ref, b.dtype) + tol.C_ELEM * b.scale() + b.tiny
    bound = np.broadcast_to(bound, b.ref.shape)
    return np.where(b.exact, 0.0, bound) if b.exact is not None else bound


def _errors(out: np.ndarray, b: Bound, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|out - ref| (0 where both are equal, inf where only one is NaN), and the mask of elements
    that rounded to +-inf legitimately (the reference lies within bound of the overflow)."""
    y = b.ref
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(out - y)
        same = (out == y) | (np.isnan(out) & np.isnan(y))
        overflow = (np.isinf(out) & np.isfinite(y) & (np.sign(out) == np.sign(y))
                    & (np.abs(y) + bound >= overflow_threshold(b.dtype)))
    err = np.where(same | overflow, 0.0, err)
    if b.ignore is not None:
        err = np.where(b.ignore, 0.0, err)
    return np.where(np.isnan(err), np.inf, err), overflow


def measure(out: Any, b: Bound, rng: np.random.Generator) -> Measurement:
    """Both gates on ``out`` (any array convertible to float64) against ``b``."""
    o = np.asarray(out).astype(np.float64)
    if o.shape != b.ref.shape:
        return Measurement(b.name, 0, math.inf, math.inf,
                           {"index": (), "value": math.nan, "reference": math.nan,
                            "err": math.inf, "bound": 0.0, "ratio": math.inf,
                            "problem": f"shape {list(o.shape)} != {list(b.ref.shape)}"},
                           np.zeros(0))
    bound = element_bound(b)
    err, overflow = _errors(o, b, bound)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    worst = None
    max_ratio = 0.0
    if ratio.size:
        at = int(np.argmax(ratio))
        max_ratio = float(ratio.flat[at])
        worst = {"index": tuple(int(i) for i in np.unravel_index(at, ratio.shape)),
                 "value": float(o.flat[at]), "reference": float(b.ref.flat[at]),
                 "err": float(err.flat[at]), "bound": float(bound.flat[at]),
                 "ratio": max_ratio}
    return Measurement(b.name, int(ratio.size), max_ratio, _aggregate(err, overflow, b),
                       worst, _sample(ratio, rng), *_energies(err, overflow, b))


def _aggregate(err: np.ndarray, overflow: np.ndarray, b: Bound) -> float:
    """||err||_F over the finite elements against C_AGG ||sigma||_F."""
    sigma = np.broadcast_to(b.sigma(), b.ref.shape)
    keep = np.isfinite(b.ref) & np.isfinite(err) & ~overflow & np.isfinite(sigma)
    num = float(np.linalg.norm(err[keep]))
    den = tol.C_AGG * float(np.linalg.norm(sigma[keep]))
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def _sample(ratio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = ratio.reshape(-1)
    if flat.size <= SAMPLE:
        return flat.copy()
    return np.concatenate([rng.choice(flat, SAMPLE - 1, replace=False), [flat.max()]])


def _energies(err: np.ndarray, overflow: np.ndarray, b: Bound) -> tuple[float, float]:
    keep = np.isfinite(b.ref) & ~overflow
    e = err[keep]
    return float(np.sum(b.ref[keep] ** 2)), float(np.sum(e[np.isfinite(e)] ** 2))
