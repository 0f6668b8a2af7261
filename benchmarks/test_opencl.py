"""The OpenCL backend against what a user would otherwise call, side by side in one run.

- gemm fp32 at M = N = K = 2048: ``dshal.ops.gemm(backend="opencl")`` against numpy/OpenBLAS
  ``a @ b`` (sgemm) and the numpy backend. Host <-> device copies are included: every call on
  host arrays pays them.
- sparse attention at B=1, Hq=16, Hkv=2, L=8192, D=64, float32, block 64, top_k 8, window
  128, causal: the opencl backend against the numpy backend.

``make bench`` times the cases with pytest-benchmark (tables by :mod:`benchmarks._harness`);
``python -m benchmarks.test_opencl`` prints the same comparison without pytest. Kernels are
built (or loaded from the program cache) by the warm-up call, outside the timing. Nothing here
asserts a timing.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import dshal
from benchmarks._harness import Case, best_time, ids, run
from benchmarks.test_gemm import matrix, numpy_matmul

ATTENTION = dict(top_k=8, block_size=64, window=128, causal=True)


def available() -> bool:
    b = dshal.ops.backends().get("opencl")
    return b is not None and b.available


def dshal_gemm(n: int, backend: str):
    a, b = matrix(n, n), matrix(n, n, 1)
    return lambda: dshal.ops.gemm(a, b, backend=backend)


@functools.cache
def qkv(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 16, length, 64), np.float32),
            rng.standard_normal((1, 2, length, 64), np.float32),
            rng.standard_normal((1, 2, length, 64), np.float32))


def dshal_attention(length: int, backend: str):
    q, k, v = qkv(length)
    return lambda: dshal.ops.sparse_attention(q, k, v, backend=backend, **ATTENTION)


def attention_flops(length: int) -> float:
    """Nominal flops: 2 * 2 * Hq * D per (query, key) over each query's window keys plus the
    keys of its selected blocks (own block up to the query, top_k full blocks before it); a
    block overlapping the window is counted twice, so this is a slight overestimate."""
    bs, w, top_k = ATTENTION["block_size"], ATTENTION["window"], ATTENTION["top_k"]
    p = np.arange(length)
    own = p // bs
    keys = np.minimum(p + 1, w) + np.minimum(own, top_k) * bs + (p - own * bs + 1)
    return float(keys.sum()) * 16 * 64 * 2 * 2


def cases(tiny: bool = False) -> list[Case]:
    """gemm fp32 at 2048³ and sparse attention at L = 8192 (or toy sizes)."""
    n = 64 if tiny else 2048
    op, ref = f"opencl gemm fp32 {n}³", "numpy fp32 (OpenBLAS)"
    f = 2.0 * n**3
    out = [Case(op, ref, functools.partial(numpy_matmul, n), f),
           Case(op, "dshal numpy fp32", functools.partial(dshal_gemm, n, "numpy"), f, peer=ref),
           Case(op, "dshal opencl fp32", functools.partial(dshal_gemm, n, "opencl"), f,
                peer=ref)]
    length = 256 if tiny else 8192
    op, ref = f"opencl sparse attention L={length} (top_k 8, window 128, causal)", "dshal numpy"
    f = attention_flops(length)
    out += [Case(op, ref, functools.partial(dshal_attention, length, "numpy"), f, rounds=3),
            Case(op, "dshal opencl", functools.partial(dshal_attention, length, "opencl"), f,
                 peer=ref, rounds=3)]
    return out


@pytest.mark.skipif(not available(), reason="the opencl backend has no device here")
@pytest.mark.parametrize("case", cases(), ids=ids(cases()))
def test_opencl(benchmark, case: Case) -> None:
    run(benchmark, case)


def main() -> None:
    """Print the comparison: ``python -m benchmarks.test_opencl``."""
    if not available():
        raise SystemExit("the opencl backend has no device here (see dshal info)")
    print(f"opencl device: {dshal.ops.backends()['opencl'].device.name}")
    for op in dict.fromkeys(c.op for c in cases()):
        rows = [c for c in cases() if c.op == op]
        times = {c.impl: best_time(c.make(), repeat=min(c.rounds, 3)) for c in rows}
        print(op)
        for c in rows:
            t = times[c.impl]
            ratio = f", {times[c.peer] / t:.2f}x vs {c.peer}" if c.peer else ""
            print(f"  {c.impl:24s} {t:8.3f} s  {c.flops / t / 1e9:7.1f} GFLOP/s{ratio}")


if __name__ == "__main__":
    main()
