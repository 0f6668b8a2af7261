"""Quick timing of serving: batched paged decode and varlen prefill against torch SDPA.

Decode: B sequences, Hq=16, Hkv=2, D=64, one query each, ``top_k=16, block_size=64, window=256,
causal``, float32. dshal runs on the paged cache of :class:`dshal.serving.PagedKVCache` with its
``block_keys`` (paged), and on the same cache gathered contiguous with the same block_keys
(contiguous); SDPA runs ``enable_gqa=True`` on the contiguous cache (one query sees every key:
dense decode). Prefill: 8 sequences of mixed lengths (32768 tokens) in one varlen call, against
SDPA ``is_causal`` on the batch padded to the longest sequence and against a loop of one SDPA
call per sequence. Rows of a table are timed alternately, best of ``--repeat``, each after a
pause (idle worker threads of the other library must not be spinning). Public API calls
(``dshal.ops.sparse_attention``), so the times include validation and dispatch.

The torch backend (``--torch``): decode on the same cache in torch (``library="torch"``), paged +
block_keys through ``backend="torch"``, batched (:mod:`dshal.torch.batched`) against the
per-sequence path (``dshal.torch.forms.BATCHED_ROWS = 0``: one contiguous call per sequence, as
before the batched path) and SDPA on the same data, B = 8 and 32 at cache 8192; then a short
varlen prefill, per sequence (the default for sequences longer than ``BATCHED_ROWS``) against
the batched path forced on every sequence (padded to the longest) and a per-sequence SDPA loop.

    python benchmarks/quick_serving.py [--repeat 3] [--tiny] [--torch]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable

import numpy as np

import dshal
from dshal.serving import PagedKVCache

H, HKV, D = 16, 2, 64
OPTS = dict(top_k=16, block_size=64, window=256, causal=True)


def timed(fn: Callable[[], object]) -> float:
    time.sleep(0.2)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    for fn in runs.values():
        fn()  # warm-up
    best = {name: math.inf for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn))
    return best


def table(title: str, best: dict[str, float], peer: str) -> str:
    lines = [f"### {title}", "| implementation | best | ratio (peer/this) |", "|---|---|---|"]
    for name, t in best.items():
        ratio = "" if name == peer else f"{best[peer] / t:.2f}x vs {peer}"
        lines.append(f"| {name} | {t * 1e3:.2f} ms | {ratio} |")
    return "\n".join(lines)


def decode_runs(B: int, L: int, rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    import torch

    cache = PagedKVCache(B * (-(-L // 256) + 1), 256, HKV, D, block_size=OPTS["block_size"])
    seqs = [cache.add_sequence() for _ in range(B)]
    for s in seqs:  # prompts in chunks, so the pages of the sequences interleave in the pool
        for a in range(0, L, 4096):
            n = min(4096, L - a)
            cache.append(s, rng.standard_normal((HKV, n, D), dtype=np.float32),
                         rng.standard_normal((HKV, n, D), dtype=np.float32))
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    paged = cache.attention_args(seqs)
    k = np.stack([cache.contiguous(s)[0] for s in seqs])
    v = np.stack([cache.contiguous(s)[1] for s in seqs])
    bk = np.stack([cache.block_summaries(s) for s in seqs])
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    return {
        "torch SDPA (dense decode)": lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, enable_gqa=True),
        "dshal paged + block_keys": lambda: dshal.ops.sparse_attention(
            q, cache.k_pages, cache.v_pages, **paged, **OPTS),
        "dshal contiguous + block_keys": lambda: dshal.ops.sparse_attention(
            q, k, v, block_keys=bk, **OPTS),
    }


def torch_decode_runs(B: int, L: int, rng: np.random.Generator
                      ) -> dict[str, Callable[[], object]]:
    """The torch backend's paged decode, per-sequence and batched, against SDPA."""
    import torch


    cache = PagedKVCache(B * (-(-L // 256) + 1), 256, HKV, D, block_size=OPTS["block_size"],
                         library="torch")
    seqs = [cache.add_sequence() for _ in range(B)]
    for s in seqs:  # prompts in chunks, so the pages of the sequences interleave in the pool
        for a in range(0, L, 4096):
            n = min(4096, L - a)
            cache.append(s, torch.from_numpy(rng.standard_normal((HKV, n, D), np.float32)),
                         torch.from_numpy(rng.standard_normal((HKV, n, D), np.float32)))
    q = torch.from_numpy(rng.standard_normal((B, H, 1, D), dtype=np.float32))
    paged = cache.attention_args(seqs)
    k = torch.stack([cache.contiguous(s)[0] for s in seqs])
    v = torch.stack([cache.contiguous(s)[1] for s in seqs])

    def run() -> object:
        return dshal.ops.sparse_attention(q, cache.k_pages, cache.v_pages, **paged,
                                          backend="torch", **OPTS)

    return {
        "torch SDPA (dense decode)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, enable_gqa=True),
        "dshal torch, per-sequence loop (before)": with_batched_rows(0, run),
        "dshal torch, batched (after)": run,
    }


def with_batched_rows(rows: int, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``dshal.torch.forms.BATCHED_ROWS = rows`` (restored after)."""
    from dshal.torch import forms as torch_forms

    def run() -> object:
        default, torch_forms.BATCHED_ROWS = torch_forms.BATCHED_ROWS, rows
        try:
            return fn()
        finally:
            torch_forms.BATCHED_ROWS = default

    return run


def torch_chunk_runs(B: int, L: int, lq: int, rng: np.random.Generator
                     ) -> dict[str, Callable[[], object]]:
    """B sequences of ``lq`` new queries each (chunked prefill, speculative decode) over a paged
    cache of L keys on the torch backend: per sequence against batched."""
    import torch

    cache = PagedKVCache(B * (-(-L // 256) + 1), 256, HKV, D, block_size=OPTS["block_size"],
                         library="torch")
    seqs = [cache.add_sequence() for _ in range(B)]
    for s in seqs:
        cache.append(s, torch.from_numpy(rng.standard_normal((HKV, L, D), np.float32)),
                     torch.from_numpy(rng.standard_normal((HKV, L, D), np.float32)))
    q = torch.from_numpy(rng.standard_normal((1, H, B * lq, D), np.float32))
    cu = torch.arange(0, B * lq + 1, lq, dtype=torch.int32)
    paged = cache.attention_args(seqs)

    def run() -> object:
        return dshal.ops.sparse_attention(q, cache.k_pages, cache.v_pages, cu_seqlens_q=cu,
                                          **paged, backend="torch", **OPTS)

    return {"dshal torch, per sequence": with_batched_rows(0, run),
            "dshal torch, batched": with_batched_rows(lq, run)}


def torch_prefill_runs(lengths: list[int], rng: np.random.Generator
                       ) -> dict[str, Callable[[], object]]:
    """A varlen prefill on the torch backend: per sequence against the batched path forced
    on every sequence, and a per-sequence SDPA loop."""
    import torch

    T = sum(lengths)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, h, T, D), np.float32))
               for h in (H, HKV, HKV))
    cu = torch.from_numpy(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def loop() -> None:
        for a, z in itertools.pairwise(cu.tolist()):
            sdpa(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], is_causal=True, enable_gqa=True)

    def run() -> object:
        return dshal.ops.sparse_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          backend="torch", **OPTS)

    return {
        "torch SDPA per-sequence loop": loop,
        "dshal torch varlen, per sequence (default)": run,
        "dshal torch varlen, batched (padded)": with_batched_rows(max(lengths), run),
    }


def prefill_runs(lengths: list[int], rng: np.random.Generator
                 ) -> dict[str, Callable[[], object]]:
    import torch

    T, Lmax = sum(lengths), max(lengths)
    q = rng.standard_normal((1, H, T, D), dtype=np.float32)
    k = rng.standard_normal((1, HKV, T, D), dtype=np.float32)
    v = rng.standard_normal((1, HKV, T, D), dtype=np.float32)
    cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    pads = [np.zeros((len(lengths), h, Lmax, D), np.float32) for h in (H, HKV, HKV)]
    for s, (a, z) in enumerate(itertools.pairwise(cu)):
        for pad, x in zip(pads, (q, k, v)):
            pad[s, :, :z - a] = x[0, :, a:z]
    pq, pk, pv = (torch.from_numpy(x) for x in pads)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def loop() -> None:
        for a, z in itertools.pairwise(cu):
            sdpa(tq[:, :, a:z], tk[:, :, a:z], tv[:, :, a:z], is_causal=True, enable_gqa=True)

    return {
        "torch SDPA padded batch (dense causal)": lambda: sdpa(pq, pk, pv, is_causal=True,
                                                               enable_gqa=True),
        "torch SDPA per-sequence loop": loop,
        "dshal varlen": lambda: dshal.ops.sparse_attention(q, k, v, cu_seqlens_q=cu,
                                                           cu_seqlens_k=cu, **OPTS),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the smoke test)")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--torch", action="store_true",
                    help="only the torch backend: decode and prefill, per sequence and batched")
    ap.add_argument("--torch-chunks", action="store_true",
                    help="only the torch backend at 1-64 queries per sequence (B=8, cache "
                         "8192): where batching stops paying")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}; options {OPTS}, Hq={H}, Hkv={HKV}, "
          f"D={D}, float32, best of {args.repeat}")
    if args.torch_chunks:
        for lq in (2, 3) if args.tiny else (1, 8, 16, 64):
            best = best_of(torch_chunk_runs(2 if args.tiny else 8, 512 if args.tiny else 8192,
                                            lq, rng), args.repeat)
            print(table(f"torch backend, {lq} queries per sequence", best,
                        "dshal torch, per sequence"), "\n")
        return
    if args.torch:
        for B in (2, 3) if args.tiny else (8, 32):
            L = 512 if args.tiny else 8192
            best = best_of(torch_decode_runs(B, L, rng), args.repeat)
            print(table(f"torch backend decode B={B} cache {L}", best,
                        "torch SDPA (dense decode)"), "\n")
        lengths = [40, 17, 9] if args.tiny else [1024, 768, 640, 512, 384, 320, 256, 192]
        best = best_of(torch_prefill_runs(lengths, rng), args.repeat)
        print(table(f"torch backend varlen prefill {len(lengths)} sequences {lengths} (total "
                    f"{sum(lengths)})", best, "torch SDPA per-sequence loop"))
        return
    decode = [(2, 512), (1, 1024)] if args.tiny else \
        [(8, 8192), (8, 32768), (1, 8192), (1, 32768), (1, 131072)]
    for B, L in decode:
        best = best_of(decode_runs(B, L, rng), args.repeat)
        print(table(f"decode B={B} cache {L}", best, "torch SDPA (dense decode)"), "\n")
    if not args.skip_prefill:
        lengths = [300, 100, 60, 40] if args.tiny else \
            [8192, 6144, 5120, 4096, 3072, 2560, 2048, 1536]
        best = best_of(prefill_runs(lengths, rng), 1 if not args.tiny else args.repeat)
        print(table(f"varlen prefill {len(lengths)} sequences {lengths} (total "
                    f"{sum(lengths)})", best, "torch SDPA padded batch (dense causal)"), "\n")
        # many short sequences: 64 of 64-1024 tokens (total 32768), where the selection and
        # the window cover most of each sequence (the call is nearly dense)
        many = [5, 3] if args.tiny else _lengths(64, 64, 1024, 32768, rng)
        best = best_of(prefill_runs(many, rng), 1 if not args.tiny else args.repeat)
        print(table(f"varlen prefill {len(many)} sequences of {min(many)}-{max(many)} tokens "
                    f"(total {sum(many)})", best, "torch SDPA padded batch (dense causal)"))


def _lengths(n: int, lo: int, hi: int, total: int, rng: np.random.Generator) -> list[int]:
    """n lengths in [lo, hi] summing to ``total`` (random, then evened out a token at a
    time)."""
    lengths = rng.integers(lo, hi + 1, n)
    while lengths.sum() != total:
        i = int(rng.integers(n))
        step = 1 if lengths.sum() < total else -1
        if lo <= lengths[i] + step <= hi:
            lengths[i] += step
    return [int(x) for x in lengths]


if __name__ == "__main__":
    main()
