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

import dshal
from benchmarks.gpu.bench import (
    ATTN,
    HKV,
    HQ,
    B,
    D,
    attention_inputs,
    attention_selection,
    command_line,
    cuda_device,
    gemm_inputs,
    gpu_time,
    report,
    scaled_mm_peer,
)
from benchmarks.gpu.counting import (
    Row,
    attention_flops,
    dense_causal_flops,
)


def attention_rows(length: int, reps: int) -> list[Row]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v, ke, ve = attention_inputs(length)
    idx, keys = attention_selection(q, k, v, length, "triton")
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

    a, b, f = gemm_inputs(n)
    rows = [Row(f"gemm bf16 {n}³", "torch.matmul", gpu_time(lambda: torch.matmul(a, b), reps),
                f),
            Row(f"gemm bf16 {n}³", "dshal triton", gpu_time(
                lambda: dshal.ops.gemm(a, b, precision="bf16", backend="triton"), reps), f,
                "torch.matmul")]
    peer = gpu_time(scaled_mm_peer(a, b), reps)
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
    args = command_line("python -m benchmarks.gpu.triton_bench", __doc__, "triton-bench", argv)
    device = cuda_device("CUDA/ROCm")
    rows: list[Row] = []
    for length in args.lengths:
        rows += attention_rows(length, args.reps)
    rows += gemm_rows(args.n, max(2, args.reps // 2))
    report("triton backend", device, rows, args.out, "triton-bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
