"""torch.distributed: examples/ddp_tiny.py under torchrun with 2 gloo processes on loopback
trains train_tiny's block like one process on the whole batch, and head-parallel sparse
attention gathered with all_gather equals the single-process call bitwise."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ddp_tiny.py"
SETTINGS = {"steps": 3, "batch": 8, "length": 32, "lr": 0.05, "seed": 0}


def _example():
    spec = importlib.util.spec_from_file_location("ddp_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("distributed")
def test_ddp_on_two_gloo_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "params.pt"
    flags = [f"--{name}={value}" for name, value in SETTINGS.items()]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(SCRIPT), *flags,
         f"--out={out}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
        assert (f"rank {rank}: head-parallel attention over 2 ranks bitwise equal to the "
                "single-process call") in run.stdout, run.stdout

    example = _example()
    torch.manual_seed(SETTINGS["seed"])
    model = example.train_tiny.TinyBlock()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    example.train(model, **SETTINGS)
    distributed = torch.load(out)
    assert distributed.keys() == model.state_dict().keys()
    for name, p in model.state_dict().items():
        assert not torch.equal(p, before[name]), name  # trained
        # fp32 bounds: DDP sums the two ranks' gradients (each a mean over 4 rows) where one
        # process sums 8 rows, so the rounding differs in the last bits
        torch.testing.assert_close(distributed[name], p, rtol=1e-5, atol=1e-6, msg=name)
