"""Ahead-of-time compilation of every Triton kernel, and the tensor-core check of ``make
kernels-check``: no GPU and no driver needed.

Each kernel variant is compiled with ``triton.compile`` for NVIDIA sm_80 and sm_90 and AMD
gfx942 (``GPUTarget``); the check fails when a variant that must run on tensor cores has no
matrix instruction for a target: ``mma.sync`` (sm_80), ``wgmma`` or ``mma.sync`` (sm_90;
the gemm tiles must give ``wgmma``), ``v_mfma`` (gfx942). fp32 variants are compiled too
(IEEE fp32 runs on the CUDA cores: no instruction expected) and fp8 only where the
architecture has fp8 tensor cores (sm_90, gfx942).

Usage: ``python -m dshal_triton.aot [--target NAME ...]``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: target name -> (backend, arch, warp size)
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
#: a tensor-core instruction in each target's assembly
TENSOR_CORES = {"sm_80": r"\bmma\.sync\.aligned", "sm_90": r"\bwgmma\.|\bmma\.sync\.aligned",
                "gfx942": r"\bv_mfma_"}
#: what the gemm tiles must give: Hopper's warpgroup instructions
GEMM_TENSOR_CORES = {**TENSOR_CORES, "sm_90": r"\bwgmma\."}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: its pointer dtypes, constexprs and whether tensor-core
    instructions must appear (``pattern``: the table to check against, or None)."""

    name: str
    kernel: str
    pointers: dict[str, str]
    constexprs: dict[str, Any]
    floats: frozenset[str] = frozenset()
    pattern: dict[str, str] | None = None
    targets: tuple[str, ...] = tuple(TARGETS)
    options: dict[str, int] = field(default_factory=dict)


def _kernels() -> dict[str, Any]:
    from dshal_triton.kernels import attention, matmul, quantize

    return {"gemm": matmul.gemm_kernel, "gated_linear": matmul.gated_linear_kernel,
            "quantize": quantize.quantize_kernel, "round": quantize.round_kernel,
            "block_scores": attention.block_scores_kernel,
            "attention_fwd": attention.attention_fwd_kernel}


def _gemm(name: str, dtype: str, mode: int, integer: bool, scaled: bool, pattern: Any,
          targets: tuple[str, ...], out: str = "fp32", bk: int = 64) -> Variant:
    return Variant(name, "gemm", {"a": f"*{dtype}", "b": f"*{dtype}", "c": f"*{out}",
                                  "bias": "*fp32", "sa": "*fp32", "sb": "*fp32"},
                   {"MODE": mode, "INT": integer, "SCALED": scaled, "HAS_BIAS": True,
                    "UPCAST": False, "BM": 128, "BN": 128, "BK": bk, "GM": 8},
                   pattern=pattern, targets=targets, options={"num_warps": 8, "num_stages": 3})


def _attention(name: str, dtype: str, ieee: bool, pattern: Any) -> Variant:
    return Variant(name, "attention_fwd", {"q": f"*{dtype}", "k": f"*{dtype}", "v": f"*{dtype}",
                                           "o": f"*{dtype}", "lse": "*fp32", "idx": "*i32"},
                   {"G": 8, "BG": 16, "D": 128, "BD": 128, "DV": 128, "BDV": 128, "BN": 64,
                    "RN": 64, "CAUSAL": True, "RANGE": 1, "IEEE": ieee, "UPCAST": False},
                   floats=frozenset({"scale2"}), pattern=pattern,
                   options={"num_warps": 4, "num_stages": 2})


