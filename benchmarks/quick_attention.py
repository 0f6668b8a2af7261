"""Quick timing: the numpy backend's sparse attention against torch SDPA (dense causal).

B=1, Hq=16, Hkv=2, L=8192, D=64, float32, block 64, top_k=8, window=128, causal; SDPA runs
``is_causal=True, enable_gqa=True`` on the same inputs. The two are timed alternately, best of
``--repeat`` each (after a warm-up and a pause before every run, so that neither library's idle
worker threads are still spinning), and the ratio is printed. ``--dense`` also times the
backend's dense causal attention. Run: ``python benchmarks/quick_attention.py [--length 8192]``.
The backend uses every CPU only when ``threadpoolctl`` is installed (see the attention module).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np

from dshal.backends.numpy.attention import sparse_attention
from dshal.calls import AttentionCall


def timed(fn: Callable[[], object]) -> float:
    time.sleep(0.3)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dense", action="store_true",
                    help="also time dense causal attention (no top_k, no window)")
    args = ap.parse_args()
    L, H, Hkv, D = args.length, args.heads, args.kv_heads, args.dim
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, H, L, D), dtype=np.float32)
    k = rng.standard_normal((1, Hkv, L, D), dtype=np.float32)
    v = rng.standard_normal((1, Hkv, L, D), dtype=np.float32)
    scale = 1 / math.sqrt(D)
    sparse = AttentionCall(q, k, v, args.top_k, args.block, args.window, True, scale, None,
                           False, False)
    runs: dict[str, Callable[[], object]] = {"sparse": lambda: sparse_attention(sparse)}
    if args.dense:
        dense = AttentionCall(q, k, v, None, args.block, 0, True, scale, None, False, False)
        runs["dense"] = lambda: sparse_attention(dense)
    try:
        import torch

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        runs["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, is_causal=True, enable_gqa=True)
        threads = torch.get_num_threads()
    except ImportError:
        print("torch is not installed: no SDPA comparison")
    best = {name: math.inf for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeat):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn))
    print(f"dshal numpy sparse_attention (top_k={args.top_k}, block={args.block}, "
          f"window={args.window}, causal): {best['sparse'] * 1e3:8.1f} ms")
    if "dense" in best:
        print(f"dshal numpy dense causal attention:{' ' * 28}{best['dense'] * 1e3:8.1f} ms")
    if "sdpa" in best:
        print(f"torch SDPA dense causal ({threads} threads):"
              f"{' ' * 29}{best['sdpa'] * 1e3:8.1f} ms")
        print(f"speed-up over SDPA: {best['sdpa'] / best['sparse']:.2f}x  "
              f"(B=1, Hq={H}, Hkv={Hkv}, L={L}, D={D}, best of {args.repeat})")
        if "dense" in best:
            print(f"dense causal vs SDPA: {best['sdpa'] / best['dense']:.2f}x")


if __name__ == "__main__":
    main()
