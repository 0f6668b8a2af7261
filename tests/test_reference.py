"""Tests of the float64 reference (the oracle every backend is certified against)."""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import pytest

import dshal.reference as ref
from tests.oracles import mask as _mask
from tests.oracles import qkv as _qkv
from tests.oracles import sdpa as _sdpa

pytestmark = pytest.mark.filterwarnings("error")  # the oracle must not warn (overflow, 0*inf)


# --------------------------------------------------------------------------------------------
# dense / causal / window against SDPA


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("Lq", "Lk"), [(9, 9), (4, 11), (1, 7), (11, 6), (3, 3)])
@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize(("Hq", "Hkv"), [(2, 2), (4, 2), (8, 1)])
def test_dense_and_window_match_sdpa(causal, Lq, Lk, window, Hq, Hkv):
    q, k, v = _qkv(Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, seed=Lq * 31 + Lk)
    out, idx, lse = ref.sparse_attention(q, k, v, causal=causal, window=window)
    assert idx is None
    assert out.shape == (2, Hq, Lq, 5) and lse.shape == (2, Hq, Lq)
    mask = _mask(Lq, Lk, causal, window)
    rows = mask.any(axis=-1)
    want, want_lse = _sdpa(q, k, v, mask)
    np.testing.assert_allclose(out[:, :, rows], want[:, :, rows], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse[:, :, rows], want_lse[:, :, rows], rtol=1e-12, atol=1e-13)
    assert (out[:, :, ~rows] == 0).all()
    assert (lse[:, :, ~rows] == -np.inf).all()


def test_explicit_scale_matches_sdpa():
    q, k, v = _qkv(Lq=5, Lk=8)
    out, _, lse = ref.sparse_attention(q, k, v, causal=True, scale=0.37)
    want, want_lse = _sdpa(q, k, v, _mask(5, 8, True), scale=0.37)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-13)


def test_low_precision_inputs_are_upcast_exactly():
    q, k, v = _qkv(Lq=4, Lk=6)
    qb, kb, vb = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    out, _, _ = ref.sparse_attention(qb, kb, vb, causal=True)
    want, _ = _sdpa(*(x.astype(np.float64) for x in (qb, kb, vb)), _mask(4, 6, True))
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------------------------
# consequences listed in DESIGN 3.1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("Lq", "Lk", "bs"), [(9, 9, 2), (5, 13, 4), (13, 13, 1), (1, 10, 3)])
@pytest.mark.parametrize("top_k", [10**6, 1.0])
def test_all_blocks_selected_equals_dense(causal, Lq, Lk, bs, top_k):
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    dense, _, dense_lse = ref.sparse_attention(q, k, v, causal=causal)
    out, idx, lse = ref.sparse_attention(q, k, v, top_k=top_k, block_size=bs, causal=causal)
    np.testing.assert_allclose(out, dense, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse, dense_lse, rtol=1e-13, atol=1e-14)
    assert idx.shape[:3] == (2, 2, Lq)


@pytest.mark.parametrize("causal", [False, True])
def test_window_at_least_lk_equals_dense(causal):
    q, k, v = _qkv(Lq=6, Lk=10)
    dense, _, _ = ref.sparse_attention(q, k, v, causal=causal)
    for window in (10, 11, 100):
        out, _, _ = ref.sparse_attention(q, k, v, window=window, causal=causal)
        np.testing.assert_array_equal(out, dense)


