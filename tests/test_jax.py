"""JAX: jax arrays in and out of every operator, and dshal.jax's gradients against jax.grad
of a dense masked attention written in jax.numpy."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("torch")  # dshal.jax's backward runs dshal's torch backward today

import jax.numpy as jnp  # noqa: E402

import dshal  # noqa: E402
import dshal.jax as dj  # noqa: E402


def _rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _attention_inputs(Hq=4, Hkv=2, Lq=19, Lk=19, D=8):
    return _rand(1, Hq, Lq, D, seed=1), _rand(1, Hkv, Lk, D, seed=2), _rand(1, Hkv, Lk, D, seed=3)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_jax_arrays_in_and_out_of_every_operator(dtype):
    q, k, v = (x.astype(dtype) for x in _attention_inputs())
    a, b, w = _rand(5, 33, dtype=dtype), _rand(33, 7, seed=4, dtype=dtype), _rand(6, 33, seed=5)
    logits = _rand(6, seed=6)
    calls = [
        lambda m: dshal.ops.sparse_attention(m(q), m(k), m(v), top_k=1, block_size=4,
                                             causal=True, return_indices=True),
        lambda m: dshal.ops.gemm(m(a), m(b), precision="bf16"),
        lambda m: dshal.ops.quantize(m(a), "fp8_e4m3", group_size=16),
        lambda m: dshal.ops.quantize(m(a), "int8", group_size=16),
        lambda m: dshal.ops.gated_channels(m(a.astype(np.float32)), m(logits),
                                           weight=m(w)),
    ]
    for call in calls:
        got, want = call(jnp.asarray), call(np.asarray)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g, n in zip(got, want):
            # (int64 indices arrive as int32 unless jax_enable_x64: jax's own rule)
            assert isinstance(g, jax.Array) and g.shape == n.shape
            assert g.dtype == jax.dtypes.canonicalize_dtype(n.dtype)
            np.testing.assert_array_equal(np.asarray(g), n)


def _allowed(sel, Lq, Lk, Hq, block_size, window, causal):
    """The keys each query attends: its selected blocks (or all, without a selection) and
    its window, within the visible keys; [B, Hq, Lq, Lk]."""
    p = np.arange(Lq)[:, None] + Lk - Lq
    j = np.arange(Lk)[None, :]
    visible = (j <= p) if causal else np.ones((Lq, Lk), bool)
    if sel is None:
        chosen = np.ones((1, 1, Lq, Lk), bool) if window == 0 else np.zeros((1, 1, Lq, Lk), bool)
    else:
        sel = np.asarray(sel)
        chosen = (sel[..., None] == (j // block_size)[None, None]).any(axis=3)  # [B,Hkv,Lq,Lk]
        chosen = np.repeat(chosen, Hq // sel.shape[1], axis=1)
    near = np.abs(p - j) < window if window else np.zeros((Lq, Lk), bool)
    return visible & (chosen | near)


def _dense(q, k, v, allowed, scale):
    """Masked softmax attention in jax.numpy (GQA by repeating kv heads); lse too."""
    g = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    s = jnp.where(allowed, jnp.einsum("bhid,bhjd->bhij", q, k) * scale, -jnp.inf)
    return jnp.einsum("bhij,bhjd->bhid", jax.nn.softmax(s, axis=-1), v), \
        jax.nn.logsumexp(s, axis=-1)


@pytest.mark.parametrize("options", [
    {"top_k": 1, "block_size": 4, "window": 3, "causal": True},
    {"top_k": 2, "block_size": 3, "window": 0, "causal": False},
    {"top_k": None, "block_size": 4, "window": 5, "causal": True},
    {"top_k": None, "block_size": 4, "window": 0, "causal": True, "scale": 0.3},
])
def test_attention_gradients_equal_jax_grad_of_dense_masked(options):
    q, k, v = map(jnp.asarray, _attention_inputs(Lq=13, Lk=19))
    selecting = options["top_k"] is not None
    out, *sel, lse = dj.sparse_attention(q, k, v, return_indices=selecting, return_lse=True,
                                         **options)
    sel = sel[0] if selecting else None
    opts = {n: options[n] for n in ("block_size", "window", "causal")}
    allowed = _allowed(sel, 13, 19, 4, **opts)
    scale = options.get("scale", 8 ** -0.5)
    ref_out, ref_lse = _dense(q, k, v, allowed, scale)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    w = jnp.asarray(_rand(*out.shape, seed=9))

    def loss_dshal(q, k, v):
        o, l = dj.sparse_attention(q, k, v, return_lse=True, **options)
        return (o * w).sum() + 0.5 * l.sum()

    def loss_dense(q, k, v):
        o, l = _dense(q, k, v, allowed, scale)
        return (o * w).sum() + 0.5 * l.sum()

    got = jax.grad(loss_dshal, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss_dense, argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5)
    jitted = jax.jit(jax.grad(loss_dshal, argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(jitted, got):
        np.testing.assert_array_equal(g, r)


def test_given_indices_and_forward_equal_dshal_ops():
    q, k, v = _attention_inputs()
    want, sel = dshal.ops.sparse_attention(q, k, v, top_k=2, block_size=4, causal=True,
                                           return_indices=True)
    got = dj.sparse_attention(*map(jnp.asarray, (q, k, v)), indices=jnp.asarray(sel),
                              block_size=4, causal=True)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_gemm_and_gated_channels_gradients():
    a, b, bias = map(jnp.asarray, (_rand(5, 33), _rand(33, 7, seed=1), _rand(7, seed=2)))
    got = jax.grad(lambda a, b, c: (dj.gemm(a, b, bias=c) ** 2).sum(), argnums=(0, 1, 2))(
        a, b, bias)
    want = jax.grad(lambda a, b, c: ((a @ b + c) ** 2).sum(), argnums=(0, 1, 2))(a, b, bias)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
    x, logits = jnp.asarray(_rand(4, 6)), jnp.asarray(_rand(6, seed=3))
    got = jax.grad(lambda x, z: (dj.gated_channels(x, z, mode="soft") ** 2).sum(),
                   argnums=(0, 1))(x, logits)
    want = jax.grad(lambda x, z: ((jax.nn.sigmoid(z) * x) ** 2).sum(), argnums=(0, 1))(
        x, logits)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    y, mask = jax.jit(lambda x, z: dj.gated_channels(x, z, return_mask=True))(x, logits)
    np.testing.assert_array_equal(mask, np.asarray(logits) > 0)
    np.testing.assert_array_equal(y, dshal.ops.gated_channels(np.asarray(x), np.asarray(logits)))
    values, scales = jax.jit(lambda x: dj.quantize(x, "int8", group_size=4))(x)
    want_v, want_s = dshal.ops.quantize(np.asarray(x), "int8", group_size=4)
    np.testing.assert_array_equal(values, want_v)
    np.testing.assert_array_equal(scales, want_s)


def test_bad_arguments_fail_while_tracing():
    q, k, v = map(jnp.asarray, _attention_inputs())
    with pytest.raises(ValueError, match="block_size"):
        jax.jit(lambda q: dj.sparse_attention(q, k, v, top_k=1, block_size=0))(q)


@pytest.mark.parametrize(("module", "extra"), [("dshal.jax", "jax"),
                                               ("dshal.integrations.transformers",
                                                "transformers")])
def test_missing_framework_names_the_extra(module, extra):
    code = (f"import sys; sys.modules[{extra!r}] = None\n"
            f"try:\n    import {module}\n"
            "except ImportError as e:\n    print(e)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert f"pip install 'dshal[{extra}]'" in run.stdout, run.stdout + run.stderr
