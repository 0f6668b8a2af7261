"""Dispatch overhead: a tiny ``gated_channels`` call against the same numpy expression.

Run with ``make bench`` (pytest-benchmark); the table shows both and their ratio, the overhead
is the difference of the medians. Target: at most 10 µs per call over the bare numpy
expression. Not a test of timing: nothing asserts it.
"""

from __future__ import annotations

import numpy as np
import pytest

import dshal
from benchmarks._harness import Case, ids, run

X = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
G = np.random.default_rng(1).standard_normal(16).astype(np.float32)
ZERO = np.float32(0)
OP, REF = "dispatch overhead (tiny gated_channels 4x16)", "numpy np.where"


def bare_numpy() -> np.ndarray:
    return np.where(G > 0.0, X, ZERO)


def through_dshal() -> np.ndarray:
    return dshal.ops.gated_channels(X, G)


def cases(tiny: bool = False) -> list[Case]:
    """The bare expression and the dshal call (same size either way)."""
    return [Case(OP, REF, lambda: bare_numpy, rounds=400, iterations=50),
            Case(OP, "dshal.ops.gated_channels", lambda: through_dshal, peer=REF,
                 rounds=400, iterations=50)]


@pytest.mark.parametrize("case", cases(), ids=ids(cases()))
def test_tiny_gated_channels(benchmark, case: Case) -> None:
    run(benchmark, case)


def main(rounds: int = 40, number: int = 2000) -> None:
    """Print the overhead without pytest: ``python -m benchmarks.test_dispatch``.

    The two are timed in alternation (``rounds`` rounds of ``number`` calls each) and each
    keeps its best round, so a neighbour's burst on a shared machine shifts both or neither.
    """
    import timeit

    through_dshal()
    base = ours = float("inf")
    for _ in range(rounds):
        base = min(base, timeit.timeit(bare_numpy, number=number) / number)
        ours = min(ours, timeit.timeit(through_dshal, number=number) / number)
    print(f"numpy expression {base * 1e6:.2f} µs, dshal.ops.gated_channels {ours * 1e6:.2f} µs, "
          f"dispatch overhead {(ours - base) * 1e6:.2f} µs per call (target <= 10 µs)")


if __name__ == "__main__":
    main()
