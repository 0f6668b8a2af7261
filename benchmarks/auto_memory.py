"""Peak extra memory of gemm(precision="auto")'s estimate (tracemalloc: numpy reports its
allocations), for float32 inputs a [M, K] of 128 MiB and 4 MiB, b [K, 256].

Run: python benchmarks/auto_memory.py (the bound is documented in dshal/auto.py)."""
import time
import tracemalloc

import numpy as np

from dshal.auto import estimate_error

rng = np.random.default_rng(0)
rows = []
for M, K in ((1 << 15, 1024), (1024, 1024)):
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, 256), dtype=np.float32)
    for p in ("fp32", "bf16", "int8"):
        tracemalloc.start()
        t = time.perf_counter()
        est = estimate_error(a, b, p, 128)
        dt = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append((f"{a.nbytes >> 20} MiB", p, peak / 2**20, dt, est))
print(f"{'input a':>8} {'precision':>9} {'peak extra MiB':>15} {'seconds':>8} {'estimate':>10}")
for r in rows:
    print(f"{r[0]:>8} {r[1]:>9} {r[2]:>15.1f} {r[3]:>8.2f} {r[4]:>10.3g}")
