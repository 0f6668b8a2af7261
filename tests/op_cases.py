"""Unit cases the backend tests share (host numpy inputs), and their checks against
:mod:`dshal.reference`.

- quantize: shapes with empty and 1-element groups, magnitudes from 1e-30 to beyond fp8's
  range, zeros, saturation and a group whose amax is 0; values and scales bit for bit.
- gated_channels: every mode x keep x weight x row-gate combination on adversarial logits
  (NaN, +-1e4, a tie, NaN in the weight rows of closed channels); the mask exactly, closed
  channels exactly 0, open ones within ``4 (u_in |y| + 8 u_acc sum |x||w| + |bias|)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dshal import reference as ref
from dshal.dtypes import DTYPE_UNIT_ROUNDOFF


def bits(x: np.ndarray) -> np.ndarray:
    """The bit patterns of ``x`` (unsigned integers of its item size)."""
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


# --- quantize ---------------------------------------------------------------------------------

QUANTIZE_SHAPES = {"row": [(3, 5, 200), (4, 0), (0, 7), (1, 1)],
                   "block": [(257, 130), (0, 5), (3, 1)], "tensor": [(33, 7), (), (0,)]}
GROUP_SIZES = (1, 16, 128, 300)


def quantize_inputs(rng: np.random.Generator, dtypes: Sequence[Any]
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """``(granularity, x)`` for every dtype and shape of :data:`QUANTIZE_SHAPES`."""
    for dtype in dtypes:
        for granularity, shapes in QUANTIZE_SHAPES.items():
            for shape in shapes:
                big = 1e3 if np.dtype(dtype) == np.float16 else 1e20
                x = np.asarray(rng.standard_normal(shape) * rng.choice([1e-30, 1e-3, 1, 300,
                                                                        big]))
                if x.size > 4:
                    x.flat[:4] = [0, -0.0, x.flat[4] * 60, -x.flat[4]]  # amax, saturation
                if len(shape) == 2 and shape[-1] >= 16:
                    x[:, :16] = 0  # a group with amax = 0: scale 1
                yield granularity, x.astype(dtype)


def check_quantize(x: np.ndarray, precision: str, granularity: str, g: int,
                   values: np.ndarray, scales: np.ndarray | None) -> None:
    """A backend's quantisation (host arrays) equals the reference's bit for bit."""
    want_v, want_s = ref.quantize(x, precision, granularity=granularity, group_size=g)
    assert values.dtype == want_v.dtype and values.shape == x.shape
    np.testing.assert_array_equal(bits(values), bits(want_v))
    if want_s is None:
        assert scales is None
    else:
        assert scales.dtype == np.float32 and scales.shape == want_s.shape
        np.testing.assert_array_equal(scales, want_s)


# --- gated_channels ---------------------------------------------------------------------------


def gated_cases(mode: str, rng: np.random.Generator, dtypes: Sequence[Any]
                ) -> Iterator[dict[str, Any]]:
    """Host (numpy) inputs and options of every combination for ``mode``."""
    for dtype in dtypes:
        for keep in (None, 0, 3, 0.3, 1.0):
            if keep is not None and mode == "soft":
                continue
            for with_weight in (False, True):
                for row_gates in (False, True):
                    x = rng.standard_normal((4, 3, 17)).astype(dtype)
                    c_out = 9 if with_weight else 17
                    w = rng.standard_normal((c_out, 17)).astype(dtype) if with_weight else None
                    bias = rng.standard_normal(c_out).astype(dtype) if with_weight else None
                    z = rng.standard_normal((4, 3, c_out) if row_gates else (c_out,)) * 3
                    z[..., :4] = [np.nan, 1e4, -1e4, 0.5]  # NaN closed/last, huge logits
                    z[..., 5] = z[..., 6]  # a tie
                    z = z.astype(dtype)
                    threshold = 0.5 if keep is None else 0.0
                    is_open = ref.gate_open(z, mode=mode, threshold=threshold, keep=keep)
                    if with_weight and not row_gates:
                        w[~is_open] = np.nan  # closed rows must never be read
                    yield {"x": x, "gate_logits": z, "weight": w, "bias": bias, "mode": mode,
                           "threshold": threshold, "keep": keep}


def check_gated(case: dict[str, Any], y: np.ndarray, mask: np.ndarray, *, u_acc: float
                ) -> None:
    """A backend's ``(y, mask)`` (host arrays) for ``case`` against the reference."""
    x, w, bias = case["x"], case["weight"], case["bias"]
    r_y, r_mask = ref.gated_channels(**case)
    np.testing.assert_array_equal(mask, r_mask)
    got = y.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(r_y))
    closed = ~np.broadcast_to(r_mask, r_y.shape)
    assert (got[closed] == 0).all(), "closed channels must be exactly 0"
    mag = np.abs(x.astype(np.float64))
    if w is not None:
        mag = mag @ np.nan_to_num(np.abs(w.astype(np.float64))).T \
            + np.abs(bias.astype(np.float64))
    ok = ~np.isnan(r_y)
    bound = 4 * (DTYPE_UNIT_ROUNDOFF[x.dtype.name] * np.abs(r_y) + u_acc * 8 * mag)
    assert (np.abs(got - r_y)[ok] <= np.broadcast_to(bound, r_y.shape)[ok]).all()
