"""The numpy backend's compiled loops (``dshal.backends.numpy._native``) against its numpy
passes: bit for bit on every path that uses them, and the same errors.

The rest of the suite checks the backend (compiled loops on) against the float64 reference;
these tests pin the two implementations of the same arithmetic to each other, so that either
one going wrong fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dshal
from dshal.backends.numpy import gemm as gemm_mod
from dshal.backends.numpy import native
from dshal.calls import QuantizeCall
from tests import op_cases

LIB = native.NATIVE
BF16 = np.dtype(ml_dtypes.bfloat16)
needs_native = pytest.mark.skipif(LIB is None, reason=native.STATUS)


def test_compiled_loops_are_built():
    """The dev/CI install builds them (setup.py); a missing compiler must not pass silently."""
    if os.environ.get("DSHAL_NUMPY_NATIVE", "1").strip() == "0":
        pytest.skip("switched off by DSHAL_NUMPY_NATIVE=0")
    assert LIB is not None, native.STATUS
    assert "compiled" in native.STATUS


def test_switch_off_by_environment():
    code = "from dshal.backends.numpy import native; print(native.NATIVE is None, native.STATUS)"
    env = {**os.environ, "DSHAL_NUMPY_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("True") and "DSHAL_NUMPY_NATIVE=0" in out


def both(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the compiled loops, then with the numpy passes."""
    first = fn(*args, **kwargs)
    native.NATIVE = None
    try:
        second = fn(*args, **kwargs)
    finally:
        native.NATIVE = LIB
    return first, second


def assert_same(got, want):
    """Bit for bit, arrays or tuples of arrays (NaN payloads aside: a NaN must stay NaN)."""
    if got is None or want is None:
        assert got is want
        return
    if isinstance(got, tuple):
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype.kind == "f" or got.dtype in (BF16,):
        nan = np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
        got, want = got[~nan], want[~nan]
    np.testing.assert_array_equal(op_cases.bits(got), op_cases.bits(want))


def wide_range(rng, shape, dtype=np.float32):
    """Values over many binades per row, signed zeros, and tiny values that round to -0."""
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-40, 30, shape)
    x = x.astype(dtype)
    flat = x.reshape(-1)
    flat[::13] = 0
    flat[5::17] = -0.0
    flat[7::19] = -1e-30
    return x


# --- quantize ---------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("precision", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("granularity", ["row", "block", "tensor"])
def test_quantize_paths_agree(precision, granularity):
    rng = np.random.default_rng(1)
    shapes = [(300, 517), (129, 129), (64, 256), (1, 1), (0, 5)]
    if granularity != "block":
        shapes.append((3, 20, 96))
    for shape in shapes:
        for dtype in (np.float32, np.float64, np.float16, BF16):
            x = wide_range(rng, shape, dtype) if dtype in (np.float32, np.float64) else \
                rng.standard_normal(shape).astype(dtype)
            for g in (1, 32, 128):
                for out in (None, np.dtype(np.float32)):
                    for deq in (False, True) if out is not None else (False,):
                        assert_same(*both(gemm_mod.quantize_values, x, precision,
                                          granularity, g, out, dequantize=deq))


@needs_native
@pytest.mark.parametrize("precision", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_quantize_paths_agree_on_strided_and_subnormal_scaled_inputs(precision):
    rng = np.random.default_rng(2)
    base = wide_range(rng, (260, 300))
    tiny = (rng.standard_normal((64, 256)) * 1e-42).astype(np.float32)  # subnormal scales
    for x in (base.T, base[::3, 1::2], tiny, tiny.T):
        for gran in ("row", "block", "tensor"):
            assert_same(*both(gemm_mod.quantize_values, x, precision, gran, 64))
            assert_same(*both(gemm_mod.quantize_values, x, precision, gran, 64,
                              np.dtype(np.float32), dequantize=True))


@needs_native
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), g=st.sampled_from([1, 3, 16, 128]),
       exponent=st.integers(-45, 37), seed=st.integers(0, 2**16),
       precision=st.sampled_from(["int8", "fp8_e4m3", "fp8_e5m2"]),
       granularity=st.sampled_from(["row", "block", "tensor"]))
def test_quantize_paths_agree_property(rows, cols, g, exponent, seed, precision, granularity):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 10.0**exponent).astype(np.float32)
    assert_same(*both(gemm_mod.quantize_values, x, precision, granularity, g))


