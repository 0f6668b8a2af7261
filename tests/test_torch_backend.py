"""The torch backend (``dshal-torch``) and the ascend backend's generic path, on torch CPU tensors.

The operator modules are called with validated call records holding torch tensors and compared
with :mod:`dshal.reference`: quantize bit for bit, gemm and gated_channels within error bounds
from error analysis (``|err| <= c * (u_out |y| + u_acc (sqrt(K) + extra) sum |a||b|)``) plus an
aggregate gate that a silent downgrade to tf32/bf16 would fail. The plugins, dispatch, the
fp32 matmul guard and the ascend probe are tested through their public hooks. The whole
certifications are tests/test_torch_certify.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dshal  # noqa: E402
from dshal import reference as ref  # noqa: E402
from dshal.arrays import to_kind  # noqa: E402
from dshal.calls import AttentionCall, GatedCall, GemmCall, QuantizeCall  # noqa: E402
from dshal.capabilities import FEATURES, Signature  # noqa: E402
from dshal.dtypes import PRECISIONS  # noqa: E402
from dshal.registry import registry  # noqa: E402
from dshal_conformance.devices import Target  # noqa: E402
from tests import op_cases  # noqa: E402
from tests.requirements import require_backend  # noqa: E402

require_backend("torch")

from dshal_ascend import device as ascend_device  # noqa: E402
from dshal_ascend import plugin as ascend_plugin  # noqa: E402
from dshal_torch import gated, gemm, numerics, plugin, quantize  # noqa: E402

U32, U64 = 2.0**-24, 2.0**-53
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the same dtypes as host (numpy / ml_dtypes) dtypes
HOST_FLOATS = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
               np.dtype(np.float64)]
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: U32,
        torch.float64: U64}


def _np(t) -> np.ndarray:
    """A torch tensor (any dtype, bfloat16 and float8 included) as a numpy array."""
    return np.asarray(to_kind(t, "numpy"))


def _tensor(rng, shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype)



# --- quantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_bitwise_equals_reference(precision):
    for granularity, x in op_cases.quantize_inputs(np.random.default_rng(1), HOST_FLOATS):
        t = to_kind(x, "torch")
        for g in op_cases.GROUP_SIZES:
            values, scales = quantize.quantize(QuantizeCall(t, precision, granularity, g))
            assert values.device == t.device
            op_cases.check_quantize(x, precision, granularity, g, _np(values),
                                    None if scales is None else scales.numpy())


def test_quantize_noncontiguous_and_fresh_result():
    rng = np.random.default_rng(2)
    base = _tensor(rng, (130, 70), scale=40.0)
    for x in (base.T, base[:, ::3], base.T[::2]):
        assert not x.is_contiguous()
        for precision in PRECISIONS:
            for granularity in ("row", "block", "tensor"):
                values, scales = quantize.quantize(QuantizeCall(x, precision, granularity, 32))
                want_v, want_s = ref.quantize(x.numpy(), precision, granularity=granularity,
                                              group_size=32)
                np.testing.assert_array_equal(op_cases.bits(_np(values)), op_cases.bits(want_v))
                if want_s is not None:
                    np.testing.assert_array_equal(scales.numpy(), want_s)
    fp32, _ = quantize.quantize(QuantizeCall(base, "fp32", "row", 128))
    assert fp32.data_ptr() != base.data_ptr()  # never the caller's own storage


def test_tf32_rounding_on_every_tie_and_special_value():
    rng = np.random.default_rng(3)
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [0, 0x0FFF, 0x1000, 0x1FFF, 0x2000, 0x3000,
            rng.integers(0, 1 << 16, upper.size, dtype=np.uint32)]
    x = np.concatenate([upper | np.uint32(low) for low in lows]).view(np.float32)
    x = np.concatenate([x, np.float32([np.inf, -np.inf, np.nan, 3.4028235e38, -0.0, 1e-45])])
    got = numerics.round_float(torch.from_numpy(x), "tf32")
    want = ref.round_to_precision(x, "tf32")
    np.testing.assert_array_equal(op_cases.bits(got.numpy()), op_cases.bits(want))


def test_quantize_refuses_float64_beyond_float32():
    x = torch.tensor([[1.0, 1e300]], dtype=torch.float64)
    with pytest.raises(ValueError, match="x holds values beyond float32"):
        dshal.ops.quantize(x, "int8", backend="torch")


# --- gemm -----------------------------------------------------------------------------------


def run_gemm(a, b, precision, *, a_scale=None, b_scale=None, group_size=128, bias=None,
             out_dtype="float32"):
    out = gemm.gemm(GemmCall(a, b, precision, a_scale, b_scale, group_size, bias, out_dtype))
    assert out.dtype == numerics.DTYPES[out_dtype] and out.device == a.device
    assert tuple(out.shape) == (*a.shape[:-2], a.shape[-2], b.shape[1])
    return out


def _host(x):
    return _np(x) if isinstance(x, torch.Tensor) else x


def check_gemm(a, b, precision, **kw):
    """The backend against the exact product of the reference's operands, within the bound."""
    out = _np(run_gemm(a, b, precision, **kw)).astype(np.float64)
    kw.pop("out_dtype", None)
    host = {k: _host(v) for k, v in kw.items()}
    A, B = ref.gemm_operands(_np(a), _np(b), precision, a_scale=host.get("a_scale"),
                             b_scale=host.get("b_scale"), group_size=kw.get("group_size", 128))
    want = A @ B + (0 if kw.get("bias") is None else _np(kw["bias"]).astype(np.float64))
    K, g = A.shape[-1], kw.get("group_size", 128)
    terms = np.abs(A) @ np.abs(B)
    if precision == "int8":  # exact sums: only the scaling rounds
        bound = 4 * U32 * (np.abs(want) + terms * (1 + math.ceil(K / g)))
    else:  # fp8 operands are dequantised in float32: two more roundings per term
        extra = 2 if precision.startswith("fp8") else 0
        bound = 4 * U32 * (np.abs(want) + (math.sqrt(max(K, 1)) + extra) * terms)
    err = np.abs(out - want)
    assert (err <= bound + 1e-300).all(), \
        f"{precision}: worst err/bound {np.max(err / np.maximum(bound, 1e-300)):.3g}"
    if np.linalg.norm(want):  # a silent tf32/bf16 product would fail this
        assert np.linalg.norm(out - want) / np.linalg.norm(want) <= 16 * U32 * math.sqrt(
            max(K, 1))
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gemm_every_precision_against_reference(precision):
    rng = np.random.default_rng(4)
    for batch, M, K, N, g in (((), 5, 300, 7, 128), ((2,), 3, 17, 97, 16), ((), 4, 0, 3, 8),
                              ((), 1, 129, 129, 1), ((2, 1), 9, 64, 5, 32), ((), 0, 5, 4, 4)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            spread = torch.from_numpy(10.0 ** rng.integers(-3, 3, K))  # dynamic range over K
            a = (_tensor(rng, (*batch, M, K), torch.float64) * spread).to(dtype)
            b = _tensor(rng, (K, N), dtype)
            check_gemm(a, b, precision, group_size=g, bias=_tensor(rng, (N,), dtype))
    a = _tensor(rng, (40, 6)).T  # non-contiguous a [6, 40] and b [40, 3]
    check_gemm(a, _tensor(rng, (3, 40)).T, precision, group_size=16)


def test_gemm_int8_is_exact_beyond_float32_chunks():
    rng = np.random.default_rng(5)
    K = 3000  # beyond the 1024 that float32 sums exactly: the chunking matters
    a = torch.from_numpy(rng.integers(-128, 128, (2, 7, K)).astype(np.int8))
    b = torch.from_numpy(rng.integers(-128, 128, (K, 5)).astype(np.int8))
    a[0, 0], b[:, 0] = -128, -128  # 3000 * 2**14 of one sign
    exact = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)
    assert np.abs(exact).max() > 2**24
    np.testing.assert_array_equal(run_gemm(a, b, "int8", out_dtype="float64").numpy(), exact)
    for g in (128, 1500, 3000):
        sa = torch.rand(2, 7, math.ceil(K / g)) + 0.5
        sb = torch.rand(math.ceil(K / g), 1) + 0.5
        out = run_gemm(a, b, "int8", a_scale=sa, b_scale=sb, group_size=g, out_dtype="float64")
        want = ref.gemm(a.numpy(), b.numpy(), precision="int8", a_scale=sa.numpy(),
                        b_scale=sb.numpy(), group_size=g)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-9 * np.abs(want).max())


