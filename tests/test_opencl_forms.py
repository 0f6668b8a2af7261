"""The 3.1a forms (varlen, paged, block_keys) on the OpenCL kernels (PoCL's CPU device in CI),
against the float64 reference and the numpy backend; the whole conformance of the forms is
``dshal certify opencl``. The forms run as one launch per stage (``attn_seq_*``), and a decode
given block_keys reads only the keys it attends."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import dshal
import dshal.reference as ref
from tests.requirements import require_backend
from tests.serving_data import paged_block_keys, ragged

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


def test_block_keys_contiguous_follow_the_summaries():
    """Summaries that disagree with the block means: the selection follows them."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
               ((2, 4, 9, 16), (2, 2, 64, 16), (2, 2, 64, 16)))
    bk = (3 * rng.standard_normal((2, 2, 64 // BS, 16))).astype(np.float32)
    form = dict(block_keys=bk, top_k=2, block_size=BS, causal=True)
    got = dshal.ops.sparse_attention(q, k, v, backend="opencl", return_indices=True,
                                     return_lse=True, **form)
    want = ref.sparse_attention(q, k, v, **form)
    _close(got, want)
    means = ref.sparse_attention(q, k, v, top_k=2, block_size=BS, causal=True)
    assert not np.array_equal(want[1], means[1])  # the summaries change the selection


def _paged_decode(seed: int = 6, ps: int = 32):
    """Paged decode over shuffled pages with NaN in unused slots, and its block_keys."""
    rd = ragged([1] * 5, [0, 5, 64, 200, 129], seed=seed)
    kp, vp, table, seqlens = rd.paged(ps, np.random.default_rng(seed))
    bk = paged_block_keys(kp, table, seqlens, BS)
    return np.stack(rd.qs), kp, vp, dict(block_table=table, seqlens_k=seqlens, block_keys=bk)


@pytest.mark.parametrize("kw", [dict(top_k=3, window=16, causal=True), dict(top_k=0.3),
                                dict(top_k=2, causal=True)])
def test_paged_block_keys_decode_matches_numpy_and_reference(kw):
    q, kp, vp, form = _paged_decode()
    opts = dict(block_size=BS, return_indices=True, return_lse=True, **form, **kw)
    got = dshal.ops.sparse_attention(q, kp, vp, backend="opencl", **opts)
    _close(got, dshal.ops.sparse_attention(q, kp, vp, backend="numpy", **opts))
    _close(got, ref.sparse_attention(q, kp, vp, block_size=BS, **form, **kw))


def test_varlen_block_keys_and_paged_varlen_match_reference():
    r = ragged([5, 12, 1, 0], [40, 64, 33, 9], seed=7)
    q, k, v = r.packed()
    rng = np.random.default_rng(8)
    bk = (3 * rng.standard_normal((1, 2, sum(-(-n // BS) for n in (40, 64, 33, 9)),
                                   16))).astype(np.float32)
    form = dict(cu_seqlens_q=r.cu_q, cu_seqlens_k=r.cu_k, block_keys=bk, top_k=2,
                block_size=BS, causal=True, window=3)
    got = dshal.ops.sparse_attention(q, k, v, backend="opencl", return_indices=True,
                                     return_lse=True, **form)
    _close(got, ref.sparse_attention(q, k, v, **form))
    kp, vp, table, seqlens = r.paged(16, rng)
    pform = dict(cu_seqlens_q=r.cu_q, block_table=table, seqlens_k=seqlens,
                 block_keys=paged_block_keys(kp, table, seqlens, BS), top_k=1, block_size=BS,
                 causal=True, window=4)
    got = dshal.ops.sparse_attention(q, kp, vp, backend="opencl", return_indices=True,
                                     return_lse=True, **pform)
    _close(got, ref.sparse_attention(q, kp, vp, **pform))


def test_decode_with_block_keys_reads_only_the_allowed_keys():
    """NaN in every key and value slot of the pool that no query may attend (besides the
    garbage past seqlens_k and in unused pages): the selection comes from block_keys alone and
    the attention pass reads only the window and the selected blocks, so the output is finite
    and equals the clean call's."""
    q, kp, vp, form = _paged_decode(seed=9)
    kw = dict(top_k=2, window=8, causal=True, block_size=BS)
    clean = ref.sparse_attention(q, kp, vp, **form, **kw)
    sel = clean[1]  # [B, Hkv, 1, n] blocks of each sequence and kv head
    ps = kp.shape[2]
    kp2, vp2 = kp.copy(), vp.copy()
    for b, n in enumerate(form["seqlens_k"]):
        for t in range(kp.shape[1]):
            allowed = np.zeros(n, bool)
            allowed[max(0, n - kw["window"]):n] = True
            for blk in sel[b, t, 0][sel[b, t, 0] >= 0]:
                allowed[blk * BS:(blk + 1) * BS] = True
            for j in np.flatnonzero(~allowed):
                page = form["block_table"][b, j // ps]
                kp2[page, t, j % ps] = np.nan
                vp2[page, t, j % ps] = np.nan
    got = dshal.ops.sparse_attention(q, kp2, vp2, backend="opencl", return_indices=True,
                                     return_lse=True, **form, **kw)
    assert np.isfinite(got[0]).all() and np.isnan(kp2).sum() > kp2.size // 2
    _close(got, clean)


def test_pools_read_in_place_whatever_their_alignment_and_flags():
    """The pools are device buffers over the caller's arrays on a CPU device (no copy): a
    read-only pool and one at an odd address give the reference's result and stay as they
    were."""
    q, kp, vp, form = _paged_decode(seed=10)
    kw = dict(top_k=2, window=8, causal=True, block_size=BS)
    want = ref.sparse_attention(q, kp, vp, **form, **kw)
    raw = np.empty(kp.size + 1, kp.dtype)
    odd = raw[1:].reshape(kp.shape)  # 4 bytes past an aligned allocation
    odd[...] = kp
    vp.flags.writeable = False
    before = (odd.copy(), vp.copy())
    got = dshal.ops.sparse_attention(q, odd, vp, backend="opencl", return_indices=True,
                                     return_lse=True, **form, **kw)
    _close(got, want)
    np.testing.assert_array_equal(odd, before[0])
    np.testing.assert_array_equal(vp, before[1])


def _launches(monkeypatch) -> list[str]:
    """The names of the kernels the OpenCL sessions launch from now on (empty sizes skipped)."""
    from dshal_opencl import device

    launches: list[str] = []
    run = device.Session.run

    def counted(self, kernel, size, *args):
        if min(size) > 0:
            launches.append(kernel.function_name)
        return run(self, kernel, size, *args)

    monkeypatch.setattr(device.Session, "run", counted)
    return launches


def test_one_launch_per_stage_whatever_the_sequence_count(monkeypatch):
    """The whole varlen/paged call runs in a fixed number of kernel launches: no loop over
    sequences on the host. A decode reads its keys in place; a prefill converts them once."""
    launches = _launches(monkeypatch)
    decode, prefill = [], []
    for S in (2, 24):
        rd = ragged([1] * S, [40 + 7 * s for s in range(S)], seed=S)
        kp, vp, table, seqlens = rd.paged(16, np.random.default_rng(S))
        launches.clear()
        dshal.ops.sparse_attention(np.stack(rd.qs), kp, vp, backend="opencl", top_k=2,
                                   block_size=BS, causal=True, block_table=table,
                                   seqlens_k=seqlens, return_indices=True)
        decode.append(list(launches))
        rp = ragged([20 + s for s in range(S)], [20 + s for s in range(S)], seed=S)
        q, k, v = rp.packed()
        launches.clear()
        dshal.ops.sparse_attention(q, k, v, backend="opencl", top_k=2, block_size=BS,
                                   causal=True, cu_seqlens_q=rp.cu_q, cu_seqlens_k=rp.cu_k)
        prefill.append(list(launches))
    assert decode[0] == decode[1] == ["attn_seq_means", "attn_seq_scores", "attn_seq_topk",
                                      "attn_seq_fwd", "attn_compact"]
    assert prefill[0] == prefill[1] == ["attn_seq_means", "attn_seq_scores", "attn_seq_topk",
                                        "attn_seq_prep", "attn_seq_fwd"]


def test_opencl_declares_the_serving_forms():
    spec = _BACKEND.spec
    assert spec.plugin_api[1] >= 2
    features = spec.capabilities["sparse_attention"].features
    assert {"varlen", "paged", "block_keys"} <= features


def test_quick_paged_opencl_runs_at_tiny_sizes(tmp_path):
    """benchmarks/quick_paged_opencl.py prints its tables, with a --before tree (here this
    checkout's kernels again, linked under tmp_path) timed in a child process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "dshal_kernels").symlink_to(root / "kernels")
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "quick_paged_opencl.py"),
                          "--repeat", "1", "--lengths", "96,200", "--block-size", "16",
                          "--before", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("### ") == 2 and run.stdout.count("| opencl before") == 2
    assert "opencl + block_keys" in run.stdout and "numpy + block_keys" in run.stdout


def test_varlen_autograd_through_opencl_matches_numpy():
    """Packed-sequence training on opencl: the forward runs attn_seq_*, the backward per
    sequence with its selection; out and gradients equal the numpy backend's."""
    torch = pytest.importorskip("torch")
    import dshal.torch as dt

    r = ragged([5, 17, 0, 9], [5, 17, 0, 9], seed=11)
    cu = torch.from_numpy(r.cu_q)
    leaves = [torch.from_numpy(x).requires_grad_() for x in r.packed()]
    got = {}
    for backend in ("opencl", "numpy"):
        out = dt.sparse_attention(*leaves, top_k=1, block_size=4, window=3, causal=True,
                                  cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
        got[backend] = (out, *torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(got["opencl"], got["numpy"]):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-4,
                                   atol=1e-5)
