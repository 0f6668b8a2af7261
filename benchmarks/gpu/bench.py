"""The cuda backend against torch on one GPU, in one process: ``python -m benchmarks.gpu.bench``.

- sparse attention, B=1, Hq=16, Hkv=2, D=128, bf16, block 64, top_k 16, window 512, causal,
  at L = 8192 and 32768: ``dshal.ops.sparse_attention(backend="cuda")`` on torch CUDA tensors
  against dense causal ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN,
  k and v expanded to 16 heads outside the timing). dshal's rate counts the keys it attends
  (exactly, from its returned selection); SDPA's the dense causal triangle.
- gemm 8192³: bf16 against ``torch.matmul``; fp8 e4m3 against ``torch._scaled_mm`` on
  pre-quantised e4m3 operands with tensor-wise scales. dshal's fp8 row starts from bf16 inputs
  and includes the row/block quantisation (CuPy has no float8 dtype, so fp8 operands cannot be
  passed in), then runs the portable int/fp8 kernel (no tensor cores).

Times are medians of CUDA-event timings after a warm-up call (which compiles the kernels).
Results are printed and, with ``--out DIR``, written as ``gpu-bench.json`` / ``gpu-bench.md``.
Targets on an H200 (reported, never asserted): bf16 gemm >= 0.9x torch.matmul; sparse
attention at 32k >= 3x faster than dense SDPA.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dshal
from benchmarks.gpu.counting import (
    Row,
    attended_keys,
    attention_flops,
    dense_causal_flops,
    gemm_flops,
    records,
    table,
)

ATTN = dict(top_k=16, block_size=64, window=512, causal=True)
B, HQ, HKV, D = 1, 16, 2, 128


def gpu_time(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream, after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def attention_inputs(length: int, device: str = "cuda") -> tuple[Any, ...]:
    """``(q, k, v, ke, ve)``: bf16 inputs (seed 0), and k and v expanded to Hq heads for the
    dense peers."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, HQ, length, D, device=device, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, HKV, length, D, device=device, dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    ke, ve = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    return q, k, v, ke, ve


def attention_selection(q: Any, k: Any, v: Any, length: int, backend: str) -> tuple[Any, int]:
    """dshal's selection for (q, k, v) on ``backend`` and the number of keys it attends."""
    _, idx = dshal.ops.sparse_attention(q, k, v, return_indices=True, backend=backend, **ATTN)
    keys = attended_keys(idx.cpu().numpy(), length, length, ATTN["block_size"],
                         ATTN["window"], True).sum()
    return idx, int(keys)


def gemm_inputs(n: int, device: str = "cuda") -> tuple[Any, Any, float]:
    """``(a, b, flops)``: two bf16 n x n operands (seed 1) and the product's FLOP count."""
    import torch

    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    return a, b, gemm_flops(n, n, n)


def scaled_mm_peer(a: Any, b: Any) -> Callable[[], Any]:
    """``torch._scaled_mm`` on a and b pre-quantised to e4m3 with tensor-wise scales (b
    column-major, as it needs): the fp8 peer."""
    import torch

    fp8 = torch.float8_e4m3fn
    sa, sb = (x.abs().max().float() / 448.0 for x in (a, b))
    a8 = (a.float() / sa).to(fp8)
    b8 = (b.float() / sb).to(fp8).t().contiguous().t()
    return lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def attention_rows(length: int, backend: str, reps: int) -> list[Row]:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v, ke, ve = attention_inputs(length)
    _, keys = attention_selection(q, k, v, length, backend)
    name = f"sparse attention L={length}"
    ours = gpu_time(lambda: dshal.ops.sparse_attention(q, k, v, backend=backend, **ATTN), reps)
    peer = gpu_time(lambda: sdpa(q, ke, ve, is_causal=True), reps)
    return [Row(name, "torch SDPA dense causal", peer, dense_causal_flops(B, HQ, length, D, D)),
            Row(name, f"dshal {backend}", ours, attention_flops(keys, HQ // HKV, D, D),
                "torch SDPA dense causal", f"{keys / (HKV * length):.0f} keys per query")]


def gemm_rows(n: int, backend: str, reps: int) -> list[Row]:
    import torch

    a, b, f = gemm_inputs(n)
    rows = [Row(f"gemm bf16 {n}³", "torch.matmul", gpu_time(lambda: torch.matmul(a, b), reps),
                f),
            Row(f"gemm bf16 {n}³", f"dshal {backend}", gpu_time(
                lambda: dshal.ops.gemm(a, b, precision="bf16", backend=backend), reps), f,
                "torch.matmul", "cublasGemmEx, fp32 compute")]
    peer = gpu_time(scaled_mm_peer(a, b), reps)
    ours = gpu_time(lambda: dshal.ops.gemm(a, b, precision="fp8_e4m3", backend=backend), reps)
    rows.append(Row(f"gemm fp8 e4m3 {n}³", "torch._scaled_mm", peer, f,
                    note="pre-quantised, tensor-wise scales"))
    rows.append(Row(f"gemm fp8 e4m3 {n}³", f"dshal {backend}", ours, f, "torch._scaled_mm",
                    "from bf16: quantisation included; portable kernel"))
    return rows


def command_line(prog: str, doc: str, stem: str, argv: list[str] | None,
                 backend: bool = False) -> argparse.Namespace:
    """The GPU benchmarks' common options (``--backend`` when asked)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    if backend:
        parser.add_argument("--backend", default="cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--n", type=int, default=8192, help="gemm size (n³)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, help=f"directory for {stem}.json / .md")
    return parser.parse_args(argv)


def cuda_device(what: str) -> str:
    """The CUDA (or ROCm) device's name; exits when torch sees none."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"no {what} device visible to torch: these benchmarks need one")
    return torch.cuda.get_device_name()


def report(title: str, device: str, rows: list[Row], out: Path | None, stem: str) -> None:
    """Print the table under ``title`` and, with ``out``, write ``stem``.md and .json."""
    import torch

    text = f"{title} on {device} (torch {torch.__version__})\n\n{table(rows)}"
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text + "\n")
        (out / f"{stem}.json").write_text(json.dumps(
            {"device": device, "torch": torch.__version__, "rows": records(rows)}, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = command_line("python -m benchmarks.gpu.bench", __doc__, "gpu-bench", argv,
                        backend=True)
    device = cuda_device("CUDA")
    rows: list[Row] = []
    for length in args.lengths:
        rows += attention_rows(length, args.backend, args.reps)
    rows += gemm_rows(args.n, args.backend, max(2, args.reps // 2))
    report("GPU benchmarks", device, rows, args.out, "gpu-bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