@needs_native
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("granularity", ["row", "block", "tensor"])
def test_quantize_paths_refuse_the_same_inputs(bad, granularity):
    x = np.ones((130, 140), np.float32)
    x[129, 139] = bad
    for lib in (LIB, None):
        native.NATIVE = lib
        try:
            with pytest.raises(ValueError, match="beyond float32's range"):
                gemm_mod.quantize_values(x, "fp8_e4m3", granularity, 128)
        finally:
            native.NATIVE = LIB


# --- rounding to float precisions -------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_float_rounding_paths_agree_on_every_upper_half(precision):
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [0, 1, 0x0FFF, 0x1000, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0xFFFF]
    x = np.concatenate([upper | np.uint32(low) for low in lows]).view(np.float32)
    with np.errstate(all="ignore"):
        assert_same(*both(gemm_mod.rounded_fp32, x.reshape(-1, 1024), precision))
        assert_same(*both(gemm_mod.rounded_fp32, x[:4096].reshape(64, 64).T, precision))
        assert_same(*both(gemm_mod.rounded_fp32, x[:6].reshape(2, 3).astype(np.float64),
                          precision))
        assert_same(*both(gemm_mod.rounded_fp32, np.empty((3, 0), np.float32), precision))


@needs_native
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_quantize_to_float_precisions_paths_agree(precision):
    """quantize's bf16/fp16 storage codes (and tf32's float32) on every upper half, other
    dtypes, a 0-d input and an empty one."""
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [0, 1, 0x0FFF, 0x1000, 0x1FFF, 0x2000, 0x7FFF, 0x8000, 0xFFFF]
    x = np.concatenate([upper | np.uint32(low) for low in lows]).view(np.float32)
    rng = np.random.default_rng(5)
    cases = [x.reshape(-1, 512), x[:3000].reshape(60, 50).T, np.float32(3.3),
             rng.standard_normal((7, 9)), np.empty((0, 4), np.float32),
             rng.standard_normal((3, 4)).astype(np.float16)]
    with np.errstate(all="ignore"):
        for case in cases:
            assert_same(*both(gemm_mod.quantize, QuantizeCall(case, precision, "row", 128)))


# --- gemm -------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("precision", ["int8", "fp8_e4m3", "fp8_e5m2", "tf32", "bf16", "fp16"])
def test_gemm_paths_agree(precision):
    rng = np.random.default_rng(3)
    for (M, K, N, g) in ((300, 517, 260, 128), (5, 1300, 33, 128), (2, 64, 48, 16),
                         (70, 256, 256, 128)):
        for scale in (1.0, 1e-6, 1e3) if precision == "fp16" else (1.0, 1e-25, 1e25):
            a = (rng.standard_normal((M, K)) * scale).astype(np.float32)
            b = rng.standard_normal((K, N)).astype(np.float32)
            for out_dtype in ("float32", "float64"):
                assert_same(*both(dshal.ops.gemm, a, b, precision=precision, group_size=g,
                                  out_dtype=out_dtype, backend="numpy"))


@needs_native
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_int8_gemm_of_stored_values_paths_agree(granularity):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 40, 384)).astype(np.float32)
    b = rng.standard_normal((384, 256)).astype(np.float32)
    qa, sa = dshal.ops.quantize(a, precision="int8", granularity=granularity, backend="numpy")
    # b's scale forms: per block, per tensor, per column (a row quantisation of b^T, one group)
    qb, sb = dshal.ops.quantize(b, precision="int8", granularity="block", backend="numpy")
    qt, st_ = dshal.ops.quantize(b, precision="int8", granularity="tensor", backend="numpy")
    qc, sc = dshal.ops.quantize(b.T.copy(), precision="int8", granularity="row",
                                group_size=384, backend="numpy")
    for values, scales in ((qb, sb), (qt, st_), (np.ascontiguousarray(qc.T), sc.reshape(1, -1))):
        assert_same(*both(dshal.ops.gemm, qa, values, precision="int8", a_scale=sa,
                          b_scale=scales, backend="numpy"))


# --- the compiled functions refuse what they cannot take --------------------------------------


