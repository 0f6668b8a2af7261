"""dshal.serving.PagedKVCache: in-place appends, incremental block summaries, freeing, reuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dshal
from dshal.errors import DshalValueError
from dshal.serving import PagedKVCache
from tests.serving_data import block_means

ROOT = Path(__file__).resolve().parents[1]


def _np(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _arr(library, x):
    if library == "torch":
        import torch

        return torch.from_numpy(x)
    return x


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_appends_summaries_free_and_reuse(library):
    if library == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    H, D, bs, ps = 2, 8, 4, 8
    cache = PagedKVCache(12, ps, H, D, block_size=bs, library=library)
    keys: dict[int, list[np.ndarray]] = {}
    vals: dict[int, list[np.ndarray]] = {}

    def add(seq, n):
        k = rng.standard_normal((H, n, D)).astype(np.float32)
        v = rng.standard_normal((H, n, D)).astype(np.float32)
        cache.append(seq, _arr(library, k), _arr(library, v))
        keys.setdefault(seq, []).append(k)
        vals.setdefault(seq, []).append(v)

    def check(seq):
        k, v = cache.contiguous(seq)
        want_k = np.concatenate(keys[seq], axis=1)
        np.testing.assert_array_equal(_np(k), want_k)
        np.testing.assert_array_equal(_np(v), np.concatenate(vals[seq], axis=1))
        np.testing.assert_allclose(_np(cache.block_summaries(seq)), block_means(want_k, bs),
                                   rtol=1e-6, atol=1e-6)

    a, b = cache.add_sequence(), cache.add_sequence()
    add(a, 3)
    add(a, 6)   # crosses a block and a page boundary from a partial block
    add(b, 17)
    for _ in range(7):  # decode steps, one token each, crossing blocks and pages
        k = rng.standard_normal((2, H, D)).astype(np.float32)
        v = rng.standard_normal((2, H, D)).astype(np.float32)
        cache.append_step([a, b], _arr(library, k), _arr(library, v))
        for r, s in enumerate((a, b)):
            keys[s].append(k[r][:, None])
            vals[s].append(v[r][:, None])
        check(a)
        check(b)
    assert (cache.length(a), cache.length(b)) == (16, 24)
    free = cache.free_pages
    cache.free(b)
    assert cache.free_pages == free + 3
    c = cache.add_sequence()  # reuses b's pages, whose old keys and sums must not leak
    add(c, 5)
    k1 = rng.standard_normal((1, H, 1, D)).astype(np.float32)
    v1 = rng.standard_normal((1, H, 1, D)).astype(np.float32)
    cache.append_step([c], _arr(library, k1), _arr(library, v1))
    keys[c].append(k1[0])
    vals[c].append(v1[0])
    check(c)
    args = cache.attention_args([a, c])
    table = _np(args["block_table"])
    assert table.dtype == np.int32 and list(_np(args["seqlens_k"])) == [16, 6]
    assert (table[1, 1:] == -1).all()
    with pytest.raises(DshalValueError, match="is not a live sequence"):
        cache.length(b)


def test_decode_on_the_cache_equals_the_contiguous_call():
    rng = np.random.default_rng(1)
    H, Hq, D = 2, 4, 16
    cache = PagedKVCache(40, 32, H, D, block_size=8)
    seqs = [cache.add_sequence() for _ in range(3)]
    for s, n in zip(seqs, (7, 100, 64)):
        cache.append(s, rng.standard_normal((H, n, D)), rng.standard_normal((H, n, D)))
    q = rng.standard_normal((3, Hq, 1, D)).astype(np.float32)
    kw = dict(top_k=3, block_size=8, window=8, causal=True)
    out = dshal.ops.sparse_attention(q, cache.k_pages, cache.v_pages,
                                     **cache.attention_args(seqs), **kw)
    for r, s in enumerate(seqs):
        k, v = cache.contiguous(s)
        want = dshal.ops.sparse_attention(q[r:r + 1], k[None], v[None], **kw)
        np.testing.assert_allclose(out[r], want[0], rtol=1e-5, atol=1e-5)


def test_errors_name_what_is_wrong():
    cache = PagedKVCache(2, 8, 1, 4, block_size=4)
    s = cache.add_sequence()
    with pytest.raises(DshalValueError, match="2 free pages, 3 more are needed"):
        cache.append(s, np.zeros((1, 17, 4)), np.zeros((1, 17, 4)))
    with pytest.raises(DshalValueError, match=r"k must have shape \[1, n, 4\]"):
        cache.append(s, np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(DshalValueError, match="must not repeat"):
        cache.append_step([s, s], np.zeros((2, 1, 4)), np.zeros((2, 1, 4)))
    with pytest.raises(DshalValueError, match="page_size \\(6\\) must be a multiple"):
        PagedKVCache(2, 6, 1, 4, block_size=4)


def test_serve_decode_example_runs():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_decode.py"), "--steps",
                          "6"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "max |paged - contiguous|" in run.stdout
