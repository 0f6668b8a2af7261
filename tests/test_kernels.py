"""The portable kernel sources (``dshal_kernels``): one text per kernel, defines from
dataclasses, and a checker that fails loudly. The full kernel x target compile is
``make kernels-check``; here each failure path is provoked once."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import dshal_kernels
from dshal_kernels import KERNELS, AttentionDefines, GemmDefines, check, source


def test_every_kernel_inlines_the_vendor_header_once():
    for name in KERNELS:
        text = source(name)
        assert "#include" not in text.split("DSHAL_VENDOR_H", 2)[-1].split("#endif", 1)[0]
        assert text.count("#define DSHAL_VENDOR_H") == 1
        assert '#line' in text and f'"{name}.cl"' in text
        for entry in KERNELS[name][1]:
            assert f"KERNEL void {entry}(" in text


def test_defines_come_from_the_dataclass_fields():
    d = GemmDefines.make("bfloat16", "float8_e4m3fn", "fp8_e4m3", "float16")
    opts = d.options()
    assert opts[:3] == ["-DTM=4", "-DTN=16", "-DMODE=1"]
    assert "-DA_T=ushort" in opts and "-DB_LOAD=dshal_ld_e4m3" in opts
    assert "-DOUT_STORE=dshal_st_f16" in opts
    assert "-DHAS_SEL=1" in AttentionDefines.make("float32", 8, 8, 1, True).options()
    with pytest.raises(ValueError, match="float64"):
        GemmDefines.make("float64", "float32", "fp32", "float32")


def test_no_vendor_identity_in_kernel_bodies():
    """Kernels test features (-D defines); only the vendor header names compilers."""
    for name in KERNELS:
        body = dshal_kernels._read(f"{name}.cl")
        for word in ("IS_CUDA", "IS_HIP", "IS_OPENCL", "__CUDACC__", "__HIP__",
                     "__OPENCL_VERSION__"):
            assert word not in body, f"{name}.cl tests {word}"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to play an unknown compiler")
def test_an_unknown_compiler_hits_the_error(tmp_path):
    src = tmp_path / "k.c"
    src.write_text(source("quantize"))
    run = subprocess.run(["gcc", "-fsyntax-only", "-x", "c", str(src)], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "unknown compiler" in run.stderr


def _broken(name: str) -> str:
    return source(name).replace("int i = GLOBAL_ID(0);", "int i = GLOBAL_ID(0)", 1)


def _need_hiprtc() -> None:
    try:
        check._hiprtc()
    except check.CompileError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("target", ["opencl", "cuda-sm_80", "hiprtc-gfx90a"])
def test_a_compile_error_fails_the_check_with_the_log(monkeypatch, target, capsys):
    if target == "opencl":
        pytest.importorskip("pyopencl")
    elif target.startswith("cuda"):
        pytest.importorskip("cuda.bindings")
    else:
        _need_hiprtc()
    monkeypatch.setattr(check, "source", _broken)
    results = check.check([target], ["quantize"])
    err = results["quantize", target]
    assert "quantize.cl" in err and "-DX_T=" in err
    assert "error" in check.table(results, [target])
    monkeypatch.setattr(check, "check", lambda targets, kernels: results)
    assert check.main(["--target", target, "--kernel", "quantize"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_nvrtc_produces_a_cubin():
    pytest.importorskip("cuda.bindings")
    cubin = check.compile_nvrtc("quantize", dshal_kernels.QuantizeDefines().options(), "sm_80")
    assert cubin[:4] == b"\x7fELF"


def test_a_missing_hipcc_is_an_error_not_a_skip(monkeypatch):
    monkeypatch.setattr(check.shutil, "which", lambda name: None)
    with pytest.raises(check.CompileError, match="hipcc not found"):
        check.compile_hip("gemm", [], "gfx90a")


def test_hiprtc_produces_a_code_object():
    _need_hiprtc()
    code = check.compile_hiprtc("quantize", dshal_kernels.QuantizeDefines().options(), "gfx90a")
    assert code[:4] == b"\x7fELF" or code.startswith(b"__CLANG_OFFLOAD_BUNDLE__")


def test_a_missing_hiprtc_is_an_error_not_a_skip(monkeypatch):
    monkeypatch.setattr(check, "_HIPRTC_LIBS", ("libdshal-no-such-hiprtc.so",))
    with pytest.raises(check.CompileError, match="hiprtc not found"):
        check.compile_hiprtc("gemm", [], "gfx90a")
