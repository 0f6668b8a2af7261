"""Where a backend's inputs live: the suite builds host numpy arrays and moves them to the
library and device the backend serves (its ``array_kind`` on its first non-host device type),
then brings results back to the host for checking. Conversions are exact (same dtype)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dshal import arrays
from dshal.capabilities import CPU, BackendSpec, device_type_name

#: torch device type names by DLPack code (ROCm builds of torch call their devices "cuda")
_TORCH_NAMES = {**{code: name for name, code in arrays.TORCH_DEVICE_TYPES.items()}, 10: "cuda"}


def _torch_accelerator() -> int | None:
    """The DLPack code of the accelerator torch reports (``torch.accelerator``), or None."""
    import torch

    acc = getattr(torch, "accelerator", None)
    if acc is None or not acc.is_available():
        return None
    found = acc.current_accelerator()
    return arrays.inspect("accelerator", torch.empty(0, device=found)).device[0]


@dataclass(frozen=True)
class Target:
    """The library and device a backend is certified on."""

    library: str
    device: tuple[int, int]

    @classmethod
    def for_backend(cls, spec: BackendSpec, device_id: int | None = None) -> Target:
        """The backend's array kind on its first accelerator device type, else the host.

        A torch backend serving several device types (the ``torch`` backend serves them all)
        is certified on the accelerator torch reports when it serves that one, else on the
        host when it serves it.
        """
        remote = sorted(d for d in spec.device_types if d != CPU)
        kind = remote[0] if remote else CPU
        if spec.array_kind == "torch" and len(spec.device_types) > 1:
            present = _torch_accelerator()
            kind = present if present in spec.device_types else \
                CPU if CPU in spec.device_types else kind
        return cls(spec.array_kind, (kind, device_id or 0))

    def describe(self) -> str:
        """``numpy arrays on cpu:0``."""
        return f"{self.library} arrays on {device_type_name(self.device[0])}:{self.device[1]}"

    def put(self, x: Any) -> Any:
        """Move a host array (anything else passes through) to this target."""
        if not isinstance(x, np.ndarray):
            return x
        if self.library == "numpy":
            return x
        if self.library == "torch":
            t = arrays.to_kind(x, "torch")
            if self.device[0] == CPU:
                return t
            return t.to(f"{_TORCH_NAMES.get(self.device[0], 'cpu')}:{self.device[1]}")
        import cupy

        with cupy.cuda.Device(self.device[1]):
            return arrays.to_kind(np.ascontiguousarray(x), "cupy")

    def get(self, result: Any) -> Any:
        """A result (array, tuple of arrays, dict) back on the host as numpy arrays."""
        if isinstance(result, tuple):
            return tuple(self.get(r) for r in result)
        if isinstance(result, dict) or result is None:
            return result
        if arrays.library_of(result) is None:
            return result
        return np.asarray(arrays.to_kind(result, "numpy"))
