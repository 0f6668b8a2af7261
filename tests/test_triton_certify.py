"""``dshal certify triton --quick`` passes under Triton's interpreter on torch CPU tensors
(DSHAL_TRITON_INTERPRET=1): every kernel of the backend (gemm in every precision, quantize,
the gated linear, selection scores and sparse attention) certified without a GPU, through the
ordinary certify path (6-7 minutes on 2 cores: the interpreter runs each program in
Python). Coverage: the quick case set (docs/backends.md, the triton section)."""

from __future__ import annotations

import pytest

from tests.certify import certify_passes

pytest.importorskip("triton")
pytest.importorskip("dshal_triton")


@pytest.mark.slow
@pytest.mark.xdist_group("triton-certify")
def test_certify_triton_quick_under_the_interpreter_passes(tmp_path):
    cert = certify_passes("triton", "--quick", tmp_path, DSHAL_TRITON_INTERPRET="1",
                          TRITON_INTERPRET="1")
    assert cert["device"]["target"] == "torch arrays on cpu:0"
    assert "interpreter" in cert["device"]["name"]