@needs_native
def test_compiled_functions_refuse_bad_buffers():
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="x must be a 2-D array"):
        LIB.quantize(x.T, np.empty((8, 4), np.uint8), np.ones((8, 1), np.float32), 1, 8, 0, 0,
                     False)
    with pytest.raises(ValueError, match="out must be a 2-D array"):
        LIB.quantize(x, np.empty((4, 8), np.float32), np.ones((4, 1), np.float32), 1, 8, 0, 0,
                     False)
    with pytest.raises(ValueError, match="shapes disagree"):
        LIB.quantize(x, np.empty((4, 8), np.uint8), np.ones((4, 2), np.float32), 1, 8, 0, 0,
                     False)
    with pytest.raises(ValueError, match="out of range"):
        LIB.quantize(x, np.empty((4, 8), np.uint8), np.ones((4, 1), np.float32), 1, 8, 7, 0,
                     False)
    with pytest.raises(ValueError, match="fmt must be"):
        LIB.round_float(x, np.empty_like(x), 3)
    with pytest.raises(ValueError, match="shapes disagree"):
        LIB.scale_add(x, x[:2], np.ones((1, 1), np.float32), 8, True)
    with pytest.raises(BufferError):  # a read-only out
        LIB.quantize(x, np.empty((4, 8), np.uint8).data.toreadonly(),
                     np.ones((4, 1), np.float32), 1, 8, 0, 0, False)


# --- the int8 gemm's integer kernel -----------------------------------------------------------

needs_kernel = pytest.mark.skipif(not native.INT8_KERNEL,
                                  reason="the int8 kernel runs on x86-64 with AVX2 only")


def _avx2() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def test_int8_kernel_is_built_where_it_can_run():
    """On an x86-64 Linux CPU with AVX2 (dev and CI machines) the kernel must be there."""
    if LIB is None or os.environ.get("DSHAL_NUMPY_INT8_KERNEL", "1").strip() == "0":
        pytest.skip("compiled loops or the kernel switched off")
    if not (sys.platform == "linux" and os.uname().machine == "x86_64" and _avx2()):
        pytest.skip("not an x86-64 Linux CPU with AVX2")
    assert LIB.INT8_KERNEL is True and native.INT8_KERNEL is True


def kernel_runs(monkeypatch) -> list[int]:
    """A list that gains an entry each time the int8 kernel runs a panel."""
    runs: list[int] = []
    real = gemm_mod._IntKernel.run

    def counted(self, *a, **k):
        runs.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(gemm_mod._IntKernel, "run", counted)
    return runs


def kernel_and_blas(monkeypatch, fn, *args, **kwargs):
    """``fn`` with the int8 kernel (asserting that it ran), then with float32 BLAS products."""
    runs = kernel_runs(monkeypatch)
    first = fn(*args, **kwargs)
    assert runs, "the int8 kernel did not run"
    monkeypatch.setattr(native, "INT8_KERNEL", False)
    runs.clear()
    second = fn(*args, **kwargs)
    assert not runs
    monkeypatch.setattr(native, "INT8_KERNEL", True)
    return first, second


@needs_kernel
@pytest.mark.parametrize("M, K, N, g", [
    (1, 1, 1, 128), (7, 130, 17, 128), (13, 256, 48, 64), (6, 2048, 16, 128),
    (25, 1030, 31, 1030),   # one span over EXACT_K terms: float64 products rounded once
    (9, 2500, 20, 1200),    # spans over EXACT_K, several of them
    (40, 300, 70, 3),       # odd groups: BLAS (pairs would straddle the groups)
])
def test_int8_kernel_agrees_with_blas_products(monkeypatch, M, K, N, g):
    rng = np.random.default_rng(M * K + N)
    a = wide_range(rng, (M, K))
    b = rng.standard_normal((K, N)).astype(np.float32)
    if g % 2:  # the kernel declines; the two paths are then one
        assert gemm_mod._IntKernel.build(np.ones((K, N), np.float32), gemm_mod._GroupScales.build(
            2, None, K, N, g, np.dtype(np.float32)), g) is None
        return
    assert_same(*kernel_and_blas(monkeypatch, dshal.ops.gemm, a, b, precision="int8",
                                 group_size=g, backend="numpy"))


