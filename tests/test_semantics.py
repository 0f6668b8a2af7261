"""DESIGN §3.1 consequences through the public API (the numpy backend), with torch's
scaled_dot_product_attention and explicit boolean masks as an independent oracle."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dshal
import dshal.reference as ref
from tests.oracles import mask, qkv, sdpa

attention = dshal.ops.sparse_attention
U = {np.float32: 2.0**-24, np.float64: 2.0**-53, ml_dtypes.bfloat16: 2.0**-8}


def _bound(dtype, v, Lk):
    """Attention error bound: output rounding plus fp32 accumulation over Lk keys of |V|."""
    u_out = U[dtype]
    u_acc = min(U[np.float32], u_out)
    return 4 * (u_out + u_acc * np.sqrt(max(Lk, 1))) * np.abs(v).max() + 1e-300


def _cast(dtype, *xs):
    return [x.astype(dtype) for x in xs]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("Lq", "Lk"), [(17, 17), (5, 23), (1, 29), (23, 7)])
@pytest.mark.parametrize("window", [0, 1, 4])
@pytest.mark.parametrize(("Hq", "Hkv"), [(2, 2), (4, 2), (8, 1)])
def test_dense_causal_window_match_sdpa(dtype, causal, Lq, Lk, window, Hq, Hkv):
    q, k, v = _cast(dtype, *qkv(Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, seed=Lq + 7 * Lk))
    out, lse = attention(q, k, v, causal=causal, window=window, return_lse=True)
    m = mask(Lq, Lk, causal, window)
    rows = m.any(axis=-1)
    want, want_lse = sdpa(*(x.astype(np.float64) for x in (q, k, v)), m)
    assert out.dtype == dtype and lse.dtype == np.float32
    err = np.abs(out[:, :, rows].astype(np.float64) - want[:, :, rows])
    assert err.max(initial=0) <= _bound(dtype, v, Lk)
    np.testing.assert_allclose(lse[:, :, rows], want_lse[:, :, rows], rtol=1e-5, atol=1e-5)
    assert (out[:, :, ~rows] == 0).all() and (lse[:, :, ~rows] == -np.inf).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("Lq", "Lk", "bs"), [(33, 33, 4), (9, 40, 8), (40, 40, 1), (1, 50, 7)])
@pytest.mark.parametrize("top_k", [10**6, 1.0])
def test_selecting_every_candidate_equals_dense(causal, Lq, Lk, bs, top_k):
    q, k, v = _cast(np.float32, *qkv(Lq=Lq, Lk=Lk, seed=3))
    dense = attention(q, k, v, causal=causal)
    out = attention(q, k, v, top_k=top_k, block_size=bs, causal=causal)
    assert np.abs(out - dense).max() <= _bound(np.float32, v, Lk)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_every_key_equals_dense(causal):
    q, k, v = _cast(np.float32, *qkv(Lq=12, Lk=30, seed=5))
    dense = attention(q, k, v, causal=causal)
    for window in (30, 31, 1000):
        out = attention(q, k, v, window=window, causal=causal)
        assert np.abs(out - dense).max() <= _bound(np.float32, v, 30)


def test_causal_decode_is_attention_over_the_whole_cache():
    q, k, v = _cast(np.float32, *qkv(Lq=1, Lk=200, Hq=8, Hkv=2, seed=9))
    out = attention(q, k, v, causal=True)
    want, _ = sdpa(*(x.astype(np.float64) for x in (q, k, v)), np.ones((1, 200), bool))
    assert np.abs(out - want).max() <= _bound(np.float32, v, 200)
    # decode with selection: the query sits at the last key, its own block is the last one
    _, idx = attention(q, k, v, top_k=2, block_size=16, causal=True, return_indices=True)
    assert (idx[..., -1] == 12).all()


def test_masked_rows_give_zero_and_minus_inf():
    q, k, v = _cast(np.float32, *qkv(Lq=10, Lk=4, seed=11))  # Lq > Lk: 6 queries see nothing
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert (out[:, :, :6] == 0).all() and (lse[:, :, :6] == -np.inf).all()
    assert np.isfinite(lse[:, :, 6:]).all()


@pytest.mark.parametrize("options", [
    {"window": 3, "causal": True},
    {"top_k": 1, "block_size": 4, "causal": True},
    {"top_k": 1, "block_size": 4, "window": 2},
])
def test_nan_and_inf_outside_the_allowed_set_do_not_leak(options):
    q, k, v = _cast(np.float32, *qkv(Lq=16, Lk=16, seed=13))
    selected = "top_k" in options
    base = attention(q, k, v, **options, return_indices=selected)
    out_clean, sel = base if selected else (base, None)
    allowed = ref.allowed_mask(16, 16, B=2, Hkv=2, block_size=options.get("block_size", 64),
                               window=options.get("window", 0),
                               causal=options.get("causal", False), indices=sel)
    kw = {"block_size": options.get("block_size", 64), "window": options.get("window", 0),
          "causal": options.get("causal", False)}
    if selected:  # keep the same selection: poisoned keys would change the block scores
        kw["indices"] = sel
    out_clean = attention(q, k, v, **kw)
    for i in (0, 5, 15):  # poison every key query i may not see, check query i's output
        hidden = ~allowed[:, :, i]  # [B, Hkv, Lk]
        assert hidden.any()
        k_bad, v_bad = k.copy(), v.copy()
        k_bad[hidden] = np.nan
        v_bad[hidden] = np.inf
        out = attention(q, k_bad, v_bad, **kw)
        np.testing.assert_array_equal(out[:, :, i], out_clean[:, :, i])


def test_gqa_groups_share_one_selection_made_from_the_summed_heads():
    q, k, v = _cast(np.float32, *qkv(Hq=8, Hkv=2, Lq=24, Lk=24, seed=17))
    _, idx = attention(q, k, v, top_k=2, block_size=4, causal=True, return_indices=True)
    assert idx.shape[:3] == (2, 2, 24)
    scores = ref.selection_scores(q, k, 4, 1 / np.sqrt(8))
    want = ref.select_blocks(scores, 2, 24, 24, 4, True)
    np.testing.assert_array_equal(idx, want)


def test_indices_round_trip_reproduces_the_output():
    q, k, v = _cast(np.float32, *qkv(Lq=20, Lk=37, seed=19))
    out, idx = attention(q, k, v, top_k=0.5, block_size=5, window=3, causal=True,
                         return_indices=True)
    again = attention(q, k, v, indices=idx, block_size=5, window=3, causal=True)
    np.testing.assert_array_equal(again, out)


def test_bfloat16_inputs():
    q, k, v = _cast(ml_dtypes.bfloat16, *qkv(Lq=9, Lk=9, seed=23))
    out = attention(q, k, v, causal=True, window=4)
    assert out.dtype == ml_dtypes.bfloat16
    want, _ = sdpa(*(x.astype(np.float64) for x in (q, k, v)), mask(9, 9, True, 4))
    err = np.abs(out.astype(np.float64) - want).max()
    assert err <= _bound(ml_dtypes.bfloat16, v.astype(np.float64), 9)


def test_non_contiguous_inputs():
    q, k, v = _cast(np.float32, *qkv(Lq=11, Lk=11, D=6, Dv=6, seed=29))
    qt = np.ascontiguousarray(q.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    kt = k[:, :, ::-1][:, :, ::-1]
    vt = np.asfortranarray(v)
    out = attention(qt, kt, vt, top_k=1, block_size=3, causal=True)
    np.testing.assert_array_equal(out, attention(q, k, v, top_k=1, block_size=3, causal=True))
