"""dshal's sparse attention as a Hugging Face transformers attention implementation.

Importing this module registers ``"dshal_sparse"`` with transformers' public
``AttentionInterface`` (and its mask builder with ``AttentionMaskInterface``), so that::

    import dshal.integrations.transformers
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="dshal_sparse")
    model.set_attn_implementation("dshal_sparse")      # or switch an existing model

runs every attention layer through :func:`dshal.ops.sparse_attention` (and, for tensors that
require grad or under ``torch.compile``, through ``torch.ops.dshal.sparse_attention``).

Sparsity settings (:class:`Sparsity`: ``top_k``, ``block_size``, ``window``) come, first found
first, from the :func:`sparsity` context manager, from ``config.dshal_sparse`` (a dict, saved
with the config), or from the defaults ``top_k=16, block_size=64, window=128``. What the model
passes is honoured: its causal flag, grouped-query heads (``num_key_value_heads``), its
``scaling``, a layer's sliding window (that layer runs its window exactly, densely: dshal's
``window`` is a union with the selected blocks, so a model's window, which is a restriction,
cannot also select blocks), KV-cache decode (``Lq = 1`` against the cache, bottom-right aligned)
and padding masks of left-padded batches (each sequence attends from its first real key, its
blocks numbered from there). A mask it cannot express (right padding, packed sequences, custom
masks) raises ``ValueError``; so do dropout, ``softcap`` and attention sinks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from dshal.integrations import require

require("transformers", "transformers", minimum="5")

import torch  # noqa: E402  (after the check that names the extra)
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import dshal  # noqa: E402

__all__ = ["DEFAULT", "NAME", "Sparsity", "attention_forward", "build_mask", "left_padding",
           "settings_for", "sparsity"]

#: the ``attn_implementation`` name this module registers
NAME = "dshal_sparse"


class Sparsity(NamedTuple):
    """Sparsity of ``dshal_sparse`` attention (the :func:`dshal.ops.sparse_attention` options).

    :param top_k: key blocks selected per query besides its own (int count, or a float in
        (0, 1] as a fraction of its candidate blocks); ``None``: no selection (dense, or the
        window alone when ``window > 0``).
    :param block_size: keys per block.
    :param window: keys within this distance of the query are always attended (0 = none).
    """

    top_k: int | float | None = 16
    block_size: int = 64
    window: int = 128


#: the settings used when neither :func:`sparsity` nor ``config.dshal_sparse`` gives them
DEFAULT = Sparsity()
_ACTIVE: list[Sparsity] = []  # the sparsity() stack (a list: torch.compile traces it)


def _settings(given: Mapping[str, Any] | Sparsity, source: str) -> Sparsity:
    if isinstance(given, Sparsity):
        return given
    if not isinstance(given, Mapping):
        raise TypeError(f"{source} must be a dict with keys {sorted(Sparsity._fields)}, "
                        f"got {type(given).__name__}")
    unknown = sorted(set(given) - set(Sparsity._fields))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown} (allowed: "
                         f"{', '.join(Sparsity._fields)})")
    return DEFAULT._replace(**given)


@contextlib.contextmanager
def sparsity(**settings: Any) -> Iterator[Sparsity]:
    """Use these sparsity settings for ``dshal_sparse`` attention inside the block (they win
    over ``config.dshal_sparse``; unnamed settings keep their defaults). Per process, not per
    thread."""
    chosen = _settings(settings, "sparsity()")
    _ACTIVE.append(chosen)
    try:
        yield chosen
    finally:
        _ACTIVE.pop()


def settings_for(config: Any) -> Sparsity:
    """The settings a layer of a model with ``config`` runs with now."""
    if _ACTIVE:
        return _ACTIVE[-1]
    given = getattr(config, "dshal_sparse", None)
    return DEFAULT if given is None else _settings(given, "config.dshal_sparse")


# --- masks ------------------------------------------------------------------------------------


def _allowed_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A transformers 4-D mask [B or 1, 1, Lq, Lk] as booleans [batch, Lq, Lk] (True = attend)."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"dshal_sparse: attention_mask of shape {tuple(mask.shape)} (allowed: "
                         "[batch, 1, Lq, Lk], one mask for all heads)")
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():  # additive: 0 attends, the dtype's minimum (or -inf) not
        allowed = mask == 0
        if not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min)).all()):
            raise ValueError("dshal_sparse: an additive attention_mask with values other than 0 "
                             "and -inf (a bias) cannot be expressed")
    else:
        raise TypeError(f"dshal_sparse: attention_mask dtype {mask.dtype} (allowed: bool or a "
                        "floating additive mask)")
    return allowed[:, 0].expand(batch, -1, -1)


def _model_mask(lq: int, lk: int, causal: bool, window: int | None,
                device: torch.device) -> torch.Tensor:
    """The [Lq, Lk] mask a model's causal flag and sliding window mean, bottom-right aligned."""
    p = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    allowed = j <= p if causal else torch.ones(lq, lk, dtype=torch.bool, device=device)
    if window:
        allowed = allowed & ((p - j).abs() < window)
    return allowed


