"""Sparse attention against dense causal SDPA and FlexAttention, side by side.

B=1, Hq=16, Hkv=2, D=64, float32, block 64, causal: dshal's numpy backend (top_k 8 + window
128 at L=8192, top_k 16 + window 128 at L=16384, and top_k >= the number of blocks, the
dense-equivalent call) against ``torch.nn.functional.scaled_dot_product_attention(is_causal=
True, enable_gqa=True)``. FlexAttention runs with a block mask built from the same selection
(exactly the same function, compiled with ``torch.compile``) at L=2048: its
``create_block_mask`` (quadratic in L: ~25 s at 8192) and compile time make 8192 too slow for
one run; the mask build is timed as its own row. Rates count the attended
(query, key) pairs: 4 * D flops each.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest

import dshal
from benchmarks._harness import Case, ids, run

H, HKV, D, BS = 16, 2, 64, 64


@functools.cache
def inputs(L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [1, H, L, D], k and v [1, HKV, L, D], float32 (shared by every row of a size)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, H, L, D), dtype=np.float32),
            rng.standard_normal((1, HKV, L, D), dtype=np.float32),
            rng.standard_normal((1, HKV, L, D), dtype=np.float32))


def attended_pairs(L: int, top_k: int, window: int) -> int:
    """(query, key) pairs a causal top-k + window selection attends at most (per head)."""
    p = np.arange(L)
    return int(np.minimum(p + 1, window + (top_k + 1) * BS).sum())


def flops(L: int, pairs: int | None = None) -> float:
    return 4.0 * D * H * (L * (L + 1) // 2 if pairs is None else pairs)


def sdpa(L: int):
    """Dense causal grouped-query SDPA on the same inputs."""
    import torch

    tq, tk, tv = (torch.from_numpy(x) for x in inputs(L))
    return lambda: torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, is_causal=True, enable_gqa=True)


def sparse(L: int, top_k: int, window: int):
    q, k, v = inputs(L)
    return lambda: dshal.ops.sparse_attention(q, k, v, top_k=top_k, block_size=BS,
                                              window=window, causal=True)


def selection_mask_mod(L: int, top_k: int, window: int):
    """FlexAttention ``mask_mod`` of exactly the keys dshal's selection attends."""
    import torch

    q, k, v = inputs(L)
    _, idx = dshal.ops.sparse_attention(q, k, v, top_k=top_k, block_size=BS, window=window,
                                        causal=True, return_indices=True)
    sel = np.zeros((1, HKV, L, -(-L // BS)), bool)
    b, h, i, j = np.nonzero(idx >= 0)
    sel[b, h, i, idx[b, h, i, j]] = True
    tsel, g = torch.from_numpy(sel), H // HKV

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki < window) | tsel[b, h // g, qi, ki // BS])

    return mask_mod


def flex_block_mask(L: int, top_k: int, window: int):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = selection_mask_mod(L, top_k, window)
    return lambda: create_block_mask(mask_mod, 1, H, L, L, device="cpu")


def flex(L: int, top_k: int, window: int, compiled: bool = True):
    """FlexAttention, compiled (the fused kernel; the warm-up call compiles) unless told not
    to (the eager path materialises the scores: only for the toy-size smoke test)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    mask = flex_block_mask(L, top_k, window)()
    tq, tk, tv = (torch.from_numpy(x) for x in inputs(L))
    fn = torch.compile(flex_attention) if compiled else flex_attention

    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile()"
            return fn(tq, tk, tv, block_mask=mask, enable_gqa=True, scale=1 / math.sqrt(D))

    return call


def cases(tiny: bool = False) -> list[Case]:
    """Rows at L=8192 and 16384 (dshal vs SDPA) and 2048 (with FlexAttention)."""
    out: list[Case] = []
    sizes = [(256, 2, 32, 128)] if tiny else [(8192, 8, 128, 3), (16384, 16, 128, 2)]
    for L, top_k, w, rounds in sizes:
        op, ref = f"sparse_attention L={L} top_k={top_k} window={w}", "torch SDPA dense causal"
        nb = -(-L // BS)
        out += [
            Case(op, ref, functools.partial(sdpa, L), flops(L), rounds=rounds),
            Case(op, "dshal numpy sparse", functools.partial(sparse, L, top_k, w),
                 flops(L, attended_pairs(L, top_k, w)), peer=ref, rounds=rounds),
            Case(op, f"dshal numpy top_k={nb} (dense-equivalent)",
                 functools.partial(sparse, L, nb, w), flops(L), peer=ref, rounds=rounds),
        ]
    L, top_k, w = (256, 2, 32) if tiny else (2048, 8, 128)
    op, ref = f"sparse_attention L={L} top_k={top_k} window={w} (FlexAttention)", "torch SDPA"
    pairs = flops(L, attended_pairs(L, top_k, w))
    out += [
        Case(op, ref, functools.partial(sdpa, L), flops(L), rounds=3),
        Case(op, "dshal numpy sparse", functools.partial(sparse, L, top_k, w), pairs,
             peer=ref, rounds=3),
        Case(op, "FlexAttention (same selection)",
             functools.partial(flex, L, top_k, w, not tiny), pairs, peer=ref, rounds=2),
        Case(op, "create_block_mask (once per mask)",
             functools.partial(flex_block_mask, L, top_k, w), rounds=1),
    ]
    return out


@pytest.mark.parametrize("case", cases(), ids=ids(cases()))
def test_attention(benchmark, case: Case) -> None:
    if "dshal" not in case.impl:
        pytest.importorskip("torch")
    run(benchmark, case)
