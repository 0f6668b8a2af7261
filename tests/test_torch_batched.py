"""The torch backend's batched path for short-query sequences of the 3.1a forms
(:mod:`dshal.torch.batched`) against the float64 reference and the per-sequence path, on random
ragged batches: zero-length sequences, sequences shorter than a block, queries longer than their
cache, shuffled pages, NaN garbage in unused slots and pages, NaN in keys and values a row may
not see, block_keys (means and random), block means, indices, reruns bitwise equal."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dshal  # noqa: E402
import dshal.reference as ref  # noqa: E402
from dshal.torch import forms as torch_forms  # noqa: E402
from tests.serving_data import paged_block_keys, ragged  # noqa: E402

T = torch.from_numpy
BS = 8


def _run(q, k, v, batched: bool, monkeypatch, **kw):
    """The torch backend on float64 tensors, batched or one call per sequence."""
    monkeypatch.setattr(torch_forms, "BATCHED_ROWS", 16 if batched else 0)
    args = {n: (T(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    res = dshal.ops.sparse_attention(T(q), T(k), T(v), backend="torch", return_lse=True,
                                     **args)
    return tuple(x.numpy() for x in res)


def _check(q, k, v, monkeypatch, **kw):
    """Batched equals the reference (selection exactly) and the per-sequence path; a rerun
    is bitwise equal."""
    selecting = kw.get("top_k") is not None or kw.get("indices") is not None
    got = _run(q, k, v, True, monkeypatch, return_indices=selecting, **kw)
    want = ref.sparse_attention(q, k, v, **kw)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got[-1], want[2], rtol=1e-6, atol=1e-6, equal_nan=True)  # f32
    if selecting:
        np.testing.assert_array_equal(got[1], want[1])
    old = _run(q, k, v, False, monkeypatch, return_indices=selecting, **kw)
    for a, b in zip(got, old):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
    again = _run(q, k, v, True, monkeypatch, return_indices=selecting, **kw)
    for a, b in zip(got, again):
        assert a.tobytes() == b.tobytes()
    return got


OPTIONS = [dict(top_k=2, window=5, causal=True), dict(top_k=1, causal=True),
           dict(top_k=0.5, window=3, causal=False), dict(window=6, causal=True),
           dict(causal=True), dict(top_k=3, window=0, causal=False), dict(window=4)]


def _lengths(rng, S, decode):
    lk = [int(x) for x in rng.choice([0, 1, 5, 8, 13, 31, 64, 90], S)]
    lq = [1] * S if decode else [int(x) for x in rng.choice([0, 1, 2, 3, 7, 16], S)]
    if not decode:
        lq[0] = max(lq[0], lk[0] + 2)  # a query longer than its cache (negative positions)
        lq[0] = min(lq[0], 16)
    return lq, lk


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("opts", OPTIONS)
def test_paged_batches(seed, opts, monkeypatch):
    rng = np.random.default_rng(seed)
    decode = seed % 2 == 0
    lq, lk = _lengths(rng, 6, decode)
    r = ragged(lq, lk, Hq=4, Hkv=2, D=8, Dv=8, seed=seed, dtype=np.float64)
    kp, vp, table, seqlens = r.paged(16, rng)  # shuffled pages, NaN garbage, bad entries
    kw = dict(block_size=BS, block_table=table, seqlens_k=seqlens, **opts)
    if decode:
        q = np.stack(r.qs)
    else:
        q = np.concatenate(r.qs, axis=1)[None]
        kw["cu_seqlens_q"] = r.cu_q
    _check(q, kp, vp, monkeypatch, **kw)
    if "top_k" in opts:
        means = paged_block_keys(kp, table, seqlens, BS)
        _check(q, kp, vp, monkeypatch, block_keys=means, **kw)
        noise = rng.standard_normal(means.shape) * 3
        _check(q, kp, vp, monkeypatch, block_keys=np.where(np.isnan(means), np.nan, noise),
               **kw)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("opts", OPTIONS)
def test_varlen_batches(seed, opts, monkeypatch):
    rng = np.random.default_rng(10 + seed)
    lq, lk = _lengths(rng, 5, seed % 2 == 0)
    r = ragged(lq, lk, Hq=6, Hkv=3, D=4, Dv=5, seed=seed, dtype=np.float64)
    q, k, v = r.packed()
    kw = dict(block_size=BS, cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k, **opts)
    _check(q, k, v, monkeypatch, **kw)
    if "top_k" in opts:
        nb = sum(-(-n // BS) for n in lk)
        bk = rng.standard_normal((1, 3, nb, 4))
        _check(q, k, v, monkeypatch, block_keys=bk, **kw)


def test_contiguous_block_keys_and_indices(monkeypatch):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 4, 5, 8))
    k = rng.standard_normal((3, 2, 37, 8))
    v = rng.standard_normal((3, 2, 37, 8))
    bk = rng.standard_normal((3, 2, 5, 8))
    _check(q, k, v, monkeypatch, block_keys=bk, top_k=2, window=3, causal=True, block_size=BS)
    r = ragged([2, 0, 3, 1], [20, 4, 33, 9], seed=5, dtype=np.float64)
    qp, kp, vp = r.packed()
    nb = np.repeat([-(-n // BS) for n in [20, 4, 33, 9]], [2, 0, 3, 1])
    idx = rng.integers(-1, 5, (1, 2, 6, 3)) % np.maximum(nb, 1)[None, None, :, None]
    idx[0, 0, 0, 0] = -1
    _check(qp, kp, vp, monkeypatch, indices=idx, window=2, causal=True, block_size=BS,
           cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k)


def test_nan_in_keys_a_row_may_not_see(monkeypatch):
    """Rows of one sequence see different keys: a NaN key and value one row sees (its output
    is NaN) must not reach the row before it (causal), nor any row beyond the window."""
    r = ragged([4, 1], [40, 30], seed=7, dtype=np.float64)
    q, k, v = r.packed()
    k[0, :, 37], v[0, :, 37] = np.nan, np.nan  # position 37: seen by rows 1-3 only
    v[0, :, 2] = np.inf  # position 2: outside every row's window and selection
    got = _check(q, k, v, monkeypatch, cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k, top_k=1,
                 window=6, causal=True, block_size=BS)
    assert np.isfinite(got[0][0, :, 0]).all() and np.isnan(got[0][0, :, 1]).all()
    assert np.isfinite(got[0][0, :, 4]).all()


def test_long_sequences_keep_the_per_sequence_path(monkeypatch):
    """A mixed batch: prefill rows beyond BATCHED_ROWS run per sequence, the decode rows
    batched, and the indices of both land in one layout."""
    r = ragged([40, 1, 0, 1, 17], [40, 60, 3, 1, 50], seed=11, dtype=np.float64)
    kp, vp, table, seqlens = r.paged(16, np.random.default_rng(1))
    q = np.concatenate(r.qs, axis=1)[None]
    bk = paged_block_keys(kp, table, seqlens, BS)
    _check(q, kp, vp, monkeypatch, cu_seqlens_q=r.cu_q, block_table=table, seqlens_k=seqlens,
           block_keys=bk, top_k=2, window=4, causal=True, block_size=BS)


def test_float32_decode_matches_per_sequence_path(monkeypatch):
    r = ragged([1] * 5, [0, 7, 64, 129, 200], seed=2)
    kp, vp, table, seqlens = r.paged(32, np.random.default_rng(4))
    bk = paged_block_keys(kp, table, seqlens, 16)
    kw = dict(block_table=table, seqlens_k=seqlens, block_keys=bk, top_k=3, window=16,
              causal=True, block_size=16, return_indices=True)
    q = np.stack(r.qs)
    new = _run(q, kp, vp, True, monkeypatch, **kw)
    old = _run(q, kp, vp, False, monkeypatch, **kw)
    np.testing.assert_array_equal(new[1], old[1])
    np.testing.assert_allclose(new[0], old[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[2], old[2], rtol=1e-5, atol=1e-6)
    assert np.isfinite(new[0]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tied_block_means_select_the_lower_blocks(dtype, monkeypatch):
    """Every key block a copy of its sequence's first (small integers: every mean and score is
    exact): the batched selection from block means is the reference's, ties to the lower
    block, in every dtype."""
    rng = np.random.default_rng(8)
    lk = [100, 5, 0, 129, 64, 48]
    lq = [1, 3, 0, 2, 1, 16]
    qs = [rng.integers(-3, 4, (4, n, 16)).astype(dtype) for n in lq]
    ks = [np.tile(rng.integers(-3, 4, (2, BS, 16)), (1, -(-n // BS), 1))[:, :n].astype(dtype)
          for n in lk]
    vs = [rng.standard_normal((2, n, 16)).astype(dtype) for n in lk]
    q, k, v = (np.concatenate(xs, axis=1)[None] for xs in (qs, ks, vs))
    cu_q = np.concatenate(([0], np.cumsum(lq))).astype(np.int32)
    cu_k = np.concatenate(([0], np.cumsum(lk))).astype(np.int32)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, top_k=3, block_size=BS, causal=True)
    got = _run(q, k, v, True, monkeypatch, return_indices=True, **kw)
    want = ref.sparse_attention(q, k, v, **kw)[1]
    np.testing.assert_array_equal(got[1], want)
    assert (want[0, :, 0, :3] == [0, 1, 2]).all()  # the lowest of the tied blocks


def test_strided_pools_and_packed_rows(monkeypatch):
    """Non-contiguous k/v (a pool stored [P, page_size, Hkv, D], packed rows stored [Tk, H,
    D]) take the advanced-indexing gather and give the same results."""
    r = ragged([1, 1, 1, 1], [0, 9, 40, 77], seed=12, dtype=np.float64)
    kp, vp, table, seqlens = r.paged(16, np.random.default_rng(2))
    q = torch.from_numpy(np.stack(r.qs))
    kw = dict(block_table=torch.from_numpy(table), seqlens_k=torch.from_numpy(seqlens),
              top_k=1, window=5, causal=True, block_size=BS, backend="torch",
              return_lse=True)
    strided = [torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))
                                ).permute(0, 2, 1, 3) for x in (kp, vp)]
    assert not strided[0].is_contiguous()
    got = dshal.ops.sparse_attention(q, *strided, **kw)
    want = dshal.ops.sparse_attention(q, torch.from_numpy(kp), torch.from_numpy(vp), **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    rv = ragged([2, 0, 3], [20, 4, 33], seed=13, dtype=np.float64)
    qv, kv, vv = rv.packed()
    kwv = dict(cu_seqlens_q=T(rv.cu_q), cu_seqlens_k=T(rv.cu_k), top_k=2, window=3,
               block_size=BS, backend="torch", return_lse=True)
    strided = [torch.from_numpy(np.ascontiguousarray(x[0].transpose(1, 0, 2))
                                ).permute(1, 0, 2)[None] for x in (kv, vv)]
    assert not strided[0].is_contiguous()
    got = dshal.ops.sparse_attention(T(qv), *strided, **kwv)
    want = dshal.ops.sparse_attention(T(qv), T(kv), T(vv), **kwv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_batches_of_sequences_within_the_budget(monkeypatch):
    """A score budget smaller than one sequence's serves the sequences in several batches
    (one each here), with the same results as one batch (up to rounding: a batch pads to its
    own widest sequence) and the same selection."""
    from dshal.torch import batched

    r = ragged([1, 3, 0, 2], [30, 0, 17, 64], seed=14, dtype=np.float64)
    q, k, v = r.packed()
    kw = dict(cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k, top_k=2, window=4, causal=True,
              block_size=BS, return_indices=True)
    whole = _run(q, k, v, True, monkeypatch, **kw)
    monkeypatch.setattr(batched, "_BUDGET", 1)
    apart = _run(q, k, v, True, monkeypatch, **kw)
    np.testing.assert_array_equal(whole[1], apart[1])
    for a, b in zip(whole, apart):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
