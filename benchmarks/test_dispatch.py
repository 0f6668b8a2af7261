"""Dispatch overhead: a tiny ``gated_channels`` call against the same numpy expression.

Run with ``make bench`` (pytest-benchmark); the summary line prints the overhead in µs. Target:
at most 10 µs per call over the bare numpy expression. Not a test of timing: nothing asserts it.
"""

from __future__ import annotations

import numpy as np
import pytest

import dshal

X = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
G = np.random.default_rng(1).standard_normal(16).astype(np.float32)
ZERO = np.float32(0)


def bare_numpy() -> np.ndarray:
    return np.where(G > 0.0, X, ZERO)


def through_dshal() -> np.ndarray:
    return dshal.ops.gated_channels(X, G)


@pytest.mark.parametrize("impl", [bare_numpy, through_dshal], ids=["numpy", "dshal"])
def test_tiny_gated_channels(benchmark, impl):
    impl()  # load plugins and fill the dispatch cache outside the timing
    benchmark.group = "dispatch overhead (tiny gated_channels)"
    benchmark(impl)


def main() -> None:
    """Print the overhead without pytest: ``python benchmarks/test_dispatch.py``."""
    import timeit

    through_dshal()
    n = 20000
    base = min(timeit.repeat(bare_numpy, number=n, repeat=5)) / n
    ours = min(timeit.repeat(through_dshal, number=n, repeat=5)) / n
    print(f"numpy expression {base * 1e6:.2f} µs, dshal.ops.gated_channels {ours * 1e6:.2f} µs, "
          f"dispatch overhead {(ours - base) * 1e6:.2f} µs per call (target <= 10 µs)")


if __name__ == "__main__":
    main()
