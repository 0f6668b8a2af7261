"""The backward of sparse_attention on the CPU (DESIGN 3.1b): the compiled kernel of
``_attention.c`` run on the backend's thread pool.

The kernel is key-major: it walks the key blocks of one (batch, kv head) and, for each, the
query rows allowed keys of it (the rows that selected it and those whose window reaches it), so
a block's k, v, dk and dv rows stay in cache while its rows pass; each row recomputes its
probabilities from the forward's lse over those keys only and adds its part of dq. Delta is
FlashAttention-2's ``rowsum(grad_out * out)``. The work is cut into units, each the key blocks
[b0, b1) of one (batch, kv head), balanced by the (row, block) pairs they hold. A unit writes the
dk and dv rows of its own blocks (no other unit touches them); units of one kv head run on
separate threads only when there are fewer (batch, kv head) pairs than threads, and each then
adds dq into its own buffer (g x Lq x D floats), summed in unit order afterwards, so results do
not depend on the threads' timing (reruns are bitwise equal). The kernel computes in float32:
float16/bfloat16 inputs are converted (and the gradients converted back); float64 is not
declared (a backend that computes it in float64 serves it).
"""

from __future__ import annotations

import itertools

import numpy as np

from dshal.backends.numpy import native
from dshal.backends.numpy.attention import _parallel, _workers
from dshal.calls import AttentionBackwardCall

#: below this many (query row, head) pairs a call runs on the calling thread
_THREADING_MIN = 1 << 12


def _f32(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else np.ascontiguousarray(x, dtype=np.float32)


def _block_spans(idx: np.ndarray | None, lq: int, n_blocks: int, parts: int
                 ) -> list[tuple[int, int]]:
    """Key blocks [0, n_blocks) cut into at most ``parts`` spans of about equal work: the
    (row, block) pairs of the selection ``idx`` [Lq, n] plus a window's or dense share."""
    if parts <= 1 or n_blocks <= 1:
        return [(0, n_blocks)]
    work = np.full(n_blocks, 1.0 + (lq / n_blocks if idx is None else 0.0))
    if idx is not None:
        picked = idx[idx >= 0]
        work += np.bincount(picked, minlength=n_blocks)[:n_blocks]
    ends = np.searchsorted(np.cumsum(work), np.arange(1, parts) * work.sum() / parts) + 1
    cuts = [0, *sorted({int(e) for e in ends if 0 < e < n_blocks}), n_blocks]
    return list(itertools.pairwise(cuts))


def sparse_attention_backward(call: AttentionBackwardCall
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dq, dk, dv)`` in the dtypes of q, k and v (see the module docstring)."""
    lib = native.ATTENTION
    if lib is None:  # the plugin declares the backward only when the kernel is built
        raise RuntimeError(f"the numpy backend's compiled attention is "
                           f"{native.ATTENTION_STATUS}")
    q, k, v, go, out = (_f32(x) for x in (call.q, call.k, call.v, call.grad_out, call.out))
    lse, glse = _f32(call.lse), _f32(call.grad_lse)
    idx = None if call.indices is None else \
        np.ascontiguousarray(np.sort(np.asarray(call.indices, np.int64), axis=-1))
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq, dk, dv = np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32), \
        np.zeros(v.shape, np.float32)
    if 0 not in (B, Hq, Lq, Lk):
        delta = np.einsum("bhld,bhld->bhl", go, out)
        g, n_blocks = Hq // Hkv, -(-Lk // call.block_size)
        threads = _workers() if Hq * Lq >= _THREADING_MIN else 1
        parts = min(n_blocks, max(1, -(-threads // (B * Hkv))))
        units = [(b, t, b0, b1) for b in range(B) for t in range(Hkv)
                 for b0, b1 in _block_spans(None if idx is None else idx[b, t], Lq, n_blocks,
                                            parts)]
        shared = len(units) == B * Hkv
        partial = {} if shared else {u: np.zeros((g, Lq, q.shape[3]), np.float32)
                                     for u in units}

        def work(unit: tuple[int, int, int, int]) -> None:
            b, t, b0, b1 = unit
            heads = slice(t * g, (t + 1) * g)
            lib.attention_backward(
                q[b, heads], k[b, t], v[b, t], lse[b, heads], delta[b, heads], go[b, heads],
                None if glse is None else glse[b, heads], None if idx is None else idx[b, t],
                dq[b, heads] if shared else partial[unit], dk[b, t], dv[b, t], b0, b1,
                call.block_size, call.window, call.causal, call.scale, native.ATTENTION_ISA)

        _parallel(work, units, threads, blas=False)
        for (b, t, _, _), dq_u in partial.items():  # unit order: deterministic
            dq[b, t * g:(t + 1) * g] += dq_u
    return (dq.astype(call.q.dtype, copy=False), dk.astype(call.k.dtype, copy=False),
            dv.astype(call.v.dtype, copy=False))
