"""gemm and quantize: dshal's numpy backend against numpy/OpenBLAS and torch.matmul.

gemm at M = N = K = 2048: numpy fp32 ``a @ b`` (the reference), ``torch.matmul`` fp32 and bf16,
and ``dshal.ops.gemm`` at every precision (emulated numerics on fp32 BLAS; the low precisions
are compared with dshal fp32). quantize of a 4096 x 4096 float32 tensor against
``np.copyto`` of it (bytes = read + write).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import dshal
from benchmarks._harness import Case, ids, run


@functools.cache
def matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def numpy_matmul(n: int):
    a, b = matrix(n, n), matrix(n, n, 1)
    return lambda: a @ b


def torch_matmul(n: int, dtype: str):
    import torch

    a, b = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (matrix(n, n), matrix(n, n, 1)))
    return lambda: torch.matmul(a, b)


def dshal_gemm(n: int, precision: str):
    a, b = matrix(n, n), matrix(n, n, 1)
    return lambda: dshal.ops.gemm(a, b, precision=precision)


def copy(n: int):
    x = matrix(n, n)
    dst = np.empty_like(x)
    return lambda: np.copyto(dst, x)


def dshal_quantize(n: int, precision: str, granularity: str):
    x = matrix(n, n)
    return lambda: dshal.ops.quantize(x, precision, granularity=granularity)


QUANT = [("int8", "row"), ("int8", "block"), ("int8", "tensor"), ("fp8_e4m3", "row"),
         ("fp8_e4m3", "block"), ("fp8_e5m2", "row"), ("bf16", "row"), ("fp16", "row"),
         ("tf32", "row")]
STORED = {"int8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bf16": 2, "fp16": 2, "tf32": 4}


def cases(tiny: bool = False) -> list[Case]:
    """gemm rows at 2048³ and quantize rows at 4096 x 4096 (or toy sizes)."""
    n = 64 if tiny else 2048
    op, ref, fp32 = f"gemm {n}³", "numpy fp32 (OpenBLAS)", "dshal numpy fp32"
    f = 2.0 * n**3
    out = [Case(op, ref, functools.partial(numpy_matmul, n), f),
           Case(op, "torch.matmul fp32", functools.partial(torch_matmul, n, "float32"), f,
                peer=ref),
           Case(op, "torch.matmul bf16", functools.partial(torch_matmul, n, "bfloat16"), f,
                peer=ref, rounds=3),
           Case(op, fp32, functools.partial(dshal_gemm, n, "fp32"), f, peer=ref)]
    out += [Case(op, f"dshal numpy {p}", functools.partial(dshal_gemm, n, p), f, peer=fp32)
            for p in ("tf32", "bf16", "fp16", "fp8_e4m3", "int8")]
    n = 64 if tiny else 4096
    op, ref = f"quantize {n}x{n} float32", "np.copyto"
    out.append(Case(op, ref, functools.partial(copy, n), nbytes=8.0 * n * n, rounds=10))
    for p, gran in QUANT:
        out.append(Case(op, f"dshal numpy {p} {gran}",
                        functools.partial(dshal_quantize, n, p, gran),
                        nbytes=(4.0 + STORED[p]) * n * n, peer=ref))
    return out


@pytest.mark.parametrize("case", cases(), ids=ids(cases()))
def test_gemm(benchmark, case: Case) -> None:
    if "torch" in case.impl:
        pytest.importorskip("torch")
    run(benchmark, case)
