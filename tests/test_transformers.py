"""dshal_sparse in Hugging Face transformers: a tiny Llama (and Mistral, for a sliding window)
built from a config, no weights downloaded, compared with transformers' own sdpa attention."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def _import_hub_kernels() -> None:
    """Import the hub's ``kernels`` package (a transformers dependency) before transformers
    does: with the checkout root on sys.path (pytest puts it there), the repository's
    ``kernels/`` directory, installed as ``dshal_kernels``, would shadow it."""
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers does without it
    finally:
        sys.path[:] = saved


_import_hub_kernels()
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402

from dshal.integrations import transformers as dt  # noqa: E402

VOCAB, LENGTH, BLOCK = 64, 24, 4
DENSE = {"top_k": LENGTH // BLOCK, "block_size": BLOCK, "window": 0}  # top_k >= the blocks
SPARSE = {"top_k": 1, "block_size": BLOCK, "window": 3}
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0, eos_token_id=None)  # no early stop: every run makes all tokens


def _model(config_type=LlamaConfig, **extra):
    torch.manual_seed(0)
    cfg = config_type(**{**SMALL, **extra})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _ids(batch: int = 2, length: int = LENGTH):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _both(model, fn, settings=DENSE):
    """fn(model) with sdpa, then with dshal_sparse under ``settings``."""
    model.set_attn_implementation("sdpa")
    ref = fn(model)
    model.set_attn_implementation(dt.NAME)
    with dt.sparsity(**settings):
        got = fn(model)
    return ref, got


@torch.no_grad()
def test_dense_settings_give_sdpa_logits_and_greedy_tokens():
    model = _model()
    ids = _ids()
    ref, got = _both(model, lambda m: m(ids).logits)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # KV-cache decode: each new token attends to the cache with Lq = 1
    ref, got = _both(model, lambda m: m.generate(ids[:, :6], max_new_tokens=10,
                                                  do_sample=False))
    assert got.shape == (2, 16) and torch.equal(got, ref)


@torch.no_grad()
def test_left_padded_batch_prefill_and_generate():
    model = _model()
    ids = _ids(3, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = ids * mask  # pad token 0

    ref, got = _both(model, lambda m: m(ids, attention_mask=mask).logits)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    ref, got = _both(model, lambda m: m.generate(ids, attention_mask=mask, max_new_tokens=6,
                                                  do_sample=False))
    assert torch.equal(got, ref)


@torch.no_grad()
def test_right_padding_is_a_clear_error():
    model = _model()
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    model.set_attn_implementation(dt.NAME)
    with pytest.raises(ValueError, match="left padding only"):
        model(ids, attention_mask=mask)


@torch.no_grad()
def test_sliding_window_model():
    model = _model(MistralConfig, sliding_window=7)
    ids = _ids()
    ref, got = _both(model, lambda m: m(ids).logits, SPARSE)  # the layer's window wins
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref, got = _both(model, lambda m: m.generate(ids[:, :10], max_new_tokens=6,
                                                  do_sample=False))
    assert torch.equal(got, ref)
    mask = torch.ones_like(ids[:, :12])
    mask[1, :4] = 0  # left padding and the window together, in prefill and decode
    padded = ids[:, :12] * mask
    ref, got = _both(model, lambda m: m.generate(padded, attention_mask=mask,
                                                  max_new_tokens=8, do_sample=False), SPARSE)
    assert torch.equal(got, ref)


@torch.no_grad()
def test_settings_from_config_and_context():
    model = _model(dshal_sparse=SPARSE)
    ids = _ids()
    model.set_attn_implementation(dt.NAME)
    assert dt.settings_for(model.config) == dt.Sparsity(**SPARSE)
    sparse = model(ids).logits
    with dt.sparsity(**DENSE) as chosen:
        assert dt.settings_for(model.config) == chosen
        dense = model(ids).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(dense, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-3)  # sparsity changed the result
    assert dt.settings_for(object()) == dt.DEFAULT == dt.Sparsity(16, 64, 128)
    with pytest.raises(ValueError, match="allowed: top_k, block_size, window"):
        dt.sparsity(topk=3).__enter__()


def test_training_step_with_sparsity():
    model = _model(attention_dropout=0.0).train()
    model.set_attn_implementation(dt.NAME)
    ids = _ids()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    with dt.sparsity(**SPARSE):
        for _ in range(3):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            grads = [model.model.layers[0].self_attn.q_proj.weight.grad,
                     model.model.layers[1].self_attn.k_proj.weight.grad]
            assert all(g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0
                       for g in grads)
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dropout_is_refused():
    model = _model(attention_dropout=0.1).train()
    model.set_attn_implementation(dt.NAME)
    with pytest.raises(ValueError, match="dropout"):
        model(_ids())


def test_torch_compile_has_no_graph_break():
    # (with use_cache=False, transformers builds a packed-sequence mask from position_ids
    # while tracing, whatever the attention: a padded or packed mask is read, a graph break)
    model = _model(num_hidden_layers=1)
    model.set_attn_implementation(dt.NAME)
    ids = _ids()
    with dt.sparsity(**SPARSE), torch.no_grad():
        eager = model(ids).logits
        # fullgraph: any graph break raises (with its reason); aot_eager traces the dshal op
        # through its fake implementation without inductor's C++ compile (seconds here)
        compiled = torch.compile(lambda x: model(x).logits, fullgraph=True, backend="aot_eager")
        out = compiled(ids)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
