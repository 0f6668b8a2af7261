"""Every benchmark case runs once at toy sizes, so the benchmarks cannot rot (no timings)."""

from __future__ import annotations

import importlib

import pytest

from benchmarks import _harness

MODULES = ["test_attention", "test_gemm", "test_gating", "test_dispatch", "test_opencl",
           "test_training"]


@pytest.mark.parametrize("name", MODULES)
def test_cases_run_at_tiny_sizes(name: str) -> None:
    pytest.importorskip("torch")
    module = importlib.import_module(f"benchmarks.{name}")
    _harness.smoke(module.cases(tiny=True))


def test_memory_probe_and_table() -> None:
    """The subprocess memory probe reports a number for every case (the forward, and the
    training step); the table printer formats every column."""
    pytest.importorskip("torch")
    for case in importlib.import_module("benchmarks.test_memory").cases(tiny=True):
        res = _harness.peak_memory("benchmarks.test_memory", case.impl, tiny=True)
        assert res["extra_mib"] >= 0 and res["seconds"] > 0
    records = [{"impl": "a", "median": 2.0, "min": 1.0, "flops": 4e9},
               {"impl": "b", "median": 1.0, "min": 1.0, "bytes": 1e9, "peer": "a",
                "extra_mib": res["extra_mib"]}]
    text = _harness.format_table("t", _harness.table_rows(records, {"sgemm_gflops": 10.0,
                                                                     "copy_gbs": 10.0}))
    assert "2.00x vs a" in text and "GFLOP/s" in text and "GB/s" in text


def test_quick_serving_runs_at_tiny_sizes() -> None:
    """benchmarks/quick_serving.py prints its decode and prefill tables (toy sizes): two
    decode sizes, the mixed-length prefill and the many-short-sequences prefill."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "quick_serving.py"),
                          "--tiny", "--repeat", "1"], capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("### ") == 4 and "dshal paged + block_keys" in run.stdout
    assert "varlen prefill 2 sequences of 3-5 tokens" in run.stdout


def test_quick_serving_torch_tables_at_tiny_sizes() -> None:
    """``quick_serving.py --torch`` prints the torch backend's decode (per-sequence against
    batched) and prefill tables, ``--torch-chunks`` its queries-per-sequence tables (toy
    sizes)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "quick_serving.py"),
                          "--tiny", "--torch", "--repeat", "1"], capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("### ") == 3 and "dshal torch, batched (after)" in run.stdout
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "quick_serving.py"),
                          "--tiny", "--torch-chunks", "--threads", "1", "--repeat", "1"],
                         capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.startswith("torch threads: 1;") and run.stdout.count("### ") == 2
