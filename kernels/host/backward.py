"""The backward of ``sparse_attention`` (DESIGN 3.1b) on a device (kernels/attention.cl), for
any :class:`Session`.

Three launches after the selection mask: ``attn_bwd_delta`` (rowsum(dout * out) - grad_lse),
``attn_bwd_dq`` (per query, walking its allowed keys) and ``attn_bwd_dkv`` (per key, summing
over the queries and heads that may attend it). Nothing Lq x Lk is formed; float32 inside,
gradients in the dtypes of q, k, v.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dshal.calls import AttentionBackwardCall
from dshal_kernels import AttentionDefines
from dshal_kernels.host.attention import _padded, heads_per_item
from dshal_kernels.host.session import Session

_I32, _F32 = np.int32, np.float32


def sparse_attention_backward(s: Session, call: AttentionBackwardCall
                              ) -> tuple[Any, Any, Any]:
    """``(dq, dk, dv)`` of ``call`` in session ``s``."""
    xp, q, k, v = s.xp, call.q, call.k, call.v
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    zeros = tuple(xp.zeros(x.shape, x.dtype) for x in (q, k, v))
    if 0 in (B, Hq, Hkv, Lq, Lk):
        return zeros
    g, bs, BH, rows = Hq // Hkv, call.block_size, B * Hkv, B * Hq * Lq
    nb = -(-Lk // bs)
    has_sel = call.indices is not None
    qp, kp, vp = _padded(xp, q), _padded(xp, k), _padded(xp, v)
    op, gp = _padded(xp, call.out), _padded(xp, call.grad_out)
    Dp, Dvp = qp.shape[-1], vp.shape[-1]
    hpw = heads_per_item(g, 2 * Dp, Dvp, s.cpu)  # q and dq, dout per head
    prg = s.program(AttentionDefines.make(np.dtype(q.dtype).name, Dp, Dvp, hpw, has_sel))
    qb, kb, vb = s.upload(qp, "q"), s.upload(kp, "k"), s.upload(vp, "v")
    ob, gb = s.upload(op, "out"), s.upload(gp, "grad_out")
    lse = s.upload(call.lse, "lse", np.float32)
    has_glse = call.grad_lse is not None
    glse = s.upload(call.grad_lse, "grad_lse", np.float32) if has_glse else s.alloc(4, "grad_lse")
    delta = s.alloc(4 * rows, "delta")
    s.run(prg.attn_bwd_delta, (rows,), ob, gb, glse, _I32(has_glse), delta, _I32(rows))
    mask = s.alloc(BH * Lq * nb if has_sel else 1, "selection mask")
    if has_sel:
        idx = s.upload(call.indices, "indices", np.int32)
        s.run(prg.attn_idx_mask, (Lq, BH), idx, mask, _I32(BH), _I32(Lq),
              _I32(call.indices.shape[-1]), _I32(nb))
    shape = (_I32(BH), _I32(g), _I32(Lq), _I32(Lk), _I32(nb), _I32(bs), _I32(call.window),
             _I32(call.causal), _F32(call.scale))
    item = np.dtype(q.dtype).itemsize
    dqb = s.alloc(item * qp.size, "dq")
    s.run(prg.attn_bwd_dq, (Lq, BH * (g // hpw)), qb, kb, vb, gb, lse, delta, mask, dqb,
          *shape)
    dkb, dvb = s.alloc(item * kp.size, "dk"), s.alloc(item * vp.size, "dv")
    s.run(prg.attn_bwd_dkv, (Lk, BH), qb, kb, vb, gb, lse, delta, mask, dkb, dvb, *shape)
    return (s.download(dqb, q.shape, q.dtype) if D else zeros[0],
            s.download(dkb, k.shape, k.dtype) if D else zeros[1],
            s.download(dvb, v.shape, v.dtype) if Dv else zeros[2])
