"""Serve a batch with a paged KV cache: prefill prompts of different lengths, then decode.

Each step appends every sequence's new key/value into its pages in place (the block summaries
follow incrementally), runs one batched ``sparse_attention`` over the paged cache with
``block_keys`` (decode reads only the blocks it selects, the window and the summaries), and
checks the result against the contiguous call on each sequence's gathered cache: once with the
cache's block_keys (the same selection: the outputs must agree to rounding) and once with no
summaries at all (dshal's block means; the summaries must equal them to float32 rounding).

    python examples/serve_decode.py [--steps 16] [--library numpy|torch]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dshal

ATTN = dict(top_k=4, block_size=16, window=32, causal=True)


def _np(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--library", choices=("numpy", "torch"), default="numpy")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    Hq, Hkv, D, page_size = 8, 2, 32, 32
    prompts = [5, 130, 47, 300, 64]
    cache = dshal.serving.PagedKVCache(64, page_size, Hkv, D, block_size=ATTN["block_size"],
                                       library=args.library)
    lib = __import__(args.library)
    arr = (lambda x: lib.from_numpy(x)) if args.library == "torch" else (lambda x: x)

    seqs = []
    for n in prompts:  # prefill: each prompt attends to itself (varlen would batch these too)
        s = cache.add_sequence()
        cache.append(s, arr(rng.standard_normal((Hkv, n, D)).astype(np.float32)),
                     arr(rng.standard_normal((Hkv, n, D)).astype(np.float32)))
        seqs.append(s)
    worst = 0.0
    start = time.perf_counter()
    for step in range(args.steps):
        B = len(seqs)
        q = arr(rng.standard_normal((B, Hq, 1, D)).astype(np.float32))
        cache.append_step(seqs, arr(rng.standard_normal((B, Hkv, D)).astype(np.float32)),
                          arr(rng.standard_normal((B, Hkv, D)).astype(np.float32)))
        paged = cache.attention_args(seqs)
        out = dshal.ops.sparse_attention(q, cache.k_pages, cache.v_pages, **paged, **ATTN)
        for b, s in enumerate(seqs):
            k, v = cache.contiguous(s)
            bk = cache.block_summaries(s)
            same = dshal.ops.sparse_attention(q[b:b + 1], k[None], v[None], block_keys=bk[None],
                                              **ATTN)
            plain = dshal.ops.sparse_attention(q[b:b + 1], k[None], v[None], **ATTN)
            np.testing.assert_allclose(_np(bk), _block_means(_np(k), ATTN["block_size"]),
                                       rtol=1e-5, atol=1e-5)
            for what, want in (("with its block_keys", same), ("with block means", plain)):
                err = float(np.abs(_np(out[b]) - _np(want[0])).max())
                assert err < 1e-5, (f"step {step}, sequence {s}: paged and contiguous ({what}) "
                                    f"differ by {err}")
                worst = max(worst, err)
        if step == args.steps // 2:  # a sequence finishes, a new prompt joins the batch
            cache.free(seqs.pop(1))
            s = cache.add_sequence()
            cache.append(s, arr(rng.standard_normal((Hkv, 90, D)).astype(np.float32)),
                         arr(rng.standard_normal((Hkv, 90, D)).astype(np.float32)))
            seqs.append(s)
    took = time.perf_counter() - start
    lengths = [cache.length(s) for s in seqs]
    print(f"{args.steps} decode steps, batch {len(seqs)}, cache lengths {lengths}, "
          f"{cache.free_pages} free pages; max |paged - contiguous| = {worst:.2e} "
          f"({took:.2f} s with the checks)")


def _block_means(k: np.ndarray, block_size: int) -> np.ndarray:
    H, L, D = k.shape
    nb = -(-L // block_size)
    pad = np.zeros((H, nb * block_size, D))
    pad[:, :L] = k
    counts = np.minimum(block_size, L - np.arange(nb) * block_size)
    return pad.reshape(H, nb, block_size, D).sum(axis=2) / counts[None, :, None]


if __name__ == "__main__":
    main()
