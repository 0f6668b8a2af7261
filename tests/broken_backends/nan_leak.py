"""Masking by multiplication: weights of keys outside the allowed set are multiplied by 0
after the exponential, so NaN/Inf in those keys or values reach the output."""

import math
from dataclasses import replace

import numpy as np

from dshal import reference
from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class NanLeak(Wrapped):
    """NaN leak from keys outside the allowed set"""

    name = "bb_nan_leak"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        selecting = call.top_k is not None
        out, sel, lse = super().dshal_sparse_attention_run(
            replace(call, return_indices=call.return_indices or selecting))
        q, k, v = (np.asarray(x, np.float32) for x in (call.q, call.k, call.v))
        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        g = Hq // Hkv
        selection = sel if selecting else call.indices
        mask = reference.allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=call.block_size,
                                      window=call.window, causal=call.causal,
                                      indices=selection).astype(np.float32)
        leaky = np.zeros(out.shape, np.float32)
        with np.errstate(all="ignore"):
            for t in range(Hkv):
                s = call.scale * q[:, t * g:(t + 1) * g] @ np.swapaxes(k[:, t:t + 1], -1, -2)
                w = np.exp(s - np.nanmax(np.where(mask[:, t:t + 1] > 0, s, -math.inf),
                                         axis=-1, keepdims=True, initial=-math.inf))
                w = w * mask[:, t:t + 1]  # the bug: 0 * NaN is NaN
                leaky[:, t * g:(t + 1) * g] = (w @ v[:, t:t + 1]) / w.sum(-1, keepdims=True)
        out = np.where(mask.any(-1).repeat(g, axis=1)[..., None], leaky, 0).astype(out.dtype)
        return out, sel if call.return_indices else None, lse


plugin = NanLeak()
