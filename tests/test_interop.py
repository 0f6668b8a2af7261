"""Inputs from numpy, PyTorch and any DLPack producer; results in the caller's library."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dshal

torch = pytest.importorskip("torch")


class DLPackOnly:
    """A foreign array type that only speaks DLPack (like a library dshal has never heard of)."""

    def __init__(self, array: np.ndarray):
        self._a = array
        self.shape = array.shape
        self.dtype = array.dtype

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def _attn_inputs(dtype=np.float32):
    rng = np.random.default_rng(1)
    return [rng.standard_normal(s).astype(dtype) for s in ((1, 4, 9, 8), (1, 2, 9, 8),
                                                            (1, 2, 9, 8))]


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_in_torch_out(torch_dtype):
    q, k, v = (torch.from_numpy(a).to(torch_dtype) for a in _attn_inputs())
    out, lse = dshal.ops.sparse_attention(q, k, v, top_k=1, block_size=4, causal=True,
                                          return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch_dtype and out.shape == q.shape
    assert lse.dtype == torch.float32
    np_out = dshal.ops.sparse_attention(*(_to_np(t) for t in (q, k, v)), top_k=1, block_size=4,
                                        causal=True)
    np.testing.assert_array_equal(_to_np(out), np_out)


def _to_np(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def test_torch_non_contiguous_and_requires_grad():
    x = torch.randn(6, 4).t()  # [4, 6], transposed view
    g = torch.randn(6, requires_grad=True)
    y = dshal.ops.gated_channels(x, g.detach())
    expected = torch.where(g.detach() > 0, x, torch.zeros(()))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_torch_fp8_and_int8_gemm():
    a = torch.randn(5, 33)
    b = torch.randn(33, 7)
    av, asc = dshal.ops.quantize(a, "fp8_e4m3", group_size=16)
    bv, bsc = dshal.ops.quantize(b, "fp8_e4m3", granularity="block", group_size=16)
    assert av.dtype == torch.float8_e4m3fn and asc.shape == (5, 3) and bsc.shape == (3, 1)
    y = dshal.ops.gemm(av, bv, a_scale=asc, b_scale=bsc, group_size=16)
    y_fly = dshal.ops.gemm(a, b, precision="fp8_e4m3", group_size=16)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_fly, rtol=1e-6, atol=1e-6)


def test_dlpack_only_object():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    g = np.array([1.0, -1.0, 2.0, -2.0], np.float32)
    y = dshal.ops.gated_channels(DLPackOnly(x), DLPackOnly(g))
    np.testing.assert_array_equal(np.asarray(y), np.where(g > 0, x, 0))


def test_numpy_bfloat16_roundtrip():
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    g = np.array([1.0, -1.0, 2.0, -2.0], np.float32)
    y = dshal.ops.gated_channels(x, g)
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y.astype(np.float32),
                                  np.where(g > 0, x.astype(np.float32), 0))
