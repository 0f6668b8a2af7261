"""The plan cache of ``dshal.ops``: a cached plan is reused only by calls it validated.

numpy arrays are keyed by dtype and shape, other arrays by their full metadata, options by value
and type; each test first caches a plan, then makes a call that must not reuse it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dshal
from dshal import ops


@pytest.fixture(autouse=True)
def empty_cache():
    ops._PLANS.clear()
    yield
    ops._PLANS.clear()


def _gates(n: int = 16, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, n)).astype(dtype), rng.standard_normal(n).astype(dtype)


def test_repeated_calls_reuse_one_plan():
    x, g = _gates()
    for _ in range(3):
        dshal.ops.gated_channels(x, g)
    assert len(ops._PLANS) == 1


def test_option_types_are_part_of_the_key():
    x, g = _gates()
    dshal.ops.gated_channels(x, g, return_mask=True)
    with pytest.raises(TypeError, match="return_mask"):
        dshal.ops.gated_channels(x, g, return_mask=1)  # 1 == True, but not a bool


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_dtypes_of_one_shape_get_their_own_plan(dtype):
    x, g = _gates()
    dshal.ops.gated_channels(x, g)
    y = dshal.ops.gated_channels(*_gates(dtype=dtype))
    assert y.dtype == dtype


def test_a_new_shape_is_validated():
    x, g = _gates()
    dshal.ops.gated_channels(x, g)
    with pytest.raises(ValueError, match="gate_logits must have shape"):
        dshal.ops.gated_channels(x, g[:8])


def test_byte_order_is_part_of_the_key():
    x, g = _gates()
    dshal.ops.gated_channels(x, g)
    swapped = x.astype(x.dtype.newbyteorder())
    with pytest.raises(TypeError, match="x has dtype"):
        dshal.ops.gated_channels(swapped, g)


def test_other_libraries_do_not_reuse_a_numpy_plan():
    x, g = _gates()
    dshal.ops.gated_channels(x, g)
    y = dshal.ops.gated_channels(torch.from_numpy(x), torch.from_numpy(g))
    assert isinstance(y, torch.Tensor)
    with pytest.raises(TypeError, match="one library"):
        dshal.ops.gated_channels(x, torch.from_numpy(g))


def test_unhashable_options_are_validated_every_call():
    x, g = _gates()
    for _ in range(2):
        with pytest.raises(TypeError, match="threshold"):
            dshal.ops.gated_channels(x, g, threshold=[0.0])
    assert len(ops._PLANS) == 0
