"""Invalid calls raise the right exception type, naming the argument and what is allowed."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dshal
from dshal import ops

torch = pytest.importorskip("torch")

F32 = np.float32
rng = np.random.default_rng(0)


def arr(*shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


Q, K, V = arr(1, 4, 8, 16), arr(1, 2, 8, 16), arr(1, 2, 8, 16)
A, B = arr(4, 8), arr(8, 3)
X, G = arr(3, 6), arr(6)
I8 = np.ones((4, 8), np.int8)
I8B = np.ones((8, 3), np.int8)
E4 = np.ones((4, 8), ml_dtypes.float8_e4m3fn)
E5 = np.ones((8, 3), ml_dtypes.float8_e5m2)


def attn(**kw):
    args = {"q": Q, "k": K, "v": V} | kw
    return lambda: ops.sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def gemm(**kw):
    args = {"a": A, "b": B} | kw
    return lambda: ops.gemm(args.pop("a"), args.pop("b"), **args)


def quant(**kw):
    args = {"x": A, "precision": "int8"} | kw
    return lambda: ops.quantize(args.pop("x"), args.pop("precision"), **args)


def gated(**kw):
    args = {"x": X, "gate_logits": G} | kw
    return lambda: ops.gated_channels(args.pop("x"), args.pop("gate_logits"), **args)


BAD = [
    # sparse_attention
    ("q rank 3", attn(q=arr(4, 8, 16)), ValueError, "q must have 4 dimensions"),
    ("k rank 5", attn(k=arr(1, 1, 2, 8, 16)), ValueError, "k must have 4"),
    ("q list", attn(q=[[1.0]]), TypeError, "q must be an array"),
    ("Hq % Hkv", attn(q=arr(1, 3, 8, 16)), ValueError, "multiple of k/v heads"),
    ("batch mismatch", attn(k=arr(2, 2, 8, 16), v=arr(2, 2, 8, 16)), ValueError, "batch"),
    ("head dim mismatch", attn(k=arr(1, 2, 8, 15)), ValueError, "head dim"),
    ("v length mismatch", attn(v=arr(1, 2, 7, 16)), ValueError, "v must have"),
    ("mixed dtypes", attn(k=K.astype(np.float16)), TypeError, "k has dtype float16"),
    ("int q", attn(q=Q.astype(np.int32)), TypeError, "q has dtype int32"),
    ("bool top_k", attn(top_k=True), TypeError, "top_k"),
    ("negative top_k", attn(top_k=-1), ValueError, "top_k"),
    ("nan top_k", attn(top_k=float("nan")), ValueError, "top_k"),
    ("fraction > 1", attn(top_k=1.5), ValueError, "top_k"),
    ("string top_k", attn(top_k="4"), TypeError, "top_k"),
    ("block_size 0", attn(block_size=0), ValueError, "block_size"),
    ("block_size float", attn(block_size=2.0), TypeError, "block_size"),
    ("negative window", attn(window=-1), ValueError, "window"),
    ("causal int", attn(causal=1), TypeError, "causal"),
    ("nan scale", attn(scale=float("nan")), ValueError, "scale"),
    ("top_k and indices", attn(top_k=1, indices=np.zeros((1, 2, 8, 1), np.int64)), ValueError,
     "top_k or indices"),
    ("return_indices alone", attn(return_indices=True), ValueError, "return_indices"),
    ("indices out of range", attn(indices=np.full((1, 2, 8, 1), 9, np.int64), block_size=4),
     ValueError, "indices must lie in [-1, 1]"),
    ("indices below -1", attn(indices=np.full((1, 2, 8, 1), -2, np.int64)), ValueError,
     "indices must lie"),
    ("indices wrong shape", attn(indices=np.zeros((1, 4, 8, 1), np.int64)), ValueError,
     "indices must have shape"),
    ("indices float", attn(indices=np.zeros((1, 2, 8, 1), F32)), TypeError, "indices has dtype"),
    ("mixed libraries", attn(k=torch.from_numpy(K)), TypeError, "one library"),
    # quantize
    ("unknown precision", quant(precision="fp4"), ValueError, "precision='fp4'"),
    ("auto in quantize", quant(precision="auto"), ValueError, "precision"),
    ("bad granularity", quant(granularity="col"), ValueError, "granularity"),
    ("group 0", quant(group_size=0), ValueError, "group_size"),
    ("block needs 2-D", quant(x=arr(2, 4, 8), granularity="block"), ValueError,
     "x must have 2 dimensions"),
    ("nan to quantize", quant(x=np.array([[1.0, np.nan]], F32)), ValueError, "finite"),
    ("inf to quantize", quant(x=np.array([[np.inf]], F32), precision="fp8_e4m3"), ValueError,
     "finite"),
    ("int input", quant(x=I8), TypeError, "x has dtype int8"),
    # gemm
    ("K mismatch", gemm(b=arr(7, 3)), ValueError, "agree on K"),
    ("b rank 3", gemm(b=arr(1, 8, 3)), ValueError, "b must have 2"),
    ("a rank 1", gemm(a=arr(8)), ValueError, "a must have at least 2"),
    ("mixed float dtypes", gemm(b=B.astype(np.float16)), TypeError, "share a dtype"),
    ("unknown precision", gemm(precision="fp6"), ValueError, "precision='fp6'"),
    ("precision contradicts int8", gemm(a=I8, b=I8B, precision="fp8_e4m3"), ValueError,
     "contradicts a"),
    ("mixed quant formats", gemm(a=E4, b=E5), ValueError, "share one format"),
    ("a_scale with float a", gemm(precision="int8", a_scale=1.0), ValueError, "a_scale"),
    ("a_scale wrong shape", gemm(a=I8, b=I8B, a_scale=np.ones((4, 3), F32)), ValueError,
     "a_scale has shape [4, 3]"),
    ("b_scale wrong shape", gemm(a=I8, b=I8B, b_scale=np.ones((3,), F32)), ValueError,
     "b_scale has shape [3]"),
    ("nan scale", gemm(a=I8, b=I8B, a_scale=float("nan")), ValueError, "a_scale"),
    ("nan scale array", gemm(a=I8, b=I8B, b_scale=np.full((1, 3), np.nan, F32)), ValueError,
     "b_scale must be finite"),
    ("nan a quantised int8", gemm(a=np.where(A > 1, np.nan, A).astype(F32), precision="int8"),
     ValueError, "a holds NaN or Inf"),
    ("inf b quantised fp8", gemm(b=np.where(B > 1, np.inf, B).astype(F32),
                                 precision="fp8_e5m2"), ValueError, "b holds NaN or Inf"),
    ("nan a measured by auto", gemm(a=np.where(A > 1, np.nan, A).astype(F32),
                                    precision="auto"), ValueError, "a holds NaN or Inf"),
    ("bias shape", gemm(bias=arr(4)), ValueError, "bias must have shape [3]"),
    ("bad out_dtype", gemm(out_dtype="int32"), ValueError, "out_dtype"),
    ("tolerance without auto", gemm(tolerance=1e-2), ValueError, "tolerance"),
    ("negative tolerance", gemm(precision="auto", tolerance=-1.0), ValueError, "tolerance"),
    ("bad candidate", gemm(precision="auto", candidates=["fp64"]), ValueError, "candidates"),
    ("candidates string", gemm(precision="auto", candidates="fp32"), TypeError, "candidates"),
    ("group_size bool", gemm(group_size=True), TypeError, "group_size"),
    # gated_channels
    ("bad mode", gated(mode="gumbel"), ValueError, "mode='gumbel'"),
    ("logit shape", gated(gate_logits=arr(5)), ValueError, "gate_logits must have shape"),
    ("weight cin", gated(weight=arr(4, 5)), ValueError, "weight must have shape"),
    ("weight dtype", gated(weight=arr(4, 6, dtype=np.float64)), TypeError, "weight has dtype"),
    ("bias without weight", gated(bias=arr(6)), ValueError, "bias needs weight"),
    ("bias shape", gated(weight=arr(4, 6), bias=arr(6), gate_logits=arr(4)), ValueError,
     "bias must have shape [4]"),
    ("nan threshold", gated(threshold=float("nan")), ValueError, "threshold"),
    ("bool keep", gated(keep=False), TypeError, "keep"),
    ("keep fraction 0", gated(keep=0.0), ValueError, "keep"),
    ("keep with soft", gated(keep=2, mode="soft"), ValueError, "keep"),
    ("keep and threshold", gated(keep=2, threshold=0.5), ValueError, "threshold or keep"),
    ("x 0-d", gated(x=np.float32(1.0)), TypeError, "x must be an array"),
    ("return_mask str", gated(return_mask="yes"), TypeError, "return_mask"),
    ("mixed libraries", gated(gate_logits=torch.from_numpy(G)), TypeError, "one library"),
]


@pytest.mark.parametrize(("case", "call", "exc", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, call, exc, needle):
    with pytest.raises(exc) as err:
        call()
    assert needle in str(err.value), f"{case}: {err.value}"
    # argument errors are ValueError/TypeError, and dshal's own ones are DshalErrors too
    assert isinstance(err.value, ValueError | TypeError)


def test_at_least_forty_cases():
    assert len(BAD) >= 40


def test_unknown_backend_named():
    with pytest.raises(ValueError, match="backend='tpu' is not installed"):
        ops.gated_channels(X, G, backend="tpu")


def test_explain_validates_too():
    with pytest.raises(ValueError, match="op="):
        dshal.explain("conv2d", X)
