"""The built-in numpy backend against the float64 reference (:mod:`dshal.reference`).

The backend's modules are called directly with validated call records. Error bounds come from
error analysis (DESIGN 5): for outputs y of length-n reductions,
``|err| <= c * (u_out * |y| + u_acc * (sqrt(n) + extra) * sum |terms|)``, plus an aggregate
``||err||_F / ||y||_F`` gate that catches a silent downgrade of the arithmetic.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings

import ml_dtypes
import numpy as np
import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dshal import hookspec, ops
from dshal import reference as ref
from dshal.backends.numpy import attention as attn_mod
from dshal.backends.numpy import gating as gating_mod
from dshal.backends.numpy import gemm as gemm_mod
from dshal.backends.numpy import native, plugin
from dshal.backends.numpy import scratch as scratch_mod
from dshal.calls import AttentionCall, GatedCall, GemmCall, QuantizeCall
from dshal.capabilities import FEATURES, BackendSpec, DeviceInfo
from dshal.dtypes import DTYPE_UNIT_ROUNDOFF, PRECISIONS, UNIT_ROUNDOFF
from tests import op_cases

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]
U32, U64 = 2.0**-24, 2.0**-53


def _u(dtype: np.dtype) -> float:
    return DTYPE_UNIT_ROUNDOFF[np.dtype(dtype).name]


# --- sparse attention -------------------------------------------------------------------------


def run_attention(q, k, v, *, top_k=None, block_size=64, window=0, causal=False, scale=None,
                  indices=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None and q.shape[-1] else scale or 1.0
    call = AttentionCall(q, k, v, top_k, block_size, window, causal, scale, indices,
                         top_k is not None or indices is not None, True)
    out, idx, lse = attn_mod.sparse_attention(call)
    B, Hq, Lq, _ = q.shape
    assert out.shape == (B, Hq, Lq, v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Lq) and lse.dtype == np.float32
    if idx is not None:
        assert idx.dtype == np.int64 and idx.shape[:3] == (B, k.shape[1], Lq)
    return out, idx, lse, scale


def check_selection(q, k, idx, *, top_k, block_size, causal, scale):
    """The backend's selection is a valid top-k: forced own block, the right count, and no
    unselected candidate scoring above a selected one beyond the scores' rounding error."""
    Lq, Lk = q.shape[2], k.shape[2]
    nb = ref.n_blocks(Lk, block_size)
    scores = ref.selection_scores(q, k, block_size, scale)  # [B, Hkv, Lq, nb]
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    cand = ref.attention_candidates(Lq, Lk, block_size, causal)
    own = ref.own_block(Lq, Lk, block_size)
    want = ref.resolve_count(top_k, cand.sum(axis=-1))
    chosen = np.zeros((*idx.shape[:3], nb + 1), bool)
    np.put_along_axis(chosen, np.where(idx < 0, nb, idx), True, axis=-1)
    chosen = chosen[..., :nb]
    valid = idx >= 0
    assert (valid[..., 1:] <= valid[..., :-1]).all(), "-1 padding must come last"
    assert ((np.diff(idx, axis=-1) > 0) | ~valid[..., 1:]).all(), "indices must ascend"
    rows = own >= 0
    assert chosen[..., np.nonzero(rows)[0], own[rows]].all(), "own block must be selected"
    ranked = chosen & cand
    assert (ranked.sum(axis=-1) == want).all(), "wrong number of selected candidates"
    assert not (chosen & ~cand & (np.arange(nb) != own[:, None])).any()
    # the backend scores in float32 (float64 inputs: float64): near-ties may flip
    u = U64 if q.dtype == np.float64 else U32
    qsum = np.abs(ref._f64(q)).reshape(*k.shape[:2], q.shape[1] // k.shape[1], *q.shape[2:]
                                       ).sum(axis=2)
    tol = 64 * u * abs(scale) * np.nan_to_num(np.abs(qsum).sum(axis=-1), posinf=0)[..., None] \
        * np.nan_to_num(np.abs(ref._f64(k)), posinf=0).max(axis=(2, 3), initial=0)[
            ..., None, None]
    low = np.where(ranked, scores, np.inf).min(axis=-1, initial=np.inf)
    high = np.where(cand & ~ranked, scores, -np.inf).max(axis=-1, initial=-np.inf)
    assert (high <= low + tol[..., 0]).all(), "an unselected candidate outranks a selected block"


