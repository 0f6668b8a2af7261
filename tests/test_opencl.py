"""The OpenCL backend on this machine's OpenCL device (PoCL's CPU device in CI).

Device selection, typed failures provoked for real (a kernel with a syntax error through the
build path every kernel takes; an allocation above the device's limit), the program cache (miss,
hit, corrupt entries, a second process that compiles nothing), and the operators against
:mod:`dshal.reference` on a few shapes each. The whole certification is tests/
test_opencl_certify.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("pyopencl")

import dshal
from dshal import reference
from dshal.errors import BackendRuntimeError
from dshal_kernels import GemmDefines, QuantizeDefines, source
from tests.requirements import require_backend

_BACKEND = require_backend("opencl")
pytestmark = pytest.mark.xdist_group("opencl")

from dshal_opencl import cache, plugin  # noqa: E402
from dshal_opencl.device import ENV, Runtime, choose, enumerate_devices  # noqa: E402
from dshal_opencl.errors import (  # noqa: E402
    DeviceSelectionError,
    OpenCLAllocationError,
    OpenCLBuildError,
)
from dshal_opencl.programs import Programs  # noqa: E402

RNG = np.random.default_rng(7)
ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env}, cwd=ROOT)


# --- device selection -------------------------------------------------------------------------


def test_default_choice_is_the_first_gpu_else_the_first_device():
    import pyopencl as cl

    found = enumerate_devices()
    gpus = [f for f in found if f.device.type & cl.device_type.GPU]
    assert choose(found, None).label == (gpus or found)[0].label


def test_selection_by_index_and_by_name_parts():
    found = enumerate_devices()
    first = found[0]
    assert choose(found, "0:0").label == "0:0"
    assert choose(found, "0").label == "0:0"  # a platform alone means its first device
    plat, dev = first.platform.name.split()[0].lower(), first.device.name.split()[0].upper()
    assert choose(found, f"{plat}:{dev}").label == first.label


def test_invalid_selection_lists_the_valid_devices(monkeypatch):
    found = enumerate_devices()
    with pytest.raises(DeviceSelectionError) as err:
        choose(found, "7:no-such-device")
    text = str(err.value)
    assert "DSHAL_OPENCL_DEVICE='7:no-such-device'" in text
    assert f"{found[0].label} = {found[0].platform.name.strip()}" in text
    monkeypatch.setenv(ENV, "7:no-such-device")
    info = plugin.dshal_device_probe()
    assert not info.present and "valid:" in info.reason


def test_forced_call_with_an_invalid_selection_says_why():
    proc = _run("import numpy as np, dshal\n"
                "try:\n"
                "    dshal.ops.gemm(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),"
                " backend='opencl')\n"
                "except Exception as exc:\n"
                "    print(type(exc).__name__, exc)\n", **{ENV: "9:9"})
    assert "matches no OpenCL device" in proc.stdout and "valid:" in proc.stdout, proc.stderr


def test_probe_lists_every_platform_and_device():
    info = plugin.dshal_device_probe()
    found = enumerate_devices()
    assert info.present
    for f in found:
        assert f"device {f.label}" in info.details
    assert sum("[selected]" in v for v in info.details.values()) == 1
    assert "program cache" in info.details


def test_import_dshal_does_not_import_the_backend():
    proc = _run("import sys, dshal; print(sorted(m for m in sys.modules "
                "if m.split('.')[0] in ('pyopencl', 'dshal_opencl', 'dshal_kernels')))")
    assert proc.stdout.strip() == "[]", proc.stderr


# --- typed failures ---------------------------------------------------------------------------


def test_build_failure_reports_kernel_options_and_log():
    rt = Runtime.get()
    broken = source("quantize").replace("int i = GLOBAL_ID(0);", "int i = GLOBAL_ID(0)", 1)
    assert broken != source("quantize")
    options = QuantizeDefines.make("float32", "bf16").options()
    with pytest.raises(OpenCLBuildError) as err:
        Programs(rt).build("quantize-broken", broken, options)
    text = str(err.value)
    assert "quantize-broken" in text and rt.name in text and "-DR_T=ushort" in text
    assert "error" in err.value.log.lower() and "quantize.cl" in err.value.log
    assert isinstance(err.value, BackendRuntimeError)


def test_allocation_above_the_device_limit_is_a_clear_error():
    rt = Runtime.get()
    huge = rt.max_alloc + 4096
    with pytest.raises(OpenCLAllocationError) as err, rt.session("test") as s:
        s.alloc(16, "a small buffer")
        s.alloc(huge, "a huge buffer")
    text = str(err.value)
    assert f"{huge:,} bytes requested" in text and "16 bytes already allocated" in text
    assert f"max single allocation {rt.max_alloc:,}" in text and rt.name in text
    assert isinstance(err.value, MemoryError) and isinstance(err.value, BackendRuntimeError)


# --- the program cache ------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(tmp_path / "dshal"))
    return tmp_path / "dshal" / "opencl"


DEFINES = GemmDefines.make("float16", "float16", "fp16", "float16", "float16")


def test_cache_miss_then_hit_in_a_private_directory(cache_dir):
    first = Programs(Runtime.get())
    first.get(DEFINES)
    assert (first.source_builds, first.cache.misses, first.cache.hits) == (1, 1, 0)
    entries = list(cache_dir.glob("*.bin"))
    assert len(entries) == 1 and not list(cache_dir.glob(".tmp-*"))
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(cache_dir.parent.stat().st_mode) == 0o700
    second = Programs(Runtime.get())
    second.get(DEFINES)
    assert (second.source_builds, second.cache.hits) == (0, 1)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_a_corrupt_entry_is_rebuilt(cache_dir, damage):
    Programs(Runtime.get()).get(DEFINES)
    (entry,) = cache_dir.glob("*.bin")
    data = entry.read_bytes()
    entry.write_bytes({"garbage": b"not a program", "truncated": data[: len(data) // 2],
                       "flipped": data[:-1] + bytes([data[-1] ^ 0xFF])}[damage])
    again = Programs(Runtime.get())
    prg = again.get(DEFINES)
    assert (again.source_builds, again.cache.corrupt) == (1, 1)
    assert prg.gemm_tile is not None
    assert entry.read_bytes() == data  # rewritten whole


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DSHAL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "dshal"
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"
    monkeypatch.setenv("DSHAL_KERNEL_CACHE", "off")
    assert Programs(Runtime.get()).cache is None


def test_a_second_process_compiles_nothing(tmp_path):
    code = ("import json, numpy as np, dshal\n"
            "from dshal_opencl.programs import programs\n"
            "a = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
            "dshal.ops.gemm(a, a.T.copy(), precision='bf16', backend='opencl')\n"
            "dshal.ops.quantize(a, 'int8', backend='opencl')\n"
            "p = programs()\n"
            "print(json.dumps([p.source_builds, p.cache.hits]))\n")
    env = {"DSHAL_CACHE_DIR": str(tmp_path)}
    first, second = _run(code, **env), _run(code, **env)
    assert json.loads(first.stdout.splitlines()[-1]) == [2, 0], first.stderr
    assert json.loads(second.stdout.splitlines()[-1]) == [0, 2], second.stderr


# --- operators against the reference ----------------------------------------------------------


def _close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape,opts", [
    ((2, 4, 4, 33, 33, 16, 16), dict()),
    ((1, 4, 2, 17, 65, 32, 8), dict(causal=True, window=9)),
    ((1, 8, 1, 1, 200, 16, 16), dict(causal=True, top_k=2, block_size=32)),
    ((1, 4, 2, 40, 97, 17, 5), dict(top_k=0.4, block_size=13, window=3)),
    ((1, 2, 1, 30, 20, 8, 8), dict(causal=True, top_k=1, block_size=4)),  # Lq > Lk
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_attention_matches_the_reference(shape, opts, dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    q, k = (RNG.standard_normal(s).astype(np_dtype) for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D)))
    v = RNG.standard_normal((B, Hkv, Lk, Dv)).astype(np_dtype)
    sel = "top_k" in opts
    got = dshal.ops.sparse_attention(q, k, v, backend="opencl", return_lse=True,
                                     return_indices=sel, **opts)
    out, lse = got[0], got[-1]
    kw = {k_: v_ for k_, v_ in opts.items() if k_ not in ("top_k",)}
    if sel:  # judge the output against the reference run with the backend's own selection
        want_sel = reference.select_blocks(
            reference.selection_scores(q, k, opts["block_size"], 1 / np.sqrt(D)),
            opts["top_k"], Lq, Lk, opts["block_size"], opts.get("causal", False))
        np.testing.assert_array_equal(got[1], want_sel)
        kw["indices"] = got[1]
    ref_out, _, ref_lse = reference.sparse_attention(q, k, v, **kw)
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    _close(out, ref_out, tol, tol)
    _close(lse, ref_lse, 1e-5, 1e-5)


def test_nan_outside_the_allowed_keys_does_not_leak():
    q = RNG.standard_normal((1, 2, 8, 16)).astype(np.float32)
    k = RNG.standard_normal((1, 1, 64, 16)).astype(np.float32)
    v = RNG.standard_normal((1, 1, 64, 16)).astype(np.float32)
    k[..., :40, :] = np.nan  # only the last 8 + window keys are allowed below
    v[..., :40, :] = np.inf
    out = dshal.ops.sparse_attention(q, k, v, window=4, causal=True, backend="opencl")
    assert np.isfinite(out).all()


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "int8"])
def test_gemm_matches_the_reference(precision):
    a = RNG.standard_normal((2, 9, 70)).astype(np.float32)
    b = RNG.standard_normal((70, 37)).astype(np.float32)
    bias = RNG.standard_normal(37).astype(np.float32)
    got = dshal.ops.gemm(a, b, precision=precision, group_size=32, bias=bias, backend="opencl")
    want = reference.gemm(a, b, precision=precision, group_size=32, bias=bias)
    _close(got, want, 1e-5, 1e-4)


def test_int8_gemm_is_exact_and_refuses_k_it_cannot_sum():
    a = RNG.integers(-128, 128, (5, 4099)).astype(np.int8)
    b = RNG.integers(-128, 128, (4099, 3)).astype(np.int8)
    got = dshal.ops.gemm(a, b, out_dtype="float64", backend="opencl")
    exact = a.astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(got, exact.astype(np.float32).astype(np.float64))
    sig = dshal.ops.signature("gemm", np.zeros((1, 200_000), np.int8),
                              np.zeros((200_000, 1), np.int8))
    assert "exceeds 131071" in plugin.dshal_call_check(sig, _BACKEND.device)[0]


@pytest.mark.parametrize("granularity", ["row", "block", "tensor"])
@pytest.mark.parametrize("precision", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_quantize_is_bit_exact(granularity, precision):
    x = (RNG.standard_normal((40, 70)) * np.exp(RNG.uniform(-8, 8, (40, 1)))).astype(np.float32)
    x[:, :16] = 0  # amax = 0 groups
    got_v, got_s = dshal.ops.quantize(x, precision, granularity=granularity, group_size=16,
                                      backend="opencl")
    want_v, want_s = reference.quantize(x, precision, granularity=granularity, group_size=16)
    np.testing.assert_array_equal(got_s, want_s)
    np.testing.assert_array_equal(got_v.view(np.uint8), want_v.view(np.uint8))


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_rounding_is_bit_exact_with_specials(precision):
    x = (RNG.standard_normal(500) * np.exp(RNG.uniform(-30, 30, 500))).astype(np.float32)
    x[:6] = [np.inf, -np.inf, 0.0, -0.0, 65520.0, 6e-8]
    got, _ = dshal.ops.quantize(x, precision, backend="opencl")
    want, _ = reference.quantize(x, precision)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("opts", [dict(), dict(mode="soft_hard", keep=3),
                                  dict(mode="soft", threshold=0.5), dict(threshold=0.1)])
def test_gated_channels_match_the_reference(opts):
    x = RNG.standard_normal((3, 5, 24)).astype(np.float32)
    w = RNG.standard_normal((10, 24)).astype(np.float32)
    bias = RNG.standard_normal(10).astype(np.float32)
    logits = RNG.standard_normal((3, 5, 10)).astype(np.float32)
    if opts.get("mode") != "soft":
        w[np.argmin(logits.max(axis=(0, 1)))] = np.nan  # the channel closed everywhere
    y, mask = dshal.ops.gated_channels(x, logits, weight=w, bias=bias, return_mask=True,
                                       backend="opencl", **opts)
    want, open_ = reference.gated_channels(x, logits, weight=w, bias=bias, **opts)
    np.testing.assert_array_equal(mask, open_)
    _close(y, want, 1e-5, 1e-5)
    static = RNG.standard_normal(24).astype(np.float16)
    y2 = dshal.ops.gated_channels(x.astype(np.float16), static, backend="opencl", **opts)
    want2, _ = reference.gated_channels(x.astype(np.float16), static, **opts)
    _close(y2, want2, 1e-3, 1e-3)


def test_torch_cpu_tensors_come_back_as_torch_tensors():
    torch = pytest.importorskip("torch")
    a = torch.randn(6, 5)
    out = dshal.ops.gemm(a, torch.randn(5, 4), backend="opencl")
    assert isinstance(out, torch.Tensor) and out.shape == (6, 4)


def test_zero_size_dimensions():
    z = dshal.ops.gemm(np.zeros((0, 4), np.float32), np.ones((4, 3), np.float32),
                       backend="opencl")
    assert z.shape == (0, 3)
    z = dshal.ops.gemm(np.ones((2, 0), np.float32), np.ones((0, 3), np.float32),
                       bias=np.ones(3, np.float32), backend="opencl")
    np.testing.assert_array_equal(z, np.ones((2, 3)))
    out, lse = dshal.ops.sparse_attention(np.ones((1, 2, 3, 4), np.float32),
                                          np.ones((1, 1, 0, 4), np.float32),
                                          np.ones((1, 1, 0, 4), np.float32), return_lse=True,
                                          backend="opencl")
    assert (out == 0).all() and np.isneginf(lse).all()
