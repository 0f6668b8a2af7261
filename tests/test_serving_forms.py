"""DESIGN 3.1a: varlen, paged and block_keys forms of sparse_attention, through the public API
(numpy backend) and the float64 reference, against the contiguous call on each sequence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import dshal
import dshal.reference as ref
from dshal.capabilities import BackendSpec, Signature, capability_reasons
from dshal.errors import DshalValueError
from tests.serving_data import block_means, paged_block_keys, ragged

attention = dshal.ops.sparse_attention
BS = 8
OPTIONS = [dict(top_k=2, window=4, causal=True), dict(top_k=1, causal=False),
           dict(top_k=0.5, window=3, causal=False), dict(causal=True), dict(window=5),
           dict(window=3, causal=True)]


def _per_sequence(r, **kw):
    """The contiguous call on each sequence: (outs, lses, indices) lists."""
    outs, lses, idx = [], [], []
    for q, k, v in zip(r.qs, r.ks, r.vs):
        res = attention(q[None], k[None], v[None], block_size=BS, return_lse=True,
                        return_indices="top_k" in kw, **kw)
        outs.append(res[0][0])
        lses.append(res[-1][0])
        idx.append(res[1][0] if "top_k" in kw else None)
    return outs, lses, idx


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _same_indices(got, want):
    """got [Hkv, lq, n] equals want [Hkv, lq, m] up to -1 padding."""
    n = max(got.shape[-1], want.shape[-1])
    pad = [(0, 0)] * (got.ndim - 1)
    np.testing.assert_array_equal(np.pad(got, [*pad, (0, n - got.shape[-1])], constant_values=-1),
                                  np.pad(want, [*pad, (0, n - want.shape[-1])],
                                         constant_values=-1))


# lq/lk: zero-length sequences, shorter than one block, a query longer than its cache
RAGGED = [([3, 0, 17, 1, 40], [5, 0, 9, 31, 40]), ([1, 1, 1, 1], [0, 3, 8, 70]),
          ([12, 2], [4, 2])]


@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize(("lq", "lk"), RAGGED)
def test_varlen_equals_each_sequence(kw, lq, lk):
    r = ragged(lq, lk, seed=len(lq))
    q, k, v = r.packed()
    res = attention(q, k, v, cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k, block_size=BS,
                    return_lse=True, return_indices="top_k" in kw, **kw)
    outs, lses, idx = _per_sequence(r, **kw)
    cq = r.cu_q
    for s in range(len(lq)):
        rows = slice(cq[s], cq[s + 1])
        _close(res[0][0, :, rows], outs[s])
        _close(res[-1][0, :, rows], lses[s])
        if "top_k" in kw:
            _same_indices(res[1][0, :, rows], idx[s])
    want = ref.sparse_attention(q, k, v, cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k,
                                block_size=BS, **kw)
    _close(res[0], want[0])


@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize(("lq", "lk"), RAGGED)
@pytest.mark.parametrize("varlen_q", [False, True])
def test_paged_equals_contiguous(kw, lq, lk, varlen_q):
    """Shuffled pages, NaN in unused slots, unused pages and unused table entries."""
    if not varlen_q:
        lq = [1] * len(lk)
    r = ragged(lq, lk, seed=3)
    rng = np.random.default_rng(7)
    kp, vp, table, seqlens = r.paged(16, rng)
    q = np.concatenate(r.qs, axis=1)[None] if varlen_q else np.stack(r.qs)
    extra = {"cu_seqlens_q": r.cu_q} if varlen_q else {}
    bk = paged_block_keys(kp, table, seqlens, BS) if "top_k" in kw else None
    for summaries in (None, bk) if bk is not None else (None,):
        res = attention(q, kp, vp, block_table=table, seqlens_k=seqlens, block_size=BS,
                        block_keys=summaries, return_lse=True,
                        return_indices="top_k" in kw, **extra, **kw)
        assert np.isfinite(res[0]).all()
        outs, lses, idx = _per_sequence(r, **kw)
        for s in range(len(lq)):
            b, rows = (0, slice(r.cu_q[s], r.cu_q[s + 1])) if varlen_q else (s, slice(None))
            _close(res[0][b, :, rows], outs[s])
            _close(res[-1][b, :, rows], lses[s])
            if "top_k" in kw:
                _same_indices(res[1][b, :, rows], idx[s])
        want = ref.sparse_attention(q, kp, vp, block_table=table, seqlens_k=seqlens,
                                    block_keys=summaries, block_size=BS, **extra, **kw)
        _close(res[0], want[0])


@pytest.mark.parametrize("lq", [1, 6])
@pytest.mark.parametrize("form", ["contiguous", "paged", "varlen"])
def test_selection_follows_block_keys(form, lq):
    """Summaries that disagree with the block means: the selection is theirs."""
    rng = np.random.default_rng(11)
    r = ragged([lq, lq], [64, 45], seed=5)
    Hkv, D = 2, 16
    fake = [rng.standard_normal((Hkv, -(-k.shape[1] // BS), D)).astype(np.float32) * 5
            for k in r.ks]
    kw = dict(top_k=2, causal=True, block_size=BS, return_indices=True)
    want = [attention(q[None], k[None], v[None], block_keys=f[None], **kw)
            for q, k, v, f in zip(r.qs, r.ks, r.vs, fake)]
    means = [attention(q[None], k[None], v[None], **kw)[1] for q, k, v in zip(r.qs, r.ks, r.vs)]
    assert any(not np.array_equal(w[1], m) for w, m in zip(want, means))
    for (w_out, w_idx), q, k, v, f in zip(want, r.qs, r.ks, r.vs, fake):
        r_out, r_idx, _ = ref.sparse_attention(q[None], k[None], v[None], top_k=2, causal=True,
                                               block_size=BS, block_keys=f[None])
        _same_indices(w_idx[0], r_idx[0])
        _close(w_out, r_out)
    if form == "contiguous":
        return
    if form == "varlen":
        q, k, v = r.packed()
        got = attention(q, k, v, cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k,
                        block_keys=np.concatenate(fake, axis=1)[None], **kw)
        rows = [(0, slice(r.cu_q[s], r.cu_q[s + 1])) for s in range(2)]
    else:
        kp, vp, table, seqlens = r.paged(16, rng)
        bk = np.full((kp.shape[0], Hkv, 16 // BS, D), np.nan, np.float32)
        for s, f in enumerate(fake):
            for b in range(f.shape[1]):
                bk[table[s, b // 2], :, b % 2] = f[:, b]
        got = attention(np.stack(r.qs), kp, vp, block_table=table, seqlens_k=seqlens,
                        block_keys=bk, **kw)
        rows = [(s, slice(None)) for s in range(2)]
    for (w_out, w_idx), (b, sl) in zip(want, rows):
        _close(got[0][b, :, sl], w_out[0])
        _same_indices(got[1][b, :, sl], w_idx[0])


def test_decode_ignores_every_key_it_does_not_attend():
    """Keys and values outside the selected blocks and the window are NaN: nothing leaks, and
    the output is that of the full cache with block_keys (the means of the clean cache)."""
    rng = np.random.default_rng(2)
    B, Hq, Hkv, L, D = 3, 8, 2, 256, 16
    q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    bk = block_means(k, BS)
    kw = dict(top_k=3, window=12, causal=True, block_size=BS, block_keys=bk)
    out, idx = attention(q, k, v, return_indices=True, **kw)
    keep = np.zeros((B, Hkv, L), bool)
    keep[..., L - 12:] = True
    for b in range(B):
        for t in range(Hkv):
            for blk in idx[b, t, 0]:
                if blk >= 0:
                    keep[b, t, blk * BS:(blk + 1) * BS] = True
    k2, v2 = np.where(keep[..., None], k, np.nan), np.where(keep[..., None], v, np.nan)
    out2 = attention(q, k2, v2, **kw)
    np.testing.assert_array_equal(out, out2)
    _close(out, ref.sparse_attention(q, k, v, top_k=3, window=12, causal=True, block_size=BS,
                                     block_keys=bk)[0])


def _paged_case():
    r = ragged([1, 1], [20, 9], seed=1)
    kp, vp, table, seqlens = r.paged(16, np.random.default_rng(0))
    return np.stack(r.qs), kp, vp, table, seqlens


def _varlen_case():
    r = ragged([3, 2], [5, 4], seed=1)
    q, k, v = r.packed()
    return q, k, v, r.cu_q, r.cu_k


BAD = {
    "cu_seqlens_q must start at 0": lambda q, k, v, cq, ck: dict(
        cu_seqlens_q=cq + 1, cu_seqlens_k=ck),
    "cu_seqlens_k must be non-decreasing": lambda q, k, v, cq, ck: dict(
        cu_seqlens_q=cq, cu_seqlens_k=np.array([0, 6, 4, 9][:len(ck)], np.int32)),
    "cu_seqlens_q must end at": lambda q, k, v, cq, ck: dict(
        cu_seqlens_q=np.array([0, 1, 4], np.int32), cu_seqlens_k=ck),
    "cu_seqlens_q was given without cu_seqlens_k": lambda q, k, v, cq, ck: dict(
        cu_seqlens_q=cq),
    "cu_seqlens_k was given without cu_seqlens_q": lambda q, k, v, cq, ck: dict(
        cu_seqlens_k=ck),
    "cu_seqlens_k must have cu_seqlens_q's shape": lambda q, k, v, cq, ck: dict(
        cu_seqlens_q=cq, cu_seqlens_k=ck[:-1]),
    "block_keys must have 2 rows": lambda q, k, v, cq, ck: dict(
        cu_seqlens_q=cq, cu_seqlens_k=ck, top_k=1,
        block_keys=np.zeros((1, 2, 3, 16), np.float32)),
}


@pytest.mark.parametrize("message", list(BAD))
def test_varlen_errors_name_the_argument(message):
    q, k, v, cq, ck = _varlen_case()
    with pytest.raises(DshalValueError, match=message):
        attention(q, k, v, block_size=BS, **BAD[message](q, k, v, cq, ck))


PAGED_BAD = {
    "block_table\\[0, 1\\] = 99 is a used page": lambda t, s: dict(
        block_table=np.where(np.arange(t.shape[1]) == 1, 99, t).astype(np.int32),
        seqlens_k=s),
    "block_table\\[1, 0\\] = -1 is a used page": lambda t, s: dict(
        block_table=np.where((np.arange(2) == 1)[:, None] & (np.arange(t.shape[1]) == 0),
                             -1, t).astype(np.int32), seqlens_k=s),
    "seqlens_k\\[0\\] = 100 must lie in \\[0, 48\\]": lambda t, s: dict(
        block_table=t, seqlens_k=np.array([100, 9], np.int32)),
    "seqlens_k\\[1\\] = -2": lambda t, s: dict(block_table=t,
                                               seqlens_k=np.array([3, -2], np.int32)),
    "needs block_table and seqlens_k together; seqlens_k is missing": lambda t, s: dict(
        block_table=t),
    "block_table is missing": lambda t, s: dict(seqlens_k=s),
    "paged and contiguous key arguments are mixed": lambda t, s: dict(
        block_table=t, seqlens_k=s, cu_seqlens_q=np.array([0, 1, 2], np.int32),
        cu_seqlens_k=np.array([0, 1, 2], np.int32)),
    "one row per sequence": lambda t, s: dict(block_table=t[:1], seqlens_k=s[:1]),
    "page_size \\(16, k's dim 2\\) must be a multiple of block_size \\(6\\)": lambda t, s: dict(
        block_table=t, seqlens_k=s, block_size=6),
    "block_keys must have shape \\[\\d+, 2, 2, 16\\]": lambda t, s: dict(
        block_table=t, seqlens_k=s, top_k=1, block_keys=np.zeros((3, 2, 2, 16), np.float32)),
    "give top_k with them": lambda t, s: dict(
        block_table=t, seqlens_k=s, window=2, block_keys=np.zeros((1, 2, 2, 16), np.float32)),
}


@pytest.mark.parametrize("message", list(PAGED_BAD))
def test_paged_errors_name_the_argument(message):
    q, kp, vp, table, seqlens = _paged_case()
    kw = {"block_size": BS, **PAGED_BAD[message](table, seqlens)}
    with pytest.raises(DshalValueError, match=message):
        attention(q, kp, vp, **kw)


def test_contiguous_block_keys_shape_and_indices_range():
    r = ragged([2], [20])
    q, k, v = (x[None] for x in (r.qs[0], r.ks[0], r.vs[0]))
    with pytest.raises(DshalValueError, match=r"block_keys must have shape \[1, 2, 3, 16\]"):
        attention(q, k, v, top_k=1, block_size=BS, block_keys=np.zeros((1, 2, 2, 16)))
    rv = ragged([2, 2], [20, 4])
    qv, kv, vv = rv.packed()
    idx = np.full((1, 2, 4, 1), 2, np.int64)  # sequence 1 has 1 block: 2 is out of range
    with pytest.raises(DshalValueError, match=r"indices\[0, 0, 2, 0\] = 2 must lie in \[-1, 0\]"):
        attention(qv, kv, vv, indices=idx, cu_seqlens_q=rv.cu_q, cu_seqlens_k=rv.cu_k,
                  block_size=BS)


def test_unused_table_entries_are_ignored():
    """Entries past seqlens_k may hold anything (here: out of the pool's range)."""
    q, kp, vp, table, seqlens = _paged_case()
    assert (table[:, -1] >= kp.shape[0]).all()
    attention(q, kp, vp, block_table=table, seqlens_k=seqlens, block_size=BS, window=3)


def test_api1_plugins_are_refused_the_forms_with_a_reason():
    numpy_spec = dshal.ops.backends()["numpy"].spec
    old = dataclasses.replace(numpy_spec, name="old", plugin_api=(1, 1))
    sig = Signature("sparse_attention", "numpy", (1, 0), (("q", "float32"),),
                    frozenset({"paged", "causal"}))
    assert capability_reasons(numpy_spec, sig) == []
    reasons = capability_reasons(old, sig)
    assert reasons == ["features paged need plugin API 2 (the plugin declares 1..1)"]
    assert isinstance(old, BackendSpec)


def test_signature_names_the_forms():
    q, kp, vp, table, seqlens = _paged_case()
    sig = dshal.ops.signature("sparse_attention", q, kp, vp, block_table=table,
                              seqlens_k=seqlens, top_k=1, block_size=BS,
                              block_keys=paged_block_keys(kp, table, seqlens, BS))
    assert {"paged", "block_keys", "top_k", "cross_length"} <= sig.features
    assert dict(sig.sizes)["seq_len"] == table.shape[1] * kp.shape[2]


def test_compiled_decode_agrees_with_the_numpy_passes(monkeypatch):
    """The fused loop of _decode.c (float32 pools) against the numpy passes, NaN garbage in
    every unused slot; both against the reference."""
    from dshal.backends.numpy import decode

    if decode._FUSED is None:
        pytest.skip("dshal.backends.numpy._decode is not built")
    r = ragged([1] * 5, [0, 5, 64, 200, 129], Hq=8, Hkv=2, seed=6)
    kp, vp, table, seqlens = r.paged(32, np.random.default_rng(1))
    q = np.stack(r.qs)
    bk = paged_block_keys(kp, table, seqlens, BS)
    kw = dict(block_table=table, seqlens_k=seqlens, block_keys=bk, top_k=3, window=12,
              causal=True, block_size=BS, return_lse=True)
    fused = attention(q, kp, vp, **kw)
    monkeypatch.setattr(decode, "_FUSED", None)
    plain = attention(q, kp, vp, **kw)
    want = ref.sparse_attention(q, kp, vp, **{n: x for n, x in kw.items() if n != "return_lse"})
    for got in (fused, plain):
        assert np.isfinite(got[0]).all()
        _close(got[0], want[0])
        _close(got[1], want[2])
