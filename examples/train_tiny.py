"""Train a tiny transformer block built from dshal's operators, on the CPU, in about a minute.

The block: a bf16 ``gemm`` embeds the inputs, block-sparse causal attention with grouped-query
heads (top-k blocks plus a sliding window) mixes positions, and an MLP whose hidden channels
are gated (``gated_channels`` with ``soft_hard`` gates and an L0-style penalty on the expected
number of open channels) computes the output. The task is synthetic: predict, at each
position, the input vector seen ``LAG`` positions earlier (a learned position embedding lets
attention find it within its window).

    python examples/train_tiny.py              # 300 steps
    python examples/train_tiny.py --steps 30   # the shortened run CI does
    python examples/train_tiny.py --versus-sdpa --length 256   # also the dense-SDPA model

It prints the loss every 25 steps and, at the end, the first and last loss, the fraction of
hidden channels the gates closed and the training throughput in tokens/s; ``--versus-sdpa``
then trains the same model with dense causal SDPA in place of the sparse attention (same
seed and steps) and prints both throughputs. It exits non-zero if the loss did not decrease.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import dshal
import dshal.torch  # torch.ops.dshal.* with autograd (dshal.ops routes there anyway)

LAG = 3
FEATURES, MODEL, HIDDEN = 8, 32, 64
HEADS, KV_HEADS = 4, 2
MAX_LENGTH = 256


class TinyBlock(torch.nn.Module):
    """Embedding (bf16 gemm) -> sparse attention -> gated-channel MLP -> readout."""

    def __init__(self, attention: str = "dshal") -> None:
        super().__init__()
        self.attention = attention  # "dshal" (sparse) or "sdpa" (dense causal, to compare)
        d = MODEL // HEADS

        def param(*shape: int, scale: float) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape) * scale)

        self.embed = param(FEATURES, MODEL, scale=FEATURES ** -0.5)
        self.position = param(MAX_LENGTH, MODEL, scale=1.0)
        self.wq = param(MODEL, HEADS * d, scale=MODEL ** -0.5)
        self.wkv = param(MODEL, 2 * KV_HEADS * d, scale=MODEL ** -0.5)
        self.wo = param(HEADS * d, MODEL, scale=MODEL ** -0.5)
        self.w1 = param(HIDDEN, MODEL, scale=MODEL ** -0.5)  # [C_out, C_in] for the gates
        self.b1 = torch.nn.Parameter(torch.zeros(HIDDEN))
        self.gates = torch.nn.Parameter(torch.full((HIDDEN,), 1.0))
        self.w2 = param(HIDDEN, MODEL, scale=HIDDEN ** -0.5)
        self.readout = param(MODEL, FEATURES, scale=MODEL ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        d = MODEL // HEADS
        h = dshal.ops.gemm(x, self.embed, precision="bf16") + self.position[:L]
        q = (h @ self.wq).view(B, L, HEADS, d).transpose(1, 2)
        k, v = (h @ self.wkv).view(B, L, 2, KV_HEADS, d).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   enable_gqa=True)
        else:
            att = dshal.ops.sparse_attention(q, k, v, top_k=1, block_size=8, window=LAG + 2,
                                             causal=True)
        h = h + att.transpose(1, 2).reshape(B, L, HEADS * d) @ self.wo
        hidden = dshal.ops.gated_channels(h, self.gates, weight=self.w1, bias=self.b1,
                                          mode="soft_hard")
        h = h + torch.relu(hidden) @ self.w2
        return h @ self.readout

    def open_fraction(self) -> float:
        return float((self.gates > 0).float().mean())


def batch(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets: target[i] = x[i - LAG] (0 before the sequence starts)."""
    x = torch.randn(n, length, FEATURES, generator=generator)
    lagged = torch.zeros_like(x)
    lagged[:, LAG:] = x[:, :-LAG]
    return x, lagged


def train(model: TinyBlock, args: argparse.Namespace) -> tuple[float, float, float]:
    """Train ``model`` for ``args.steps`` steps: (first task loss, last, seconds)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = last = float("nan")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch, args.length, gen)
        task = torch.nn.functional.mse_loss(model(x), y)
        # L0-style: the expected number of open gates, sigmoid(logit) summed
        loss = task + args.penalty * torch.sigmoid(model.gates).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = task.item()
        first = last if step == 1 else first
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  task loss {last:.4f}  open channels "
                  f"{model.open_fraction():.0%}", flush=True)
    return first, last, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--penalty", type=float, default=3e-3,
                        help="weight of the L0-style penalty on open gates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--versus-sdpa", action="store_true",
                        help="also train the model with dense SDPA and compare tokens/s")
    args = parser.parse_args(argv)
    if not 1 <= args.length <= MAX_LENGTH:
        parser.error(f"--length must be in [1, {MAX_LENGTH}], got {args.length}")
    torch.set_num_threads(1)  # tensors this small: more threads cost more than they give
    torch.manual_seed(args.seed)
    model = TinyBlock()
    first, last, elapsed = train(model, args)
    tokens = args.steps * args.batch * args.length
    closed = 1.0 - model.open_fraction()
    print(f"loss {first:.4f} -> {last:.4f} in {args.steps} steps ({elapsed:.1f} s, "
          f"{tokens / elapsed:.0f} tokens/s); closed channels: {closed:.1%} "
          f"({round(closed * HIDDEN)} of {HIDDEN})")
    if args.versus_sdpa:
        torch.manual_seed(args.seed)
        _, dense_last, dense = train(TinyBlock("sdpa"), args)
        print(f"tokens/s: dshal sparse attention {tokens / elapsed:.0f}, dense SDPA "
              f"{tokens / dense:.0f} (dshal / SDPA {dense / elapsed:.2f}); SDPA model's last "
              f"loss {dense_last:.4f}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
