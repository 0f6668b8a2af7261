"""``import dshal`` is cheap and has no hard dependency on any vendor library."""

from __future__ import annotations

import subprocess
import sys

VENDORS = ("torch", "cupy", "pyopencl", "torch_npu", "ml_dtypes", "rich", "hypothesis")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout


def test_import_loads_no_vendor_library_and_no_plugin():
    out = _run("import sys, dshal; print(sorted(m for m in sys.modules if m.split('.')[0] in "
               f"{VENDORS!r} or m.startswith('dshal.backends')))")
    assert out.strip() == "[]"


def test_import_is_fast():
    # measured in a fresh interpreter, best of three to ignore a cold disk cache
    code = ("import time; t = time.perf_counter(); import dshal; "
            "print(time.perf_counter() - t)")
    best = min(float(_run(code)) for _ in range(3))
    assert best < 0.3, f"import dshal took {best:.3f} s"


def test_numpy_call_needs_no_torch():
    out = _run("import sys, numpy as np, dshal; "
               "dshal.ops.gated_channels(np.ones((2, 3), np.float32), np.ones(3, np.float32)); "
               "print('torch' in sys.modules)")
    assert out.strip() == "False"