def check_attention(q, k, v, *, nan_ok=False, **kw):
    """Backend vs reference (with the backend's own selection when it used top_k)."""
    out, idx, lse, scale = run_attention(q, k, v, **kw)
    top_k, indices = kw.pop("top_k", None), kw.pop("indices", None)
    if top_k is not None:
        check_selection(q, k, idx, top_k=top_k, block_size=kw.get("block_size", 64),
                        causal=kw.get("causal", False), scale=scale)
        indices = idx
    elif indices is not None:
        nb = ref.n_blocks(k.shape[2], kw.get("block_size", 64))
        np.testing.assert_array_equal(idx, ref.normalize_indices(indices, nb))
    kw["scale"] = scale
    r_out, _, r_lse = ref.sparse_attention(q, k, v, indices=indices, **kw)
    with np.errstate(invalid="ignore"):
        r_abs, _, _ = ref.sparse_attention(q, k, np.abs(ref._f64(v)), indices=indices, **kw)
    got = out.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(r_out)), "NaN pattern differs"
    if not nan_ok:
        assert not np.isnan(r_out).any()
    fin = np.isfinite(r_out) & np.isfinite(r_abs)
    u_acc = U64 if q.dtype == np.float64 else U32
    n = max(1, k.shape[2])
    # a score carries ~u_acc * scale * sum_d |q_d k_d| of error: the row's largest such sum
    qk = _score_magnitude(q, k, kw["scale"])
    bound = 4 * _u(q.dtype) * np.abs(r_out) \
        + 32 * u_acc * (math.sqrt(n) + qk[..., None]) * r_abs
    with np.errstate(invalid="ignore"):
        err = np.abs(np.where(fin, got - r_out, 0))
    assert (err <= np.where(fin, bound, np.inf) + 1e-300).all(), \
        f"max err/bound {np.max(err / np.maximum(bound, 1e-300)):.3g}"
    norm = np.linalg.norm(np.where(fin, r_out, 0))
    if norm > 0:
        typical = np.median(qk) if qk.size else 0.0
        assert np.linalg.norm(err) / norm <= \
            8 * max(_u(q.dtype), u_acc * (math.sqrt(n) + typical)) + 1e-12
    lse64 = lse.astype(np.float64)
    assert np.array_equal(np.isneginf(lse64), np.isneginf(r_lse))
    assert np.array_equal(np.isnan(lse64), np.isnan(r_lse))
    finite = np.isfinite(r_lse)
    lse_bound = 8 * U32 * (np.abs(r_lse) + qk + math.log(n)) + 4 * u_acc * math.sqrt(n)
    assert (np.abs(lse64[finite] - r_lse[finite]) <= lse_bound[finite]).all()
    return out, idx, lse


def _score_magnitude(q, k, scale) -> np.ndarray:
    """[B, Hq, Lq]: max over keys of scale * sum_d |q_d k_d| (non-finite keys ignored)."""
    qa = np.nan_to_num(np.abs(ref._f64(q)), posinf=0.0)
    ka = np.nan_to_num(np.abs(ref._f64(k)), posinf=0.0)
    g = q.shape[1] // k.shape[1] if k.shape[1] else 1
    ka = np.repeat(ka, g, axis=1)
    return abs(scale) * (qa @ np.swapaxes(ka, -1, -2)).max(axis=-1, initial=0.0)


def _qkv(rng, B, Hq, Hkv, Lq, Lk, D, Dv, dtype=np.float32):
    q = rng.standard_normal((B, Hq, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype)
    return q, k, v


SIZES = (1, 3, 17, 97, 129)

#: the ways float32 attention runs: each build of the compiled tiles this CPU runs, and the
#: numpy passes (the path without the extension, and float64's)
PATHS = [*(native.ATTENTION.SUPPORTED if native.ATTENTION is not None else ()), "numpy passes"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    if request.param == "numpy passes":
        monkeypatch.setattr(native, "ATTENTION", None)
    else:
        monkeypatch.setattr(native, "ATTENTION_ISA", native.ATTENTION.ISAS.index(request.param))
    return request.param


@pytest.mark.parametrize("seed", range(40))
def test_attention_random_against_reference(seed, path):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        Hkv, g = int(rng.choice([1, 2])), int(rng.choice([1, 2, 8]))
        Lq, Lk = int(rng.choice(SIZES)), int(rng.choice(SIZES))
        if rng.random() < 0.3:
            Lq = Lk
        D, Dv = int(rng.choice([4, 16])), int(rng.choice([3, 8]))
        q, k, v = _qkv(rng, int(rng.integers(1, 3)), Hkv * g, Hkv, Lq, Lk, D, Dv)
        bs = int(rng.choice([1, 4, 16, 64]))
        window = int(rng.choice([0, 0, 1, 5, 40, 200]))
        mode = int(rng.integers(4))
        top_k = [None, int(rng.integers(0, 6)), float(rng.choice([0.1, 0.5, 1.0])), None][mode]
        indices = None
        if mode == 3:
            nb = ref.n_blocks(Lk, bs)
            indices = rng.integers(-1, nb, (q.shape[0], Hkv, Lq, int(rng.integers(0, 4))))
        check_attention(q, k, v, top_k=top_k, indices=indices, block_size=bs, window=window,
                        causal=bool(rng.integers(2)))


@settings(max_examples=60, deadline=None)
@given(Hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 8]), Lq=st.integers(0, 40),
       Lk=st.integers(0, 70), bs=st.integers(1, 20), window=st.integers(0, 80),
       causal=st.booleans(), top_k=st.one_of(st.none(), st.integers(0, 8),
                                             st.floats(0.01, 1.0)),
       seed=st.integers(0, 2**16))
