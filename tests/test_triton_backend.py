"""The triton backend (backends/triton): interpreter-mode gating, the interpreter's bf16
``tl.dot`` and its workaround, per-architecture refusals, and the ahead-of-time tensor-core
check. Its certification under the interpreter is tests/test_triton_certify.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("dshal_triton")

from dshal.capabilities import DeviceInfo, Signature
from dshal_triton import device

ENV = {**os.environ, "DSHAL_TRITON_INTERPRET": "1", "TRITON_INTERPRET": "1"}


def _run(code: str, env: dict[str, str]) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_cpu_tensors_are_never_served_without_the_interpreter_switch():
    env = {k: v for k, v in os.environ.items()
           if k not in ("DSHAL_TRITON_INTERPRET", "TRITON_INTERPRET")}
    out = _run("import torch, dshal\n"
               "from dshal.registry import registry\n"
               "b = registry.backends()['triton']\n"
               "print(b.available, 1 in b.spec.device_types)", env)
    assert out.splitlines()[0] == "False False"


def test_interpreter_mode_serves_cpu_tensors_only_when_forced():
    out = _run("import torch, dshal\n"
               "from dshal.registry import registry\n"
               "b = registry.backends()['triton']\n"
               "print(b.available, sorted(b.spec.device_types), b.spec.priority)\n"
               "a = torch.randn(5, 7); w = torch.randn(7, 3)\n"
               "y = dshal.ops.gemm(a, w, backend='triton')\n"
               "print(float((y - a @ w).abs().max()) < 1e-5)", ENV)
    first, second = out.splitlines()
    assert first == "True [1] -20"  # below numpy (0) and torch (-5): taken when forced
    assert second == "True"


def test_interpreter_bf16_dot_is_garbage_and_the_upcast_fixes_it():
    """Triton's interpreter multiplies bf16 tiles as their uint16 bit patterns; the kernels'
    UPCAST path (dot_operand) gives the exact products the GPU's tensor cores give."""
    code = """
import torch, triton, triton.language as tl
from dshal_triton.kernels.common import dot_operand

@triton.jit
def mm(a, b, c, N: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(a + r[:, None] * N + r[None, :])
    y = tl.load(b + r[:, None] * N + r[None, :])
    z = tl.dot(dot_operand(x, UPCAST), dot_operand(y, UPCAST))
    tl.store(c + r[:, None] * N + r[None, :], z)

torch.manual_seed(0)
a = torch.randn(64, 64).bfloat16(); b = torch.randn(64, 64).bfloat16()
ref = a.double() @ b.double()
for up in (False, True):
    c = torch.empty(64, 64)
    mm[(1,)](a, b, c, 64, up)
    print(float((c.double() - ref).abs().max()))
"""
    raw, fixed = (float(x) for x in _run(code, ENV).split())
    assert raw > 1e3  # the interpreter's bug, measured: still there in this triton
    assert fixed < 1e-4


def test_interpreter_mode_refuses_when_triton_was_imported_compiled():
    env = {**ENV}
    env.pop("TRITON_INTERPRET")
    out = _run("import triton, dshal\n"
               "from dshal.registry import registry\n"
               "b = registry.backends()['triton']\n"
               "print(b.available); print(b.unavailable_reason())", env)
    assert out.splitlines()[0] == "False"
    assert "TRITON_INTERPRET=1" in out


def _sig(dtypes, precision=None, library="torch", index=0):
    return Signature("gemm", library, (2, index), tuple(("a", d) for d in dtypes),
                     precision=precision)


@pytest.mark.parametrize("arch,dtype,precision,refused", [
    ("sm_75", "bfloat16", None, "bf16"), ("sm_80", "bfloat16", None, None),
    ("sm_80", "float8_e4m3fn", "fp8_e4m3", "fp8"), ("sm_89", "float8_e4m3fn", "fp8_e4m3", None),
    ("sm_90", "float32", "fp8_e5m2", None), ("sm_80", "float32", "fp8_e5m2", "fp8"),
    ("gfx90a", "float32", "fp8_e4m3", "fp8"), ("gfx942", "float8_e5m2", "fp8_e5m2", None),
    ("sm_75", "float32", "tf32", "tf32"),
])
def test_refusals_per_architecture(arch, dtype, precision, refused):
    info = DeviceInfo(present=True, details={"arch:0": arch})
    reasons = device.refusals(_sig([dtype], precision), info)
    if refused is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and arch in reasons[0] and refused in reasons[0]


def test_cupy_callers_are_left_to_the_cuda_backend():
    info = DeviceInfo(present=True, details={"arch:0": "sm_90"})
    reasons = device.refusals(_sig(["float32"], library="cupy"), info)
    assert reasons and "library=cupy" in reasons[0]


@pytest.mark.slow
def test_aot_tensor_core_check_passes_and_detects_missing_tensor_cores():
    """make kernels-check's Triton part for one target, and the check itself failing on an
    IEEE fp32 variant declared as a tensor-core one."""
    from dshal_triton import aot

    results = aot.check(["sm_90"])
    assert results and not any(results.values()), results
    fp32 = next(v for v in aot.variants() if v.name == "gemm fp32 ieee")
    text = aot.assembly(aot.compile_variant(fp32, "sm_90"), "sm_90")
    import re

    assert not re.search(aot.GEMM_TENSOR_CORES["sm_90"], text)
    bf16 = next(v for v in aot.variants() if v.name == "gemm bf16")
    assert re.search(r"\bwgmma\.", aot.assembly(aot.compile_variant(bf16, "sm_90"), "sm_90"))
