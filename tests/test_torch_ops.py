"""torch.ops.dshal.*: opcheck, float64 gradcheck, straight-through formulas, torch.compile,
and the autograd path of dshal.ops."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dshal  # noqa: E402
import dshal.reference as ref  # noqa: E402
import dshal.torch as dt  # noqa: E402
from dshal.torch import attention  # noqa: E402

OPS = torch.ops.dshal


def _randn(*shape, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, dtype=dtype, generator=g).requires_grad_(grad)


def _qkv(B=1, Hq=4, Hkv=2, Lq=13, Lk=13, D=6, Dv=5, dtype=torch.float64, seed=0):
    return (_randn(B, Hq, Lq, D, dtype=dtype, seed=seed),
            _randn(B, Hkv, Lk, D, dtype=dtype, seed=seed + 1),
            _randn(B, Hkv, Lk, Dv, dtype=dtype, seed=seed + 2))


# --- opcheck ----------------------------------------------------------------------------------

ATTENTION_CASES = [  # (shape kwargs, indices?, top_k count, fraction, block, window, causal)
    ({}, False, 2, None, 4, 3, True),
    ({"Hq": 8, "Hkv": 1, "Lq": 5, "Lk": 17}, True, None, 0.5, 3, 0, False),
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_opcheck_sparse_attention(case):
    shape, with_indices, count, fraction, bs, window, causal = case
    if with_indices:
        count = fraction = None
    q, k, v = _qkv(dtype=torch.float32, **shape)
    idx = None
    if with_indices:
        nb = -(-k.shape[2] // bs)
        idx = torch.randint(-1, nb, (1, k.shape[1], q.shape[2], 3), generator=torch.Generator()
                            .manual_seed(1))
    torch.library.opcheck(OPS.sparse_attention.default,
                          (q, k, v, idx, count, fraction, bs, window, causal, None, None))


@pytest.mark.parametrize("precision", ["bf16", "int8", "auto"])
def test_opcheck_gemm(precision):
    a, b, bias = _randn(2, 5, 40, dtype=torch.float32), _randn(40, 7, dtype=torch.float32), \
        _randn(7, dtype=torch.float32)
    tolerance = 1e-2 if precision == "auto" else None
    torch.library.opcheck(OPS.gemm.default, (a, b, bias, None, None, None, None, precision, 16,
                                             None, tolerance, None, None))


@pytest.mark.parametrize(("mode", "weighted"), [("hard", True), ("soft", False),
                                               ("soft_hard", True)])
def test_opcheck_gated_channels(mode, weighted):
    x = _randn(6, 12, dtype=torch.float32)
    w = _randn(9, 12, dtype=torch.float32) if weighted else None
    b = _randn(9, dtype=torch.float32) if weighted else None
    logits = _randn(9 if weighted else 12, dtype=torch.float32)
    torch.library.opcheck(OPS.gated_channels.default, (x, logits, w, b, mode, 0.0, None, None,
                                                       None))


@pytest.mark.parametrize(("precision", "granularity"), [("bf16", "row"),
                                                        ("fp8_e4m3", "block")])
def test_opcheck_quantize(precision, granularity):
    x = _randn(8, 20, dtype=torch.float32, grad=precision == "bf16")
    torch.library.opcheck(OPS.quantize.default, (x, precision, granularity, 8, None))


# --- gradients --------------------------------------------------------------------------------

GRAD_CASES = [  # (shape kwargs, options): masked rows, GQA, windows, top-k, fractions
    ({}, {"top_k": 2, "block_size": 4, "window": 3, "causal": True}),
    ({"Hq": 8, "Hkv": 1}, {"top_k": 1, "block_size": 3, "causal": True}),
    ({"Lq": 9, "Lk": 5}, {"causal": True}),  # 4 queries see nothing: zero gradient
    ({"Lq": 5, "Lk": 14}, {"window": 2}),
    ({"Hq": 2, "Hkv": 2}, {"top_k": 0.5, "block_size": 2, "causal": False}),
    ({"Lq": 1, "Lk": 20}, {"top_k": 2, "block_size": 4, "causal": True}),  # decode
]


@pytest.mark.parametrize(("shape", "options"), GRAD_CASES)
def test_sparse_attention_gradcheck(shape, options):
    q, k, v = _qkv(**shape)
    # fast mode: random projections of the Jacobian (a full one costs a minute per case here)
    assert torch.autograd.gradcheck(lambda *t: dt.sparse_attention(*t, **options), (q, k, v),
                                    fast_mode=True)


def _dense_oracle(q, k, v, allowed, scale):
    """(out, lse) of masked attention by plain torch autograd over a dense mask, float64."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = torch.from_numpy(allowed).repeat_interleave(g, 1)
    s = torch.where(mask, scale * q @ kk.transpose(-1, -2), -math.inf)
    lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isfinite(lse), lse, 0)
    return torch.where(mask, torch.exp(s - safe[..., None]), 0) @ vv, safe