def test_attention_property(Hkv, g, Lq, Lk, bs, window, causal, top_k, seed):
    q, k, v = _qkv(np.random.default_rng(seed), 1, Hkv * g, Hkv, Lq, Lk, 8, 5)
    check_attention(q, k, v, top_k=top_k, block_size=bs, window=window, causal=causal)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_attention_dtypes_and_noncontiguous(dtype, path):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 33, 8, 16)).astype(dtype).transpose(0, 2, 1, 3)  # [2,8,33,16]
    k = rng.standard_normal((2, 16, 50, 2)).astype(dtype).transpose(0, 3, 2, 1)  # [2,2,50,16]
    v = rng.standard_normal((2, 2, 8, 50)).astype(dtype).transpose(0, 1, 3, 2)  # [2,2,50,8]
    assert not q.flags.c_contiguous and not k.flags.c_contiguous
    for kw in (dict(top_k=3, block_size=8, window=4, causal=True),
               dict(top_k=0.5, block_size=5), dict(window=7), dict(causal=True), {}):
        check_attention(q, k, v, **kw)


def test_attention_special_cases_equal_dense(path):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 4, 2, 40, 40, 16, 8)
    dense_causal = run_attention(q, k, v, causal=True)[0]
    for top_k in (100, 1.0):  # top_k >= every candidate count: dense causal
        np.testing.assert_allclose(run_attention(q, k, v, top_k=top_k, block_size=8,
                                                 causal=True)[0], dense_causal, atol=2e-6)
    np.testing.assert_allclose(run_attention(q, k, v, window=40, causal=True)[0],
                               dense_causal, atol=2e-6)
    dense = run_attention(q, k, v)[0]
    np.testing.assert_allclose(run_attention(q, k, v, window=80)[0], dense, atol=2e-6)
    # decode: one query at the end of a long cache sees the whole cache
    qd, kd, vd = _qkv(rng, 1, 8, 2, 1, 300, 16, 8)
    out = check_attention(qd, kd, vd, causal=True)[0]
    np.testing.assert_allclose(out, run_attention(qd, kd, vd)[0], atol=2e-6)
    check_attention(qd, kd, vd, causal=True, top_k=4, block_size=16, window=32)


def test_attention_returned_indices_reproduce_output(path):
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 8, 2, 70, 90, 16, 8)
    for kw in (dict(causal=True, window=10), dict(causal=False, window=0)):
        out, idx, lse, _ = run_attention(q, k, v, top_k=3, block_size=8, **kw)
        again, idx2, lse2, _ = run_attention(q, k, v, indices=idx, block_size=8, **kw)
        np.testing.assert_array_equal(out, again)
        np.testing.assert_array_equal(idx, idx2)
        np.testing.assert_array_equal(lse, lse2)


def test_attention_empty_rows_and_zero_sizes(path):
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 1, 2, 1, 20, 5, 8, 4)  # Lq > Lk causal: the first 15 rows see nothing
    out, _, lse = check_attention(q, k, v, causal=True, top_k=2, block_size=2)
    assert (out[:, :, :15] == 0).all() and np.isneginf(lse[:, :, :15]).all()
    out, _, lse = check_attention(q, k, v, indices=np.full((1, 1, 20, 2), -1), block_size=2)
    assert (out == 0).all() and np.isneginf(lse).all()
    for B, Hq, Hkv, Lq, Lk, D, Dv in ((0, 2, 1, 5, 5, 4, 4), (1, 2, 1, 0, 5, 4, 4),
                                      (1, 2, 1, 5, 0, 4, 4), (1, 2, 2, 5, 5, 0, 4),
                                      (1, 2, 1, 5, 5, 4, 0)):
        q, k, v = _qkv(rng, B, Hq, Hkv, Lq, Lk, D, Dv)
        for kw in ({}, dict(top_k=2, block_size=2, causal=True), dict(window=3)):
            out, idx, lse, _ = run_attention(q, k, v, **kw)
            r_out, r_idx, r_lse = ref.sparse_attention(q, k, v, **kw)
            np.testing.assert_allclose(out, r_out, atol=1e-6)
            np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))
            if idx is not None:
                assert idx.shape == r_idx.shape