@needs_kernel
@pytest.mark.parametrize("form", ["scalar", "per row", "per column", "per row group+block"])
def test_int8_kernel_on_stored_values_with_every_scale_form(monkeypatch, form):
    rng = np.random.default_rng(7)
    M, K, N = 23, 384, 50  # N not a multiple of 16 nor of the group: scales per column
    a = rng.integers(-128, 128, (2, M, K)).astype(np.int8)  # -128 too: stored, not quantised
    b = rng.integers(-128, 128, (K, N)).astype(np.int8)
    scales = {
        "scalar": (0.25, np.float32(3.0)),
        "per row": (rng.random((2, M, 1), dtype=np.float32), 0.5),
        "per column": (None, rng.random((1, N), dtype=np.float32)),
        "per row group+block": (rng.random((2, M, 3), dtype=np.float32),
                                rng.random((3, 1), dtype=np.float32)),
    }[form]
    bias = rng.standard_normal(N).astype(np.float32)
    for values in (b, np.asfortranarray(b)[::-1][::-1]):  # and b transposed in memory
        assert_same(*kernel_and_blas(monkeypatch, dshal.ops.gemm, a, values, precision="int8",
                                     a_scale=scales[0], b_scale=scales[1], bias=bias,
                                     backend="numpy"))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 30), K=st.integers(1, 400), N=st.integers(1, 70),
       g=st.sampled_from([2, 16, 64, 128, 256]), exponent=st.integers(-15, 15),
       seed=st.integers(0, 2**16))
def test_int8_kernel_agrees_property(M, K, N, g, exponent, seed):
    rng = np.random.default_rng(seed)
    # elements over 30 binades, zeros among them; every scale product stays a float32 normal
    a = (rng.standard_normal((M, K)) * 10.0 ** rng.integers(-15, 15, (M, K))).astype(np.float32)
    a.reshape(-1)[::7] = 0
    b = (rng.standard_normal((K, N)) * 10.0**exponent).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        assert_same(*kernel_and_blas(mp, dshal.ops.gemm, a, b, precision="int8", group_size=g,
                                     backend="numpy"))


@needs_kernel
def test_int8_kernel_leaves_float64_sums_and_lossy_scales_to_blas(monkeypatch):
    rng = np.random.default_rng(8)
    a = rng.integers(-128, 128, (12, 256)).astype(np.int8)
    b = rng.integers(-128, 128, (256, 32)).astype(np.int8)
    runs = kernel_runs(monkeypatch)
    dshal.ops.gemm(a, b, a_scale=0.5, out_dtype="float64", backend="numpy")
    # a product of scales that float32 would round into the subnormals: float64 scales
    out = dshal.ops.gemm(a, b, a_scale=1e-30, b_scale=1e-15, backend="numpy")
    assert not runs
    want = (a.astype(np.float64) @ b.astype(np.float64)) * 1e-45
    np.testing.assert_allclose(out, want.astype(np.float32), rtol=1e-6)


@needs_kernel
def test_int8_kernel_functions_refuse_bad_buffers():
    K, N = 10, 20
    b = np.ones((K, N), np.float32)
    packed = np.empty((2, 5 * 32), np.int16)
    LIB.pack_b(b, packed)
    with pytest.raises(ValueError, match="pack_b: out must be"):
        LIB.pack_b(b, np.empty((1, 5 * 32), np.int16))
    acc = np.empty((4, N), np.float32)
    a16 = np.zeros((6, K), np.int16)
    scales = np.ones((1, 1), np.float32)
    LIB.int8_panel(acc, a16, packed, K, K, scales, N)
    with pytest.raises(ValueError, match="disagree"):  # a's rows not padded to the 6-row tile
        LIB.int8_panel(acc, a16[:4], packed, K, K, scales, N)
    with pytest.raises(ValueError, match="disagree"):  # odd groups between spans
        LIB.int8_panel(acc, a16, packed, K, 5, np.ones((2, 1), np.float32), N)
    with pytest.raises(ValueError, match="disagree"):  # scales for another width
        LIB.int8_panel(acc, a16, packed, K, K, np.ones((1, 3), np.float32), N)
    with pytest.raises(ValueError, match="a must be a 2-D array"):
        LIB.int8_panel(acc, a16.astype(np.int32), packed, K, K, scales, N)