def test_gradients_through_lse_with_caller_indices():
    """lse is float32 by contract, too coarse for finite differences: compare both outputs'
    gradients with plain autograd over the dense allowed mask instead."""
    q, k, v = _qkv()
    nb = -(-k.shape[2] // 4)
    idx = torch.randint(-1, nb, (1, 2, 13, 2), generator=torch.Generator().manual_seed(3))
    out, lse = dt.sparse_attention(q, k, v, indices=idx, block_size=4, window=2, causal=True,
                                   return_lse=True)
    allowed = ref.allowed_mask(13, 13, B=1, Hkv=2, block_size=4, window=2, causal=True,
                               indices=idx.numpy())
    go, gl = _randn(*out.shape, grad=False, seed=7), _randn(*lse.shape, grad=False, seed=8)
    (out * go).sum().add((torch.where(torch.isfinite(lse), lse, 0) * gl).sum()).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want_out, want_lse = _dense_oracle(q, k, v, allowed, 6 ** -0.5)
    (want_out * go).sum().add((want_lse * gl).sum()).backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-6, atol=1e-6)


def test_masked_rows_get_zero_gradient():
    q, k, v = _qkv(Lq=9, Lk=5)
    dt.sparse_attention(q, k, v, causal=True).sum().backward()
    assert (q.grad[:, :, :4] == 0).all() and q.grad[:, :, 4:].abs().sum() > 0


def test_gradients_ignore_nan_outside_the_allowed_set():
    """Queries 0-11 select blocks 0-2, queries 12-15 block 3, whose keys and values are
    NaN/Inf, and query 13 is NaN: all share one tile, yet no NaN reaches a gradient of the
    queries, keys or values of the finite part."""
    q, k, v = (t.detach().clone() for t in _qkv(Lq=16, Lk=16, dtype=torch.float32))
    k[:, :, 12:], v[:, :, 12:], q[:, :, 13] = math.nan, math.inf, math.nan
    for t in (q, k, v):
        t.requires_grad_()
    idx = torch.full((1, 2, 16, 3), -1)
    idx[:, :, :12] = torch.tensor([0, 1, 2])
    idx[:, :, 12:, 0] = 3
    out = dt.sparse_attention(q, k, v, indices=idx, block_size=4)
    assert torch.isfinite(out[:, :, :12]).all()
    out[:, :, :12].sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad[:, :, :12]).all()


def test_backward_tiles_never_hold_lq_by_lk():
    L, bs = 4096, 64
    q, k, v = _qkv(Lq=L, Lk=L, D=4, Dv=4, dtype=torch.float32, seed=1)
    geo = attention.Geometry.of(q, k, v, block_size=bs, window=128, causal=True, scale=0.5)
    sel = attention.select(q.detach(), k.detach(), geo, 4)
    largest = max(t.allowed.numel() for t in attention.tiles(geo, sel, q.device))
    assert largest * 16 < L * L


