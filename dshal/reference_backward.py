"""Reference gradients of ``sparse_attention`` (DESIGN 3.1b), in float64: the oracle of the
backward operator, as :mod:`dshal.reference` is the forward's.

Dense masked attention per (batch, kv head), the selection held constant: with ``P`` the
softmax over each query's allowed keys, ``dP = dO V^T`` and ``delta = rowsum(P dP)``,
``dS = P (dP - delta + dlse)``, ``dQ = scale dS K``, ``dK = scale Σ_heads dS^T Q``,
``dV = Σ_heads P^T dO``. Products over keys (or queries) never multiply a disallowed entry:
rows holding NaN/Inf contribute only where allowed (as the forward reference does), so NaN/Inf
in keys or values a query may not attend reach none of its gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal import reference


@dataclass(frozen=True)
class Gradients:
    """The float64 gradients and, for error bounds, the quantities they are built from.

    ``p``, ``ds`` [B, Hq, Lq, Lk] (0 where not allowed); ``dp_abs`` = Σ_e |dO||v| and
    ``allowed`` [B, Hkv, Lq, Lk]; ``lse`` [B, Hq, Lq].
    """

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    p: np.ndarray
    ds: np.ndarray
    dp_abs: np.ndarray
    allowed: np.ndarray
    lse: np.ndarray


def masked_product(w: np.ndarray, x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``w @ x`` for ``w`` [..., R, N] that is 0 wherever ``allowed`` [R, N] is False, without
    0 * NaN: rows of ``x`` [N, E] holding NaN/Inf contribute only where allowed."""
    bad = ~np.isfinite(x).all(axis=-1)
    out = w @ np.where(bad[:, None], 0.0, x)
    if bad.any():
        cols = np.flatnonzero(bad)
        terms = w[..., cols, None] * x[cols]  # [..., R, nbad, E]
        out = out + np.where(allowed[:, cols, None], terms, 0.0).sum(axis=-2)
    return out


def sparse_attention_backward(q: Any, k: Any, v: Any, grad_out: Any, *,
                              grad_lse: Any | None = None, indices: Any | None = None,
                              block_size: int = 64, window: int = 0, causal: bool = False,
                              scale: float | None = None) -> Gradients:
    """float64 gradients of ``sparse_attention`` with the selection ``indices`` (None: window
    or dense attention); see the module docstring."""
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    go = np.asarray(grad_out, np.float64)
    B, Hq, Lq, D = q64.shape
    Hkv, Lk = k64.shape[1], k64.shape[2]
    g = Hq // Hkv
    scale = (1.0 / math.sqrt(D) if D else 1.0) if scale is None else float(scale)
    common = dict(block_size=block_size, window=window, causal=causal, scale=scale)
    _, _, lse = reference.sparse_attention(q64, k64, v64, indices=indices, **common)
    allowed = reference.allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=block_size,
                                     window=window, causal=causal, indices=indices)
    gl = np.zeros((B, Hq, Lq)) if grad_lse is None else np.asarray(grad_lse, np.float64)
    dq, dk, dv = np.zeros(q64.shape), np.zeros(k64.shape), np.zeros(v64.shape)
    p = np.zeros((B, Hq, Lq, Lk))
    ds = np.zeros((B, Hq, Lq, Lk))
    dp_abs = np.zeros((B, Hq, Lq, Lk))
    with np.errstate(all="ignore"):
        for b in range(B):
            for t in range(Hkv):
                h = slice(t * g, (t + 1) * g)
                ok = allowed[b, t]
                lse_h = lse[b, h][..., None]
                s = scale * (_masked_rows(q64[b, h]) @ _masked_rows(k64[b, t]).T)
                s = np.where(ok, _poisoned(s, q64[b, h], k64[b, t], ok, scale), -np.inf)
                ph = np.where(ok, np.exp(s - np.where(np.isfinite(lse_h), lse_h, 0.0)), 0.0)
                dph = np.where(ok, _poisoned(go[b, h] @ _masked_rows(v64[b, t]).T, go[b, h],
                                             v64[b, t], ok, 1.0), 0.0)
                delta = (ph * dph).sum(axis=-1, keepdims=True)
                dsh = np.where(ok, ph * (dph - delta + gl[b, h][..., None]), 0.0)
                dq[b, h] = scale * masked_product(dsh, k64[b, t], ok)
                dk[b, t] = scale * sum(masked_product(dsh[i].T, q64[b, h][i], ok.T)
                                       for i in range(g))
                dv[b, t] = sum(masked_product(ph[i].T, go[b, h][i], ok.T) for i in range(g))
                p[b, h], ds[b, h] = ph, dsh
                dp_abs[b, h] = np.abs(go[b, h]) @ np.abs(_masked_rows(v64[b, t])).T
    return Gradients(dq, dk, dv, p, ds, dp_abs, allowed, lse)


def _masked_rows(x: np.ndarray) -> np.ndarray:
    """x with its non-finite rows zeroed (they are put back where allowed by
    :func:`_poisoned`)."""
    bad = ~np.isfinite(x).all(axis=-1)
    return np.where(bad[..., None], 0.0, x) if bad.any() else x


def _poisoned(s: np.ndarray, a: np.ndarray, x: np.ndarray, ok: np.ndarray, scale: float
              ) -> np.ndarray:
    """Products ``scale a . x[j]`` [g, Lq, Lk] recomputed exactly where a non-finite row of
    ``a`` or ``x`` meets an allowed pair (elsewhere the zeroed rows' values stand: they are
    masked afterwards)."""
    bad_x = ~np.isfinite(x).all(axis=-1)
    bad_a = ~np.isfinite(a).all(axis=-1)
    if not (bad_x.any() or bad_a.any()):
        return s
    hit = ok[None] & (bad_x[None, None, :] | bad_a[..., None])
    gi, ii, jj = np.nonzero(hit)
    s = s.copy()
    s[gi, ii, jj] = scale * np.einsum("nd,nd->n", a[gi, ii], x[jj])
    return s