@needs_kernel
@pytest.mark.parametrize("a_scale", [0.37, 1e-3])
def test_int8_kernel_sums_beyond_float32_integers(monkeypatch, a_scale):
    """A span of 1500 terms of -128 x -128 sums past 2**24, where float32 stops holding every
    integer: the kernel must round the exact int32 sum times its scale once, as BLAS's float64
    chunk sums do, not the sum first."""
    K = 1500
    a = np.full((7, K), -128, np.int8)
    b = np.full((K, 18), -128, np.int8)
    a[:, 0] = b[0] = 127  # one odd product: odd sums, which float32 cannot hold
    a[3, :5] = 1
    out, blas = kernel_and_blas(monkeypatch, dshal.ops.gemm, a, b, a_scale=a_scale,
                                backend="numpy")
    assert_same(out, blas)
    sums = a.astype(np.int64) @ b.astype(np.int64)
    assert sums.min() > 2**24 and (sums % 2).all()
    np.testing.assert_array_equal(out, (sums * np.float64(np.float32(a_scale))).astype(np.float32))


def test_int8_kernel_switch_off_by_environment():
    code = ("from dshal.backends.numpy import native; "
            "print(native.INT8_KERNEL, native.INT8_STATUS)")
    env = {**os.environ, "DSHAL_NUMPY_INT8_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("False") and "float32 BLAS" in out


@needs_kernel
@pytest.mark.parametrize("K", [131071, 131072])
def test_int8_kernel_longest_int32_sum(monkeypatch, K):
    """131071 terms of -128 x -128 is the longest sum int32 holds (2**31 - 16384): the kernel
    takes it; one term more and the gemm stays on BLAS's float64 chunk sums."""
    a = np.full((1, K), -128, np.int8)
    b = np.full((K, 1), -128, np.int8)
    runs = kernel_runs(monkeypatch)
    out = dshal.ops.gemm(a, b, a_scale=0.37, backend="numpy")
    assert bool(runs) == (K < 2**17)
    want = np.float64(K * 16384) * np.float64(np.float32(0.37))
    np.testing.assert_array_equal(out, np.full((1, 1), want, np.float32))


# --- attention's exp2 -------------------------------------------------------------------------


@needs_native
def test_exp2_within_two_ulp_of_the_exact_power():
    rng = np.random.default_rng(9)
    x = np.concatenate([np.linspace(-126, 128, 200_000, dtype=np.float32),
                        rng.uniform(-125, 128, 200_000).astype(np.float32),
                        rng.uniform(-1, 1, 100_000).astype(np.float32)]).reshape(4, -1)
    y = np.empty_like(x)
    LIB.exp2(x, y)
    exact = np.exp2(x.astype(np.float64))
    normal = (exact >= 2.0**-125) & (exact < 2.0**128)
    assert (np.abs(y[normal] - exact[normal]) <= 2 * 2.0**-24 * exact[normal]).all()
    assert (y[exact < 2.0**-125] == 0).all()  # flushed: attention's sums hold a term >= 1


@needs_native
def test_exp2_special_values_and_strided_rows():
    x = np.array([[-np.inf, np.inf, np.nan, 0.0, -0.0, 128.0, 1e30, -1e30, -125.0, 3.0]],
                 np.float32)
    y = np.full_like(x, 7.0)
    LIB.exp2(x, y)
    np.testing.assert_array_equal(y[0, :2], [0.0, np.inf])
    assert np.isnan(y[0, 2])
    np.testing.assert_array_equal(y[0, 3:], [1, 1, np.inf, np.inf, 0, 2.0**-125, 8])
    wide = np.arange(24, dtype=np.float32).reshape(4, 6) - 12
    out = np.zeros((4, 12), np.float32)
    LIB.exp2(wide[:, ::1][::2], out[::2, :6])  # rows at a stride on both sides
    np.testing.assert_array_equal(out[::2, :6], np.exp2(wide[::2]))
    assert not out[1::2].any() and not out[:, 6:].any()
    with pytest.raises(ValueError, match="shapes disagree"):
        LIB.exp2(x, np.empty((1, 3), np.float32))
    with pytest.raises(ValueError, match="x must be a 2-D array"):
        LIB.exp2(x.astype(np.float64), y)


@needs_native
def test_attention_with_and_without_the_compiled_exp2():
    """The compiled exp2 moves attention by ulps, not by its tolerance (the reference check
    is the conformance suite's; this compares the two paths directly)."""
    rng = np.random.default_rng(10)
    q = rng.standard_normal((1, 4, 300, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, 300, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 300, 32)).astype(np.float32)
    for kwargs in ({"causal": True}, {"top_k": 2, "block_size": 32, "window": 40,
                                      "causal": True}):
        fast, slow = both(dshal.ops.sparse_attention, q, k, v, backend="numpy", **kwargs)
        np.testing.assert_allclose(fast, slow, rtol=2e-6, atol=2e-7)
