"""Quick timing of the OpenCL paged decode: this checkout's kernels against another tree's (e.g.
main's per-sequence loop), with the numpy backend in the same run.

S sequences of mixed lengths (``--lengths``) in a :class:`dshal.serving.PagedKVCache` (pages
interleaved in the pool, ``block_keys`` kept by the cache), one query each, Hq=8, Hkv=2, D=64,
``top_k=4, window=64, causal``, float32, for each ``--block-size``; then a varlen prefill of
S sequences of a quarter of those lengths (block 64). Rows (public API calls: validation and
dispatch included) are timed alternately, best of ``--repeat``, after a pause.

``--before DIR`` also times the OpenCL calls without block_keys in a child process whose
``dshal_kernels`` is ``DIR/dshal_kernels`` (e.g. main's ``kernels/``: ``git archive main
kernels | tar -x -C X``, then ``mv X/kernels X/dshal_kernels``); that tree may not serve
``block_keys`` (main refuses them), so its rows run without them, as a user of it would. The
child runs between two rounds of this process's rows, which are reported as the best of both
rounds.

    python benchmarks/quick_paged_opencl.py [--before DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

import dshal
from dshal.serving import PagedKVCache

H, HKV, D, PAGE = 8, 2, 64, 64
OPTS = dict(top_k=4, window=64, causal=True)
MEANS = "opencl, means from the keys"
PREFILL_BS = 64


def paged_decode(lengths: list[int], bs: int) -> tuple[np.ndarray, PagedKVCache, dict]:
    """q [S, H, 1, D], the cache, and its paged arguments (block_keys included)."""
    rng = np.random.default_rng(0)
    cache = PagedKVCache(sum(-(-n // PAGE) for n in lengths) + 4, PAGE, HKV, D, block_size=bs)
    seqs = [cache.add_sequence() for _ in lengths]
    for a in range(0, max(lengths), 512):  # chunks in turn: the sequences' pages interleave
        for s, n in zip(seqs, lengths):
            if a < n:
                m = min(512, n - a)
                cache.append(s, rng.standard_normal((HKV, m, D), dtype=np.float32),
                             rng.standard_normal((HKV, m, D), dtype=np.float32))
    q = rng.standard_normal((len(lengths), H, 1, D), dtype=np.float32)
    return q, cache, cache.attention_args(seqs)


def decode_runs(lengths: list[int], bs: int) -> dict[str, Callable[[], object]]:
    q, cache, args = paged_decode(lengths, bs)
    kp, vp = cache.k_pages, cache.v_pages
    plain = {n: x for n, x in args.items() if n != "block_keys"}

    def call(backend: str, form: dict) -> Callable[[], object]:
        return lambda: dshal.ops.sparse_attention(q, kp, vp, block_size=bs, backend=backend,
                                                  **form, **OPTS)

    return {"opencl + block_keys": call("opencl", args),
            MEANS: call("opencl", plain),
            "numpy + block_keys": call("numpy", args)}


def prefill_runs(lengths: list[int]) -> dict[str, Callable[[], object]]:
    """A varlen prefill (causal, queries = keys) of sequences of a quarter of ``lengths``."""
    rng = np.random.default_rng(1)
    lens = [n // 4 for n in lengths]
    T = sum(lens)
    q = rng.standard_normal((1, H, T, D), dtype=np.float32)
    k, v = (rng.standard_normal((1, HKV, T, D), dtype=np.float32) for _ in range(2))
    cu = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)

    def call(backend: str) -> Callable[[], object]:
        return lambda: dshal.ops.sparse_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                  block_size=PREFILL_BS, backend=backend,
                                                  **OPTS)

    return {MEANS: call("opencl"), "numpy": call("numpy")}


def cases(lengths: list[int], sizes: list[int]
          ) -> dict[str, Callable[[], dict[str, Callable[[], object]]]]:
    """title -> a maker of its rows (the first row is the one --before also times)."""
    out = {f"paged decode, block_size {bs}": (lambda bs=bs: decode_runs(lengths, bs))
           for bs in sizes}
    lens = [n // 4 for n in lengths]
    out[f"varlen prefill {lens} (total {sum(lens)}), block_size {PREFILL_BS}"] = \
        lambda: prefill_runs(lengths)
    return out


def best_of(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (program builds)
    best = {name: math.inf for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(0.1)
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def child(lengths: list[int], sizes: list[int], repeat: int) -> None:
    """The --before side: time each case's opencl row without block_keys, print JSON."""
    out = {}
    for title, make in cases(lengths, sizes).items():
        fn = make()[MEANS]
        out[title] = best_of({MEANS: fn}, repeat)[MEANS]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lengths", default="1024,4096,1536,3584,2048,3072,2560,1280")
    ap.add_argument("--block-size", default="16,64")
    ap.add_argument("--before", help="a directory holding the other tree's dshal_kernels")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    sizes = [int(x) for x in a.block_size.split(",")]
    if a.child:
        return child(lengths, sizes, a.repeat)
    import dshal_kernels

    print(f"S={len(lengths)} lengths {lengths}, Hq={H}, Hkv={HKV}, D={D}, page {PAGE}, "
          f"{OPTS}, float32, best of {a.repeat}; kernels from "
          f"{os.path.dirname(dshal_kernels.__file__)}")
    made = {title: make() for title, make in cases(lengths, sizes).items()}
    best = {title: best_of(fns, a.repeat) for title, fns in made.items()}
    before = None
    if a.before:
        cmd = [sys.executable, __file__, "--child", "--repeat", str(a.repeat), "--lengths",
               a.lengths, "--block-size", a.block_size]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [os.path.abspath(a.before), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        before = json.loads(done.stdout.strip().splitlines()[-1])
    for title, fns in made.items():  # a second round after the child: the best of both
        again = best_of(fns, a.repeat)
        best[title] = {n: min(t, again[n]) for n, t in best[title].items()}
    for title, rows in best.items():
        if before is not None:
            rows = {f"opencl before ({a.before}), means from the keys": before[title], **rows}
        peer = next(iter(rows))
        print(f"### {title}")
        print("| implementation | best | ratio (peer/this) |\n|---|---|---|")
        for name, t in rows.items():
            ratio = "" if name == peer else f"{rows[peer] / t:.2f}x vs {peer}"
            print(f"| {name} | {t * 1e3:.2f} ms | {ratio} |")
        print()


if __name__ == "__main__":
    main()
