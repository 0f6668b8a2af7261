"""``quantize`` in torch primitives: bitwise what :func:`dshal.reference.quantize` gives.

Per group: ``scale = amax / qmax`` in float32 (1 where that is 0), ``values = x / scale`` in
float32 (true division, :func:`~dshal_torch.numerics.true_divide`), clamped to +-qmax and
rounded to nearest even: ``torch.round`` for int8, the float8 cast for fp8. The clamp comes
first because torch's float8 casts of out-of-range values are not a saturation everywhere
(e5m2 overflows to inf; e4m3fn, which has no inf, gives NaN in older torch versions); qmax is
exactly representable, so clamping before rounding equals rounding then saturating. Groups are
formed by zero-padding the grouped axes to a multiple of ``group_size`` (zeros change no amax).
"""

from __future__ import annotations

import torch

from dshal.calls import QuantizeCall
from dshal.dtypes import QMAX, QUANTIZED_PRECISIONS
from dshal_torch.numerics import round_float, true_divide

#: torch storage dtype of each quantised precision
STORAGE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8}


def quantize(call: QuantizeCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``quantize``: ``(values, scales)``, scales ``None`` for the float precisions."""
    if call.precision not in QUANTIZED_PRECISIONS:
        return round_float(call.x, call.precision), None
    return quantize_values(call.x, call.precision, call.granularity, call.group_size)


def quantize_values(x: torch.Tensor, precision: str, granularity: str, g: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8/int8 values (x's shape) and float32 scales of ``x`` for ``granularity`` ``row``
    ([..., ceil(K/g)]), ``block`` (2-D x: [ceil(K/g), ceil(N/g)]) or ``tensor`` (shape ())."""
    x32 = x.to(torch.float32)
    if x.dtype == torch.float64 and not bool(torch.isfinite(x32).all()):
        raise ValueError("x holds values beyond float32's range (infinite once rounded to "
                         "float32): cannot quantize")
    if granularity == "tensor":
        amax = x32.abs().amax() if x32.numel() else x32.new_zeros(())
        scales = _scales(amax, precision)
        return encode(true_divide(x32, scales), precision), scales
    if granularity == "block":
        K, N = x32.shape
        padded = _pad(_pad(x32, 0, g), 1, g)
        nk, nn = padded.shape[0] // g, padded.shape[1] // g
        tiles = padded.reshape(nk, g, nn, g)
        scales = _scales(tiles.abs().amax(dim=(1, 3)), precision)
        scaled = true_divide(tiles, scales[:, None, :, None]).reshape(nk * g, nn * g)
        return encode(scaled[:K, :N], precision), scales
    if granularity != "row":
        raise ValueError(f"granularity={granularity!r} (allowed: row, block, tensor)")
    K = x32.shape[-1]
    padded = _pad(x32, -1, g)
    groups = padded.reshape(*padded.shape[:-1], padded.shape[-1] // g, g)
    scales = _scales(groups.abs().amax(dim=-1), precision)
    scaled = true_divide(groups, scales.unsqueeze(-1)).reshape(padded.shape)
    return encode(scaled[..., :K], precision), scales


def _pad(x: torch.Tensor, dim: int, g: int) -> torch.Tensor:
    """``x`` zero-padded along ``dim`` to a multiple of ``g``."""
    extra = -x.shape[dim] % g
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _scales(amax: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 ``amax / qmax``, 1 where that is 0 (amax 0, or so small that it underflows)."""
    scale = true_divide(amax, QMAX[precision])
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def encode(scaled: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 ``x / scale`` saturated to +-qmax and rounded to nearest even, as storage."""
    qmax = QMAX[precision]
    clamped = scaled.clamp(-qmax, qmax)
    if precision == "int8":
        return torch.round(clamped).to(torch.int8)
    return clamped.to(STORAGE[precision])
