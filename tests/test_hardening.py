"""Hostile but valid input: huge counts and sizes clipped in the core, zero-size calls, missing
and mixed arrays, gemm auto's candidates and memory, on every backend usable here."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import dshal
from dshal import auto, clipping, reference
from dshal.plans import plan_attention
from dshal.registry import registry

BACKENDS = [n for n in ("numpy", "opencl", "torch")
            if n in registry.backends() and registry.backends()[n].available]
HUGE = 10**30
RNG = np.random.default_rng(7)


def _attn(B=1, Hq=2, Hkv=1, Lq=9, Lk=9, D=8, Dv=8):
    q = RNG.standard_normal((B, Hq, Lq, D)).astype(np.float32)
    k = RNG.standard_normal((B, Hkv, Lk, D)).astype(np.float32)
    v = RNG.standard_normal((B, Hkv, Lk, Dv)).astype(np.float32)
    return q, k, v


def _close(x, y):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_attention_counts_mean_all(backend):
    q, k, v = _attn()
    dense = reference.sparse_attention(q, k, v, causal=True)[0]
    for kw in ({"top_k": HUGE, "block_size": 2}, {"window": 2**31}, {"window": 2**63},
               {"top_k": 2, "block_size": 2**31}, {"top_k": HUGE, "block_size": 2**40}):
        out = dshal.ops.sparse_attention(q, k, v, causal=True, backend=backend, **kw)
        _close(out, dense)
    out, sel = dshal.ops.sparse_attention(q, k, v, top_k=HUGE, block_size=2**31,
                                          return_indices=True, backend=backend)
    assert sel.shape == (1, 1, 9, 1) and (np.asarray(sel) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_keep_and_group_sizes(backend):
    x = RNG.standard_normal((5, 8)).astype(np.float32)
    logits = RNG.standard_normal(8).astype(np.float32)
    y = dshal.ops.gated_channels(x, logits, keep=HUGE, backend=backend)
    _close(y, x)
    for gran in ("row", "block", "tensor"):
        values, scales = dshal.ops.quantize(x, "int8", granularity=gran, group_size=2**31,
                                            backend=backend)
        ref_v, ref_s = reference.quantize(x, "int8", granularity=gran, group_size=8)
        np.testing.assert_array_equal(values, ref_v)
        np.testing.assert_array_equal(scales, ref_s)
    b = RNG.standard_normal((8, 3)).astype(np.float32)
    out = dshal.ops.gemm(x, b, precision="int8", group_size=2**31, backend=backend)
    _close(out, reference.gemm(x, b, precision="int8", group_size=8))


def test_clipping_happens_once_in_the_core():
    q, k, v = _attn(Lq=5, Lk=13)
    metas = {n: dshal.arrays.inspect(n, x) for n, x in (("q", q), ("k", k), ("v", v))}
    sizes = dict(plan_attention(metas, top_k=HUGE, block_size=2**31, window=2**31).sig.sizes)
    assert (sizes["block_size"], sizes["window"]) == (13, 13)
    assert clipping.attention(HUGE, 4, 0, 5, 13) == (4, 4, 0)  # 4 blocks of 4 keys
    assert clipping.attention(0.5, 4, 3, 5, 13) == (0.5, 4, 3)  # fractions as they are
    assert clipping.group_size(2**31, 0, 0) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_heads_and_zero_head_dim(backend):
    q, k, v = _attn(Hq=0, Hkv=0)
    out, sel, lse = dshal.ops.sparse_attention(q, k, v, top_k=1, block_size=4,
                                               return_indices=True, return_lse=True,
                                               backend=backend)
    assert out.shape == (1, 0, 9, 8) and sel.shape[:3] == (1, 0, 9) and lse.shape == (1, 0, 9)
    assert str(sel.dtype).endswith("int64") and str(lse.dtype).endswith("float32")
    q, k, v = _attn(D=0)
    out = dshal.ops.sparse_attention(q, k, v, causal=True, backend=backend)
    _close(out, reference.sparse_attention(q, k, v, causal=True)[0])
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        dshal.ops.sparse_attention(*_attn(Hq=2, Hkv=0), backend=backend)


@pytest.mark.parametrize("shape", [(4, 0, 3), (0, 5, 3), (2, 5, 0)])
def test_auto_zero_size(shape):
    m, k, n = shape
    out, info = dshal.ops.gemm(np.ones((m, k), np.float32), np.ones((k, n), np.float32),
                               precision="auto", return_info=True)
    assert out.shape == (m, n) and not out.any()
    assert info["estimated_error"] == 0.0


@pytest.mark.parametrize("call, name", [
    (lambda: dshal.ops.sparse_attention(None, *_attn()[1:]), "q"),
    (lambda: dshal.ops.sparse_attention(*_attn()[:2], None), "v"),
    (lambda: dshal.ops.gemm(np.ones((2, 2), np.float32), None), "b"),
    (lambda: dshal.ops.quantize(None, "int8"), "x"),
    (lambda: dshal.ops.gated_channels(np.ones((2, 2), np.float32), None), "gate_logits"),
])
def test_missing_arrays_are_named(call, name):
    with pytest.raises(dshal.DshalTypeError, match=f"^{name} is required"):
        call()


def test_mixed_libraries_are_dshal_errors():
    torch = pytest.importorskip("torch")
    a = np.ones((2, 3), np.float32)
    with pytest.raises(dshal.DshalTypeError, match=r"a is numpy, b is torch"):
        dshal.ops.gemm(a, torch.ones(3, 2))
    with pytest.raises(dshal.DshalTypeError, match=r"^b must be an array"):
        dshal.ops.gemm(a, [[1.0]])


# --- auto -------------------------------------------------------------------------------------


def test_auto_estimate_memory_is_bounded():
    a = RNG.standard_normal((1 << 13, 1024), dtype=np.float32)  # 32 MiB
    b = RNG.standard_normal((1024, 64), dtype=np.float32)
    tracemalloc.start()
    try:
        est = auto.estimate_error(a, b, "bf16", 128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the whole-array version held float64 copies of a (64 MiB each) several times over
    assert peak <= 7 * auto.BLOCK_BYTES, peak
    assert 1e-4 < est < 1e-2


@pytest.mark.parametrize("shape", [(33, 200, 17), (300, 2048, 40)], ids=["exact", "sketched"])
def test_blocked_estimate_matches_whole_array_formula(shape, monkeypatch):
    """Small blocks (many of them) give the estimate one block gives (the exact path keeps b
    whole: its block holds b)."""
    m, k, n = shape
    small = 8 * k * n if m * k * n <= auto.EXACT_LIMIT else 8 * 64 * max(k, n, auto.PROBES) // 7
    a = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal((k, n)).astype(np.float32)
    for precision in ("int8", "bf16", "fp8_e4m3"):
        whole = auto.estimate_error(a, b, precision, 64)
        monkeypatch.setattr(auto, "BLOCK_BYTES", small)
        blocked = auto.estimate_error(a, b, precision, 64)
        monkeypatch.undo()
        assert blocked == pytest.approx(whole, rel=1e-9), precision


GEMM_PLUGIN = {"p_bf16_only": """
import numpy as np
from dshal.hookspec import hookimpl
from dshal.capabilities import BackendSpec, DeviceInfo, OpCapability
from dshal.reference import gemm

