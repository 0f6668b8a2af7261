"""``dshal certify opencl --full`` passes on this machine's OpenCL device (PoCL in CI) and writes
its certificate: the one full OpenCL certification of the test suite. About 35 s with a warm
program cache, about 12 minutes on a fresh machine, where every kernel variant is compiled."""

from __future__ import annotations

import pytest

from tests.certify import certify_passes

pytest.importorskip("pyopencl")


@pytest.mark.slow
@pytest.mark.xdist_group("opencl-certify")
def test_certify_opencl_full_passes(tmp_path):
    certify_passes("opencl", "--full", tmp_path)
