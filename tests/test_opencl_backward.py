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

from dshal import ops, reference, reference_backward
from dshal.registry import registry

_BACKEND = registry.backends().get("opencl")
if _BACKEND is None or not _BACKEND.available:
    pytest.skip("the opencl backend is not installed or has no device: "
                f"{_BACKEND.unavailable_reason() if _BACKEND else 'not installed'}",
                allow_module_level=True)
pytestmark = pytest.mark.xdist_group("opencl")


def _inputs(rng, B, Hq, Hkv, Lq, Lk, D, dtype=np.float32, **opts):
    """q, k, v and the numpy backend's forward (out, lse, selection) with a random grad_out."""
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in
               ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))
    res = ops.sparse_attention(q, k, v, return_indices=opts.get("top_k") is not None,
                               return_lse=True, backend="numpy", **opts)
    idx = res[1] if opts.get("top_k") is not None else opts.get("indices")
    go = rng.standard_normal(res[0].shape).astype(dtype)
    return q, k, v, res[0], res[-1], go, idx


CASES = [
    dict(B=1, Hq=4, Hkv=2, Lq=100, Lk=130, D=16, top_k=2, block_size=16, window=8, causal=True),
    dict(B=2, Hq=8, Hkv=1, Lq=64, Lk=64, D=32, top_k=3, block_size=8),
    dict(B=1, Hq=2, Hkv=2, Lq=130, Lk=100, D=16, causal=True),  # dense, more queries
    dict(B=1, Hq=3, Hkv=1, Lq=50, Lk=100, D=8, window=5),  # window, not causal
    dict(B=1, Hq=4, Hkv=4, Lq=1, Lk=257, D=16, top_k=2, block_size=32, causal=True),  # decode
    dict(B=1, Hq=2, Hkv=1, Lq=33, Lk=47, D=8, top_k=5, block_size=1, causal=True),
]
_SHAPE = ("B", "Hq", "Hkv", "Lq", "Lk", "D")


def _grads(case, rng, dtype=np.float32, with_lse=False):
    shape = {n: case[n] for n in _SHAPE}
    opts = {n: x for n, x in case.items() if n not in shape}
    q, k, v, out, lse, go, idx = _inputs(rng, **shape, dtype=dtype, **opts)
    gl = rng.standard_normal(lse.shape).astype(np.float32) if with_lse else None
    kw = {n: opts[n] for n in ("block_size", "window", "causal") if n in opts}
    got = ops.sparse_attention_backward(q, k, v, out, lse, go, grad_lse=gl, indices=idx,
                                        backend="opencl", **kw)
    ref = reference_backward.sparse_attention_backward(q, k, v, go, grad_lse=gl, indices=idx,
                                                       **kw)
    return got, ref


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("with_lse", [False, True])
def test_matches_the_float64_reference(case, with_lse) -> None:
    got, ref = _grads(case, np.random.default_rng(len(str(case))), with_lse=with_lse)
    for name, x, want in zip("qkv", got, (ref.dq, ref.dk, ref.dv)):
        assert x.dtype == np.float32 and x.shape == want.shape
        err = np.abs(x - want).max(initial=0)
        assert err <= 2e-5 * max(1.0, np.abs(want).max(initial=0)), (name, err)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_low_precision_in_its_dtype(dtype) -> None:
    got, ref = _grads(CASES[0], np.random.default_rng(3), dtype, with_lse=True)
    unit = 2.0 ** -8 if dtype is ml_dtypes.bfloat16 else 2.0 ** -11
    for name, x, want in zip("qkv", got, (ref.dq, ref.dk, ref.dv)):
        assert x.dtype == dtype
        err = np.abs(x.astype(np.float64) - want).max(initial=0)
        assert err <= 4 * unit * max(1.0, np.abs(want).max(initial=0)), (name, err)


def test_nan_outside_the_allowed_set_and_empty_rows() -> None:
    rng = np.random.default_rng(2)
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 2, 24, 256, 8
    q, k, v, out, lse, go, idx = _inputs(rng, B, Hq, Hkv, Lq, Lk, D, top_k=1, block_size=16,
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
    first, _ = _grads(CASES[1], np.random.default_rng(5))
    again, _ = _grads(CASES[1], np.random.default_rng(5))
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