@hookimpl
def dshal_backend_declare():
    cap = OpCapability(dtypes={"float32"}, features={"auto"}, precisions={"fp32", "bf16"},
                       auto_order=("bf16", "fp32"))
    return BackendSpec(name="bf16_only", version="1", plugin_api=(1, 1), device_types={1},
                       array_kind="numpy", priority=-1, capabilities={"gemm": cap})

@hookimpl
def dshal_device_probe():
    return DeviceInfo(present=True, name="x")

@hookimpl
def dshal_gemm_run(call):
    return gemm(call.a, call.b, precision=call.precision).astype(np.float32)
"""}


def test_auto_candidates_are_filtered_by_the_serving_backend(tmp_path):
    from tests.fake_dist import installed

    a = RNG.standard_normal((16, 64)).astype(np.float32)
    b = RNG.standard_normal((64, 8)).astype(np.float32)
    with installed(tmp_path, GEMM_PLUGIN, {"bf16_only": "p_bf16_only"}):
        _, info = dshal.ops.gemm(a, b, precision="auto", tolerance=0.5, return_info=True,
                                 candidates=["fp8_e4m3", "int8", "bf16", "fp32"],
                                 backend="bf16_only")
        assert (info["precision"], info["backend"]) == ("bf16", "bf16_only")
        # the numpy backend declares every precision: the same call there picks fp8
        _, info = dshal.ops.gemm(a, b, precision="auto", tolerance=0.5, return_info=True,
                                 candidates=["fp8_e4m3", "int8", "bf16", "fp32"])
        assert info["precision"] == "fp8_e4m3"
        with pytest.raises(dshal.UnsupportedError, match="declares none of the candidates"):
            dshal.ops.gemm(a, b, precision="auto", candidates=["int8"], backend="bf16_only")


def test_autograd_path_clips_too():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.tensor(x, requires_grad=True) for x in _attn(Lq=6, Lk=8))
    out = dshal.ops.sparse_attention(q, k, v, top_k=HUGE, block_size=2**31, window=2**40,
                                     causal=True)
    out.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    dshal.ops.sparse_attention(q, k, v, causal=True).sum().backward()
    for got, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, x.grad)
    with pytest.raises(ValueError, match="block_size"):
        dshal.ops.sparse_attention(q, k, v, top_k=2, block_size=0)
