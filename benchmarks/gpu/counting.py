"""What the GPU benchmarks count and print: FLOPs of each call and the comparison table.

Pure numpy and text, so it is unit-tested on any machine (tests/test_gpu_bench.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def _overlap(a0: Any, a1: Any, b0: Any, b1: Any) -> Any:
    """Length of [a0, a1) ∩ [b0, b1) (elementwise)."""
    return np.maximum(0, np.minimum(a1, b1) - np.maximum(a0, b0))


def attended_keys(indices: np.ndarray, Lq: int, Lk: int, block: int, window: int,
                  causal: bool) -> np.ndarray:
    """Keys each query attends (DESIGN 3.1): its window plus its selected blocks (``indices``
    [B, Hkv, Lq, n] as ``return_indices`` gives them: unique, -1 padded), within the visible
    keys, each key once. Returns [B, Hkv, Lq] counts."""
    p = np.arange(Lq) + (Lk - Lq)
    vis = np.clip(p + 1, 0, Lk) if causal else np.full(Lq, Lk)
    w0 = np.maximum(0, p - window + 1)
    w1 = np.maximum(w0, np.minimum(vis, p + window)) if window > 0 else w0
    b0 = indices.astype(np.int64) * block
    b1 = np.minimum(b0 + block, vis[:, None])
    inside = np.where(indices >= 0, _overlap(b0, b1, 0, vis[:, None]), 0)
    in_window = np.where(indices >= 0, _overlap(b0, b1, w0[:, None], w1[:, None]), 0)
    return (w1 - w0) + (inside - in_window).sum(axis=-1)


def attention_flops(keys: int | float, heads_per_kv: int, d: int, dv: int) -> float:
    """FLOPs of attention over ``keys`` (query, kv head, key) triples: q·k (2d) and p·v (2dv)
    for each of the kv head's query heads."""
    return 2.0 * (d + dv) * heads_per_kv * float(keys)


def dense_causal_flops(b: int, h: int, length: int, d: int, dv: int) -> float:
    """FLOPs of dense causal attention with Lq = Lk = ``length`` (what SDPA computes)."""
    return 2.0 * (d + dv) * b * h * length * (length + 1) / 2


def gemm_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


@dataclass(frozen=True)
class Row:
    """One timed implementation: ``peer`` names the row of the same benchmark it is compared
    with (ratio = peer time / this time: above 1 means faster than the peer)."""

    bench: str
    impl: str
    seconds: float
    flops: float
    peer: str | None = None
    note: str = ""

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12 if self.seconds > 0 else 0.0


def ratio(row: Row, rows: list[Row]) -> float | None:
    """Peer time / this time, or None without a peer row."""
    peer = next((r for r in rows if r.bench == row.bench and r.impl == row.peer), None)
    return None if peer is None or row.seconds <= 0 else peer.seconds / row.seconds


COLUMNS = ("benchmark", "implementation", "time", "TFLOP/s", "vs peer", "note")


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (also readable as plain text)."""
    cells = []
    for r in rows:
        x = ratio(r, rows)
        vs = "" if x is None else f"{x:.2f}x {r.peer}"
        cells.append((r.bench, r.impl, f"{r.seconds * 1e3:.3f} ms", f"{r.tflops:.1f}", vs,
                      r.note))
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    fmt = [" | ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))) for c in cells]
    head = " | ".join(name.ljust(w) for name, w in zip(COLUMNS, widths))
    rule = "-|-".join("-" * w for w in widths)
    return "\n".join(f"| {line} |" for line in [head, rule, *fmt])


def records(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts, with their rate and ratio."""
    return [{**asdict(r), "tflops": r.tflops, "ratio": ratio(r, rows)} for r in rows]