def test_gemm_prequantized_scale_forms():
    rng = np.random.default_rng(6)
    M, K, N, g = 6, 300, 70, 64
    for precision in ("int8", "fp8_e4m3", "fp8_e5m2"):
        storage = quantize.STORAGE[precision]
        a = (_tensor(rng, (2, M, K), scale=20.0).clamp(-127, 127)).to(storage)
        b = (_tensor(rng, (K, N), scale=20.0).clamp(-127, 127)).to(storage)
        a_forms = [None, 0.5, torch.rand(2, M, 1), torch.rand(2, M, math.ceil(K / g))]
        b_forms = [None, 2.0, torch.rand(1, N),
                   torch.rand(math.ceil(K / g), math.ceil(N / g), dtype=torch.float64)]
        for sa in a_forms:
            for sb in b_forms:
                check_gemm(a, b, precision, a_scale=sa, b_scale=sb, group_size=g)
        # one operand stored, the other float (quantised on the fly)
        check_gemm(a, _tensor(rng, (K, N)), precision, a_scale=a_forms[3], group_size=g)
        check_gemm(_tensor(rng, (M, K)), b, precision, b_scale=b_forms[3], group_size=g)
    a = torch.from_numpy(rng.integers(-127, 128, (3, 10)).astype(np.int8))
    b = torch.from_numpy(rng.integers(-127, 128, (10, 70)).astype(np.int8))
    check_gemm(a, b, "int8", b_scale=torch.rand(1, 2), group_size=64)  # K <= g: [1, ceil(N/g)]