def test_gated_gradients():
    x, w, b = _randn(5, 7), _randn(6, 7), _randn(6)
    for mode in ("soft", "soft_hard"):  # exact where the mask is locally constant
        logits = _randn(6, seed=4)
        assert torch.autograd.gradcheck(
            lambda x, lg, w, b, mode=mode: dt.gated_channels(x, lg, weight=w, bias=b,
                                                             mode=mode), (x, logits, w, b))
        row_logits = _randn(5, 7, seed=5)
        assert torch.autograd.gradcheck(
            lambda x, lg, mode=mode: dt.gated_channels(x, lg, mode=mode), (x, row_logits))


def test_hard_gate_straight_through_and_closed_rows():
    x, w, b = _randn(5, 7), _randn(6, 7), _randn(6)
    logits = torch.tensor([1.0, -1.0, 2.0, -3.0, 0.5, -0.2], dtype=torch.float64,
                          requires_grad=True)
    w_nan = w.detach().clone()
    w_nan[1] = math.nan  # a closed channel's weight row: never read
    w_nan.requires_grad_()
    y = dt.gated_channels(x, logits, weight=w_nan, bias=b, mode="hard")
    gy = _randn(5, 6, grad=False, seed=9)
    (y * gy).sum().backward()
    closed = logits.detach() <= 0
    pre = x.detach() @ w.detach().T + b.detach()
    sig = torch.sigmoid(logits.detach())
    want = torch.where(closed, 0, (gy * pre).sum(0) * sig * (1 - sig))
    torch.testing.assert_close(logits.grad, want)
    assert (w_nan.grad[closed] == 0).all() and (b.grad[closed] == 0).all()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, (gy * ~closed) @ torch.where(closed[:, None], 0,
                                                                    w_nan.detach()))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8", "fp8_e4m3"])
def test_gemm_straight_through(precision):
    a, b, bias = _randn(2, 3, 40, dtype=torch.float32), _randn(40, 9, dtype=torch.float32), \
        _randn(9, dtype=torch.float32)
    out = dt.gemm(a, b, bias=bias, precision=precision, group_size=16)
    g = _randn(2, 3, 9, dtype=torch.float32, grad=False, seed=2)
    (out * g).sum().backward()
    a_op, b_op = (torch.from_numpy(x) for x in ref.gemm_operands(
        a.detach().numpy(), b.detach().numpy(), precision, group_size=16))
    g64 = g.double()
    torch.testing.assert_close(a.grad.double(), g64 @ b_op.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), a_op.reshape(-1, 40).T @ g64.reshape(-1, 9),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, g.sum((0, 1)))


def test_quantize_float_precisions_pass_gradients_straight_through():
    x = _randn(4, 6, dtype=torch.float32)
    values, scales = dt.quantize(x, "bf16")
    assert scales is None and values.dtype == torch.bfloat16
    values.float().sum().backward()
    assert (x.grad == 1).all()
    codes, scales = dt.quantize(x.detach(), "int8")
    assert codes.dtype == torch.int8 and scales.shape == (4, 1)


# --- dshal.ops routes, torch.compile ----------------------------------------------------------


def test_dshal_ops_with_grad_uses_the_autograd_path():
    q, k, v = _qkv(dtype=torch.float32)
    out = dshal.ops.sparse_attention(q, k, v, top_k=1, block_size=4, causal=True)
    assert out.grad_fn is not None
    with torch.no_grad():
        plain = dshal.ops.sparse_attention(q, k, v, top_k=1, block_size=4, causal=True)
    assert plain.grad_fn is None and torch.equal(out.detach(), plain)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None


def test_results_and_errors_match_dshal_ops():
    q, k, v = _qkv(dtype=torch.float32)
    out, idx, lse = dt.sparse_attention(q, k, v, top_k=2, block_size=4, causal=True,
                                        return_indices=True, return_lse=True)
    want, want_idx, want_lse = dshal.ops.sparse_attention(
        q.detach(), k.detach(), v.detach(), top_k=2, block_size=4, causal=True,
        return_indices=True, return_lse=True)
    assert torch.equal(out.detach(), want) and torch.equal(idx, want_idx)
    assert torch.equal(lse.detach(), want_lse)
    with pytest.raises(ValueError, match="block_size"):
        dt.sparse_attention(q, k, v, top_k=2, block_size=0)
    with pytest.raises(TypeError, match="bool"):
        dt.sparse_attention(q, k, v, top_k=True)
    _, info = dt.gemm(q[0, 0], k[0, 0].T, precision="auto", tolerance=1e-2, return_info=True)
    assert info["precision"] == "fp32" and info["backend"] == "numpy"
    assert info["estimated_error"] is not None


