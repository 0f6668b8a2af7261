"""Peak extra memory of one call, each measured in a fresh subprocess (clean high-water mark).

Sparse attention at L=32768 (B=1, H=8 query and kv heads, D=64, block 64, top_k 16, window 256,
causal) must stay under 2 GiB of extra memory: no dense L x L buffer (that alone would be
32 GiB in float32); its training step (forward + backward, torch tensors, Hq=16, Hkv=2) under
4 GiB, the gradients included. The L=8192 rows of ``test_attention`` and the gemm/gated-linear
rows are measured the same way for comparison. The time column is that one (cold) call.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import dshal
from benchmarks import test_attention, test_gating, test_gemm, test_training
from benchmarks._harness import Case, peak_memory

OP = "peak extra memory per call (fresh process, VmHWM - VmRSS)"


@functools.cache
def long_inputs(L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((1, 8, L, 64), dtype=np.float32) for _ in range(3))


def long_sparse(L: int):
    q, k, v = long_inputs(L)
    return lambda: dshal.ops.sparse_attention(q, k, v, top_k=16, block_size=64, window=256,
                                              causal=True)


def cases(tiny: bool = False) -> list[Case]:
    """The L=32768 sparse attention call, and a training step (forward + backward, the
    gradients of q, k and v included) at L=32768, Hq=16, Hkv=2, top_k 16 (L=512 when tiny)."""
    L = 512 if tiny else 32768
    return [Case(OP, f"dshal numpy sparse_attention L={L} H=8 top_k=16 window=256",
                 functools.partial(long_sparse, L)),
            Case(OP, f"dshal sparse_attention fwd+bwd L={L} Hq=16 Hkv=2 top_k=16 "
                 f"window={test_training.WINDOW}",
                 functools.partial(test_training.step, "dshal", L, 16))]


def _pick(cases: list[Case], impls: tuple[str, ...]) -> list[Case]:
    """The first case of each of ``impls`` (the one :func:`peak_memory` finds by name)."""
    first = {c.impl: c for c in reversed(cases)}
    return [first[i] for i in impls]


#: (module, impl) pairs measured: the long call, then the peers at their benchmark sizes
MEASURED = [("benchmarks.test_memory", c.impl) for c in cases()] + [
    ("benchmarks.test_attention", c.impl) for c in _pick(
        test_attention.cases(), ("torch SDPA dense causal", "dshal numpy sparse"))] + [
    ("benchmarks.test_gemm", c.impl) for c in _pick(
        test_gemm.cases(), ("numpy fp32 (OpenBLAS)", "dshal numpy fp32", "dshal numpy int8",
                            "dshal numpy fp8_e4m3 block"))] + [
    ("benchmarks.test_gating", c.impl) for c in _pick(
        test_gating.cases(), ("torch F.linear (dense)", "dshal numpy gated_channels"))]


@pytest.mark.parametrize("module,impl", MEASURED, ids=[i.replace(" ", "_") for _, i in MEASURED])
def test_peak_memory(benchmark, module: str, impl: str) -> None:
    if "torch" in impl:
        pytest.importorskip("torch")
    res: dict[str, float] = {}
    benchmark.group = OP
    benchmark.pedantic(lambda: res.update(peak_memory(module, impl)), rounds=1, iterations=1)
    name = f"{impl} [{module.rsplit('.', 1)[-1].removeprefix('test_')}]"
    benchmark.extra_info.update(impl=name, extra_mib=res["extra_mib"], call_s=res["seconds"])