def test_attention_nan_outside_allowed_never_leaks(path):
    rng = np.random.default_rng(5)
    for trial in range(60):
        Lq, Lk = int(rng.choice([1, 9, 40])), int(rng.choice([9, 40, 97]))
        q, k, v = _qkv(rng, 1, 4, 2, Lq, Lk, 8, 4)
        for x in (k, v):  # poison a few keys and values
            pos = rng.integers(0, Lk, 3)
            x[0, rng.integers(0, 2, 3), pos, rng.integers(0, x.shape[-1], 3)] = \
                rng.choice([np.nan, np.inf, -np.inf], 3)
        mode, bs = trial % 3, int(rng.choice([1, 4, 16]))
        nb = ref.n_blocks(Lk, bs)
        check_attention(q, k, v, nan_ok=True, causal=bool(trial % 2), block_size=bs,
                        window=int(rng.choice([0, 1, 5])), top_k=[2, 0.3, None][mode],
                        indices=None if mode < 2 else rng.integers(-1, nb, (1, 2, Lq, 2)))
    # the classic leak: a causal query must not see NaN in the future
    q, k, v = _qkv(rng, 1, 2, 1, 16, 16, 8, 4)
    k[0, 0, 8:] = np.nan
    v[0, 0, 8:] = np.inf
    for kw in ({}, dict(window=4), dict(top_k=1, block_size=4)):
        out = run_attention(q, k, v, causal=True, **kw)[0]
        assert np.isfinite(out[:, :, :8]).all()


def test_attention_logits_around_1e4_and_stale_reference(path):
    """Huge scores and rows whose best key comes late (the lazy rescale must catch up)."""
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, 1, 4, 1, 64, 64, 16, 8)
    k[0, 0, 5] = q[0, 0, 40] * 300  # one key scores ~1e4 for some queries
    for kw in ({}, dict(causal=True), dict(top_k=2, block_size=8, window=3, causal=True),
               dict(top_k=2, block_size=8)):
        check_attention(q, k, v, **kw)
    check_attention(q * 50, k, v, causal=True, window=9)


def test_attention_scores_beyond_float32_shift_resolution_stay_finite(path):
    """scale=3e9 puts scores near 1e11 (log2 units), where float32 cannot resolve a shift by
    the row's reference: the reference key itself used to come out below 2**-125, leaving rows
    with no mass (NaN). Every layout of the passes must keep them finite and correct."""
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, 1, 4, 2, 200, 200, 32, 32)
    for kw in (dict(top_k=2, block_size=16, window=8, causal=True), dict(causal=True), {},
               dict(window=5, causal=True), dict(top_k=3, block_size=8)):
        out, _, lse, _ = run_attention(q, k, v, scale=3e9, **kw)
        assert np.isfinite(out).all() and np.isfinite(lse).all(), kw
        check_attention(q, k, v, scale=3e9, **kw)


def test_attention_threaded_units_match_and_rerun_bitwise(monkeypatch, path):
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 1, 8, 2, 300, 300, 16, 8)
    kw = dict(top_k=3, block_size=16, window=20, causal=True)
    serial = run_attention(q, k, v, **kw)
    monkeypatch.setattr(attn_mod, "_THREADING_MIN", 0)
    monkeypatch.setattr(attn_mod, "_RANGE", 256)  # several units per (batch, kv head)
    monkeypatch.setenv("DSHAL_NUM_THREADS", "3")
    first = check_attention(q, k, v, **kw)
    second = run_attention(q, k, v, **kw)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(first[0], serial[0], atol=1e-6)
    np.testing.assert_array_equal(first[1], serial[1])
    # without threadpoolctl the units run in order on the calling thread, same results
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    monkeypatch.setattr(attn_mod, "_CONTROLLER", None)
    for a, b in zip(run_attention(q, k, v, **kw)[:3], first):
        np.testing.assert_array_equal(a, b)


