"""The 3.1a forms in torch: the torch backend against the reference, autograd for varlen
(against per-sequence autograd), paged calls that need grad refused, the fake implementation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dshal  # noqa: E402
import dshal.reference as ref  # noqa: E402
import dshal.torch as dt  # noqa: E402
from tests.serving_data import paged_block_keys, ragged  # noqa: E402

BS = 8
T = torch.from_numpy


@pytest.mark.parametrize("kw", [dict(top_k=2, window=4, causal=True), dict(window=3),
                                dict(top_k=0.5, causal=False)])
def test_torch_backend_serves_every_form(kw):
    r = ragged([3, 0, 9, 1], [5, 2, 20, 30], seed=4)
    q, k, v = r.packed()
    got = dshal.ops.sparse_attention(T(q), T(k), T(v), cu_seqlens_q=T(r.cu_q),
                                     cu_seqlens_k=T(r.cu_k), block_size=BS, backend="torch",
                                     return_lse=True, **kw)
    want = ref.sparse_attention(q, k, v, cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k,
                                block_size=BS, **kw)
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=2e-5, atol=2e-5)
    rd = ragged([1, 1, 1], [5, 0, 40], seed=2)
    kp, vp, table, seqlens = rd.paged(16, np.random.default_rng(0))
    qd = np.stack(rd.qs)
    bk = paged_block_keys(kp, table, seqlens, BS) if "top_k" in kw else None
    got = dshal.ops.sparse_attention(T(qd), T(kp), T(vp), block_table=T(table),
                                     seqlens_k=T(seqlens), block_size=BS, backend="torch",
                                     block_keys=None if bk is None else T(bk), **kw)
    want = ref.sparse_attention(qd, kp, vp, block_table=table, seqlens_k=seqlens,
                                block_keys=bk, block_size=BS, **kw)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), want[0], rtol=2e-5, atol=2e-5)


def test_varlen_autograd_equals_per_sequence_autograd():
    r = ragged([4, 0, 7, 2], [6, 3, 7, 17], seed=9)
    q, k, v = (T(x).double().requires_grad_() for x in r.packed())
    kw = dict(top_k=1, window=3, causal=True, block_size=4)
    out, lse = dt.sparse_attention(q, k, v, cu_seqlens_q=T(r.cu_q), cu_seqlens_k=T(r.cu_k),
                                   return_lse=True, **kw)
    w = torch.randn_like(out)
    ((out * w).sum() + torch.nan_to_num(lse, neginf=0.0).sum()).backward()
    cq, ck = r.cu_q, r.cu_k
    for s in range(4):
        qs = q.detach()[:, :, cq[s]:cq[s + 1]].clone().requires_grad_()
        ks = k.detach()[:, :, ck[s]:ck[s + 1]].clone().requires_grad_()
        vs = v.detach()[:, :, ck[s]:ck[s + 1]].clone().requires_grad_()
        o, ls = dt.sparse_attention(qs, ks, vs, return_lse=True, **kw)
        ((o * w[:, :, cq[s]:cq[s + 1]]).sum()
         + torch.nan_to_num(ls, neginf=0.0).sum()).backward()
        torch.testing.assert_close(q.grad[:, :, cq[s]:cq[s + 1]], qs.grad)
        torch.testing.assert_close(k.grad[:, :, ck[s]:ck[s + 1]], ks.grad)
        torch.testing.assert_close(v.grad[:, :, ck[s]:ck[s + 1]], vs.grad)
    small = ragged([2, 0, 3], [3, 2, 5], Hq=2, Hkv=1, D=3, Dv=2, seed=1)
    assert torch.autograd.gradcheck(
        lambda a, b, c: dt.sparse_attention(a, b, c, cu_seqlens_q=T(small.cu_q),
                                            cu_seqlens_k=T(small.cu_k), **kw),
        tuple(T(x).double().requires_grad_() for x in small.packed()))


def test_paged_call_that_needs_grad_is_refused():
    rd = ragged([1, 1], [5, 9], seed=2)
    kp, vp, table, seqlens = rd.paged(16, np.random.default_rng(0), garbage=0.0)
    q = T(np.stack(rd.qs)).requires_grad_()
    with pytest.raises(ValueError, match=r"paged KV cache .* is inference only"):
        dshal.ops.sparse_attention(q, T(kp), T(vp), block_table=T(table),
                                   seqlens_k=T(seqlens), block_size=BS, window=4)
    with torch.no_grad():
        out = dshal.ops.sparse_attention(q, T(kp), T(vp), block_table=T(table),
                                         seqlens_k=T(seqlens), block_size=BS, window=4)
    assert out.shape == (2, 4, 1, 16)


def test_fake_implementation_validates_and_shapes():
    r = ragged([3, 2], [5, 9], seed=1)
    q, k, v = (T(x) for x in r.packed())
    args = (q, k, v, None, T(r.cu_q), T(r.cu_k), None, None, None, 2, None, BS, 0, True, None,
            None)
    torch.library.opcheck(torch.ops.dshal.sparse_attention_forms, args,
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        out, sel, _ = torch.ops.dshal.sparse_attention_forms(
            fq, fk, fv, None, mode.from_tensor(T(r.cu_q)), mode.from_tensor(T(r.cu_k)), None,
            None, None, 2, None, BS, 0, True, None, None)
        assert out.shape == (1, 4, 5, 16) and sel.shape == (1, 2, 5, 2)
        with pytest.raises(ValueError, match="cu_seqlens_k must have cu_seqlens_q's shape"):
            torch.ops.dshal.sparse_attention_forms(
                fq, fk, fv, None, mode.from_tensor(T(r.cu_q)),
                mode.from_tensor(T(r.cu_k[:-1])), None, None, None, 2, None, BS, 0, True,
                None, None)
