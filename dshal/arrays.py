"""Array interop: which library and device an argument comes from, and conversions.

"Is this a torch tensor?" never imports torch: libraries are recognised by the module of the
array's type, and imported only when an array of theirs is already in hand. Conversions are
zero-copy where the libraries allow it (DLPack, shared host memory); bfloat16 and float8 travel
as same-sized integer views because numpy's DLPack import does not know them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from dshal.capabilities import CPU, device_type_name
from dshal.dtypes import numpy_dtype
from dshal.errors import DshalTypeError, DshalValueError

#: device codes for torch device types DLPack has no code for (documented in docs/backends.md)
TORCH_DEVICE_TYPES = {"cpu": 1, "cuda": 2, "mps": 8, "xpu": 14, "meta": 1000, "npu": 1001,
                      "privateuseone": 1002, "hpu": 1003, "mtia": 1004}
_INT_VIEW = {1: "uint8", 2: "int16"}
_NARROW_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
_HOST = (CPU, 0)


class ArrayMeta(NamedTuple):
    """Library, device, dtype and shape of one array argument (hashable: part of cache keys)."""

    library: str
    device: tuple[int, int]
    dtype: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def library_of(x: Any) -> str | None:
    """``"numpy"``, ``"torch"``, ``"cupy"``, ``"dlpack"`` (any other DLPack producer) or None."""
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.partition(".")[0]
    if root in ("torch", "cupy"):
        return root
    if hasattr(x, "__dlpack__") and hasattr(x, "shape"):
        return "dlpack"
    return None


def _torch_device_code(device) -> tuple[int, int]:
    import torch

    kind = device.type
    code = TORCH_DEVICE_TYPES.get(kind, 1002)
    if kind == "cuda" and torch.version.hip:
        code = 10
    return code, device.index or 0


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_str(dtype: Any) -> str:
    """Canonical name of a numpy/torch/cupy dtype (memoised: ``str(np.dtype)`` costs µs)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        name = str(dtype).removeprefix("torch.").removeprefix("dtype(").strip("')\"")
        _DTYPE_NAMES[dtype] = name
        return name


def dtype_name_of(x: Any) -> str:
    """The canonical dtype name of array ``x`` (``"float32"``, ``"bfloat16"``...)."""
    return _dtype_str(x.dtype)


def inspect(name: str, x: Any) -> ArrayMeta:
    """Describe array argument ``name``; a non-array raises ``TypeError`` naming it."""
    lib = library_of(x)
    if lib is None:
        raise DshalTypeError(
            f"{name} must be an array (numpy, torch, cupy or any object with __dlpack__), "
            f"got {type(x).__name__}"
        )
    if lib == "numpy":
        return ArrayMeta(lib, _HOST, _dtype_str(x.dtype), x.shape)
    if lib == "torch":
        return ArrayMeta(lib, _torch_device_code(x.device), _dtype_str(x.dtype), tuple(x.shape))
    dev = x.__dlpack_device__()
    return ArrayMeta(lib, (int(dev[0]), int(dev[1])), _dtype_str(x.dtype), tuple(x.shape))


def common_origin(metas: dict[str, ArrayMeta]) -> tuple[str, tuple[int, int]]:
    """The one library and device of a call's arrays; mixing raises naming the arguments."""
    items = list(metas.items())
    first_name, first = items[0]
    for name, meta in items[1:]:
        if meta.library != first.library:
            raise DshalTypeError(
                f"arrays of one call must come from one library: {first_name} is "
                f"{first.library}, {name} is {meta.library}"
            )
        if meta.device != first.device:
            raise DshalValueError(
                f"arrays of one call must be on one device: {first_name} is on "
                f"{device_type_name(first.device[0])}:{first.device[1]}, {name} is on "
                f"{device_type_name(meta.device[0])}:{meta.device[1]}"
            )
    return first.library, first.device


# --- conversions ------------------------------------------------------------------------------


def _torch_to_numpy(t) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    name = _dtype_str(t.dtype)
    if name in _NARROW_FLOATS:
        import torch

        size = t.element_size()
        raw = t.view(getattr(torch, _INT_VIEW[size])).numpy()
        return raw.view(numpy_dtype(name))
    return t.numpy()


