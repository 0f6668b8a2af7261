"""The numpy backend's compiled backward of sparse_attention against the float64 reference
gradients (DESIGN 3.1b): selections, windows, dense, GQA, Lq != Lk, the lse gradient, NaN/Inf
outside the allowed set, rows with nothing allowed, threads and the kernel's argument checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dshal
from dshal import ops, reference_backward
from dshal.backends.numpy import native
from tests.backward_data import CASES, grads, inputs

pytestmark = pytest.mark.skipif(native.ATTENTION is None, reason=native.ATTENTION_STATUS)


#: every build of the kernel's tiles this CPU runs (the best runs by default)
ISAS = native.ATTENTION.SUPPORTED if native.ATTENTION is not None else ()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    monkeypatch.setattr(native, "ATTENTION_ISA", native.ATTENTION.ISAS.index(request.param))
    return request.param


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("with_lse", [False, True])
def test_matches_the_float64_reference(case, with_lse, isa) -> None:
    got, ref = grads(case, np.random.default_rng(len(str(case))), "numpy", with_lse=with_lse)
    for name, x, want in zip("qkv", got, (ref.dq, ref.dk, ref.dv)):
        assert x.dtype == np.float32
        err = np.abs(x - want).max(initial=0)
        assert err <= 2e-5 * max(1.0, np.abs(want).max(initial=0)), (name, err)


def test_caller_indices_duplicates_and_unused(isa) -> None:
    rng = np.random.default_rng(1)
    idx = np.array([[[[3, 3, -1, 0], [-1, -1, -1, -1], [2, 1, 1, -1], [0, 3, 2, 1]]]])
    idx = np.repeat(idx, 5, axis=2)[:, :, :17]
    q, k, v, out, lse, go, _ = inputs(rng, 1, 2, 1, 17, 31, 8, indices=idx, block_size=8,
                                       window=2)
    got = ops.sparse_attention_backward(q, k, v, out, lse, go, indices=idx, block_size=8,
                                        window=2, backend="numpy")
    ref = reference_backward.sparse_attention_backward(q, k, v, go, indices=idx, block_size=8,
                                                       window=2)
    for x, want in zip(got, (ref.dq, ref.dk, ref.dv)):
        np.testing.assert_allclose(x, want, atol=2e-5)


def test_nan_outside_the_allowed_set_and_empty_rows(isa) -> None:
    rng = np.random.default_rng(2)
    q, k, v, out, lse, go, idx = inputs(rng, 1, 4, 2, 24, 96, 8, top_k=1, block_size=16,
                                         causal=True)
    allowed = reference_backward.reference.allowed_mask(24, 96, B=1, Hkv=2, block_size=16,
                                                        window=0, causal=True, indices=idx)
    never = ~allowed.any(axis=2)
    k[never] = np.inf
    v[never] = np.nan
    got = ops.sparse_attention_backward(q, k, v, out, lse, go, indices=idx, block_size=16,
                                        causal=True, backend="numpy")
    assert all(np.isfinite(x[~never] if x.shape == k.shape else x).all() for x in got)
    assert (got[1][never] == 0).all() and (got[2][never] == 0).all()
    # queries before every key (Lq > Lk, causal): nothing allowed, zero gradients
    q, k, v, out, lse, go, _ = inputs(rng, 1, 2, 1, 12, 5, 4, causal=True)
    dq, dk, dv = ops.sparse_attention_backward(q, k, v, out, lse, go, causal=True,
                                               backend="numpy")
    assert (dq[:, :, :7] == 0).all() and all(np.isfinite(x).all() for x in (dq, dk, dv))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precisioninputs(dtype) -> None:
    rng = np.random.default_rng(3)
    q, k, v, out, lse, go, idx = inputs(rng, 1, 4, 2, 40, 40, 16, dtype, top_k=1,
                                         block_size=8, causal=True)
    got = ops.sparse_attention_backward(q, k, v, out, lse, go, indices=idx, block_size=8,
                                        causal=True, backend="numpy")
    ref = reference_backward.sparse_attention_backward(q, k, v, go, indices=idx, block_size=8,
                                                       causal=True)
    for x, want in zip(got, (ref.dq, ref.dk, ref.dv)):
        assert x.dtype == dtype
        np.testing.assert_allclose(x.astype(np.float64), want, atol=0.02, rtol=0.02)


def test_float64_is_not_declared_and_zero_sizes() -> None:
    cap = dshal.ops.backends()["numpy"].spec.capabilities["sparse_attention_backward"]
    assert "float64" not in cap.dtypes and "float32" in cap.dtypes
    z = np.zeros((1, 2, 0, 4), np.float32)
    k = np.zeros((1, 1, 3, 4), np.float32)
    dq, dk, dv = ops.sparse_attention_backward(z, k, k, z, z[..., 0], z, backend="numpy")
    assert dq.shape == z.shape and (dk == 0).all() and (dv == 0).all()


def test_reruns_are_bitwise_equal(monkeypatch) -> None:
    rng = np.random.default_rng(4)
    q, k, v, out, lse, go, idx = inputs(rng, 1, 8, 1, 600, 600, 16, top_k=2, block_size=32,
                                         window=16, causal=True)
    runs = []
    for threads in ("1", "3", "3"):
        monkeypatch.setenv("DSHAL_NUM_THREADS", threads)
        runs.append(ops.sparse_attention_backward(q, k, v, out, lse, go, indices=idx,
                                                  block_size=32, window=16, causal=True,
                                                  backend="numpy"))
    for a, b, c in zip(*runs):  # a rerun is bitwise equal; another split sums dq in
        np.testing.assert_array_equal(b, c)  # another order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_argument_checks() -> None:
    lib = native.ATTENTION
    f = np.zeros((2, 4, 3), np.float32)
    k = np.zeros((5, 3), np.float32)
    lse = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="disagree"):  # 5 keys are 5 blocks of 1, not 9
        lib.attention_backward(f, k, k, lse, lse, f, None, None, f, k, k, 0, 9, 1, 0, False,
                               1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        lib.attention_backward(f[:, ::2], k, k, lse, lse, f, None, None, f, k, k, 0, 1, 1, 0,
                               False, 1.0)
    with pytest.raises(ValueError, match="isa 7"):
        lib.attention_backward(f, k, k, lse, lse, f, None, None, f, k, k, 0, 5, 1, 0, False,
                               1.0, 7)
    # the forward: o [g, n, Dv], m and l [g, n], selected uint8 [n, n_blocks]
    o, m = np.zeros((2, 4, 3), np.float32), np.zeros((2, 4), np.float32)
    sel = np.zeros((4, 5), np.uint8)
    lib.attention_forward(f, k, k, sel, o, m, m.copy(), 1, 1, 0, True, 1.0)
    with pytest.raises(ValueError, match="disagree"):  # 5 keys in blocks of 2 are 3 blocks
        lib.attention_forward(f, k, k, sel, o, m, m.copy(), 1, 2, 0, True, 1.0)
    with pytest.raises(ValueError, match="1-byte items"):
        lib.attention_forward(f, k, k, sel.astype(np.int64), o, m, m.copy(), 1, 1, 0, True, 1.0)
    with pytest.raises(ValueError, match="isa 7"):
        lib.attention_forward(f, k, k, None, o, m, m.copy(), 1, 1, 0, True, 1.0, 7)


def test_every_build_of_the_tiles_agrees_and_the_status_names_the_one_that_runs() -> None:
    """The builds sum in different orders (vector widths), so they agree to rounding; an ISA
    asked for by DSHAL_NUMPY_ATTENTION_ISA is used when this CPU runs it."""
    rng = np.random.default_rng(5)
    q, k, v, out, lse, go, idx = inputs(rng, 2, 6, 2, 70, 90, 24, top_k=2, block_size=16,
                                         window=5, causal=True)
    runs = []
    for name in ISAS:
        dq, dk, dv = (np.zeros_like(x) for x in (q[0, :3], k[0, 0], v[0, 0]))
        delta = np.einsum("hld,hld->hl", go[0, :3], out[0, :3])
        native.ATTENTION.attention_backward(
            q[0, :3], k[0, 0], v[0, 0], lse[0, :3], delta, go[0, :3], None,
            np.sort(idx[0, 0], axis=-1), dq, dk, dv, 0, 6, 16, 5, True, 24 ** -0.5,
            native.ATTENTION.ISAS.index(name))
        runs.append((dq, dk, dv))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert native.ATTENTION.ISAS[native.ATTENTION_ISA] in native.ATTENTION_STATUS


def test_torch_autograd_runs_the_numpy_backward() -> None:
    torch = pytest.importorskip("torch")
    from dshal.torch import library

    q = torch.randn(1, 4, 40, 8, requires_grad=True)
    k = torch.randn(1, 2, 40, 8, requires_grad=True)
    v = torch.randn(1, 2, 40, 8, requires_grad=True)
    out, lse = dshal.ops.sparse_attention(q, k, v, top_k=1, block_size=8, causal=True,
                                          return_lse=True)
    (out.sum() + lse.sum()).backward()
    opts = dict(block_size=8, window=0, causal=True, scale=8 ** -0.5)
    with torch.no_grad():
        o2, sel, l2 = torch.ops.dshal.sparse_attention(q, k, v, None, 1, None, 8, 0, True,
                                                       None, None)
        chosen = library.backward_backend(q, k, v, o2, l2, torch.ones_like(o2), None, sel,
                                          opts, None)
    assert chosen == "numpy"
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o3, l3 = dshal.ops.sparse_attention(q2, k2, v2, top_k=1, block_size=8, causal=True,
                                        return_lse=True, backend="torch")
    (o3.sum() + l3.sum()).backward()  # forced torch: the torch backend's backward
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-5)