# --- quantize ---------------------------------------------------------------------------------



@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_bitwise_equals_reference(precision):
    for gran, x in op_cases.quantize_inputs(np.random.default_rng(8), FLOATS):
        for g in op_cases.GROUP_SIZES:
            values, scales = gemm_mod.quantize(QuantizeCall(x, precision, gran, g))
            op_cases.check_quantize(x, precision, gran, g, values, scales)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_encoders_match_ml_dtypes_on_every_tie(fmt):
    dtype = np.dtype(getattr(ml_dtypes, {"fp8_e4m3": "float8_e4m3fn",
                                         "fp8_e5m2": "float8_e5m2"}[fmt]))
    grid = np.unique(np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32))
    grid = grid[np.isfinite(grid)].astype(np.float64)
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(9)
    x = np.concatenate([grid.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                        np.nextafter(mids, np.float32(-np.inf)),
                        (rng.standard_normal(4096) * 10.0 ** rng.integers(-9, 5, 4096)
                         ).astype(np.float32), np.float32([0.0, -0.0, 1e-38, -1e-45])])
    qmax = np.float32(grid.max())
    x = np.clip(x, -qmax, qmax)
    # every upper-16-bit pattern in range, with lower bits 0, 1, 0x8000, 0xFFFF and random
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [0, 1, 0x8000, 0xFFFF, rng.integers(0, 1 << 16, upper.size, dtype=np.uint32)]
    every = np.concatenate([(upper | np.uint32(low)) for low in lows]).view(np.float32)
    with np.errstate(invalid="ignore"):
        every = every[np.abs(every) <= qmax]
    x = np.concatenate([x, every])
    want = x.astype(dtype).view(np.uint8)
    mbits, bias = gemm_mod._FP8_LAYOUT[fmt]
    out = np.empty(x.shape, np.uint8)
    gemm_mod._encode_fp8(x, out, mbits, bias)
    np.testing.assert_array_equal(out, want)
    # the float32 grid values (gemm's on-the-fly operands): the decoded codes, -0.0 included
    grid_values = np.empty(x.shape, np.float32)
    gemm_mod.round_fp8(x, grid_values, mbits, bias)
    np.testing.assert_array_equal(op_cases.bits(grid_values),
                                  op_cases.bits(want.view(dtype).astype(np.float32)))


@pytest.mark.parametrize("precision", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_float32_operands_are_the_decoded_quantisation(precision):
    rng = np.random.default_rng(15)
    for shape, g in (((2, 5, 256), 128), ((7, 300), 64), ((129, 129), 1), ((256, 384), 128)):
        x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-12, 4, shape[-1])
             ).astype(np.float32)
        x[..., :3] = [0.0, -0.0, -1e-30]  # signed zeros and values that round to -0
        for gran in ("row", "block") if len(shape) == 2 else ("row",):
            values, scales = gemm_mod.quantize_values(x, precision, gran, g)
            as_float, same = gemm_mod.quantize_values(x, precision, gran, g, np.dtype(np.float32))
            np.testing.assert_array_equal(scales, same)
            want = gemm_mod.decode(values)
            # fp8 bit for bit (-0.0 is a code); int8 has no -0: rint's -0.0 equals its 0
            same_bits = op_cases.bits if precision != "int8" else np.asarray
            np.testing.assert_array_equal(same_bits(as_float), same_bits(want))
            # scaled in place through a grouped view: what the expanded scales give
            if gran == "row":
                got = gemm_mod._scaled_a(as_float, scales, g)
                full = gemm_mod._expand_last(scales, g, shape[-1])
            else:
                got = gemm_mod._scaled_b(as_float, scales, g)
                full = gemm_mod._expand_last(np.repeat(scales, g, axis=0)[:shape[0]], g,
                                             shape[1])
            np.testing.assert_array_equal(same_bits(got), same_bits(want * full))


# --- gemm -------------------------------------------------------------------------------------


def run_gemm(a, b, precision, *, a_scale=None, b_scale=None, group_size=128, bias=None,
             out_dtype="float32"):
    out = gemm_mod.gemm(GemmCall(a, b, precision, a_scale, b_scale, group_size, bias,
                                 out_dtype))
    assert out.dtype == np.dtype(out_dtype if out_dtype != "bfloat16" else BF16)
    assert out.shape == (*a.shape[:-2], a.shape[-2], b.shape[1])
    return out


