"""Certification of the backward of sparse_attention (DESIGN 3.1b, plugin API 2): its cases,
their inputs and the check of dq, dk, dv against the float64 reference gradients.

**Inputs.** The forward is the float64 reference's on the case's q, k, v (rounded to the
dtype): its selection (``top_k`` ranked by the reference, or the caller's ``indices``), its out
(rounded to the dtype) and lse (float32); grad_out is random in the dtype and grad_lse random
float32 where the case uses lse. The backend gets exactly these; the reference gradients are
computed from the same q, k, v, selection and gradients in float64 (with its own lse).

**Bounds** (the element and aggregate gates of :mod:`.tolerance`). With ``P`` the float64
probabilities, ``|dP| = Σ_e |dO_e||v_je|`` and ``A_ij = P_ij (|dP|_ij + Σ_j P |dP| + |dO||out|
+ |dlse_i|)`` (the magnitude of ``dS`` and of the terms it is built from: a kernel may take
``delta = dO . out`` with the rounded out):
``M(dq_i) = scale Σ_j A_ij |k_j|``, ``M(dk_j) = scale Σ_i A_ij |q_i|``, ``M(dv_j) = Σ_i P_ij
|dO_i|`` (sums over the g heads of the kv head). Recomputing ``P`` from the given lse perturbs it
relatively by ``δ_i = u_acc ((sqrt(D) + 3) L_i + |lse_i| + 1)`` (``L_i`` the largest allowed
``scale Σ|q||k|``, as in the forward): ``extra = Σ δ_i (terms of M)``. ``K`` counts the terms
of the longest chain: the allowed keys plus the head dims (dq), and the queries and heads
meeting a key plus those (dk, dv). Keys no query may attend must get exactly zero (their NaN
or Inf must not leak), as must every gradient of a row with nothing allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dshal import reference, reference_backward
from dshal.dtypes import DTYPE_UNIT_ROUNDOFF
from dshal_conformance.cases import Case, table_cases
from dshal_conformance.gates import Bound, finite_abs, measure

if TYPE_CHECKING:  # data and checks register this module's builder and check
    from dshal_conformance.checks import Verdict
    from dshal_conformance.data import Call

OP = "sparse_attention_backward"

#: (scenario, shape and options) as the forward's cases, plus ``grad_lse``
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dense-causal-gqa2", dict(Hq=4, Hkv=2, Lq=65, Lk=65, D=32, causal=True)),
    ("topk-gqa8-causal", dict(Hq=16, Hkv=2, Lq=129, Lk=129, D=32, top_k=3, block_size=16,
                              causal=True, grad_lse=True)),
    ("topk-window-cross", dict(B=2, Hq=4, Hkv=2, Lq=33, Lk=129, D=32, top_k=2, block_size=16,
                               window=8, causal=True, grad_lse=True)),
    ("causal-more-queries", dict(Hq=2, Hkv=1, Lq=129, Lk=17, D=16, causal=True,
                                 grad_lse=True)),
    ("window-3", dict(Hq=2, Hkv=1, Lq=20, Lk=50, D=16, window=3)),
    ("indices", dict(B=2, Hq=4, Hkv=2, Lq=17, Lk=97, D=16, block_size=16, indices="random",
                     window=2)),
    ("lse-only", dict(Hq=4, Hkv=1, Lq=40, Lk=80, D=16, top_k=1, block_size=8, causal=True,
                      grad_lse=True, grad_out="zero")),
    ("nan-outside-topk", dict(Hq=4, Hkv=2, Lq=32, Lk=256, D=16, top_k=2, block_size=32,
                              causal=True, data="nan-outside")),
    ("nan-outside-window", dict(Hq=2, Hkv=1, Lq=8, Lk=64, D=16, window=4, data="nan-outside",
                                grad_lse=True)),
    ("logits-1e4", dict(Hq=2, Hkv=1, Lq=64, Lk=64, D=64, causal=True, data="big-logits",
                        dtypes=("bfloat16", "float32"))),
    ("odd-head-dims", dict(Hq=3, Hkv=1, Lq=3, Lk=5, D=3, Dv=17, top_k=1, block_size=2)),
    ("decode-topk-gqa8", dict(B=2, Hq=8, Hkv=1, Lq=1, Lk=1025, D=64, top_k=4, block_size=64,
                              causal=True, grad_lse=True)),
    ("transposed", dict(B=2, Hq=4, Hkv=2, Lq=33, Lk=65, D=32, top_k=2, block_size=16,
                        layout="transposed")),
    ("no-queries", dict(Hq=2, Hkv=1, Lq=0, Lk=17, D=8, top_k=1, block_size=4)),
    ("no-keys", dict(Hq=2, Hkv=1, Lq=5, Lk=0, D=8, causal=True)),
)

_SHAPE = ("B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv", "grad_lse", "grad_out")


def backward_cases() -> Iterator[Case]:
    """The fixed cases of the backward (:data:`CASES` x dtypes)."""
    yield from table_cases(OP, CASES, _SHAPE, {"B": 1})


def build(p: dict[str, Any], rng: np.random.Generator) -> Call:
    """q, k, v, out, lse, grad_out (positional) and grad_lse, indices and the options."""
    from dshal_conformance import data

    forward = data.attention({n: x for n, x in p.items() if n not in ("grad_lse", "grad_out")},
                             rng)
    q, k, v = forward.args
    opts = dict(forward.kwargs)
    top_k, indices = opts.pop("top_k", None), opts.pop("indices", None)
    D = q.shape[-1]
    scale = opts.get("scale") or (1.0 / math.sqrt(D) if D else 1.0)
    bs, causal = opts.get("block_size", 64), opts.get("causal", False)
    if top_k is not None:
        scores = reference.selection_scores(q, k, bs, scale)
        indices = reference.select_blocks(scores, top_k, q.shape[2], k.shape[2], bs, causal)
    out, _, lse = reference.sparse_attention(q, k, v, indices=indices, **opts)
    dtype = q.dtype
    go = rng.standard_normal(out.shape)
    if p.get("grad_out") == "zero":
        go[...] = 0
    kwargs: dict[str, Any] = {**opts, "indices": indices}
    if p.get("grad_lse"):
        kwargs["grad_lse"] = rng.standard_normal(lse.shape).astype(np.float32)
    with np.errstate(over="ignore"):
        args = (q, k, v, out.astype(dtype), lse.astype(np.float32), go.astype(dtype))
    return data.Call(args, kwargs)


def check(call: Call, result: Any, rng: np.random.Generator, quantizer: Any = None
          ) -> Verdict:
    """dq, dk, dv against the float64 reference gradients (see the module docstring)."""
    from dshal_conformance.checks import Verdict

    q, k, v, out, _, go = (np.asarray(a) for a in call.args)
    o = call.kwargs
    B, Hq, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    g = Hq // Hkv if Hkv else 1
    scale = o.get("scale")
    scale = (1.0 / math.sqrt(D) if D else 1.0) if scale is None else float(scale)
    common = dict(indices=o.get("indices"), block_size=o.get("block_size", 64),
                  window=o.get("window", 0), causal=o.get("causal", False), scale=scale)
    ref = reference_backward.sparse_attention_backward(q, k, v, go, grad_lse=o.get("grad_lse"),
                                                       **common)
    dtype = np.dtype(q.dtype).name
    acc = "float64" if dtype == "float64" else "float32"
    u_acc, u_in = DTYPE_UNIT_ROUNDOFF[acc], DTYPE_UNIT_ROUNDOFF[dtype]
    aq, ak = finite_abs(q), finite_abs(k)
    ago, aout = finite_abs(go), finite_abs(out)
    gl = np.zeros((B, Hq, Lq)) if o.get("grad_lse") is None else np.abs(o["grad_lse"])
    allowed = np.repeat(ref.allowed, g, axis=1)  # [B, Hq, Lq, Lk]
    p = ref.p
    dmag = (p * ref.dp_abs).sum(-1) + (ago * aout).sum(-1) + gl  # [B, Hq, Lq]
    a = p * (ref.dp_abs + dmag[..., None])
    with np.errstate(over="ignore", invalid="ignore"):
        logits = np.where(allowed, scale * aq @ np.repeat(ak, g, axis=1).swapaxes(-1, -2), 0)
    size = logits.max(axis=-1, initial=0.0)
    lse_abs = np.where(np.isfinite(ref.lse), np.abs(ref.lse), 0.0)
    delta = (u_acc * ((math.sqrt(D) + 3) * size + lse_abs + 1))[..., None]  # [B, Hq, Lq, 1]

    def per_kv(x: np.ndarray) -> np.ndarray:  # sum over the g heads of each kv head
        return x.reshape(B, Hkv, g, *x.shape[2:]).sum(axis=2)

    akr = np.repeat(ak, g, axis=1)
    m_dq = scale * a @ akr
    x_dq = delta * m_dq
    m_dk = scale * per_kv(a.swapaxes(-1, -2) @ aq)
    x_dk = scale * per_kv((delta * a).swapaxes(-1, -2) @ aq)
    m_dv = per_kv(p.swapaxes(-1, -2) @ ago)
    x_dv = per_kv((delta * p).swapaxes(-1, -2) @ ago)
    n_keys = allowed.sum(-1)[..., None]  # [B, Hq, Lq, 1]
    meets = per_kv(allowed.sum(axis=2))[..., None]  # queries x heads meeting each key
    widest = int(n_keys.max(initial=0))
    verdict = Verdict()
    dq, dk, dv = (np.asarray(r) for r in result)
    for name, got, want, mag, extra, k_len in (
            ("dq", dq, ref.dq, m_dq, x_dq, n_keys + Dv),
            ("dk", dk, ref.dk, m_dk, x_dk, meets + widest + D + Dv),
            ("dv", dv, ref.dv, m_dv, x_dv, meets + widest + D)):
        verdict.measurements.append(measure(got, Bound(name, want, mag, k_len, u_in, acc, dtype,
                                                       extra=extra, extra_rss=extra), rng))
    never = ~ref.allowed.any(axis=2)  # [B, Hkv, Lk]: keys no query may attend
    for name, got in (("dk", dk), ("dv", dv)):
        if got.shape[:3] == never.shape and (got[never] != 0).any():
            verdict.problems.append(f"{name} is not zero on keys no query may attend "
                                    "(a gradient leaks outside the allowed set)")
    return verdict
