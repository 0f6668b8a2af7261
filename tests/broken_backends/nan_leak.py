"""Masking by multiplication: weights of keys outside the allowed set are multiplied by 0
after the exponential, so NaN/Inf in those keys or values reach the output."""

import math

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped


class NanLeak(Wrapped):
    """NaN leak from keys outside the allowed set"""

    name = "bb_nan_leak"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        out, sel, lse, q, k, v, mask = self.attention_with_mask(call)
        mask = mask.astype(np.float32)
        Hq, Hkv = q.shape[1], k.shape[1]
        g = Hq // Hkv
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
