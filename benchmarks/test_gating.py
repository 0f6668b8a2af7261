"""gated_channels: gated linear against dense ``F.linear``; weightless gates against a copy.

Gated linear: 4096 tokens x 4096 -> 4096 float32, 40% of the output channels closed (static
gates): dshal computes only the open rows; the peers compute every row (``F.linear``, numpy
``x @ w.T``). Rates count the flops each one performs. Weightless hard gates on 64 MiB: dshal
against numpy ``np.where`` and ``np.copyto`` (bytes = read + write).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import dshal
from benchmarks._harness import Case, ids, run

CLOSED = 0.4


@functools.cache
def linear_inputs(t: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [t, c], weight [c, c], gate logits [c] with ``CLOSED`` of them <= 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((t, c), dtype=np.float32)
    w = rng.standard_normal((c, c), dtype=np.float32) / np.float32(c**0.5)
    logits = np.ones(c, np.float32)
    logits[rng.permutation(c)[: int(CLOSED * c)]] = -1
    return x, w, logits


def torch_linear(t: int, c: int):
    import torch

    x, w, _ = (torch.from_numpy(a) for a in linear_inputs(t, c))
    return lambda: torch.nn.functional.linear(x, w)


def numpy_linear(t: int, c: int):
    x, w, _ = linear_inputs(t, c)
    return lambda: x @ w.T


def dshal_linear(t: int, c: int):
    x, w, logits = linear_inputs(t, c)
    return lambda: dshal.ops.gated_channels(x, logits, weight=w)


@functools.cache
def channel_inputs(rows: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((rows, c), dtype=np.float32), rng.standard_normal(c).astype(
        np.float32)


def copy(rows: int, c: int):
    x, _ = channel_inputs(rows, c)
    dst = np.empty_like(x)
    return lambda: np.copyto(dst, x)


def numpy_where(rows: int, c: int):
    x, g = channel_inputs(rows, c)
    return lambda: np.where(g > 0, x, np.float32(0))


def dshal_gates(rows: int, c: int):
    x, g = channel_inputs(rows, c)
    return lambda: dshal.ops.gated_channels(x, g)


def cases(tiny: bool = False) -> list[Case]:
    """Gated linear rows and weightless-gate rows (or toy sizes)."""
    t = c = 64 if tiny else 4096
    op, ref = f"gated linear {t}x{c}->{c}, {CLOSED:.0%} closed", "torch F.linear (dense)"
    f = 2.0 * t * c * c
    out = [Case(op, ref, functools.partial(torch_linear, t, c), f),
           Case(op, "numpy x @ w.T (dense)", functools.partial(numpy_linear, t, c), f, peer=ref),
           Case(op, "dshal numpy gated_channels", functools.partial(dshal_linear, t, c),
                f * (1 - CLOSED), peer=ref)]
    rows, c = (16, 64) if tiny else (4096, 4096)  # 64 MiB of float32
    op, ref = f"gated channels (no weight) {rows * c * 4 >> 20} MiB", "np.copyto"
    nbytes = 8.0 * rows * c
    out += [Case(op, ref, functools.partial(copy, rows, c), nbytes=nbytes, rounds=10),
            Case(op, "numpy np.where", functools.partial(numpy_where, rows, c), nbytes=nbytes,
                 peer=ref, rounds=10),
            Case(op, "dshal numpy gated_channels", functools.partial(dshal_gates, rows, c),
                 nbytes=nbytes, peer=ref, rounds=10)]
    return out


@pytest.mark.parametrize("case", cases(), ids=ids(cases()))
def test_gating(benchmark, case: Case) -> None:
    if "torch" in case.impl:
        pytest.importorskip("torch")
    run(benchmark, case)