def test_gemm_out_dtypes_bias_and_fp16_overflow():
    rng = np.random.default_rng(7)
    a, b, bias = _tensor(rng, (4, 33), torch.float64), _tensor(rng, (33, 5), torch.float64), \
        _tensor(rng, (5,), torch.float64)
    exact = a.numpy() @ b.numpy() + bias.numpy()
    for out_dtype in ("float16", "bfloat16", "float32", "float64"):
        out = _np(run_gemm(a, b, "fp32", bias=bias, out_dtype=out_dtype)).astype(np.float64)
        u = UNIT[numerics.DTYPES[out_dtype]]
        np.testing.assert_allclose(out, exact, rtol=0, atol=8 * max(u, U32) * np.abs(exact).max()
                                   + 1e-5)
    big = torch.full((2, 4), 200.0)
    out = run_gemm(big, torch.full((4, 3), 200.0), "fp32", out_dtype="float16")
    assert torch.isinf(out).all()  # 160000 is beyond float16: inf, as the format says


def test_fp32_gemm_is_ieee_whatever_torch_allows(monkeypatch):
    rng = np.random.default_rng(8)
    a, b = _tensor(rng, (64, 512), torch.float64), _tensor(rng, (512, 64), torch.float64)
    exact = a.numpy() @ b.numpy()
    matmul = torch.backends.mkldnn.matmul
    seen, real = [], torch.matmul

    def spy(x, y):  # the precision in force when the product runs (CPUs without bf16
        seen.append(matmul.fp32_precision)  # units ignore the setting: this sees it)
        return real(x, y)

    monkeypatch.setattr(torch, "matmul", spy)
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"  # oneDNN may then multiply float32 in bf16
    try:
        out = run_gemm(a, b, "fp32", out_dtype="float64").numpy()
        assert seen == ["ieee"] and matmul.fp32_precision == "bf16"  # the caller's is back
    finally:
        matmul.fp32_precision = before
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 1e-6  # bf16 would be ~1e-3
    tf32 = run_gemm(a, b, "tf32", out_dtype="float64").numpy()
    assert np.linalg.norm(tf32 - exact) / np.linalg.norm(exact) > 1e-5


