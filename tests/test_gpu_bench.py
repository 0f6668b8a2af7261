"""The pure parts of the GPU benchmarks (benchmarks/gpu): FLOP counting and the table.

The benchmarks themselves need a CUDA GPU (benchmarks/gpu/check.sh); what they count and
print is checked here against brute force and by hand.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu.counting import (
    Row,
    attended_keys,
    attention_flops,
    dense_causal_flops,
    gemm_flops,
    ratio,
    records,
    table,
)

ROOT = Path(__file__).resolve().parents[1]


def _brute(indices, Lq, Lk, block, window, causal):
    """Keys each query attends, by enumerating them (DESIGN 3.1)."""
    out = np.zeros(indices.shape[:-1], np.int64)
    for pos in np.ndindex(*indices.shape[:-1]):
        i = pos[-1]
        p = i + Lk - Lq
        keys = set()
        for j in range(Lk):
            visible = j <= p if causal else True
            in_window = window > 0 and abs(p - j) < window
            selected = j // block in {int(b) for b in indices[pos] if b >= 0}
            if visible and (in_window or selected):
                keys.add(j)
        out[pos] = len(keys)
    return out


@pytest.mark.parametrize("Lq,Lk,block,window,causal", [
    (20, 20, 4, 3, True), (7, 30, 5, 0, True), (12, 12, 3, 5, False), (9, 16, 4, 1, True),
])
def test_attended_keys_match_brute_force(Lq, Lk, block, window, causal):
    rng = np.random.default_rng(3)
    nb = -(-Lk // block)
    idx = np.full((1, 2, Lq, 3), -1, np.int64)
    for pos in np.ndindex(1, 2, Lq):
        chosen = rng.choice(nb, size=rng.integers(0, 4), replace=False)
        idx[pos][: chosen.size] = np.sort(chosen)
    got = attended_keys(idx, Lq, Lk, block, window, causal)
    np.testing.assert_array_equal(got, _brute(idx, Lq, Lk, block, window, causal))


def test_flop_counts():
    assert gemm_flops(8192, 8192, 8192) == 2 * 8192**3
    # dense causal, L = 4: 10 (query, key) pairs per head, 4 * D flops each
    assert dense_causal_flops(1, 2, 4, 8, 8) == 2 * 10 * 4 * 8
    assert attention_flops(10, 8, 128, 64) == 10 * 8 * 2 * (128 + 64)


def test_table_and_records_show_rates_and_ratios():
    rows = [Row("gemm", "torch.matmul", 0.002, 4e12),
            Row("gemm", "dshal cuda", 0.001, 4e12, "torch.matmul", "gemmEx"),
            Row("attn", "dshal cuda", 0.5, 1e12, "missing peer")]
    assert rows[1].tflops == pytest.approx(4000.0)
    assert ratio(rows[1], rows) == pytest.approx(2.0) and ratio(rows[0], rows) is None
    assert ratio(rows[2], rows) is None
    lines = table(rows).splitlines()
    assert lines[0].split("|")[1:-1] == [c.ljust(len(c)) for c in lines[0].split("|")[1:-1]]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "benchmark", "implementation", "time", "TFLOP/s", "vs peer", "note"]
    assert set(lines[1]) <= {"|", "-", " "}
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells == ["gemm", "dshal cuda", "1.000 ms", "4000.0", "2.00x torch.matmul", "gemmEx"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    rec = records(rows)
    assert rec[1]["ratio"] == pytest.approx(2.0) and rec[0]["ratio"] is None
    assert rec[1]["tflops"] == pytest.approx(4000.0)


def test_the_gpu_check_script_parses_and_the_bench_module_imports():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu/check.sh")], check=True)
    import benchmarks.gpu.bench as bench

    assert bench.ATTN["top_k"] == 16 and bench.ATTN["window"] == 512


def test_the_shared_gpu_bench_pieces_run_on_cpu_tensors(tmp_path, capsys):
    """The inputs, selection, fp8 peer, options and report both GPU scripts are built from,
    run on torch CPU tensors (the scripts themselves need a device)."""
    torch = pytest.importorskip("torch")
    import benchmarks.gpu.bench as bench

    q, k, v, ke, ve = bench.attention_inputs(256, device="cpu")
    assert q.shape == (bench.B, bench.HQ, 256, bench.D) and q.dtype == torch.bfloat16
    g = bench.HQ // bench.HKV
    assert ke.shape == ve.shape == q.shape
    assert torch.equal(ke[:, :g], k[:, :1].expand(-1, g, -1, -1))  # kv head 0 for its g heads
    idx, keys = bench.attention_selection(q, k, v, 256, "torch")
    assert idx.shape[:3] == (bench.B, bench.HKV, 256)
    assert 0 < keys <= bench.HKV * 256 * 256  # every key at most once per query row
    a, b, flops = bench.gemm_inputs(64, device="cpu")
    assert flops == 2 * 64 ** 3
    want = a.float() @ b.float()
    got = bench.scaled_mm_peer(a, b)().float()
    assert (got - want).norm() / want.norm() < 0.1  # e4m3 operands
    args = bench.command_line("prog", "doc\n\nmore", "gpu-bench", ["--n", "64"], backend=True)
    assert (args.backend, args.n, args.lengths, args.out) == ("cuda", 64, [8192, 32768], None)
    rows = [bench.Row("gemm", "torch.matmul", 1e-3, flops)]
    bench.report("GPU benchmarks", "a CPU", rows, tmp_path, "gpu-bench")
    assert "GPU benchmarks on a CPU" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu-bench.json").read_text())["device"] == "a CPU"
    assert (tmp_path / "gpu-bench.md").read_text().startswith("GPU benchmarks on a CPU")
