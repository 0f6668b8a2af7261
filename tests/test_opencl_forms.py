"""The 3.1a forms (varlen, paged, block_keys) on the OpenCL kernels (PoCL's CPU device in CI),
against the float64 reference; the whole conformance of the forms is ``dshal certify opencl``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import dshal
import dshal.reference as ref
from tests.requirements import require_backend
from tests.serving_data import block_means, ragged

_BACKEND = require_backend("opencl")
pytestmark = pytest.mark.xdist_group("opencl")

BS = 8
TOL = dict(rtol=2e-5, atol=2e-5)
OPTS = [dict(top_k=2, window=4, causal=True), dict(window=3), dict(top_k=0.5),
        dict(causal=True)]


def _close(got: tuple, want: tuple) -> None:
    out, sel, lse = got
    np.testing.assert_allclose(out, want[0], **TOL)
    np.testing.assert_allclose(lse, want[2], **TOL)
    if want[1] is None:
        assert sel is None
    else:
        np.testing.assert_array_equal(sel, want[1])


@pytest.mark.parametrize("kw", OPTS)
def test_varlen_matches_reference(kw):
    r = ragged([3, 0, 17, 1, 9], [5, 2, 20, 30, 0], seed=4)
    q, k, v = r.packed()
    form = dict(cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k, block_size=BS, **kw)
    sel = "top_k" in kw
    got = dshal.ops.sparse_attention(q, k, v, backend="opencl", return_lse=True,
                                     return_indices=sel, **form)
    _close(got if sel else (got[0], None, got[1]), ref.sparse_attention(q, k, v, **form))


@pytest.mark.parametrize("kw", OPTS)
def test_paged_matches_reference_and_ignores_garbage(kw):
    rd = ragged([1, 1, 1, 1], [5, 0, 40, 17], seed=2)
    kp, vp, table, seqlens = rd.paged(16, np.random.default_rng(0))  # NaN in unused slots
    q = np.stack(rd.qs)
    form = dict(block_table=table, seqlens_k=seqlens, block_size=BS, **kw)
    got = dshal.ops.sparse_attention(q, kp, vp, backend="opencl", return_lse=True, **form)
    want = ref.sparse_attention(q, kp, vp, **form)
    assert np.isfinite(got[0]).all()
    _close((got[0], None, got[1]), (want[0], None, want[2]))


def test_paged_varlen_queries_match_reference():
    rd = ragged([5, 1, 0, 12], [5, 40, 7, 30], seed=3)
    kp, vp, table, seqlens = rd.paged(16, np.random.default_rng(1))
    q = rd.packed()[0]
    form = dict(cu_seqlens_q=rd.cu_q, block_table=table, seqlens_k=seqlens, block_size=BS,
                top_k=1, window=4, causal=True)
    got = dshal.ops.sparse_attention(q, kp, vp, backend="opencl", return_lse=True,
                                     return_indices=True, **form)
    _close(got, ref.sparse_attention(q, kp, vp, **form))


def test_block_keys_refused_with_a_reason():
    """The kernels would convert every key of a decode given summaries (DESIGN 3.1a forbids
    it): block_keys are not declared, and a forced call says so."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
               ((2, 4, 9, 16), (2, 2, 64, 16), (2, 2, 64, 16)))
    bk = block_means(k, BS)
    with pytest.raises(dshal.errors.UnsupportedError, match="block_keys"):
        dshal.ops.sparse_attention(q, k, v, block_keys=bk, backend="opencl", top_k=2,
                                   block_size=BS, causal=True)


def test_opencl_declares_the_serving_forms():
    spec = _BACKEND.spec
    assert spec.plugin_api[1] >= 2
    features = spec.capabilities["sparse_attention"].features
    assert {"varlen", "paged"} <= features and "block_keys" not in features