def test_decode_is_attention_over_the_whole_cache():
    q, k, v = _qkv(Lq=1, Lk=12, Hq=4, Hkv=2)
    out, _, lse = ref.sparse_attention(q, k, v, causal=True)
    for h in range(4):
        t = h // 2
        s = k[0, t] @ q[0, h, 0] / math.sqrt(8)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, h, 0], p @ v[0, t] / p.sum(), rtol=1e-12)
        np.testing.assert_allclose(lse[0, h, 0], s.max() + np.log(p.sum()), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# selection


def _brute_selection(q, k, top_k, bs, causal, scale):
    """Loop-by-loop selection straight from the DESIGN text (sorted python lists)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    nb = -(-Lk // bs)
    rows = {}
    for b in range(B):
        for t in range(Hkv):
            for i in range(Lq):
                p = i + Lk - Lq
                own = p // bs if 0 <= p < Lk else None
                qs = q[b, t * g:(t + 1) * g, i].sum(axis=0)
                cands = []
                for blk in range(nb):
                    keys = range(blk * bs, min((blk + 1) * bs, Lk))
                    if blk == own or (causal and max(keys) > p):
                        continue
                    s = scale * float(qs @ k[b, t, list(keys)].mean(axis=0))
                    cands.append((-s, blk))
                n = top_k if isinstance(top_k, int) else math.ceil(top_k * len(cands))
                chosen = {blk for _, blk in sorted(cands)[:n]}
                if own is not None:
                    chosen.add(own)
                rows[b, t, i] = sorted(chosen)
    return rows


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("Lq", "Lk", "bs", "top_k"),
                         [(9, 9, 2, 2), (5, 13, 4, 1), (7, 7, 1, 3), (4, 10, 3, 0.5), (6, 9, 2, 0)])
def test_selection_matches_brute_force(causal, Lq, Lk, bs, top_k):
    q, k, _ = _qkv(Hq=8, Hkv=2, Lq=Lq, Lk=Lk, seed=7)
    scores = ref.selection_scores(q, k, bs, 0.3)
    idx = ref.select_blocks(scores, top_k, Lq, Lk, bs, causal)
    want = _brute_selection(q, k, top_k, bs, causal, 0.3)
    assert idx.shape[:3] == (2, 2, Lq)  # one selection per kv head, shared by its g q heads
    for (b, t, i), blocks in want.items():
        row = idx[b, t, i]
        assert row[row >= 0].tolist() == blocks
        assert (row[len(blocks):] == -1).all()
    assert idx.shape[-1] == max(len(x) for x in want.values())


def test_selection_uses_the_sum_over_the_group_of_query_heads():
    # head 0 prefers block 0, head 1 block 1, strongly enough that the sum prefers block 1
    k = np.zeros((1, 1, 6, 2))
    k[0, 0, 0:2] = [1.0, 0.0]
    k[0, 0, 2:4] = [0.0, 1.0]
    q = np.zeros((1, 2, 1, 2))
    q[0, 0, 0] = [1.0, 0.0]
    q[0, 1, 0] = [0.0, 3.0]
    v = np.zeros((1, 1, 6, 1))
    # non-causal, Lq=1, Lk=6: p = 5, own block 2; candidates 0 and 1
    _, idx, _ = ref.sparse_attention(q, k, v, top_k=1, block_size=2)
    assert idx.tolist() == [[[[1, 2]]]]


def test_own_block_is_always_selected():
    q, k, v = _qkv(Lq=7, Lk=15, seed=3)
    for causal in (False, True):
        _, idx, _ = ref.sparse_attention(q, k, v, top_k=0, block_size=4, causal=causal)
        own = ref.own_block(7, 15, 4)
        assert idx.shape == (2, 2, 7, 1)
        np.testing.assert_array_equal(idx[..., 0], np.broadcast_to(own, (2, 2, 7)))
        _, idx, _ = ref.sparse_attention(q, k, v, top_k=2, block_size=4, causal=causal)
        for i, o in enumerate(own):
            assert (idx[:, :, i] == o).any(axis=-1).all()


def test_own_block_and_candidates_geometry():
    # Lq=4, Lk=6: p = 2..5; block_size 4: blocks [0,4), [4,6)
    np.testing.assert_array_equal(ref.own_block(4, 6, 4), [0, 0, 1, 1])
    np.testing.assert_array_equal(ref.own_block(8, 6, 4), [-1, -1, 0, 0, 0, 0, 1, 1])
    cand = ref.attention_candidates(4, 6, 4, causal=True)
    np.testing.assert_array_equal(cand, [[0, 0], [0, 0], [1, 0], [1, 0]])
    cand = ref.attention_candidates(4, 6, 4, causal=False)
    np.testing.assert_array_equal(cand, [[0, 1], [0, 1], [1, 0], [1, 0]])


def test_fraction_rounds_up():
    # non-causal, Lq=1, Lk=12, block 1: p = 11, 11 candidates; 0.5 of 11 -> 6
    q, k, v = _qkv(B=1, Hq=1, Hkv=1, Lq=1, Lk=12)
    _, idx, _ = ref.sparse_attention(q, k, v, top_k=0.5, block_size=1)
    assert (idx >= 0).sum() == 6 + 1  # plus the own block
    _, idx, _ = ref.sparse_attention(q, k, v, top_k=0.01, block_size=1)
    assert (idx >= 0).sum() == 1 + 1  # a positive fraction of a non-empty set is at least 1


def test_resolve_count():
    assert ref.resolve_count(0.5, 11) == 6
    assert ref.resolve_count(0.07, 100) == 7  # float64 product is 7.000000000000001
    assert ref.resolve_count(0.28, 25) == 7
    assert ref.resolve_count(0.071, 100) == 8
    assert ref.resolve_count(1e-9, 5) == 1
    assert ref.resolve_count(0.5, 0) == 0
    assert ref.resolve_count(1.0, 7) == 7
    assert ref.resolve_count(3, 2) == 2
    np.testing.assert_array_equal(ref.resolve_count(0.5, np.array([0, 1, 2, 3])), [0, 1, 1, 2])
    for bad in (True, -1, 0.0, 1.5, float("nan"), "3"):
        with pytest.raises(ValueError):
            ref.resolve_count(bad, 4)


def test_ties_go_to_the_lower_block_index():
    B, H, Lk, bs = 1, 1, 12, 2
    k = np.ones((B, H, Lk, 4))  # every block has the same mean: exact ties
    q = np.ones((B, H, 1, 4))
    v = np.arange(Lk, dtype=float).reshape(1, 1, Lk, 1)
    _, idx, _ = ref.sparse_attention(q, k, v, top_k=2, block_size=bs)
    assert idx.tolist() == [[[[0, 1, 5]]]]
    # a better block wins over a tie
    k[0, 0, 6:8] = 2.0
    _, idx, _ = ref.sparse_attention(q, k, v, top_k=2, block_size=bs)
    assert idx.tolist() == [[[[0, 3, 5]]]]


def test_non_finite_block_scores_rank_last():
    q, k, v = _qkv(B=1, Hq=1, Hkv=1, Lq=1, Lk=8, seed=5)
    q[0, 0, 0] = np.abs(q[0, 0, 0])
    k[0, 0, 0, :] = np.abs(k[0, 0, 0, :]) * 1e3  # block 0 would otherwise win...
    scores = ref.selection_scores(q, k, 2, 1.0)
    assert scores[0, 0, 0, 0] == scores[0, 0, 0, :3].max()
    for poison in (np.nan, np.inf, -np.inf):
        kk = k.copy()
        kk[0, 0, 1, 0] = poison  # ...but its mean is not finite: it ranks after every block
        _, idx, _ = ref.sparse_attention(q, kk, v, top_k=2, block_size=2)
        assert 0 not in idx[0, 0, 0].tolist()
        _, idx, _ = ref.sparse_attention(q, kk, v, top_k=3, block_size=2)
        assert idx[0, 0, 0].tolist() == [0, 1, 2, 3]


def test_indices_round_trip():
    q, k, v = _qkv(Lq=10, Lk=13, Hq=4, Hkv=2, seed=11)
    for causal, window in ((True, 0), (True, 3), (False, 2)):
        out, idx, lse = ref.sparse_attention(q, k, v, top_k=1, block_size=3, causal=causal,
                                             window=window)
        out2, idx2, lse2 = ref.sparse_attention(q, k, v, indices=idx, block_size=3,
                                                causal=causal, window=window)
        np.testing.assert_array_equal(idx2, idx)
        np.testing.assert_array_equal(out2, out)
        np.testing.assert_array_equal(lse2, lse)


def test_caller_indices_are_normalised():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Lq=2, Lk=8)
    given = np.array([[[[3, -1, 1, 3], [-1, -1, -1, -1]]]])
    out, idx, _ = ref.sparse_attention(q, k, v, indices=given, block_size=2)
    assert idx.tolist() == [[[[1, 3], [-1, -1]]]]
    # no block is forced with indices, no window: the second query attends nothing
    assert (out[0, :, 1] == 0).all()
    allowed = ref.allowed_mask(2, 8, B=1, Hkv=1, block_size=2, window=0, causal=False,
                               indices=given)
    assert allowed[0, 0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        ref.sparse_attention(q, k, v, indices=given + 1, block_size=2)  # block 4 of 4
    with pytest.raises(ValueError):
        ref.sparse_attention(q, k, v, indices=given, top_k=1, block_size=2)


def test_nan_inf_outside_the_allowed_set_do_not_leak():
    rng = np.random.default_rng(1)
    Lq, Lk, bs = 12, 16, 2
    q, k, v = _qkv(Lq=Lq, Lk=Lk, seed=2)
    k_bad, v_bad = k.copy(), v.copy()
    planted = rng.random((2, 2, Lk)) < 0.25
    k_bad[planted] = np.nan
    k_bad[..., 3, 1] = np.inf
    v_bad[planted] = np.inf
    v_bad[..., 5, 0] = np.nan
    planted[..., 3] = planted[..., 5] = True
    for causal, window, top_k in ((True, 0, 2), (True, 3, 1), (False, 2, 1), (True, 4, None)):
        out, idx, lse = ref.sparse_attention(q, k_bad, v_bad, top_k=top_k, block_size=bs,
                                             causal=causal, window=window)
        allowed = ref.allowed_mask(Lq, Lk, B=2, Hkv=2, block_size=bs, window=window,
                                   causal=causal, indices=idx)
        # the reference with the same selection on clean inputs
        clean, _, clean_lse = ref.sparse_attention(
            q, k, v, indices=idx, block_size=bs, causal=causal, window=window) \
            if idx is not None else ref.sparse_attention(q, k, v, causal=causal, window=window)
        touched = (allowed & planted[:, :, None, :]).any(axis=-1)  # [B, Hkv, Lq]
        touched = np.repeat(touched, 2, axis=1)  # per q head
        assert (~touched).sum() > 0
        np.testing.assert_array_equal(out[~touched], clean[~touched])
        np.testing.assert_array_equal(lse[~touched], clean_lse[~touched])
        assert np.isfinite(out[~touched]).all()


def test_fully_masked_rows():
    q, k, v = _qkv(Lq=10, Lk=4)  # causal with Lq > Lk: queries 0..5 see nothing
    v[:] = np.nan  # nothing is allowed, so NaN values must not matter either
    out, _, lse = ref.sparse_attention(q, k, v, causal=True)
    assert (out[:, :, :6] == 0).all() and (lse[:, :, :6] == -np.inf).all()
    assert np.isnan(out[:, :, 6:]).all()
    out, _, lse = ref.sparse_attention(q, k, v, causal=True, top_k=1, block_size=2)
    assert (out[:, :, :6] == 0).all() and (lse[:, :, :6] == -np.inf).all()


@pytest.mark.parametrize("shape", [(0, 2, 2, 3, 3), (1, 0, 0, 3, 3), (1, 2, 1, 0, 3),
                                   (1, 2, 1, 3, 0)])
def test_zero_size_attention(shape):
    B, Hq, Hkv, Lq, Lk = shape
    q = np.zeros((B, Hq, Lq, 4))
    k = np.zeros((B, Hkv, Lk, 4))
    v = np.zeros((B, Hkv, Lk, 2))
    out, idx, lse = ref.sparse_attention(q, k, v, top_k=2, block_size=2, causal=True)
    assert out.shape == (B, Hq, Lq, 2) and lse.shape == (B, Hq, Lq)
    assert idx.shape[:3] == (B, Hkv, Lq)
    assert (out == 0).all()
    if Lk == 0:
        assert (lse == -np.inf).all()


# --------------------------------------------------------------------------------------------
# quantize


def test_quantize_scale_shapes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 300)).astype(np.float32)
    for p in ("int8", "fp8_e4m3", "fp8_e5m2"):
        values, scales = ref.quantize(x, p, granularity="row", group_size=128)
        assert values.shape == x.shape and scales.shape == (2, 3, 3)
        assert scales.dtype == np.float32
        assert values.dtype == {"int8": np.int8, "fp8_e4m3": ml_dtypes.float8_e4m3fn,
                                "fp8_e5m2": ml_dtypes.float8_e5m2}[p]
        values, scales = ref.quantize(x[0].T, p, granularity="block", group_size=128)
        assert scales.shape == (3, 1)
        values, scales = ref.quantize(x, p, granularity="tensor")
        assert scales.shape == ()
    with pytest.raises(ValueError):
        ref.quantize(x, "int8", granularity="block")
    with pytest.raises(ValueError):
        ref.quantize(np.array([1.0, np.nan]), "int8")


def test_quantize_row_scales_are_group_amax_over_qmax():
    x = np.array([[1.0, -5.0, 2.0, 0.5, 0.25]], dtype=np.float32)
    values, scales = ref.quantize(x, "int8", group_size=2)
    np.testing.assert_array_equal(scales, [[np.float32(5) / 127, np.float32(2) / 127,
                                            np.float32(0.25) / 127]])
    assert values.tolist() == [[25, -127, 127, 32, 127]]


def test_quantize_zero_group_has_scale_one():
    x = np.zeros((2, 10), dtype=np.float32)
    x[1, 5:] = 3.0
    for p in ("int8", "fp8_e4m3", "fp8_e5m2"):
        values, scales = ref.quantize(x, p, group_size=5)
        assert scales[0].tolist() == [1.0, 1.0] and scales[1, 0] == 1.0
        assert (values[0].astype(np.float64) == 0).all()
        _, s = ref.quantize(np.zeros((3, 4), np.float32), p, granularity="tensor")
        assert s == 1.0


def test_quantize_saturates():
    # a subnormal amax gives a float32 scale amax/qmax that rounds a long way down (to the
    # smallest subnormal 2**-149), so amax/scale lies far above qmax and must saturate
    tiny = np.float32(2.0**-149)
    for p, qmax, amax in (("int8", 127.0, 2e-43), ("fp8_e4m3", 448.0, 8.8e-43),
                          ("fp8_e5m2", 57344.0, 1.0e-40)):
        x = np.array([[amax, -amax, 0.0]], np.float32)
        values, scales = ref.quantize(x, p)
        assert scales.tolist() == [[tiny]]
        assert x[0, 0] / scales[0, 0] > qmax
        assert values.astype(np.float64).tolist() == [[qmax, -qmax, 0.0]]
    # e4m3fn has no infinity: 464 and above would become NaN without saturation
    values, _ = ref.quantize(np.array([[448.0, 470.0]], np.float32) * 2.0**-140, "fp8_e4m3")
    assert np.isfinite(values.astype(np.float64)).all()


def test_quantize_rounds_to_nearest_even():
    x = np.array([[127.0, 2.5, 3.5, -2.5, 0.5, 1.5, -0.5]], np.float32)  # scale exactly 1
    values, scales = ref.quantize(x, "int8", group_size=8)
    assert scales.tolist() == [[1.0]]
    assert values.tolist() == [[127, 2, 4, -2, 0, 2, 0]]
    # e4m3 around 1: spacing 1/8, so 1 + 1/16 is a tie (-> 1) and 1 + 3/16 rounds up to 1.25
    x = np.array([[448.0, 1 + 1 / 16, 1 + 3 / 16, 1 + 1 / 16 + 2**-12]], np.float32)
    values, _ = ref.quantize(x, "fp8_e4m3")
    assert values.astype(np.float64).tolist() == [[448.0, 1.0, 1.25, 1.125]]


@pytest.mark.parametrize(("p", "u", "tiny"), [("fp8_e4m3", 2.0**-4, 2.0**-10),
                                              ("fp8_e5m2", 2.0**-3, 2.0**-17)])
@pytest.mark.parametrize("granularity", ["row", "block", "tensor"])
def test_fp8_round_trip_error_is_bounded(p, u, tiny, granularity):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((40, 70)) * np.exp(rng.uniform(-6, 6, (40, 70)))).astype(np.float32)
    values, scales = ref.quantize(x, p, granularity=granularity, group_size=16)
    if granularity == "row":
        deq = ref.dequantize_a(values, scales, 16)
        full = scales[:, np.arange(70) // 16]
    elif granularity == "block":
        deq = ref.dequantize_b(values, scales, 16)
        full = scales[np.arange(40) // 16][:, np.arange(70) // 16]
    else:
        deq = ref.dequantize_a(values, scales, 16)
        full = np.broadcast_to(scales, x.shape)
    err = np.abs(deq - x.astype(np.float64))
    bound = (u * np.abs(x) + tiny * full) * (1 + 2.0**-20)  # + float32 division rounding
    assert (err <= bound).all()


def test_tf32_rounding_by_hand():
    x = np.array([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, -(1 + 2**-11 + 2**-20),
                  1 + 2**-10, 3.0, np.inf, -np.inf, np.finfo(np.float32).max, 0.0])
    got = ref.round_to_precision(x, "tf32")
    assert got.dtype == np.float32
    assert got.tolist() == [1.0, 1 + 2**-9, 1 + 2**-10, -(1 + 2**-10), 1 + 2**-10, 3.0,
                            np.inf, -np.inf, np.inf, 0.0]
    assert np.isnan(ref.round_to_precision(np.array([np.nan]), "tf32")).all()


def test_round_to_precision_formats():
    x = np.array([1 + 2**-9, 1 + 3 * 2**-12, 70000.0], np.float32)
    assert ref.round_to_precision(x, "bf16").dtype == np.dtype(ml_dtypes.bfloat16)
    assert ref.round_to_precision(x, "bf16").astype(np.float64).tolist() == [1.0, 1.0, 70144.0]
    assert ref.round_to_precision(x, "fp16").astype(np.float64).tolist() == [
        1.001953125, 1 + 2**-10, np.inf]
    values, scales = ref.quantize(x, "fp32")
    assert scales is None and values.dtype == np.float32


# --------------------------------------------------------------------------------------------
# gemm


def test_int8_gemm_is_exact():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (3, 5, 300), dtype=np.int8)
    a[0, 0, :] = -128
    b = rng.integers(-128, 128, (300, 7), dtype=np.int8)
    b[:, 0] = -128
    want = a.astype(np.int64) @ b.astype(np.int64)
    got = ref.gemm(a, b)
    np.testing.assert_array_equal(got, want.astype(np.float64))
    assert (got.astype(np.int64) == want).all()


def test_group_scaled_dequantisation_matches_a_hand_loop():
    rng = np.random.default_rng(1)
    M, K, N, g = 2, 5, 3, 2
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    a_scale = rng.uniform(0.1, 2, (M, 3)).astype(np.float32)
    b_scale = rng.uniform(0.1, 2, (3, 2)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    got = ref.gemm(a, b, a_scale=a_scale, b_scale=b_scale, group_size=g, bias=bias)
    want = np.zeros((M, N))
    for m in range(M):
        for n in range(N):
            for kk in range(K):
                want[m, n] += (float(a[m, kk]) * float(a_scale[m, kk // g])
                               * float(b[kk, n]) * float(b_scale[kk // g, n // g]))
            want[m, n] += float(bias[n])
    np.testing.assert_allclose(got, want, rtol=1e-14)
    # per-row / per-column / scalar scales broadcast
    got = ref.gemm(a, b, a_scale=a_scale[:, :1], b_scale=b_scale[:1, :1].reshape(1, 1))
    want = (a * a_scale[:, :1].astype(np.float64)) @ (b * float(b_scale[0, 0]))
    np.testing.assert_allclose(got, want, rtol=1e-14)
    got = ref.gemm(a, b, a_scale=np.float32(0.5), b_scale=np.full((1, N), 2.0, np.float32))
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def test_fp8_inputs_dequantised():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 6)).astype(ml_dtypes.float8_e4m3fn)
    b = rng.standard_normal((6, 3)).astype(ml_dtypes.float8_e4m3fn)
    got = ref.gemm(a, b, a_scale=np.full((4, 1), 0.25, np.float32))
    np.testing.assert_allclose(got, (a.astype(np.float64) * 0.25) @ b.astype(np.float64),
                               rtol=1e-14)
    with pytest.raises(ValueError):
        ref.gemm(a, b, precision="int8")
    with pytest.raises(ValueError):
        ref.gemm(a, b.astype(np.float32).astype(np.int8))  # two storage formats


@pytest.mark.parametrize("p", ["bf16", "fp16", "tf32", "fp32"])
def test_float_precisions_round_the_operands(p):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 4, 33)).astype(np.float32)
    b = rng.standard_normal((33, 5)).astype(np.float32)
    a64, b64 = ref.gemm_operands(a, b, p)
    ra = ref.round_to_precision(a, p).astype(np.float64)
    rb = ref.round_to_precision(b, p).astype(np.float64)
    np.testing.assert_array_equal(a64, ra)
    np.testing.assert_array_equal(b64, rb)
    if p != "fp32":
        assert (a64 != a).any()
    np.testing.assert_allclose(ref.gemm(a, b, precision=p), ra @ rb, rtol=1e-14)
    if p == "bf16":
        np.testing.assert_array_equal(
            a64, a.astype(ml_dtypes.bfloat16).astype(np.float64))


def test_default_precision_is_fp32_and_bias_is_added():
    a = np.array([[1.0, 2.0]])  # float64 input: rounded to fp32
    b = np.array([[0.1], [0.2]])
    got = ref.gemm(a, b, bias=np.array([1.0]))
    want = 1.0 * float(np.float32(0.1)) + 2.0 * float(np.float32(0.2)) + 1.0
    assert got.tolist() == [[want]]


@pytest.mark.parametrize("p", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_on_the_fly_quantisation_matches_quantize(p):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 5, 40)).astype(np.float32)
    b = rng.standard_normal((40, 21)).astype(np.float32)
    va, sa = ref.quantize(a, p, granularity="row", group_size=16)
    vb, sb = ref.quantize(b, p, granularity="block", group_size=16)
    want = ref.dequantize_a(va, sa, 16) @ ref.dequantize_b(vb, sb, 16)
    np.testing.assert_array_equal(ref.gemm(a, b, precision=p, group_size=16), want)
    assert ref.gemm(va, vb, a_scale=sa, b_scale=sb, group_size=16).tolist() == want.tolist()


def test_zero_size_gemm():
    assert (ref.gemm(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32)) == 0).all()
    out = ref.gemm(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), precision="int8")
    assert out.shape == (3, 4) and (out == 0).all()
    assert ref.gemm(np.zeros((0, 5), np.float32), np.ones((5, 2), np.float32)).shape == (0, 2)


# --------------------------------------------------------------------------------------------
# gated channels


def test_threshold_is_strict_and_nan_is_closed():
    z = np.array([0.0, 0.5, -0.5, np.nan, 1e-300])
    assert ref.gate_open(z).tolist() == [False, True, False, False, True]
    assert ref.gate_open(z, threshold=0.5).tolist() == [False] * 5
    assert ref.gate_open(z, mode="soft").all()


def test_keep_ties_to_lower_index_and_nan_last():
    z = np.array([1.0, 2.0, 2.0, np.nan, 2.0])
    assert ref.gate_open(z, keep=2).tolist() == [False, True, True, False, False]
    assert ref.gate_open(z, keep=0.5).tolist() == [False, True, True, False, True]  # ceil(2.5)
    assert ref.gate_open(z, keep=4).tolist() == [True, True, True, False, True]
    assert ref.gate_open(z, keep=5).all()  # NaN opens only once keep reaches it
    assert not ref.gate_open(z, keep=0).any()
    rows = np.array([[3.0, 1.0, 2.0], [-1.0, -np.inf, np.nan]])
    assert ref.gate_open(rows, keep=2).tolist() == [[True, False, True], [True, True, False]]


def test_gate_values_per_mode():
    z = np.array([2.0, -1.0, 1e4, -1e4])
    is_open = ref.gate_open(z)
    sig = 1 / (1 + np.exp(-np.array([2.0, -1.0])))
    np.testing.assert_array_equal(ref.gate_values(z, mode="hard", open_mask=is_open),
                                  [1.0, 0.0, 1.0, 0.0])
    soft = ref.gate_values(z, mode="soft", open_mask=np.ones(4, bool))
    np.testing.assert_allclose(soft, [sig[0], sig[1], 1.0, 0.0], rtol=1e-15)
    sh = ref.gate_values(z, mode="soft_hard", open_mask=is_open)
    np.testing.assert_allclose(sh, [sig[0], 0.0, 1.0, 0.0], rtol=1e-15)


def test_gated_channels_without_weight():
    x = np.array([[1.0, np.nan, 3.0, np.inf], [5.0, 6.0, 7.0, 8.0]])
    z = np.array([1.0, -1.0, 0.0, -2.0])
    y, mask = ref.gated_channels(x, z)
    assert mask.tolist() == [True, False, False, False]
    assert y.tolist() == [[1.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]
    y, _ = ref.gated_channels(x[1], z, mode="soft")
    np.testing.assert_allclose(y, x[1] * ref.sigmoid(z), rtol=1e-15)
    y, _ = ref.gated_channels(x, z, mode="soft_hard")
    assert y[:, 1:].tolist() == [[0.0] * 3] * 2
    np.testing.assert_allclose(y[:, 0], x[:, 0] * ref.sigmoid(1.0), rtol=1e-15)


def test_gated_channels_with_weight_closed_rows_never_leak():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6))
    w = rng.standard_normal((5, 6))
    bias = rng.standard_normal(5)
    z = np.array([0.3, -1.0, 2.0, np.nan, -0.1])
    w[[1, 3, 4]] = np.nan
    bias[1] = np.inf
    for mode in ("hard", "soft_hard"):
        y, mask = ref.gated_channels(x, z, weight=w, bias=bias, mode=mode)
        assert mask.tolist() == [True, False, True, False, False]
        assert y.shape == (2, 3, 5) and np.isfinite(y).all()
        assert (y[..., ~mask] == 0).all()
        gate = 1.0 if mode == "hard" else ref.sigmoid(z[mask])
        np.testing.assert_allclose(y[..., mask], gate * (x @ w[mask].T + bias[mask]),
                                   rtol=1e-14)


def test_gated_channels_per_row_gates():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3))
    w = rng.standard_normal((5, 3))
    z = rng.standard_normal((4, 5))
    w[2] = np.nan
    z[:, 2] = -1.0  # channel 2 closed in every row
    z[0, 4] = -1.0  # channel 4 closed in row 0 only
    w[4, :] = 1e300  # large but finite: only row 0 has it closed
    y, mask = ref.gated_channels(x, z, weight=w, keep=None, threshold=0.0)
    assert mask.shape == (4, 5)
    want = np.where(mask, x @ np.where(np.isnan(w), 0, w).T, 0.0)
    np.testing.assert_allclose(y, want, rtol=1e-14)
    y, mask = ref.gated_channels(x, z, weight=w, keep=2)
    assert (mask.sum(axis=-1) == 2).all() and (y[~mask] == 0).all()


def test_gated_channels_zero_size_and_errors():
    y, mask = ref.gated_channels(np.zeros((0, 3)), np.zeros(4), weight=np.zeros((4, 3)))
    assert y.shape == (0, 4) and mask.shape == (4,)
    y, mask = ref.gated_channels(np.zeros((2, 3)), np.zeros((2, 0)), weight=np.zeros((0, 3)))
    assert y.shape == (2, 0)
    with pytest.raises(ValueError):
        ref.gated_channels(np.zeros((2, 3)), np.zeros(4))
    with pytest.raises(ValueError):
        ref.gate_open(np.zeros(3), mode="sometimes")


def test_no_warnings_on_extreme_logits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = ref.gated_channels(np.ones((2, 3)), np.array([1e4, -1e4, -1e308]), mode="soft")
    assert y.tolist() == [[1.0, 0.0, 0.0]] * 2
