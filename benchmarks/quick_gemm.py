"""Quick timing: the numpy backend's gemm precisions and quantize, interleaved with their peers.

gemm at ``--size``³ float32 (numpy ``a @ b`` and dshal fp32 first), then every precision;
quantize of a ``--rows`` x ``--rows`` float32 tensor next to ``np.copyto`` of the same bytes.
Each round calls every row once (after a warm-up call and a short pause each), so that a
neighbour's load moves all rows alike; the median and best over ``--repeat`` rounds are
printed with the ratio to the row's peer (numpy fp32 for gemm, the copy for quantize): the
targets of docs/performance.md read those ratios. A row that follows a BLAS row shares the
CPUs with OpenBLAS's workers while they spin before sleeping; ``OPENBLAS_THREAD_TIMEOUT=4``
shortens that (docs/performance.md, 2026-12-02). Run:
``python benchmarks/quick_gemm.py [--size 2048] [--rows 4096] [--repeat 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

import dshal
from dshal.backends.numpy import native

GEMM_PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8")
QUANTIZE = (("int8", "row"), ("int8", "block"), ("int8", "tensor"), ("fp8_e4m3", "row"),
            ("fp8_e4m3", "block"), ("fp8_e5m2", "row"), ("bf16", "row"), ("fp16", "row"))


def rows(size: int, quant: int) -> dict[str, tuple[str, Callable[[], object]]]:
    """name -> (peer name, call)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    x = rng.standard_normal((quant, quant), dtype=np.float32)
    y = np.empty_like(x)
    out: dict[str, tuple[str, Callable[[], object]]] = {
        "numpy a @ b fp32": ("", lambda: a @ b)}
    for p in GEMM_PRECISIONS:
        out[f"dshal gemm {p}"] = ("numpy a @ b fp32", lambda p=p: dshal.ops.gemm(
            a, b, precision=p, backend="numpy"))
    out["np.copyto"] = ("", lambda: np.copyto(y, x))
    for p, g in QUANTIZE:
        out[f"dshal quantize {p} {g}"] = ("np.copyto", lambda p=p, g=g: dshal.ops.quantize(
            x, precision=p, granularity=g, backend="numpy"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="gemm M = K = N")
    ap.add_argument("--rows", type=int, default=4096, help="quantize input is rows x rows")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    runs = rows(args.size, args.rows)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _, call in runs.values():
        call()
    for _ in range(args.repeat):
        for name, (_, call) in runs.items():
            time.sleep(0.05)
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    print(f"numpy backend elementwise path: {native.STATUS}")
    print(f"{'implementation':28s} {'median':>10s} {'best':>10s}  ratio to peer (median)")
    for name, (peer, _) in runs.items():
        med, best = statistics.median(times[name]), min(times[name])
        ratio = f"{med / statistics.median(times[peer]):5.2f}x of {peer}" if peer else ""
        print(f"{name:28s} {med * 1e3:8.2f}ms {best * 1e3:8.2f}ms  {ratio}")


if __name__ == "__main__":
    main()
