"""Shared inputs of the compiled and portable backward tests (numpy, opencl): a forward on the
numpy backend and the float64 reference gradients of the same call."""

from __future__ import annotations

from typing import Any

import numpy as np

from dshal import ops, reference_backward

#: call shapes and options covering selections, windows, dense, GQA, Lq != Lk and decode
CASES = [
    dict(B=1, Hq=4, Hkv=2, Lq=100, Lk=130, D=16, top_k=2, block_size=16, window=8, causal=True),
    dict(B=2, Hq=8, Hkv=1, Lq=64, Lk=64, D=32, top_k=3, block_size=8),
    dict(B=1, Hq=2, Hkv=2, Lq=130, Lk=100, D=16, causal=True),  # dense, more queries
    dict(B=1, Hq=3, Hkv=1, Lq=50, Lk=100, D=8, window=5),  # window, not causal
    dict(B=1, Hq=4, Hkv=4, Lq=1, Lk=257, D=16, top_k=2, block_size=32, causal=True),  # decode
    dict(B=1, Hq=2, Hkv=1, Lq=33, Lk=47, D=8, top_k=5, block_size=1, causal=True),
]
SHAPE = ("B", "Hq", "Hkv", "Lq", "Lk", "D")


def inputs(rng: np.random.Generator, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int,
           dtype: Any = np.float32, **opts: Any) -> tuple[Any, ...]:
    """q, k, v, the numpy backend's forward (out, lse), a random grad_out and the selection
    (the forward's, or the caller's ``indices``)."""
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in
               ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))
    res = ops.sparse_attention(q, k, v, return_indices=opts.get("top_k") is not None,
                               return_lse=True, backend="numpy", **opts)
    idx = res[1] if opts.get("top_k") is not None else opts.get("indices")
    go = rng.standard_normal(res[0].shape).astype(dtype)
    return q, k, v, res[0], res[-1], go, idx


def grads(case: dict[str, Any], rng: np.random.Generator, backend: str,
          dtype: Any = np.float32, with_lse: bool = False) -> tuple[Any, Any]:
    """``backend``'s gradients of ``case`` (with a random lse gradient when asked) and the float64
    reference's."""
    shape = {n: case[n] for n in SHAPE}
    opts = {n: x for n, x in case.items() if n not in shape}
    q, k, v, out, lse, go, idx = inputs(rng, **shape, dtype=dtype, **opts)
    gl = rng.standard_normal(lse.shape).astype(np.float32) if with_lse else None
    kw = {n: opts[n] for n in ("block_size", "window", "causal") if n in opts}
    got = ops.sparse_attention_backward(q, k, v, out, lse, go, grad_lse=gl, indices=idx,
                                        backend=backend, **kw)
    ref = reference_backward.sparse_attention_backward(q, k, v, go, grad_lse=gl, indices=idx,
                                                       **kw)
    return got, ref
