"""The same calls from 8 threads give bitwise-identical results to sequential calls."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import dshal
from dshal import dispatch
from dshal.registry import registry


def _calls():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 4, 40, 16), dtype=np.float32)
    k = rng.standard_normal((1, 2, 40, 16), dtype=np.float32)
    v = rng.standard_normal((1, 2, 40, 16), dtype=np.float32)
    a = rng.standard_normal((17, 64), dtype=np.float32)
    b = rng.standard_normal((64, 9), dtype=np.float32)
    x = rng.standard_normal((5, 12), dtype=np.float32)
    g = rng.standard_normal(12).astype(np.float32)
    return [
        lambda: dshal.ops.sparse_attention(q, k, v, top_k=2, block_size=8, window=5,
                                           causal=True),
        lambda: dshal.ops.gemm(a, b, precision="int8", group_size=16),
        lambda: dshal.ops.gemm(a, b, precision="bf16"),
        lambda: dshal.ops.quantize(a, "fp8_e5m2")[0].view(np.uint8),
        lambda: dshal.ops.gated_channels(x, g, keep=5, mode="soft_hard"),
        lambda: dshal.ops.gemm(a, b, precision="auto", tolerance=1e-2),
    ]


def test_threads_match_sequential_bitwise():
    calls = _calls()
    sequential = [c() for c in calls]
    registry.reload()  # the threads also race on the first (lazy) plugin load
    dispatch.clear_cache()
    jobs = [i % len(calls) for i in range(8 * 6)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: calls[i](), jobs))
    for i, got in zip(jobs, results):
        np.testing.assert_array_equal(got, sequential[i])
        assert got.dtype == sequential[i].dtype