def left_padding(mask: torch.Tensor, batch: int, lq: int, causal: bool,
                 window: int | None) -> tuple[int, list[int]]:
    """Read a padding mask as ``(end, starts)``: keys ``[starts[b], end)`` are sequence b's
    (left padding before them; unwritten static-cache slots from ``end`` on), checked exactly
    against the model's causal and window pattern. Anything else raises ``ValueError``."""
    allowed = _allowed_mask(mask, batch)
    used = allowed.any(dim=1)  # [B, Lk]: keys some query attends
    columns = torch.nonzero(used.any(dim=0))
    end = int(columns[-1]) + 1 if len(columns) else 0
    starts = [int(torch.nonzero(row)[0]) if bool(row.any()) else end for row in used[:, :end]]
    expected = _model_mask(lq, end, causal, window, mask.device).expand(batch, -1, -1)
    keys = torch.arange(end, device=mask.device)
    expected = expected & (keys[None, None, :] >= torch.tensor(starts, device=mask.device)
                           [:, None, None])
    if not torch.equal(allowed[..., :end], expected):
        raise ValueError(
            "dshal_sparse: this attention_mask cannot be expressed: dshal runs causal or "
            "sliding-window attention (bottom-right aligned) over each sequence's keys, with "
            "left padding only; right-padded batches, packed sequences and custom masks are "
            "not supported (pad on the left, e.g. tokenizer.padding_side = 'left', or run "
            "sequences one at a time)")
    return end, starts


def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
               kv_offset: Any = 0, *args: Any, attention_mask: torch.Tensor | None = None,
               allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """The mask builder registered for ``dshal_sparse`` (transformers' mask-interface
    signature): ``None`` when the layer's own pattern says everything (no padding, no custom
    or packed pattern, queries bottom-right aligned with the keys), which the attention
    function expresses with dshal's options, without an Lq x Lk tensor and without reading
    data (so ``torch.compile`` traces it); otherwise transformers' boolean sdpa mask, which
    :func:`left_padding` reads."""
    if attention_mask is not None and not torch.compiler.is_compiling() \
            and bool(attention_mask.all()):
        attention_mask = None  # a padding mask without padding
    aligned = type(q_offset) is int and type(kv_offset) is int \
        and q_offset + q_length == kv_offset + kv_length
    if allow_is_causal_skip and attention_mask is None and aligned:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, *args,
                     attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)


# --- the attention function -------------------------------------------------------------------


def _refuse(dropout: float, softcap: float | None, s_aux: Any, output_attentions: bool) -> None:
    if dropout:
        raise ValueError(f"dshal_sparse: attention dropout={dropout} (allowed: 0; set the "
                         "config's attention_dropout to 0)")
    if softcap is not None:
        raise ValueError(f"dshal_sparse: softcap={softcap} is not supported (allowed: None)")
    if s_aux is not None:
        raise ValueError("dshal_sparse: attention sinks (s_aux) are not supported")
    if output_attentions:
        raise ValueError("dshal_sparse: output_attentions=True is not supported (dshal never "
                         "forms the attention matrix)")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, s_aux: Any = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``dshal_sparse`` attention function (transformers' attention-function signature).

    :param query: [B, Hq, Lq, D]; ``key``/``value`` [B, Hkv, Lk, D] (GQA: Hq % Hkv == 0).
    :param attention_mask: None, or the 4-D mask built by the registered mask function.
    :param scaling: the model's score scale (default 1/sqrt(D)).
    :param is_causal: default ``module.is_causal`` (True when absent).
    :param sliding_window: the layer's window (default ``module.sliding_window``).
    :return: ``(out [B, Lq, Hq, Dv], None)``: no attention weights.
    """
    _refuse(dropout, softcap, s_aux, kwargs.get("output_attentions", False))
    settings = settings_for(getattr(module, "config", None))
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = sliding_window if sliding_window is not None else \
        getattr(module, "sliding_window", None)
    if window:  # the layer's window, exactly (a selection would attend outside it)
        options = {"top_k": None, "window": int(window)}
    else:
        options = {"top_k": settings.top_k, "window": settings.window}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dshal.ops.sparse_attention(q, k, v, block_size=settings.block_size,
                                          causal=causal, scale=scaling, **options)

    B, _, Lq, _ = query.shape
    if attention_mask is None:
        if causal and 1 < Lq < key.shape[2]:  # static-cache prefill: the slots past Lq are
            key, value = key[:, :, :Lq], value[:, :, :Lq]  # unwritten (sdpa crops them too)
        out = run(query, key, value)
    else:
        end, starts = left_padding(attention_mask, B, Lq, causal, window)
        out = _per_start(run, query, key[:, :, :end], value[:, :, :end], starts)
    return out.transpose(1, 2).contiguous(), None


def _per_start(run: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               starts: list[int]) -> torch.Tensor:
    """Run the sequences of a left-padded batch on their own keys, one call per distinct
    start, and put the results back in batch order."""
    distinct = sorted(set(starts))
    if len(distinct) == 1:
        s = distinct[0]
        return run(q, k[:, :, s:], v[:, :, s:])
    parts, order = [], []
    for s in distinct:
        rows = [b for b, start in enumerate(starts) if start == s]
        index = torch.tensor(rows, device=q.device)
        parts.append(run(q.index_select(0, index), k.index_select(0, index)[:, :, s:],
                         v.index_select(0, index)[:, :, s:]))
        order += rows
    inverse = torch.argsort(torch.tensor(order, device=q.device))
    return torch.cat(parts).index_select(0, inverse)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, build_mask)
