"""``gemm(precision="auto")`` never exceeds its tolerance, on hostile data too."""

from __future__ import annotations

import numpy as np
import pytest

import dshal
from dshal.auto import EXACT_LIMIT

REFUSALS_ALLOWED = ("wide_range", "cancellation")
CANDIDATES = ["fp8_e4m3", "fp8_e5m2", "int8", "bf16", "fp16", "tf32", "fp32"]


def _data(kind: str, m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k))
    b = rng.standard_normal((k, n))
    if kind == "outliers":  # a few huge activations, as in LLM outlier channels
        a[rng.integers(0, m, 5), rng.integers(0, k, 5)] *= 1e4
        b[:, rng.integers(0, n, 2)] *= 1e3
    elif kind == "wide_range":  # magnitudes spread over twelve decades
        a *= 10.0 ** rng.uniform(-6, 6, a.shape)
        b *= 10.0 ** rng.uniform(-3, 3, b.shape)
    elif kind == "cancellation":  # rows of a nearly orthogonal to b's columns
        b[:, 1:] = b[:, :1] + 1e-3 * b[:, 1:]
        a = a - (a @ b[:, :1]) @ b[:, :1].T / (b[:, 0] @ b[:, 0])
    return a.astype(np.float32), b.astype(np.float32)


def _measured(a, b, out):
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return np.linalg.norm(out.astype(np.float64) - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "wide_range", "cancellation"])
@pytest.mark.parametrize("tolerance", [1e-1, 1e-2, 1e-3, 1e-5])
@pytest.mark.parametrize("shape", [(33, 200, 17), (256, 640, 300)], ids=["exact", "sketched"])
def test_auto_meets_tolerance(kind, tolerance, shape):
    m, k, n = shape
    for seed in range(2):
        a, b = _data(kind, m, k, n, seed)
        try:
            out, info = dshal.ops.gemm(a, b, precision="auto", tolerance=tolerance,
                                       candidates=CANDIDATES, return_info=True)
        except dshal.UnsupportedError:
            # refusing is allowed only where even fp32 really misses the budget
            fp32 = dshal.ops.gemm(a, b, precision="fp32")
            assert kind in REFUSALS_ALLOWED and _measured(a, b, fp32) > tolerance / 100
            continue
        err = _measured(a, b, out)
        assert err <= tolerance, (kind, info, err)
        assert info["estimated_error"] <= tolerance
        assert info["precision"] in CANDIDATES and info["backend"] == "numpy"


def test_sketched_shape_really_is_sketched():
    assert 256 * 640 * 300 > EXACT_LIMIT >= 33 * 200 * 17


def test_auto_picks_cheap_precision_when_it_suffices():
    a, b = _data("gaussian", 64, 256, 32, 0)
    _, info = dshal.ops.gemm(a, b, precision="auto", tolerance=0.1, candidates=CANDIDATES,
                             return_info=True)
    assert info["precision"] in ("fp8_e4m3", "fp8_e5m2")
    _, info = dshal.ops.gemm(a, b, precision="auto", tolerance=1e-3, candidates=CANDIDATES,
                             return_info=True)
    assert info["precision"] in ("fp16", "tf32")


def test_auto_default_order_is_the_backends():
    a, b = _data("gaussian", 8, 16, 4, 0)
    _, info = dshal.ops.gemm(a, b, precision="auto", return_info=True)
    assert info["precision"] == "fp32"  # the numpy backend declares fp32 alone


def test_auto_refuses_an_impossible_budget():
    a, b = _data("gaussian", 8, 512, 4, 0)
    with pytest.raises(dshal.UnsupportedError, match="no candidate meets tolerance=1e-12"):
        dshal.ops.gemm(a, b, precision="auto", tolerance=1e-12, candidates=["bf16", "fp32"])