def test_ieee_guard_restores_once_and_keeps_the_legacy_api_usable():
    matmul = torch.backends.cuda.matmul
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # the legacy API: TF32 allowed
    try:
        inside, release = threading.Event(), threading.Event()

        def hold():
            with numerics.ieee_fp32():
                inside.set()
                release.wait(10)

        worker = threading.Thread(target=hold)
        worker.start()
        inside.wait(10)
        with numerics.ieee_fp32():  # nested across threads: the setting stays raised
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "ieee"  # the worker is still inside
        release.set()
        worker.join(10)
        assert matmul.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high"  # no mixed-API error
    finally:
        torch.set_float32_matmul_precision(before)


# --- gated channels -------------------------------------------------------------------------


def run_gated(x, z, *, weight=None, bias=None, mode="hard", threshold=0.0, keep=None):
    y, mask = gated.gated_channels(GatedCall(x, z, weight, bias, mode, threshold, keep, True))
    assert y.dtype == x.dtype and y.device == x.device
    assert mask.dtype == torch.bool and mask.shape == z.shape
    return y, mask


@pytest.mark.parametrize("mode", ["hard", "soft", "soft_hard"])
def test_gated_channels_against_reference(mode):
    for case in op_cases.gated_cases(mode, np.random.default_rng(9), HOST_FLOATS):
        t = {k: v if not isinstance(v, np.ndarray) else to_kind(v, "torch")
             for k, v in case.items()}
        y, mask = run_gated(t["x"], t["gate_logits"], weight=t["weight"], bias=t["bias"],
                            mode=mode, threshold=case["threshold"], keep=case["keep"])
        op_cases.check_gated(case, _np(y), mask.numpy(),
                             u_acc=U64 if case["x"].dtype == np.float64 else U32)


def test_gated_threshold_is_compared_exactly():
    z = torch.tensor([0.1, 0.2, 0.30000001192092896, -0.0], dtype=torch.float32)
    for threshold in (0.1, 0.2, 0.3, 0.30000001192092896, -0.0, 1e300, -1e300, math.inf):
        _, mask = run_gated(torch.ones(4), z, threshold=threshold)
        np.testing.assert_array_equal(mask.numpy(), ref.gate_open(z.numpy(),
                                                                  threshold=threshold))


def test_gated_nan_in_closed_rows_never_leaks_and_zero_sizes():
    rng = np.random.default_rng(10)
    x, w, z = _tensor(rng, (5, 8)), _tensor(rng, (6, 8)), _tensor(rng, (5, 6))
    z[:, 2] = -5  # channel 2 closed in every row: its weight row is never read
    w[2] = float("nan")
    x[0, 0] = float("inf")  # row 0 is poisoned for its open channels only
    y, mask = run_gated(x, z, weight=w)
    assert (y[:, 2] == 0).all() and (y[~mask] == 0).all()
    assert torch.isfinite(y[1:]).all()
    y, _ = run_gated(torch.zeros(0, 8), torch.zeros(0, 6), weight=w)
    assert tuple(y.shape) == (0, 6)
    y, _ = run_gated(torch.zeros(3, 0), torch.zeros(3, 0))
    assert tuple(y.shape) == (3, 0)
    x = _tensor(rng, (8, 5)).T  # non-contiguous x and a per-row gate view
    y, _ = run_gated(x, _tensor(rng, (8, 6)).T[:5, :6], weight=_tensor(rng, (6, 8)),
                     mode="soft_hard")
    assert tuple(y.shape) == (5, 6)


# --- the plugins and dispatch ---------------------------------------------------------------


