"""The CuPy backends (``cuda``, ``rocm``) without a GPU: everything that needs no device.

CuPy's CUDA build is installed (requirements-dev.txt) and imports here, so the probe runs for
real: the runtime's device count fails with the driver's error text and the backend shows as
"no device", never as broken. The rest is pure: the vendor records, the declarations, launch
shapes, build options (compiled once with NVRTC, as the backend builds them), BLAS plans, scale
layouts and error messages. No CuPy object is mocked. The shared launch sequences these
backends run (``dshal_kernels.host``) are exercised on PoCL by tests/test_opencl.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from dshal.capabilities import FEATURES
from dshal.dtypes import PRECISIONS
from dshal.registry import AVAILABLE, NO_DEVICE, registry
from dshal_cuda.plugin import CUDA
from dshal_cupy.blas import blas_plan
from dshal_cupy.capabilities import QUANTIZE_PRECISIONS, declare
from dshal_cupy.device import MAX_GRID, launch_shape, probe
from dshal_cupy.errors import DeviceMemoryError, KernelBuildError, LaunchError
from dshal_cupy.programs import build_options
from dshal_kernels import AttentionDefines, GemmDefines
from dshal_kernels.host.gemm import INT8_MAX_K, scale_layout
from dshal_rocm.plugin import ROCM

cupy = pytest.importorskip("cupy")


def _gpu_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


no_gpu = pytest.mark.skipif(_gpu_count() > 0, reason="a GPU is present: the probe finds it")


# --- probe and registration -------------------------------------------------------------------


@no_gpu
def test_cuda_probe_without_a_gpu_reports_no_device_with_the_driver_error():
    info = probe(CUDA)
    assert not info.present
    assert info.reason.startswith("no CUDA device: the runtime's device count failed: ")
    assert "cudaError" in info.reason  # the runtime's own error name and text


def test_rocm_probe_refuses_cupys_cuda_build():
    if cupy.cuda.runtime.is_hip:
        pytest.skip("this CuPy is the ROCm build")
    info = probe(ROCM)
    assert not info.present
    assert "is its CUDA build" in info.reason and "dshal-rocm[rocm7]" in info.reason


def test_both_backends_load_and_show_no_device_rather_than_broken():
    backends = registry.backends()
    for name, code in (("cuda", 2), ("rocm", 10)):
        b = backends[name]
        assert b.status in (NO_DEVICE, AVAILABLE), (name, b.status, b.error)
        assert b.entry_point == f"dshal_{name}.plugin:hooks"
        assert b.spec.device_types == {code} and b.spec.array_kind == "cupy"


def test_dshal_info_prints_install_hints_verbatim():
    out = subprocess.run([sys.executable, "-m", "dshal.cli", "info"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "rocm: " in out and "dshal-rocm[rocm7]" in " ".join(out.split())


def test_importing_the_plugins_does_not_import_cupy():
    code = ("import sys, dshal_cuda.plugin, dshal_rocm.plugin, dshal_cupy.hooks; "
            "print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "False"


# --- declarations -----------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", [CUDA, ROCM], ids=lambda v: v.name)
def test_declaration_covers_every_operator_and_feature(vendor):
    spec = declare(vendor)
    assert spec.name == vendor.name and spec.priority > 0
    assert set(spec.capabilities) == set(FEATURES) and spec.plugin_api == (1, 2)
    for op, cap in spec.capabilities.items():
        # plugin API 2: the backward and the varlen, paged and block_keys forms
        assert cap.features == FEATURES[op] and cap.deterministic
        assert cap.dtypes >= {"float16", "bfloat16", "float32"}
    gemm = spec.capabilities["gemm"]
    assert gemm.precisions == frozenset(PRECISIONS)
    # CuPy has no float8 dtype: fp8 exists only inside a gemm, never as an array
    assert "float8_e4m3fn" not in gemm.dtypes and "int8" in gemm.dtypes
    assert spec.capabilities["quantize"].precisions == frozenset(QUANTIZE_PRECISIONS)
    assert not any(p.startswith("fp8") for p in QUANTIZE_PRECISIONS)
    assert spec.capabilities["sparse_attention"].limits == {"head_dim": 256}


def test_vendor_facts():
    assert (CUDA.device_type, CUDA.warp, CUDA.launch_width, CUDA.hip) == (2, 32, 64, False)
    assert (ROCM.device_type, ROCM.warp, ROCM.launch_width, ROCM.hip) == (10, 64, 128, True)
    assert CUDA.auto_order == ("bf16", "fp16", "tf32", "fp32") and ROCM.auto_order == ("fp32",)
    assert CUDA.arch({"major": 9, "minor": 0}) == "sm_90"
    assert ROCM.arch({"gcnArchName": b"gfx90a:sramecc+:xnack-"}) == "gfx90a"
    assert CUDA.version_text(12040) == "12.4" and CUDA.version_text(13000) == "13.0"
    assert ROCM.version_text(60032830) == "6.0.32830"


def test_call_check_refuses_int8_k_beyond_exact_int32_sums():
    import numpy as np

    import dshal

    hooks = __import__("dshal_cuda.plugin", fromlist=["hooks"]).hooks
    big = INT8_MAX_K + 1
    sig = dshal.ops.signature("gemm", np.zeros((1, big), np.int8), np.zeros((big, 1), np.int8))
    assert f"k={big} exceeds {INT8_MAX_K}" in hooks.dshal_call_check(sig, None)[0]
    ok = dshal.ops.signature("gemm", np.zeros((1, 8), np.int8), np.zeros((8, 1), np.int8))
    assert hooks.dshal_call_check(ok, None) == []


# --- launch configuration ---------------------------------------------------------------------


def test_launch_shape_covers_the_size_in_blocks_of_the_launch_width():
    assert launch_shape((1,), 64) == ((1,), (64,))
    assert launch_shape((130, 7), 64) == ((3, 7), (64, 1))
    assert launch_shape((64, 1, 3), 128) == ((1, 1, 3), (128, 1, 1))


def test_launch_shape_grows_blocks_along_y_past_the_grid_limit():
    grid, block = launch_shape((100, 200_000), 64)
    assert block == (64, 4) and grid == (2, 50_000)
    assert grid[1] * block[1] >= 200_000 and grid[1] <= MAX_GRID[1]
    assert block[0] * block[1] <= 1024


def test_launch_shape_refuses_what_no_grid_covers_and_bad_sizes():
    with pytest.raises(LaunchError, match=r"beyond the limits"):
        launch_shape((1, 65535 * 16 + 1), 64)  # 64 x 16 threads is the largest block
    with pytest.raises(ValueError, match=r"size=\(0,\)"):
        launch_shape((0,), 64)
    with pytest.raises(ValueError, match="1 to 3 extents"):
        launch_shape((1, 1, 1, 1), 64)


# --- kernel builds ----------------------------------------------------------------------------


def test_build_options_are_the_device_facts_then_the_defines():
    d = AttentionDefines.make("bfloat16", 128, 128, 1, True)
    opts = build_options(d)
    assert opts[0] == "-DHAS_CR_DIV=1" and list(opts[1:]) == d.options()


def test_the_options_the_cuda_backend_builds_with_compile_with_nvrtc():
    from dshal_kernels.check import compile_nvrtc

    cubin = compile_nvrtc("gemm", build_options(GemmDefines.make("int8", "int8", "int8",
                                                                 "float32")), "sm_90")
    assert cubin[:4] == b"\x7fELF"


def test_a_build_error_names_the_kernel_arch_options_and_log():
    from dshal_kernels.check import CompileError, compile_nvrtc

    with pytest.raises(CompileError) as info:
        compile_nvrtc("gemm", ["-DTM=4"], "sm_80")  # incomplete defines: the source breaks
    err = KernelBuildError("gemm", "sm_80", ["-DTM=4"], str(info.value))
    assert isinstance(err, RuntimeError)
    text = str(err)
    assert text.startswith("compiling kernel 'gemm' for sm_80 failed (options: -DTM=4)")
    assert "gemm.cl" in text  # the log points into the kernel source (#line directives)


def test_out_of_memory_reports_bytes_asked_held_and_free():
    err = DeviceMemoryError("packed a", 3 << 30, 1024, 2 << 30, 80 << 30, 512,
                            "NVIDIA H200 (CUDA device 0, sm_90)")
    assert isinstance(err, MemoryError)
    text = str(err)
    for part in ("allocating packed a", "3,221,225,472 bytes asked for", "1,024 bytes already",
                 "free 2,147,483,648 of 85,899,345,920", "caches 512 bytes", "NVIDIA H200"):
        assert part in text


# --- gemm marshalling -------------------------------------------------------------------------


def test_blas_plans():
    assert blas_plan("bf16", True).data_type == "CUDA_R_16BF"
    assert blas_plan("fp32", True).compute == "CUBLAS_COMPUTE_32F_PEDANTIC"
    assert blas_plan("tf32", True).compute == "CUBLAS_COMPUTE_32F_FAST_TF32"
    assert blas_plan("fp16", True).compute == "CUBLAS_COMPUTE_32F"
    for p in ("fp32", "tf32", "bf16", "fp16"):  # ROCm: rounded operands through sgemm
        assert blas_plan(p, False).storage == "float32" and not blas_plan(p, False).compute
    for p in ("bf16", "fp16", "fp32"):  # the data types exist in CuPy's runtime module
        assert isinstance(getattr(cupy.cuda.runtime, blas_plan(p, True).data_type), int)
    with pytest.raises(ValueError, match="precision='int8' has no BLAS path"):
        blas_plan("int8", True)


@pytest.mark.parametrize("shape,K,N,want", [
    (None, 70, None, (0, 0, 1, 1, False)),           # no scale: 1
    ((), 70, 37, (0, 0, 1, 1, False)),               # scalar
    ((9, 1), 70, None, (1, 0, 1, 1, False)),         # a per row
    ((9, 3), 70, None, (3, 1, 1, 32, True)),         # a per row group of 32
    ((1, 37), 70, 37, (0, 1, 1, 1, False)),          # b per column
    ((3, 2), 70, 37, (2, 1, 32, 32, True)),          # b per 32 x 32 block
    ((1, 2), 20, 37, (2, 1, 32, 32, False)),         # b blocks, one along K
])
def test_scale_layouts(shape, K, N, want):
    assert scale_layout(shape, K, N, 32) == want


def test_bf16_gemm_is_refused_below_compute_capability_8():
    import numpy as np

    import dshal
    from dshal.capabilities import DeviceInfo
    from dshal_cupy.blas import CC_KEY, arch_reasons

    hooks = __import__("dshal_cuda.plugin", fromlist=["hooks"]).hooks
    a = np.zeros((4, 8), np.float32)
    sig = dshal.ops.signature("gemm", a, a.T.copy(), precision="bf16")
    volta = DeviceInfo(present=True, name="V100", details={CC_KEY: "7.0"})
    hopper = DeviceInfo(present=True, name="H200", details={CC_KEY: "9.0"})
    assert hooks.dshal_call_check(sig, volta) == [
        "precision=bf16 needs compute capability >= 8.0 in cuBLAS; device 0 has 7.0"]
    assert hooks.dshal_call_check(sig, hopper) == []
    fp16 = dshal.ops.signature("gemm", a, a.T.copy(), precision="fp16")
    assert arch_reasons(fp16, volta) == [] and arch_reasons(sig, None) == []
    rocm = __import__("dshal_rocm.plugin", fromlist=["hooks"]).hooks  # sgemm: no such limit
    assert rocm.dshal_call_check(sig, volta) == []