def check_gemm(a, b, precision, **kw):
    out = run_gemm(a, b, precision, **kw).astype(np.float64)
    kw.pop("out_dtype", None)
    r = ref.gemm(a, b, precision=precision, **kw)
    A, B = ref.gemm_operands(a, b, precision, a_scale=kw.get("a_scale"),
                             b_scale=kw.get("b_scale"), group_size=kw.get("group_size", 128))
    K = A.shape[-1]
    mag = np.abs(A) @ np.abs(B)
    # fp8 operands are dequantised to float32 (one more rounding per product term)
    extra = 2 if precision.startswith("fp8") else 0
    bound = 4 * (U32 * np.abs(r) + U32 * (math.sqrt(max(K, 1)) + extra) * mag)
    if precision == "int8":
        bound = 4 * U32 * (np.abs(r) + mag * (1 + math.ceil(K / kw.get("group_size", 128))))
    assert (np.abs(out - r) <= bound + 1e-300).all(), \
        f"{precision}: max err/bound {np.max(np.abs(out - r) / np.maximum(bound, 1e-300)):.3g}"
    norm = np.linalg.norm(r)
    if norm:  # aggregate gate: an fp32 product computed in tf32/bf16 would fail this
        assert np.linalg.norm(out - r) / norm <= 16 * U32 * math.sqrt(max(K, 1))
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gemm_every_precision_against_reference(precision):
    rng = np.random.default_rng(10)
    for batch, M, K, N, g in (((), 5, 300, 7, 128), ((2,), 3, 17, 97, 16), ((), 4, 0, 3, 8),
                              ((), 1, 129, 129, 1), ((2, 1), 9, 64, 5, 32), ((), 0, 5, 4, 4)):
        for dtype in (np.float32, np.float64, BF16):
            a = (rng.standard_normal((*batch, M, K)) * 10.0 ** rng.integers(-3, 3, K)
                 ).astype(dtype)  # wide dynamic range across K
            b = rng.standard_normal((K, N)).astype(dtype)
            bias = rng.standard_normal(N).astype(dtype)
            check_gemm(a, b, precision, group_size=g, bias=bias)
    a = rng.standard_normal((40, 6)).astype(np.float32).T  # non-contiguous [6, 40]
    check_gemm(a, rng.standard_normal((40, 3)).astype(np.float32), precision, group_size=16)


def test_gemm_fp32_is_not_silently_downgraded():
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((64, 512)), rng.standard_normal((512, 64))
    exact = a @ b
    out = run_gemm(a, b, "fp32", out_dtype="float64")
    rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    assert rel < 1e-6  # tf32 would give ~1e-4, bf16 ~1e-3
    tf32 = run_gemm(a, b, "tf32", out_dtype="float64")
    assert np.linalg.norm(tf32 - exact) / np.linalg.norm(exact) > 1e-5


def test_gemm_int8_is_exact_with_chunked_k():
    rng = np.random.default_rng(12)
    K = 3000  # beyond the 1024 that float32 accumulates exactly: chunking matters
    a = rng.integers(-128, 128, (2, 7, K)).astype(np.int8)
    b = rng.integers(-128, 128, (K, 5)).astype(np.int8)
    a[0, 0], b[:, 0] = -128, -128  # the largest products, all of one sign: 3000 * 2**14
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert np.abs(exact).max() > 2**24
    np.testing.assert_array_equal(run_gemm(a, b, "int8", out_dtype="float64"), exact)
    np.testing.assert_array_equal(run_gemm(a, b, "int8"), exact.astype(np.float32))
    for g in (128, 1500, 3000):  # group scales: chunks inside groups larger than 1024
        sa = rng.random((2, 7, math.ceil(K / g))).astype(np.float32) + 0.5
        sb = rng.random((math.ceil(K / g), math.ceil(5 / g))).astype(np.float32) + 0.5
        out = run_gemm(a, b, "int8", a_scale=sa, b_scale=sb, group_size=g, out_dtype="float64")
        r = ref.gemm(a, b, precision="int8", a_scale=sa, b_scale=sb, group_size=g)
        np.testing.assert_allclose(out, r, rtol=1e-12, atol=1e-9 * np.abs(r).max())


