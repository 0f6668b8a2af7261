"""examples/train_tiny.py's block under torch.distributed: data-parallel training (DDP) and
head-parallel sparse attention gathered with ``all_gather``.

    torchrun --nproc-per-node 2 examples/ddp_tiny.py --steps 3 --out params.pt

Every rank draws the same global batch and trains on its slice of it under
``DistributedDataParallel`` (gloo on CPUs, nccl on GPUs: ``--backend``); DDP averages the
gradients, so the parameters follow a single process training on the whole batch
(:func:`train` with ``rank=0, world=1``, which tests/test_distributed.py runs for the
comparison). Then each rank computes sparse attention for its slice of the heads (as
tensor-parallel attention does) and the slices are gathered and compared bitwise with the
single-process call. Rank 0 saves the parameters to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny

import dshal


def train(model: torch.nn.Module, *, steps: int, batch: int, length: int, lr: float,
          seed: int, rank: int = 0, world: int = 1) -> list[float]:
    """SGD on train_tiny's task; each step's global batch of ``batch`` sequences is drawn
    from ``seed`` and this rank takes its ``batch // world`` rows. Returns the losses."""
    if batch % world:
        raise ValueError(f"--batch {batch} must be a multiple of the world size {world}")
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gates = model.module.gates if hasattr(model, "module") else model.gates
    losses = []
    for _ in range(steps):
        x, y = train_tiny.batch(batch, length, gen)
        task = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        loss = task + 3e-3 * torch.sigmoid(gates).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(task.item())
    return losses


def head_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int,
                            world: int, **options) -> torch.Tensor:
    """Sparse attention over this rank's slice of the kv heads (and their query heads),
    gathered from every rank along the head axis."""
    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    if hkv % world:
        raise ValueError(f"{hkv} kv heads cannot be split over {world} ranks")
    kv = slice(rank * hkv // world, (rank + 1) * hkv // world)
    heads = slice(kv.start * group, kv.stop * group)
    local = dshal.ops.sparse_attention(q[:, heads], k[:, kv], v[:, kv], **options).contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="global batch (all ranks)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend")
    parser.add_argument("--out", help="rank 0 saves the trained parameters here")
    args = parser.parse_args(argv)
    dist.init_process_group(args.backend)  # rank, world size, address: torchrun's env://
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(args.seed)
        model = torch.nn.parallel.DistributedDataParallel(train_tiny.TinyBlock())
        losses = train(model, steps=args.steps, batch=args.batch, length=args.length,
                       lr=args.lr, seed=args.seed, rank=rank, world=world)
        print(f"rank {rank}/{world}: task loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
        if rank == 0 and args.out:
            torch.save(model.module.state_dict(), args.out)

        gen = torch.Generator().manual_seed(args.seed + 1)
        q, k, v = (torch.randn(2, h, 40, 16, generator=gen) for h in (8, 4, 4))
        options = {"top_k": 2, "block_size": 8, "window": 4, "causal": True}
        gathered = head_parallel_attention(q, k, v, rank, world, **options)
        same = torch.equal(gathered, dshal.ops.sparse_attention(q, k, v, **options))
        print(f"rank {rank}: head-parallel attention over {world} ranks "
              f"{'bitwise equal to' if same else 'DIFFERS from'} the single-process call",
              flush=True)
        return 0 if same else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