def test_torch_plugin_declares_every_operator_below_numpy():
    spec = plugin.dshal_backend_declare()
    assert spec.name == "torch" and spec.array_kind == "torch" and spec.priority == -5
    assert {1, 2, 8, 10, 14, 1001, 1002} <= spec.device_types and 1000 not in spec.device_types
    for op, cap in spec.capabilities.items():
        assert cap.features == FEATURES[op] and "float64" in cap.dtypes
    assert spec.capabilities["gemm"].precisions == set(PRECISIONS)
    assert spec.capabilities["gemm"].auto_order == ("fp32",)
    numpy_spec = registry.get("numpy").spec
    assert spec.priority < numpy_spec.priority
    assert Target.for_backend(spec) == Target("torch", (1, 0))  # no accelerator here


def test_probe_does_not_import_torch_and_finds_the_host():
    code = ("import sys; from dshal.registry import registry; b = registry.get('torch'); "
            "print(b.available, b.device.driver, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[0] == "True" and out[1] == "torch" and out[-1] == "False"
    info = plugin.dshal_device_probe()  # torch imported here: the accelerator is listed
    assert info.present and info.details["accelerator"] == "none"


def test_call_check_refuses_what_mps_cannot_hold():
    sig = Signature("gemm", "torch", (8, 0), (("a", "float64"), ("b", "float64")),
                    precision="fp32")
    assert plugin.dshal_call_check(sig) == [
        f"dtype {arg}=float64 on metal (MPS has no float64; supported there: float16, "
        "bfloat16, float32)" for arg in ("a", "b")]
    sig = Signature("quantize", "torch", (8, 0), (("x", "float32"),), precision="fp8_e5m2")
    assert plugin.dshal_call_check(sig) == ["precision=fp8_e5m2 on metal (MPS has no float8 "
                                            "dtypes)"]
    for device in ((1, 0), (2, 0), (1001, 0)):
        assert plugin.dshal_call_check(Signature("gemm", "torch", device, (
            ("a", "float64"), ("b", "float64")), precision="fp32")) == []


def test_dispatch_results_on_the_callers_library_device_and_dtype():
    rng = np.random.default_rng(11)
    x = _tensor(rng, (6, 40), torch.bfloat16)
    chosen = str(dshal.explain("quantize", x, "int8"))
    assert "runs on 'numpy'" in chosen and "torch: accepts (lower priority)" in chosen
    values, scales = dshal.ops.quantize(x, "fp8_e4m3", backend="torch")
    assert values.dtype == torch.float8_e4m3fn and values.device == x.device
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (6, 1)
    host = x.float().numpy()  # host arrays run when forced, and come back as numpy
    out = dshal.ops.gemm(host, host.T.copy(), precision="bf16", backend="torch")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    y = dshal.ops.gated_channels(x, torch.ones(40, dtype=torch.bfloat16), backend="torch")
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)


# --- ascend: the generic path, its probe and its switch ---------------------------------------


def test_ascend_runs_the_torch_hooks_on_the_npu_declaration(monkeypatch):
    for hook in ("dshal_quantize_run", "dshal_gemm_run", "dshal_gated_channels_run",
                 "dshal_sparse_attention_run", "dshal_sparse_attention_backward_run"):
        assert getattr(ascend_plugin, hook) is getattr(plugin, hook)  # no copied logic
    monkeypatch.delenv(ascend_device.ENV, raising=False)
    spec = ascend_plugin.dshal_backend_declare()
    assert spec.device_types == {1001} and spec.priority > plugin.PRIORITY
    for cap in spec.capabilities.values():
        assert cap.dtypes & {"float64", "float8_e4m3fn", "float8_e5m2"} == set()
    assert "fp8_e4m3" not in spec.capabilities["gemm"].precisions
    info = ascend_plugin.dshal_device_probe()
    if not info.present:  # no torch_npu (or no NPU) here: the reason says what is missing
        assert "torch_npu" in info.reason