def test_compile_fullgraph_forward_and_backward():
    q, k, v = _qkv(dtype=torch.float32)
    x, w, logits = _randn(6, 12, dtype=torch.float32), _randn(9, 12, dtype=torch.float32), \
        _randn(9, dtype=torch.float32)

    def step(q, k, v, x, w, logits):
        o = dshal.ops.sparse_attention(q, k, v, top_k=2, block_size=4, window=3, causal=True)
        y = dshal.ops.gated_channels(x, logits, weight=w, mode="soft_hard")
        z = dshal.ops.gemm(x, w.T, precision="bf16")
        return o.square().sum() + y.square().sum() + z.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (q, k, v, x, w, logits)
    loss = compiled(*args)
    loss.backward()
    got = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    eager = step(*args)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for g, t in zip(got, args):
        torch.testing.assert_close(g, t.grad)


def test_fake_validation_raises_at_trace_time():
    q, k, v = _qkv(dtype=torch.float32)
    f = torch.compile(lambda q, k, v: dt.sparse_attention(q, k, v, window=-1), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(Exception, match="window"):
        f(q, k, v)


def test_float64_results_agree_with_the_reference():
    q, k, v = _qkv(Lq=21, Lk=21)
    out, idx, lse = dt.sparse_attention(q, k, v, top_k=2, block_size=4, window=2,
                                        causal=True, return_indices=True, return_lse=True)
    want, want_idx, want_lse = ref.sparse_attention(*(t.detach().numpy() for t in (q, k, v)),
                                                    top_k=2, block_size=4, window=2,
                                                    causal=True)
    np.testing.assert_allclose(out.detach().numpy(), want, atol=1e-12)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(lse.detach().numpy(), want_lse, atol=1e-6)


def test_every_channel_closed_gives_zero_gradients():
    x, w, b = _randn(2, 3, 7), _randn(6, 7), _randn(6)
    logits = torch.full((6,), -1.0, dtype=torch.float64, requires_grad=True)
    y = dt.gated_channels(x, logits, weight=w, bias=b, mode="soft_hard")
    y.sum().backward()
    assert (y == 0).all()
    for t in (x, w, b, logits):
        assert (t.grad == 0).all()


@pytest.mark.parametrize("a_scale_shape", [(), (3, 1), (3, 3)])
def test_gemm_gradient_of_b_with_stored_int8_a(a_scale_shape):
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (3, 40), dtype=torch.int8, generator=gen)
    a_scale = torch.rand(a_scale_shape, generator=gen) + 0.5
    b = _randn(40, 9, dtype=torch.float32)
    out = dt.gemm(a, b, precision="int8", a_scale=a_scale, group_size=16)
    out.sum().backward()
    a_op, _ = ref.gemm_operands(a.numpy(), b.detach().numpy(), "int8",
                                a_scale=a_scale.numpy(), group_size=16)
    want = torch.from_numpy(a_op).T @ torch.ones(3, 9, dtype=torch.float64)
    torch.testing.assert_close(b.grad.double(), want, rtol=1e-5, atol=1e-5)


def test_backward_products_are_ieee_fp32_whatever_the_caller_allowed():
    a, b = _randn(64, 256, dtype=torch.float32), _randn(256, 32, dtype=torch.float32)

    def grads():
        a.grad = b.grad = None
        dt.gemm(a, b).square().sum().backward()
        return a.grad.clone(), b.grad.clone()

    want = grads()
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"  # the caller trades accuracy away for its own matmuls
    try:
        got = grads()
    finally:
        matmul.fp32_precision = before
    for g, w in zip(got, want):
        assert torch.equal(g, w)
