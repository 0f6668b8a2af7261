"""The triton backend against what a PyTorch user would otherwise call, on one GPU, in one
process: ``python -m benchmarks.gpu.triton_bench`` (run by ``BACKEND=triton
benchmarks/gpu/check.sh``).

- sparse attention forward, B=1, Hq=16, Hkv=2, D=128, bf16, block 64, top_k 16, window 512,
  causal, at L = 8192 and 32768: ``dshal.ops.sparse_attention(backend="triton")`` against dense
  causal SDPA forced to the flash backend, and FlexAttention (``torch.compile``d) with the
  *same* selection as a ``mask_mod`` (the selection passed in, so only attention is timed on
  that row; dshal's row includes its own selection).
- gemm 8192³: bf16 against ``torch.matmul`` (cuBLAS); fp8 e4m3 with 1x128 / 128x128 scales on
  pre-quantised operands against ``torch._scaled_mm`` with tensor-wise scales.

Targets for the first H100/H200 run (reported, never asserted): sparse attention at 32k with
top_k=16 >= 3x faster than dense flash SDPA; bf16 gemm >= 0.8x cuBLAS at 8192³.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dshal
from benchmarks.gpu.bench import gpu_time
from benchmarks.gpu.counting import (
    Row,
    attended_keys,
    attention_flops,
    dense_causal_flops,
    gemm_flops,
    records,
    table,
)

B, HQ, HKV, D = 1, 16, 2, 128
ATTN = dict(top_k=16, block_size=64, window=512, causal=True)


def attention_rows(length: int, reps: int) -> list[Row]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    _, idx = dshal.ops.sparse_attention(q, k, v, return_indices=True, backend="triton", **ATTN)
    keys = attended_keys(idx.cpu().numpy(), length, length, ATTN["block_size"],
                         ATTN["window"], True).sum()
    ke, ve = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    nb = -(-length // ATTN["block_size"])
    sel = torch.zeros(B, HKV, length, nb + 1, dtype=torch.bool, device="cuda")
    sel.scatter_(-1, torch.where(idx < 0, nb, idx), True)
    bs, win, group = ATTN["block_size"], ATTN["window"], HQ // HKV

    def mask_mod(b, h, q_idx, kv_idx):
        chosen = sel[b, h // group, q_idx, kv_idx // bs]
        return (kv_idx <= q_idx) & (chosen | (q_idx - kv_idx < win))

    block_mask = create_block_mask(mask_mod, B, HQ, length, length, device="cuda")
    flex = torch.compile(flex_attention)
    name = f"sparse attention fwd L={length}"

    def flash() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa(q, ke, ve, is_causal=True)

    ours = gpu_time(lambda: dshal.ops.sparse_attention(q, k, v, backend="triton", **ATTN), reps)
    dense = dense_causal_flops(B, HQ, length, D, D)
    sparse = attention_flops(keys, group, D, D)
    return [Row(name, "SDPA flash dense causal", gpu_time(flash, reps), dense),
            Row(name, "FlexAttention same selection", gpu_time(
                lambda: flex(q, ke, ve, block_mask=block_mask), reps), sparse,
                "SDPA flash dense causal", "selection given"),
            Row(name, "dshal triton", ours, sparse, "SDPA flash dense causal",
                f"{keys / (HKV * length):.0f} keys per query, selection included")]


def gemm_rows(n: int, reps: int) -> list[Row]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    f = gemm_flops(n, n, n)
    rows = [Row(f"gemm bf16 {n}³", "torch.matmul", gpu_time(lambda: torch.matmul(a, b), reps),
                f),
            Row(f"gemm bf16 {n}³", "dshal triton", gpu_time(
                lambda: dshal.ops.gemm(a, b, precision="bf16", backend="triton"), reps), f,
                "torch.matmul")]
    fp8 = torch.float8_e4m3fn
    sa, sb = (x.abs().max().float() / 448.0 for x in (a, b))
    a8 = (a.float() / sa).to(fp8)
    b8 = (b.float() / sb).to(fp8).t().contiguous().t()
    peer = gpu_time(lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb,
                                             out_dtype=torch.bfloat16), reps)
    qa, qsa = dshal.ops.quantize(a, "fp8_e4m3", granularity="row", backend="triton")
    qb, qsb = dshal.ops.quantize(b, "fp8_e4m3", granularity="block", backend="triton")
    ours = gpu_time(lambda: dshal.ops.gemm(qa, qb, a_scale=qsa, b_scale=qsb,
                                           out_dtype="bfloat16", backend="triton"), reps)
    rows.append(Row(f"gemm fp8 e4m3 {n}³", "torch._scaled_mm", peer, f,
                    note="tensor-wise scales"))
    rows.append(Row(f"gemm fp8 e4m3 {n}³", "dshal triton", ours, f, "torch._scaled_mm",
                    "1x128 / 128x128 scales, pre-quantised"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.triton_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--n", type=int, default=8192, help="gemm size (n³)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="directory for triton-bench.json / .md")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA/ROCm device visible to torch: these benchmarks need one")
    device = torch.cuda.get_device_name()
    rows: list[Row] = []
    for length in args.lengths:
        rows += attention_rows(length, args.reps)
    rows += gemm_rows(args.n, max(2, args.reps // 2))
    text = f"triton backend on {device} (torch {torch.__version__})\n\n{table(rows)}"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "triton-bench.md").write_text(text + "\n")
        (args.out / "triton-bench.json").write_text(json.dumps(
            {"device": device, "torch": torch.__version__, "rows": records(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
