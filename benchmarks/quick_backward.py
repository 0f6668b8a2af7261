"""Quick timing of training attention: dshal's sparse attention forward + backward against
torch SDPA forward + backward (dense causal) and, with ``--flex``, FlexAttention (the same
block selection and window as a block mask), on torch CPU tensors that require grad.

B=1, Hq=16, Hkv=2, D=64, float32, block 64, window 128, causal; ``--length``/``--top-k`` pick
the sizes (the issue's are 8192/8 and 16384/16). dshal runs ``dshal.ops.sparse_attention``
(the forward on the numpy backend, the backward through dispatch: the numpy backend's compiled
kernel) then ``out.backward(grad)``; SDPA runs ``is_causal=True, enable_gqa=True``. Each is
timed best of ``--repeat``, alternating, with the forward and backward split out (FlexAttention:
forward only on the CPU, where torch has no FlexAttention backward).
``--memory`` instead runs dshal's forward + backward once in a fresh process and prints its
peak resident memory above what the inputs and gradients hold (VmHWM - VmRSS before the call).

    python benchmarks/quick_backward.py --length 8192 --top-k 8
    python benchmarks/quick_backward.py --length 32768 --top-k 32 --memory
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def inputs(L: int, H: int, Hkv: int, D: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    grad = torch.randn(1, H, L, D, generator=g)
    return q, k, v, grad


def forward_of(kind: str, leaves: list[torch.Tensor], top_k: int, block: int, window: int
               ) -> Callable[[], torch.Tensor]:
    """The forward of ``kind`` ("dshal": sparse attention, "sdpa": dense causal SDPA) on the
    leaf tensors q, k, v (so that its output's backward fills their grads)."""
    import dshal

    if kind == "dshal":
        return lambda: dshal.ops.sparse_attention(*leaves, top_k=top_k, block_size=block,
                                                  window=window, causal=True)
    if kind == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(
            *leaves, is_causal=True, enable_gqa=True)
    raise ValueError(f"kind must be 'dshal' or 'sdpa', not {kind!r}")


def runner(kind: str, args: argparse.Namespace, tensors: tuple[torch.Tensor, ...]
           ) -> Callable[[], tuple[float, float]]:
    """A function running one forward + backward, returning (forward s, backward s)."""
    q, k, v, grad = tensors
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if kind == "flex":
        forward = _flex(args, leaves)
    else:
        forward = forward_of(kind, leaves, args.top_k, args.block, args.window)

    def run() -> tuple[float, float]:
        for x in leaves:
            x.grad = None
        time.sleep(0.3)
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        if not out.requires_grad:  # FlexAttention on the CPU: forward only
            return t1 - t0, math.nan
        out.backward(grad)
        return t1 - t0, time.perf_counter() - t1

    return run


def _flex(args: argparse.Namespace, leaves: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """FlexAttention (compiled) with dshal's own selection (indices from the forward) and
    window. torch's FlexAttention has no CPU backward (torch 2.13 raises NotImplementedError
    "FlexAttention does not support backward on CPU"), so on the CPU it runs the forward alone,
    without grad, and its backward is reported as n/a."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import dshal

    q, k, v = (x.detach() for x in leaves)
    _, idx = dshal.ops.sparse_attention(q, k, v, top_k=args.top_k, block_size=args.block,
                                        window=args.window, causal=True, return_indices=True)
    nb = -(-k.shape[2] // args.block)
    selected = torch.zeros(k.shape[1], q.shape[2], nb + 1, dtype=torch.bool)
    selected.scatter_(-1, torch.where(idx[0] < 0, nb, idx[0]), True)
    g = q.shape[1] // k.shape[1]
    bs, w = args.block, args.window

    def mask(b, h, i, j):
        return (j <= i) & ((i - j < w) | selected[h // g, i, j // bs])

    block_mask = create_block_mask(mask, 1, q.shape[1], q.shape[2], k.shape[2], device="cpu",
                                   _compile=True)  # never materialises the Lq x Lk mask
    compiled = torch.compile(flex_attention, dynamic=False)
    if q.device.type == "cpu":
        return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
    return lambda: compiled(*leaves, block_mask=block_mask, enable_gqa=True)


def memory(args: argparse.Namespace) -> None:
    tensors = inputs(args.length, args.heads, args.kv_heads, args.dim)
    run = runner("dshal", args, tensors)
    before = _status("VmRSS")
    forward, backward = run()
    extra = _status("VmHWM") - before
    print(f"dshal fwd+bwd L={args.length} top_k={args.top_k}: {forward + backward:.2f} s, "
          f"peak extra memory {extra / 2**30:.2f} GiB (inputs and gradients: "
          f"{sum(x.numel() * 4 for x in tensors) * 2 / 2**30:.2f} GiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention")
    ap.add_argument("--memory", action="store_true",
                    help="peak extra memory of dshal's fwd+bwd (in a fresh process)")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory and not args.in_process:
        sys.exit(subprocess.call([sys.executable, *sys.argv, "--in-process"]))
    if args.memory:
        memory(args)
        return
    tensors = inputs(args.length, args.heads, args.kv_heads, args.dim)
    kinds = ["dshal", "sdpa"] + (["flex"] if args.flex else [])
    runs = {kind: runner(kind, args, tensors) for kind in kinds}
    best: dict[str, tuple[float, float]] = {}
    for run in runs.values():  # warm-up (FlexAttention compiles its mask here)
        run()
    for _ in range(args.repeat):
        for kind, run in runs.items():
            f, b = run()
            if kind not in best or f + b < sum(best[kind]):
                best[kind] = (f, b)
    print(f"L={args.length} top_k={args.top_k} B=1 Hq={args.heads} Hkv={args.kv_heads} "
          f"D={args.dim} block {args.block} window {args.window} causal fp32, "
          f"{torch.get_num_threads()} torch threads, best of {args.repeat}")
    print(f"| {'':8} | forward s | backward s | fwd+bwd s | SDPA / this |")
    print("|---|---|---|---|---|")
    sdpa = sum(best["sdpa"])
    for kind, (f, b) in best.items():
        if math.isnan(b):
            print(f"| {kind:8} | {f:9.2f} | {'n/a':>10} | {'n/a':>9} | {'n/a':>11} |")
        else:
            print(f"| {kind:8} | {f:9.2f} | {b:10.2f} | {f + b:9.2f} | "
                  f"{sdpa / (f + b):11.2f} |")
    if "flex" in best and math.isnan(best["flex"][1]):
        print("flex: forward only (compiled, no grad); torch has no FlexAttention backward on "
              "the CPU")


if __name__ == "__main__":
    main()
