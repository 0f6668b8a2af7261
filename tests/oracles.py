"""Independent oracles shared by the tests: masks built loop by loop from the DESIGN text, and
torch's scaled_dot_product_attention with an explicit boolean mask."""

from __future__ import annotations

import math

import numpy as np
import torch


def qkv(B=2, Hq=4, Hkv=2, Lq=9, Lk=9, D=8, Dv=5, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Lq, D))
    k = rng.standard_normal((B, Hkv, Lk, D))
    v = rng.standard_normal((B, Hkv, Lk, Dv))
    return q, k, v


def mask(Lq, Lk, causal, window=0):
    """Independent construction of the dense/window mask, bottom-right aligned."""
    m = np.zeros((Lq, Lk), dtype=bool)
    for i in range(Lq):
        p = i + Lk - Lq
        for j in range(Lk):
            ok = j <= p if causal else True
            if window > 0:
                ok = ok and abs(p - j) < window
            m[i, j] = ok
    return m


def sdpa(q, k, v, mask, scale=None):
    """torch SDPA in float64 with an explicit boolean mask [Lq, Lk] (True = attend)."""
    g = q.shape[1] // k.shape[1]
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    tk, tv = tk.repeat_interleave(g, dim=1), tv.repeat_interleave(g, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(mask), scale=scale)
    s = (tq @ tk.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    lse = torch.logsumexp(s.masked_fill(~torch.from_numpy(mask), -math.inf), dim=-1)
    return out.numpy(), lse.numpy()
