"""A tiled kernel masking by multiplication: each tile of 16 queries loads the keys any of its
queries may attend and multiplies the masked scores' weights by 0, so NaN/Inf in a key or value
masked for one query but allowed for a neighbour in the same tile leaks (0 * NaN). Keys no
query of the tile may see are never loaded, so they never leak."""

import math

import numpy as np

from dshal.hookspec import hookimpl
from tests.broken_backends._base import Wrapped

TILE = 16


class TiledNanLeak(Wrapped):
    """NaN leak inside tiles that straddle a mask edge"""

    name = "bb_tiled_nan_leak"

    @hookimpl
    def dshal_sparse_attention_run(self, call):
        if call.q.dtype == np.float64:  # the float32 kernel only
            return super().dshal_sparse_attention_run(call)
        out, sel, lse, q, k, v, mask = self.attention_with_mask(call)
        B, Hq, Lq, _ = q.shape
        Hkv = k.shape[1]
        g = Hq // Hkv
        leaky = np.zeros(out.shape, np.float32)
        with np.errstate(all="ignore"):
            for t in range(Hkv):
                heads = slice(t * g, (t + 1) * g)
                s = call.scale * q[:, heads] @ np.swapaxes(k[:, t:t + 1], -1, -2)
                m = mask[:, t:t + 1]
                top = np.nanmax(np.where(m, s, -math.inf), axis=-1, keepdims=True,
                                initial=-math.inf)
                # the bug: 0 * NaN inside a computed tile (finite masked scores cannot overflow)
                w = np.exp(np.minimum(s - top, 0.0)) * m
                for b in range(B):
                    for i0 in range(0, Lq, TILE):  # one query tile: only its active key tiles
                        cols = mask[b, t, i0:i0 + TILE].any(axis=0)
                        wt = w[b, :, i0:i0 + TILE][..., cols]
                        leaky[b, heads, i0:i0 + TILE] = (wt @ v[b, t, cols]) / wt.sum(
                            -1, keepdims=True)
        out = np.where(mask.any(-1).repeat(g, axis=1)[..., None], leaky, 0).astype(out.dtype)
        return out, sel if call.return_indices else None, lse


plugin = TiledNanLeak()
