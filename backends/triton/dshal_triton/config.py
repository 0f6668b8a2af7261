"""Tile sizes per kernel and device family: data, kept beside the one kernel source (as
FlagGems keeps per-vendor tables), so a vendor adds numbers, not code.

Chosen, not autotuned: a certified call must be bitwise reproducible across processes, and an
autotuner that picks a different tile on another run changes the summation order. Under the
interpreter the tiles are as large as the kernels allow (each program runs in Python).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GemmTiles:
    """One gemm configuration: output tile BM x BN, K step BK, GM tile rows per L2 group."""

    BM: int
    BN: int
    BK: int
    GM: int = 8
    num_warps: int = 4
    num_stages: int = 3


#: (family, operand kind) -> tiles; family "cuda" (NVIDIA and ROCm builds of torch), "xpu",
#: "npu", "interpreter"; operand kind "fp32" (IEEE fp32 on CUDA cores), "16" (tf32, bf16,
#: fp16 tensor cores), "8" (fp8, int8)
GEMM: dict[tuple[str, str], GemmTiles] = {
    ("cuda", "fp32"): GemmTiles(64, 64, 32, num_warps=4, num_stages=3),
    ("cuda", "16"): GemmTiles(128, 128, 64, num_warps=8, num_stages=3),
    ("cuda", "8"): GemmTiles(128, 128, 128, num_warps=8, num_stages=3),
    ("interpreter", "fp32"): GemmTiles(64, 64, 64),
    ("interpreter", "16"): GemmTiles(64, 64, 64),
    ("interpreter", "8"): GemmTiles(64, 64, 64),
}


def gemm_tiles(family: str, kind: str) -> GemmTiles:
    """The table's tiles for a device family (other families take CUDA's)."""
    return GEMM.get((family, kind)) or GEMM["cuda", kind]


#: attention: keys per tile of the window / dense range, most keys per tile of a block
ATTENTION_RANGE_KEYS = 64
ATTENTION_MAX_BLOCK_KEYS = 64
#: queries x blocks per program of the selection scores
SCORE_TILE = (64, 64)
#: query rows per selection chunk (bounds the [rows, blocks] score buffer)
SCORE_ROWS = 4096
