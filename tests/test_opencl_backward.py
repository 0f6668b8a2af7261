"""The opencl backend's backward of sparse_attention (kernels/attention.cl: attn_bwd_*) against
the float64 reference gradients (DESIGN 3.1b) on this machine's OpenCL device (PoCL's CPU device
in CI): selections, windows, dense, GQA, Lq != Lk, the lse gradient, low precision, NaN/Inf
outside the allowed set and rows with nothing allowed. Its certification is
``dshal certify opencl`` (the sparse_attention_backward cases)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("pyopencl")

from dshal import ops, reference
from tests.backward_data import CASES, grads, inputs
from tests.requirements import require_backend

require_backend("opencl")
pytestmark = pytest.mark.xdist_group("opencl")


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("with_lse", [False, True])
def test_matches_the_float64_reference(case, with_lse) -> None:
    got, ref = grads(case, np.random.default_rng(len(str(case))), "opencl", with_lse=with_lse)
    for name, x, want in zip("qkv", got, (ref.dq, ref.dk, ref.dv)):
        assert x.dtype == np.float32 and x.shape == want.shape
        err = np.abs(x - want).max(initial=0)
        assert err <= 2e-5 * max(1.0, np.abs(want).max(initial=0)), (name, err)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_low_precision_in_its_dtype(dtype) -> None:
    got, ref = grads(CASES[0], np.random.default_rng(3), "opencl", dtype, with_lse=True)
    unit = 2.0 ** -8 if dtype is ml_dtypes.bfloat16 else 2.0 ** -11
    for name, x, want in zip("qkv", got, (ref.dq, ref.dk, ref.dv)):
        assert x.dtype == dtype
        err = np.abs(x.astype(np.float64) - want).max(initial=0)
        assert err <= 4 * unit * max(1.0, np.abs(want).max(initial=0)), (name, err)


def test_nan_outside_the_allowed_set_and_empty_rows() -> None:
    rng = np.random.default_rng(2)
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 2, 24, 256, 8
    q, k, v, out, lse, go, idx = inputs(rng, B, Hq, Hkv, Lq, Lk, D, top_k=1, block_size=16,
                                         causal=True)
    allowed = reference.allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=16, window=0,
                                     causal=True, indices=idx)
    never = ~allowed.any(axis=2)  # keys no query of a kv head may attend
    assert never.any()
    k[never], v[never] = np.inf, np.nan
    lse[:, :, :3] = -np.inf  # rows with nothing allowed (as the forward reports them)
    got = ops.sparse_attention_backward(q, k, v, out, lse, go, indices=idx, block_size=16,
                                        causal=True, backend="opencl")
    for x in got:
        assert np.isfinite(x).all()
    dq, dk, dv = got
    assert not dq[:, :, :3].any()
    assert not dk[never].any() and not dv[never].any()


def test_reruns_are_bitwise_equal() -> None:
    first, _ = grads(CASES[1], np.random.default_rng(5), "opencl")
    again, _ = grads(CASES[1], np.random.default_rng(5), "opencl")
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