def test_gemm_int8_is_exact_at_the_float32_limit():
    # K = 1024 products of -128 (or 127) values: sums reach 2**24, the last exact float32 integer
    K, N = 1024, 6
    a = np.full((5, K), -128, np.int8)
    a[1], a[2, ::2], a[3, 1::3] = 127, 127, -127
    b = np.full((K, N), -128, np.int8)
    b[:, 1], b[::2, 2], b[3::5, 3] = 127, 127, 1
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert np.abs(exact).max() == 2**24
    for g in (128, 1024):  # one scale group and eight (unit scales)
        ones_a = np.ones((5, K // g), np.float32)
        ones_b = np.ones((K // g, 1), np.float32)
        for sa, sb in ((None, None), (ones_a, ones_b)):
            out = run_gemm(a, b, "int8", a_scale=sa, b_scale=sb, group_size=g)
            np.testing.assert_array_equal(out, exact.astype(np.float32))


def test_gemm_int8_panels_and_threads_agree(monkeypatch):
    rng = np.random.default_rng(16)
    M, K, N, g = 1100, 1024, 264, 128  # several panels, on threads; N not a multiple of g
    a = rng.standard_normal((M, K)).astype(np.float32) * 10.0 ** rng.integers(-3, 3, K)
    b = rng.standard_normal((K, N)).astype(np.float32)
    a[:, :g] = 0  # a group with amax = 0
    monkeypatch.setenv("DSHAL_NUM_THREADS", "1")
    one = check_gemm(a, b, "int8", group_size=g)
    monkeypatch.setenv("DSHAL_NUM_THREADS", "3")
    np.testing.assert_array_equal(run_gemm(a, b, "int8", group_size=g), one)


def test_gemm_int8_scale_products_below_float32s_normals():
    # a's and b's scales are normal, their product (~1e-42) is subnormal in float32 while the
    # outputs (~1e-36) are not: the rank-1 group scale must not be rounded there first
    rng = np.random.default_rng(17)
    K, N, g = 256, 130, 128
    a = rng.integers(-127, 128, (4, K)).astype(np.int8)
    b = rng.integers(-127, 128, (K, N)).astype(np.int8)
    sa = (rng.random((4, K // g)) + 0.5).astype(np.float32) * np.float32(1e-30)
    sb = (rng.random((K // g, 2)) + 0.5).astype(np.float32) * np.float32(1e-12)
    assert (sa[:, :1] * sb[:1]).max() < np.finfo(np.float32).tiny
    check_gemm(a, b, "int8", a_scale=sa, b_scale=sb, group_size=g)


def test_scratch_buffers_are_per_slot_and_per_thread():
    first = scratch_mod.scratch("test-a", (4, 8), np.float32)
    again = scratch_mod.scratch("test-a", (2, 3), np.int32)  # smaller: the same memory
    other = scratch_mod.scratch("test-b", (4, 8), np.float32)
    assert first.shape == (4, 8) and again.shape == (2, 3) and again.dtype == np.int32
    assert np.shares_memory(first, again) and not np.shares_memory(first, other)
    grown = scratch_mod.scratch("test-a", (64, 64), np.float64)
    assert grown.shape == (64, 64) and grown.flags.c_contiguous
    seen = []
    worker = threading.Thread(target=lambda: seen.append(
        scratch_mod.scratch("test-a", (64, 64), np.float64)))
    worker.start()
    worker.join()
    assert not np.shares_memory(seen[0], grown)


def test_gemm_prequantized_scale_forms():
    rng = np.random.default_rng(13)
    M, K, N, g = 6, 300, 70, 64
    for precision, dtype in (("int8", np.int8), ("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                             ("fp8_e5m2", ml_dtypes.float8_e5m2)):
        a = (rng.standard_normal((2, M, K)) * 20).clip(-127, 127).astype(dtype)
        b = (rng.standard_normal((K, N)) * 20).clip(-127, 127).astype(dtype)
        a_forms = [None, 0.5, rng.random((2, M, 1)).astype(np.float32),
                   rng.random((2, M, math.ceil(K / g))).astype(np.float32)]
        b_forms = [None, np.float32(2.0), rng.random((1, N)).astype(np.float32),
                   rng.random((math.ceil(K / g), math.ceil(N / g))).astype(np.float64)]
        for sa in a_forms:
            for sb in b_forms:
                check_gemm(a, b, precision, a_scale=sa, b_scale=sb, group_size=g)
        # one operand quantised, the other float (quantised on the fly)
        check_gemm(a, rng.standard_normal((K, N)).astype(np.float32), precision,
                   a_scale=a_forms[3], group_size=g)
        check_gemm(rng.standard_normal((M, K)).astype(np.float32), b, precision,
                   b_scale=b_forms[3], group_size=g)
    # K <= g: block scales [1, ceil(N/g)]
    a = rng.integers(-127, 128, (3, 10)).astype(np.int8)
    b = rng.integers(-127, 128, (10, 70)).astype(np.int8)
    check_gemm(a, b, "int8", b_scale=rng.random((1, 2)).astype(np.float32), group_size=64)
    check_gemm(a.astype(ml_dtypes.float8_e4m3fn), b.astype(ml_dtypes.float8_e4m3fn),
               "fp8_e4m3", b_scale=rng.random((1, 2)).astype(np.float32), group_size=64)


def test_gemm_out_dtypes_and_bias():
    rng = np.random.default_rng(14)
    a, b = rng.standard_normal((4, 33)), rng.standard_normal((33, 5))
    bias = rng.standard_normal(5)
    for out_dtype in ("float16", "bfloat16", "float32", "float64"):
        out = run_gemm(a, b, "fp32", bias=bias, out_dtype=out_dtype)
        np.testing.assert_allclose(out.astype(np.float64), a @ b + bias, rtol=0,
                                   atol=8 * _u(out.dtype) * np.abs(a @ b + bias).max() + 1e-5)


# --- gated channels ---------------------------------------------------------------------------


def run_gated(x, z, *, weight=None, bias=None, mode="hard", threshold=0.0, keep=None):
    y, mask = gating_mod.gated_channels(GatedCall(x, z, weight, bias, mode, threshold, keep,
                                                  True))
    assert y.dtype == x.dtype and mask.dtype == bool and mask.shape == z.shape
    return y, mask


@pytest.mark.parametrize("mode", ["hard", "soft", "soft_hard"])
def test_gated_channels_against_reference(mode):
    for case in op_cases.gated_cases(mode, np.random.default_rng(15), FLOATS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # stable sigmoid: no overflow warnings
            y, mask = run_gated(case["x"], case["gate_logits"], weight=case["weight"],
                                bias=case["bias"], mode=mode, threshold=case["threshold"],
                                keep=case["keep"])
        op_cases.check_gated(case, y, mask,
                             u_acc=U64 if case["x"].dtype == np.float64 else U32)


def test_gated_channels_nan_in_closed_rows_never_leaks():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    z = rng.standard_normal((5, 6)).astype(np.float32)
    z[:, 2] = -5  # channel 2 closed in every row: its weight row is never read
    w[2] = np.nan
    x_nan = x.copy()
    x_nan[0, 0] = np.inf  # row 0 is poisoned for open channels only
    y, mask = run_gated(x_nan, z, weight=w)
    assert (y[:, 2] == 0).all() and (y[~mask] == 0).all()
    assert np.isfinite(y[1:]).all()
    y, _ = run_gated(np.zeros((0, 8), np.float32), np.zeros((0, 6), np.float32), weight=w)
    assert y.shape == (0, 6)


# --- the plugin -------------------------------------------------------------------------------


def test_plugin_declares_and_probes():
    pm = pluggy.PluginManager(hookspec.PROJECT)
    pm.add_hookspecs(hookspec)
    pm.register(plugin, name="numpy")
    pm.check_pending()
    spec = pm.hook.dshal_backend_declare()
    assert isinstance(spec, BackendSpec) and spec.name == "numpy" and spec.array_kind == "numpy"
    assert spec.plugin_api == (1, 2) and spec.device_types == {1}
    for op, cap in spec.capabilities.items():
        assert cap.features == FEATURES[op]
    assert spec.capabilities["gemm"].auto_order == ("fp32",)
    assert set(spec.capabilities["gemm"].precisions) == set(PRECISIONS)
    assert {"int8", "float8_e4m3fn"} <= spec.capabilities["gemm"].dtypes
    device = pm.hook.dshal_device_probe()
    assert isinstance(device, DeviceInfo) and device.present and device.name.startswith("cpu")
    assert "numpy" in device.driver
    x = np.ones((2, 4), np.float32)
    out = pm.hook.dshal_gemm_run(call=GemmCall(x, x.T, "fp32", None, None, 128, None,
                                               "float32"))
    np.testing.assert_array_equal(out, np.full((2, 2), 4, np.float32))
    assert UNIT_ROUNDOFF["fp32"] == U32


@pytest.mark.parametrize("b_scale", [None, np.ones((1, 5), np.float32),
                                     np.ones((0, 1), np.float32)])
def test_gemm_int8_no_depth_with_per_group_a_scale(b_scale):
    # a_scale [M, 0]: per-group scales of a row with no group (reshape(-1, 0) is ambiguous)
    a, b = np.zeros((3, 0), np.int8), np.zeros((0, 5), np.int8)
    out = ops.gemm(a, b, a_scale=np.ones((3, 0), np.float32), b_scale=b_scale,
                         backend="numpy")
    assert out.shape == (3, 5) and out.dtype == np.float32 and not out.any()