def variants() -> list[Variant]:
    """Every kernel variant the check compiles."""
    from dshal_triton.kernels.common import BF16, IEEE, STORED

    all_t = tuple(TARGETS)
    fp8_t = ("sm_90", "gfx942")
    return [
        _gemm("gemm bf16", "bf16", STORED, False, False, GEMM_TENSOR_CORES, all_t, "bf16"),
        _gemm("gemm fp16", "fp16", STORED, False, False, GEMM_TENSOR_CORES, all_t, "fp16"),
        _gemm("gemm fp32->bf16", "fp32", BF16, False, False, GEMM_TENSOR_CORES, all_t),
        _gemm("gemm fp32 ieee", "fp32", IEEE, False, False, None, all_t, bk=32),
        _gemm("gemm int8", "i8", STORED, True, True, GEMM_TENSOR_CORES, all_t, bk=128),
        _gemm("gemm fp8 e4m3", "fp8e4nv", STORED, False, True, GEMM_TENSOR_CORES, fp8_t,
              bk=128),
        _gemm("gemm fp8 e5m2", "fp8e5", STORED, False, True, GEMM_TENSOR_CORES, fp8_t, bk=128),
        Variant("gated linear bf16", "gated_linear",
                {"x": "*bf16", "w": "*bf16", "y": "*bf16", "bias": "*bf16", "gate": "*fp32",
                 "mask": "*i8", "cols": "*i32"},
                {"MODE": STORED, "HAS_BIAS": True, "HAS_GATE": True, "ROW_MASK": True,
                 "UPCAST": False, "BM": 128, "BN": 128, "BK": 64},
                pattern=TENSOR_CORES, options={"num_warps": 8, "num_stages": 3}),
        _attention("attention fwd bf16", "bf16", False, TENSOR_CORES),
        _attention("attention fwd fp16", "fp16", False, TENSOR_CORES),
        _attention("attention fwd fp32", "fp32", True, None),
        Variant("block scores bf16", "block_scores",
                {"q": "*bf16", "kmean": "*fp32", "out": "*fp32"},
                {"G": 8, "D": 128, "BD": 128, "BM": 64, "BN": 64, "LOWP": True},
                floats=frozenset({"scale"}), options={"num_warps": 4}),
        Variant("quantize fp8 e4m3 rows", "quantize",
                {"x": "*bf16", "out": "*fp8e4nv", "scales": "*fp32"},
                {"QMAX": 448.0, "INT": False, "MANT": 3, "EMIN": -6, "PER_ROW": True,
                 "BR": 16, "BC": 128}, targets=fp8_t),
        Variant("quantize int8 blocks", "quantize",
                {"x": "*fp32", "out": "*i8", "scales": "*fp32"},
                {"QMAX": 127.0, "INT": True, "MANT": 0, "EMIN": 0, "PER_ROW": False,
                 "BR": 16, "BC": 128}),
        Variant("round bf16", "round", {"x": "*fp32", "out": "*bf16"},
                {"MODE": BF16, "BLOCK": 1024}),
    ]


def compile_variant(v: Variant, target: str) -> dict[str, Any]:
    """``triton.compile`` one variant for ``target``: the compiled kernel's assembly dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[v.kernel]
    signature = {}
    for arg in fn.arg_names:
        if arg in v.constexprs:
            signature[arg] = "constexpr"
        elif arg in v.pointers:
            signature[arg] = v.pointers[arg]
        else:
            signature[arg] = "fp32" if arg in v.floats else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(v.constexprs))
    compiled = triton.compile(src, target=GPUTarget(*TARGETS[target]), options=dict(v.options))
    return compiled.asm


def assembly(asm: dict[str, Any], target: str) -> str:
    """The readable assembly of a compiled kernel: PTX, or AMDGCN."""
    text = asm.get("ptx") if target.startswith("sm_") else asm.get("amdgcn")
    return text.decode() if isinstance(text, bytes) else str(text or "")


def check(targets: Sequence[str]) -> dict[tuple[str, str], str]:
    """``{(variant, target): "" or the problem}`` for every variant and target."""
    results = {}
    for v in variants():
        for target in targets:
            if target not in v.targets:
                continue
            try:
                text = assembly(compile_variant(v, target), target)
            except Exception as exc:  # a compile error is the check's failure
                results[v.name, target] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                continue
            problem = ""
            if v.pattern is not None and not re.search(v.pattern[target], text):
                problem = (f"no tensor-core instruction (/{v.pattern[target]}/) in the "
                           f"{'PTX' if target.startswith('sm_') else 'AMDGCN'}")
            results[v.name, target] = problem
    return results


def table(results: dict[tuple[str, str], str], targets: Sequence[str]) -> str:
    """The variant x target table: ``tc`` (tensor cores found where required), ``ok``
    (compiled; none required), ``-`` (not built for that target), ``FAIL``."""
    names = list(dict.fromkeys(n for n, _ in results))
    required = {v.name: v.pattern is not None for v in variants()}
    width = max(len(n) for n in [*names, "triton kernel"])
    lines = ["  ".join(["triton kernel".ljust(width), *(t.ljust(7) for t in targets)])]
    for n in names:
        cells = []
        for t in targets:
            if (n, t) not in results:
                cells.append("-")
            else:
                cells.append("FAIL" if results[n, t] else "tc" if required[n] else "ok")
        lines.append("  ".join([n.ljust(width), *(c.ljust(7) for c in cells)]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dshal_triton.aot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=list(TARGETS))
    args = parser.parse_args(argv)
    targets = args.target or list(TARGETS)
    start = time.perf_counter()
    results = check(targets)
    print(table(results, targets))
    failed = {key: err for key, err in results.items() if err}
    for (name, target), err in failed.items():
        print(f"\n--- {name} for {target} FAILED:\n{err}", file=sys.stderr)
    print(f"triton kernels-check: {len(results) - len(failed)} of {len(results)} builds ok, "
          f"tensor cores where required ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
