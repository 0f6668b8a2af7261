"""What differs between CuPy's CUDA and ROCm builds, as one frozen record per vendor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Vendor:
    """The facts a CuPy backend needs about its vendor.

    :param name: backend (entry-point) name, ``"cuda"`` or ``"rocm"``.
    :param label: the runtime's name in messages (``"CUDA"``, ``"ROCm"``).
    :param device_type: DLPack device type served (2 CUDA, 10 ROCm).
    :param hip: CuPy must be its HIP (ROCm) build.
    :param warp: threads per warp / wavefront (32 / 64); launches use two per work-group.
    :param blas_low_precision: bf16/fp16/tf32 gemm runs in the vendor BLAS on those formats
        (``gemmEx`` with fp32 compute); when False the rounded operands are multiplied by the
        fp32 BLAS, which gives the same exact-product result more slowly.
    :param install: how a user gets the matching CuPy build (shown by the probe).
    """

    name: str
    label: str
    device_type: int
    hip: bool
    warp: int
    blas_low_precision: bool
    install: str

    @property
    def launch_width(self) -> int:
        """Threads along dimension 0 of every work-group: two warps / wavefronts."""
        return 2 * self.warp

    @property
    def auto_order(self) -> tuple[str, ...]:
        """gemm ``precision="auto"`` candidates, cheapest first."""
        return ("bf16", "fp16", "tf32", "fp32") if self.blas_low_precision else ("fp32",)

    def arch(self, props: Mapping[str, Any]) -> str:
        """The compile target from ``cupy.cuda.runtime.getDeviceProperties``: ``sm_90``,
        ``gfx90a``."""
        if self.hip:
            raw = props.get("gcnArchName", b"")
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            return text.split(":")[0] or "gfx (unknown)"
        return f"sm_{props['major']}{props['minor']}"

    def version_text(self, version: int) -> str:
        """A runtime/driver version integer as text (CUDA 12040 -> 12.4; HIP 60032830 ->
        6.0.32830)."""
        if self.hip:
            return f"{version // 10_000_000}.{version // 100_000 % 100}.{version % 100_000}"
        return f"{version // 1000}.{version % 1000 // 10}"
