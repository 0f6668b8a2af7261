"""``dshal certify torch --full`` passes on torch's CPU device and writes its certificate (the one
full torch certification of the test suite, about 2.5 minutes here), and so does the ascend
backend's generic path on torch CPU tensors under ``DSHAL_ASCEND_DEVICE=cpu`` (about 3
minutes)."""

from __future__ import annotations

import pytest

from dshal.registry import registry
from tests.certify import certify_passes

pytest.importorskip("torch")


@pytest.mark.slow
@pytest.mark.xdist_group("torch-certify")
def test_certify_torch_full_passes(tmp_path):
    cert = certify_passes("torch", "--full", tmp_path)
    assert cert["device"]["target"] == "torch arrays on cpu:0"


@pytest.mark.slow
@pytest.mark.xdist_group("ascend-certify")
def test_certify_ascend_generic_path_on_the_cpu_passes(tmp_path):
    if "ascend" not in registry.backends():
        pytest.skip("dshal-ascend is not installed")
    cert = certify_passes("ascend", "--full", tmp_path, DSHAL_ASCEND_DEVICE="cpu")
    assert cert["device"]["target"] == "torch arrays on cpu:0"
    assert "not an NPU" in cert["device"]["name"]