def test_ascend_cpu_mode_serves_torch_cpu_tensors(monkeypatch):
    monkeypatch.setenv(ascend_device.ENV, "cpu")
    spec = ascend_plugin.dshal_backend_declare()
    assert spec.device_types == {1} and spec.priority < 0
    assert spec.capabilities == ascend_plugin.capabilities(ascend_plugin.FLOATS,
                                                           ascend_plugin.PRECISIONS)
    info = ascend_plugin.dshal_device_probe()
    assert info.present and "not an NPU" in info.name and info.driver.startswith("torch ")
    monkeypatch.setenv(ascend_device.ENV, "gpu")
    info = ascend_plugin.dshal_device_probe()
    assert not info.present and "DSHAL_ASCEND_DEVICE='gpu' (allowed: npu, cpu" in info.reason


# --- sparse attention: the run hook is dshal.torch.attention ----------------------------------


def test_attention_hook_runs_dshal_torch_attention():
    from dshal.torch import attention

    rng = np.random.default_rng(12)
    q = _tensor(rng, (2, 33, 8, 16)).transpose(1, 2)  # non-contiguous [2, 8, 33, 16]
    k, v = _tensor(rng, (2, 2, 40, 16)), _tensor(rng, (2, 2, 40, 8))
    v[0, 0, 39] = float("nan")  # the last key: outside the causal view of early queries
    out, idx, lse = dshal.ops.sparse_attention(q, k, v, top_k=2, block_size=8, window=4,
                                               causal=True, return_indices=True,
                                               return_lse=True, backend="torch")
    assert out.dtype == q.dtype and idx.dtype == torch.int64 and lse.dtype == torch.float32
    call = AttentionCall(q, k, v, 2, 8, 4, True, 0.25, None, True, True)
    for got, want in zip((out, idx, lse), attention.sparse_attention(call)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # bitwise
    want_out, _, want_lse = ref.sparse_attention(q.numpy(), k.numpy(), v.numpy(),
                                                 indices=idx.numpy(), block_size=8, window=4,
                                                 causal=True, scale=0.25)
    finite = np.isfinite(want_out)
    assert (np.isnan(out.numpy()) == ~finite).all()  # NaN only where the NaN value is allowed
    np.testing.assert_allclose(out.numpy()[finite], want_out[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-5)


def test_vml_is_initialised_single_threaded_before_the_first_cpu_attention(monkeypatch):
    """MKL VML's first call, made by two threads at once, may compute one thread's chunk with
    ~1.5e-4 relative error (dshal.torch.vml): the attention kernels first make a call too small
    to be split across threads, once per process, on CPU tensors only."""
    from dshal.torch import attention, vml

    seen = []
    real_exp = torch.exp

    def spy(x, *a, **kw):
        seen.append(x.numel())
        return real_exp(x, *a, **kw)

    monkeypatch.setattr(vml, "_done", False)
    monkeypatch.setattr(torch, "exp", spy)
    vml.ensure(torch.device("meta"))
    assert seen == [] and not vml._done  # nothing to initialise off the CPU
    q = torch.randn(1, 2, 300, 64)
    geo = attention.Geometry.of(q, q, q, block_size=64, window=0, causal=True, scale=0.125)
    attention.forward(q, q, q, geo, None)
    assert vml._done and seen and all(n <= 64 for n in seen)  # below torch's parallel grain
    count = len(seen)
    attention.backward(q, None, q, q, q, torch.zeros(1, 2, 300), geo, None)
    assert len(seen) == count  # once per process


def test_attention_hook_runs_in_ieee_fp32(monkeypatch):
    from dshal.torch import attention

    matmul, seen = torch.backends.mkldnn.matmul, []
    monkeypatch.setattr(attention, "sparse_attention",
                        lambda call: seen.append(matmul.fp32_precision) or ("out", None, None))
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        call = AttentionCall(None, None, None, None, 64, 0, False, 1.0, None, False, False)
        assert plugin.dshal_sparse_attention_run(call) == ("out", None, None)
        assert seen == ["ieee"] and matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