def _numpy_to_torch(a: np.ndarray):
    import torch

    if any(s < 0 for s in a.strides):  # a copy: ascontiguousarray keeps a negative stride
        a = a.copy()  # on a length-1 axis, which torch.from_numpy refuses
    name = _dtype_str(a.dtype)
    if name in _NARROW_FLOATS:
        raw = torch.from_numpy(a.view(_INT_VIEW[a.dtype.itemsize]))
        return raw.view(getattr(torch, name))
    return torch.from_numpy(a)


def _dlpack_to_numpy(x: Any) -> np.ndarray:
    """A DLPack producer's array in numpy; bfloat16 and float8 (which numpy's DLPack import
    does not know) through the producer's ``__array__`` (jax gives ml_dtypes arrays)."""
    if _dtype_str(x.dtype) in _NARROW_FLOATS and hasattr(x, "__array__"):
        return np.asarray(x)
    return np.from_dlpack(x)


def to_kind(x: Any, kind: str) -> Any:
    """Convert ``x`` to the array type a backend computes on (``array_kind``)."""
    lib = library_of(x)
    if lib == kind:
        return x
    if kind == "numpy":
        if lib == "torch":
            return _torch_to_numpy(x)
        if lib == "cupy":
            import cupy

            return cupy.asnumpy(x)
        return _dlpack_to_numpy(x)
    if kind == "torch":
        if lib == "numpy":
            return _numpy_to_torch(x)
        import torch

        return torch.from_dlpack(x)
    if kind == "cupy":
        import cupy

        if lib == "numpy":
            return cupy.asarray(x)
        return cupy.from_dlpack(x)
    raise ValueError(f"array_kind={kind!r} (allowed: numpy, torch, cupy)")


def from_kind(y: Any, library: str, like: Any) -> Any:
    """Return backend result ``y`` in the caller's ``library`` on the device of ``like``."""
    if y is None:
        return None
    kind = library_of(y)
    if library == "numpy":
        return y if kind == "numpy" else to_kind(y, "numpy")
    if library == "torch":
        t = to_kind(y, "torch")
        return t if t.device == like.device else t.to(like.device)
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return to_kind(y, "cupy")
    namespace = getattr(like, "__array_namespace__", None)
    if namespace is not None:
        host = y if kind == "numpy" else to_kind(y, "numpy")
        if _dtype_str(host.dtype) in _NARROW_FLOATS:  # numpy cannot export them by DLPack
            return namespace().asarray(host)
        return namespace().from_dlpack(host)
    return to_kind(y, "numpy")


# --- value checks on backend-kind arrays (numpy, torch, cupy share these method names) -------


def all_finite(x: Any) -> bool:
    """True when no element of ``x`` is NaN or infinite."""
    lib = library_of(x)
    if lib == "torch":
        import torch

        return bool(torch.isfinite(x).all())
    if lib == "cupy":
        import cupy

        return bool(cupy.isfinite(x).all())
    if lib == "dlpack":
        x = _dlpack_to_numpy(x)
    if x.size == 0:
        return True
    # min/max propagate NaN and expose +-Inf without allocating a mask the size of x
    with np.errstate(invalid="ignore"):
        return bool(np.isfinite(np.float64(x.max())) and np.isfinite(np.float64(x.min())))


def value_range(x: Any) -> tuple[int, int] | None:
    """``(min, max)`` of an integer array, or None when it is empty."""
    if (x.numel() if library_of(x) == "torch" else x.size) == 0:
        return None
    return int(x.min()), int(x.max())


def zeros_like_kind(like: Any, specs: list[tuple[tuple[int, ...], str]],
                    wanted: tuple[bool, ...]) -> list[Any]:
    """Zero-filled arrays of ``like``'s kind, one per ``(shape, dtype)`` whose ``wanted`` flag
    is set (results of a call with nothing to compute, e.g. zero heads)."""
    kind = library_of(like)
    made = []
    for (shape, dtype), want in zip(specs, wanted):
        if want:
            made.append(to_kind(np.zeros(shape, numpy_dtype(dtype)),
                                kind if kind in ("numpy", "torch", "cupy") else "numpy"))
    return made


def cast(x: Any, dtype: str) -> Any:
    """``x`` as ``dtype`` (no copy when it already is)."""
    if library_of(x) == "torch":
        import torch

        return x.to(getattr(torch, dtype))
    return x.astype(numpy_dtype(dtype), copy=False)
