"""Training attention: forward + backward of dshal's sparse attention against dense SDPA's.

B=1, Hq=16, Hkv=2, D=64, float32, block 64, window 128, causal, on torch CPU tensors that
require grad: ``dshal.ops.sparse_attention`` (forward on the numpy backend, backward through
dispatch on its compiled kernel) then ``out.backward(grad)``, against
``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` forward + backward, at
L=8192 top_k 8 and L=16384 top_k 16 (issue 13's sizes). Each row is one whole step (forward,
backward, the gradients written). FlexAttention has no row: torch 2.13 has no FlexAttention
backward on the CPU ("FlexAttention does not support backward on CPU");
``benchmarks/quick_backward.py --flex`` times its forward, and the peak extra memory of the
step at L=32768 is ``quick_backward.py --length 32768 --top-k 16 --memory``. Rates count the
attended (query, key) pairs: 14 * D flops each (forward 4 * D, backward 10 * D).
"""

from __future__ import annotations

import functools

import pytest

from benchmarks._harness import Case, ids, run
from benchmarks.test_attention import HKV, D, H, attended_pairs

BLOCK, WINDOW = 64, 128


def step(kind: str, L: int, top_k: int):
    """One forward + backward of ``kind`` ("dshal" or "sdpa") at length L."""
    from benchmarks import quick_backward

    q, k, v, grad = quick_backward.inputs(L, H, HKV, D)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    forward = quick_backward.forward_of(kind, leaves, top_k, BLOCK, WINDOW)

    def call() -> None:
        for x in leaves:
            x.grad = None
        forward().backward(grad)

    return call


def flops(L: int, pairs: int | None = None) -> float:
    """Forward + backward flops of attention over ``pairs`` (query, key) pairs per head
    (default: every causal pair)."""
    return 14 * D * H * (L * (L + 1) // 2 if pairs is None else pairs)


def cases(tiny: bool = False) -> list[Case]:
    """Rows at L=8192 and 16384 (L=256 when tiny)."""
    out: list[Case] = []
    for L, top_k, rounds in [(256, 2, 1)] if tiny else [(8192, 8, 3), (16384, 16, 2)]:
        op = f"sparse_attention forward + backward L={L} top_k={top_k} window={WINDOW}"
        ref = "torch SDPA dense causal fwd+bwd"
        out += [
            Case(op, ref, functools.partial(step, "sdpa", L, top_k), flops(L), rounds=rounds),
            Case(op, "dshal sparse fwd+bwd", functools.partial(step, "dshal", L, top_k),
                 flops(L, attended_pairs(L, top_k, WINDOW)), peer=ref, rounds=rounds),
        ]
    return out


@pytest.mark.parametrize("case", cases(), ids=ids(cases()))
def test_training(benchmark, case: Case) -> None:
    pytest.importorskip("torch")
    run(benchmark, case)
