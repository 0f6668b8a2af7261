"""The backward of sparse_attention on the CPU (DESIGN 3.1b): the compiled kernel of
``_backward.c`` run on the backend's thread pool.

The work is cut into units, each the query rows [a, z) of one (batch, kv head); a unit
recomputes its rows' probabilities from the forward's lse over their allowed keys only and
writes their dq rows and adds into dk and dv of its kv head. Units of one kv head run on
separate threads only when there are fewer (batch, kv head) pairs than threads; each then adds
into its own dk/dv buffer (Lk x (D + Dv) floats), summed in unit order afterwards, so results
do not depend on the threads (reruns are bitwise equal). The kernel computes in float32:
float16/bfloat16 inputs are converted (and the gradients converted back); float64 is not
declared (a backend that computes it in float64 serves it).
"""

from __future__ import annotations

import numpy as np

from dshal.backends.numpy import native
from dshal.backends.numpy.attention import _parallel, _workers
from dshal.calls import AttentionBackwardCall

#: below this many (query row, head) pairs a call runs on the calling thread
_THREADING_MIN = 1 << 12


def _f32(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else np.ascontiguousarray(x, dtype=np.float32)


def sparse_attention_backward(call: AttentionBackwardCall
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dq, dk, dv)`` in the dtypes of q, k and v (see the module docstring)."""
    lib = native.BACKWARD
    if lib is None:  # the plugin declares the backward only when the kernel is built
        raise RuntimeError(f"the numpy backend's backward is {native.BACKWARD_STATUS}")
    q, k, v, go = (_f32(x) for x in (call.q, call.k, call.v, call.grad_out))
    lse, glse = _f32(call.lse), _f32(call.grad_lse)
    idx = None if call.indices is None else \
        np.ascontiguousarray(np.sort(np.asarray(call.indices, np.int64), axis=-1))
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq, dk, dv = np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32), \
        np.zeros(v.shape, np.float32)
    if 0 not in (B, Hq, Lq, Lk):
        g = Hq // Hkv
        threads = _workers() if Hq * Lq >= _THREADING_MIN else 1
        parts = min(Lq, max(1, -(-threads // (B * Hkv))))
        step = -(-Lq // parts)
        units = [(b, t, a, min(Lq, a + step)) for b in range(B) for t in range(Hkv)
                 for a in range(0, Lq, step)]
        shared = parts == 1
        partial = {} if shared else {u: (np.zeros(k.shape[2:], np.float32),
                                         np.zeros(v.shape[2:], np.float32)) for u in units}

        def work(unit: tuple[int, int, int, int]) -> None:
            b, t, a, z = unit
            heads = slice(t * g, (t + 1) * g)
            dk_t, dv_t = (dk[b, t], dv[b, t]) if shared else partial[unit]
            lib.attention_backward(
                q[b, heads], k[b, t], v[b, t], lse[b, heads], go[b, heads],
                None if glse is None else glse[b, heads], None if idx is None else idx[b, t],
                dq[b, heads], dk_t, dv_t, a, z, call.block_size, call.window, call.causal,
                call.scale)

        _parallel(work, units, threads)
        for (b, t, _, _), (dk_u, dv_u) in partial.items():  # unit order: deterministic
            dk[b, t] += dk_u
            dv[b, t] += dv_u
    return (dq.astype(call.q.dtype, copy=False), dk.astype(call.k.dtype, copy=False),
            dv.astype(call.v.dtype, copy=False))
