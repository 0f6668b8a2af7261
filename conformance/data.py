"""The inputs of a case: numpy arrays built from the case's parameters and a seeded generator.

Every builder is deterministic in ``(params, rng)``; :func:`build` seeds the generator from the
run's seed and the case id, so ``dshal certify NAME --case ID --seed N`` rebuilds exactly the
arrays a certificate reports. ``params["data"]`` picks an adversarial variant and
``params["layout"]`` a memory layout (contiguous, transposed, strided or reversed views).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dshal import reference
from dshal.dtypes import QMAX, STORAGE_DTYPE, numpy_dtype
from dshal_conformance import backward


@dataclass
class Call:
    """Positional arrays and keyword arguments of one operator call (host numpy arrays)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """The generator of one case: a function of the run's seed and the case id only."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def layout(x: np.ndarray, how: str) -> np.ndarray:
    """The same values in another memory layout (a view that is not C-contiguous)."""
    if how == "contiguous" or x.ndim == 0 or (how == "transposed" and x.ndim < 2):
        return x
    if how == "transposed":  # two axes stored swapped: BSHD attention, column-major b
        axes = (x.ndim - 3, x.ndim - 2) if x.ndim >= 3 else (0, 1)
        return np.ascontiguousarray(np.swapaxes(x, *axes)).swapaxes(*axes)
    if how == "strided":
        wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == "reversed":  # negative strides
        return x[..., ::-1].copy()[..., ::-1]
    raise ValueError(f"layout {how!r}")


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float64).astype(numpy_dtype(dtype))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * sigma


def _bump_ulp(x: np.ndarray) -> np.ndarray:
    """Every element moved by one unit in the last place (float16/bfloat16/float32)."""
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    bits = x.copy().view(width)
    bits += np.ones((), width)
    return bits.view(x.dtype)


# --- sparse_attention -------------------------------------------------------------------------


def attention(p: dict[str, Any], rng: np.random.Generator) -> Call:
    """q, k, v and options; variants: normal, big-logits, ties, nan-outside (cases in a 3.1a
    form: :func:`dshal_conformance.forms.build`)."""
    if "form" in p:
        from dshal_conformance.forms import build

        return build(p, rng)
    B, Hq, Hkv, Lq, Lk, D = (p[n] for n in ("B", "Hq", "Hkv", "Lq", "Lk", "D"))
    Dv = p.get("Dv", D)
    dtype, data = p["dtype"], p.get("data", "normal")
    opts = dict(p.get("opts", {}))
    sigma = 100.0 if data == "big-logits" else 1.0
    q = _cast(_normal(rng, (B, Hq, Lq, D), sigma), dtype)
    k = _cast(_normal(rng, (B, Hkv, Lk, D), sigma), dtype)
    v = _cast(_normal(rng, (B, Hkv, Lk, Dv)), dtype)
    bs = opts.get("block_size", 64)
    nb = -(-Lk // bs)
    if data == "ties":  # exact ties (copied blocks) and near-ties (copies moved by one ulp)
        for blk in range(2, nb - 1, 2):
            src = k[:, :, (blk - 2) * bs:(blk - 1) * bs]
            dst = k[:, :, blk * bs:(blk + 1) * bs]
            dst[...] = src if blk % 4 == 2 else _bump_ulp(src)
    if opts.get("indices") == "random":
        n = max(1, min(4, nb + 1))
        opts["indices"] = rng.integers(-1, max(nb, 1), size=(B, Hkv, Lq, n)).astype(np.int64)
        if nb == 0:
            opts["indices"][...] = -1
    if data == "nan-outside":
        _poison_unreachable(q, k, v, opts)
    return Call((layout(q, p.get("layout", "contiguous")), layout(k, p.get("layout",
                "contiguous")), layout(v, p.get("layout", "contiguous"))), opts)


def _poison_unreachable(q: np.ndarray, k: np.ndarray, v: np.ndarray, opts: dict) -> None:
    """Put NaN/Inf into every key and value that no query may attend.

    The selection is computed on the clean data; poisoning only blocks nobody selected keeps
    it unchanged (their scores become non-finite and rank last).
    """
    B, Hkv, Lk, D = k.shape
    Lq = q.shape[2]
    bs, causal = opts.get("block_size", 64), opts.get("causal", False)
    scale = opts.get("scale") or (1 / math.sqrt(D) if D else 1.0)
    selection = opts.get("indices")
    if opts.get("top_k") is not None:
        scores = reference.selection_scores(q, k, bs, scale) if opts.get("block_keys") is None \
            else reference.summary_scores(q, opts["block_keys"], scale)
        selection = reference.select_blocks(scores, opts["top_k"], Lq, Lk, bs, causal)
    allowed = reference.allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=bs,
                                     window=opts.get("window", 0), causal=causal,
                                     indices=selection)
    never = ~allowed.any(axis=2)  # [B, Hkv, Lk]
    b, t, j = np.nonzero(never)
    poison = np.where(np.arange(j.size) % 3 == 0, np.nan,
                      np.where(np.arange(j.size) % 3 == 1, np.inf, -np.inf))
    k[b, t, j] = poison[:, None].astype(k.dtype)
    v[b, t, j] = np.array(np.nan).astype(v.dtype)


# --- quantize and gemm ------------------------------------------------------------------------


def _float_data(rng: np.random.Generator, shape: tuple[int, ...], data: str, group: int,
                qmax: float = QMAX["fp8_e4m3"]) -> np.ndarray:
    """Float64 test data: normal, wide-range, outliers, zero-groups, subnormal, cancel,
    overflow, ties, specials."""
    x = _normal(rng, shape)
    if not x.size:
        return x
    last = shape[-1]
    groups = np.arange(last) // group
    if data == "wide-range":  # group magnitudes over 8 decades
        x = x * 10.0 ** rng.uniform(-4, 4, size=(*shape[:-1], int(groups.max()) + 1))[
            ..., groups]
    elif data == "outliers":
        x = np.where(rng.random(shape) < 0.01, x * 1000.0, x)
    elif data == "zero-groups":
        x = np.where((groups % 3 == 1)[(None,) * (len(shape) - 1)], 0.0, x)
    elif data == "subnormal":
        # odd groups hold float32 subnormals whose amax is 1.49 qmax units of 2**-149: the
        # scale amax / qmax rounds down to one unit, so x / scale reaches 1.49 qmax and only
        # saturation keeps the values finite
        odd = (groups % 2 == 1)[(None,) * (len(shape) - 1)]
        peak = np.maximum.reduceat(np.abs(x), np.arange(0, last, group), axis=-1)[..., groups]
        tiny = x / np.where(peak > 0, peak, 1.0) * math.floor(1.49 * qmax) * 2.0**-149
        x = np.where(odd, tiny, x)
    elif data == "overflow":  # products near float16's largest value
        x = np.abs(x) * 200.0 + 100.0
    elif data == "specials":  # rounding precisions: Inf, NaN, beyond float16, subnormal
        flat = x.reshape(-1)
        picks = [np.inf, -np.inf, np.nan, 70000.0, -1e5, 1e-6, 3e-8, 1e-40]
        flat[: len(picks)] = picks[: flat.size]
        rng.shuffle(flat)
    return x


def tie_values(precision: str) -> np.ndarray:
    """Values that fall exactly halfway between two codes of ``precision`` at scale 1, plus
    the format's largest value (so that the scale is exactly 1)."""
    qmax = QMAX[precision]
    if precision == "int8":
        mids = np.arange(-127, 127) + 0.5
    else:
        codes = np.arange(256, dtype=np.uint8).view(numpy_dtype(STORAGE_DTYPE[precision]))
        vals = np.unique(codes.astype(np.float64))
        vals = vals[np.isfinite(vals) & (np.abs(vals) <= qmax)]
        mids = (vals[1:] + vals[:-1]) / 2
    return np.concatenate([[qmax], mids])


def quantize(p: dict[str, Any], rng: np.random.Generator) -> Call:
    """x and options of ``quantize``."""
    shape, data = tuple(p["shape"]), p.get("data", "normal")
    g = p.get("group_size", 128)
    if data == "ties":  # every group holds qmax (scale 1) and otherwise exact ties
        x = np.resize(tie_values(p["precision"]), shape) if math.prod(shape) else np.zeros(shape)
        x = x * np.where(rng.random(shape) < 0.5, 1.0, -1.0)
        anchors = {"row": (..., slice(None, None, g)), "block": (slice(None, None, g),) * 2,
                   "tensor": (0,) * len(shape)}[p.get("granularity", "row")]
        if x.size:
            x[anchors] = QMAX[p["precision"]]
    else:
        x = _float_data(rng, shape, data, g, QMAX.get(p["precision"], QMAX["fp8_e4m3"]))
    x = layout(_cast(x, p["dtype"]), p.get("layout", "contiguous"))
    return Call((x, p["precision"]), {"granularity": p.get("granularity", "row"),
                                      "group_size": g})


def _prequantized(x: np.ndarray, precision: str, how: str | None, g: int, rows: bool
                  ) -> tuple[np.ndarray, Any]:
    """Storage values and scale of ``x`` (a: per row/group; b: per column/block)."""
    if how is None:  # raw storage values, scale 1
        values, _ = reference.quantize(x, precision, granularity="tensor")
        return values, None
    if how == "tensor":
        values, s = reference.quantize(x, precision, granularity="tensor")
        return values, float(s)
    if rows:  # a [..., M, K]: "row" = one scale per row, "group" = per group of g along K
        values, s = reference.quantize(x, precision, granularity="row",
                                       group_size=max(1, x.shape[-1]) if how == "row" else g)
        return values, s
    if how == "col":  # b [K, N]: one scale per column
        values, s = reference.quantize(np.ascontiguousarray(x.T), precision,
                                       granularity="row", group_size=max(1, x.shape[0]))
        return np.ascontiguousarray(values.T), np.ascontiguousarray(s.T)
    return reference.quantize(x, precision, granularity="block", group_size=g)


def _extreme_int8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """int8 storage values at the ends of the range, -128 included (sums overflow int16)."""
    return rng.choice(np.array([-128, -127, -126], np.int8), size=shape)


def gemm(p: dict[str, Any], rng: np.random.Generator) -> Call:
    """a, b and options of ``gemm`` (prequantised fp8/int8 storage with scales, or floats)."""
    batch, M, K, N = tuple(p.get("batch", ())), p["M"], p["K"], p["N"]
    g, data, dtype = p.get("group_size", 128), p.get("data", "normal"), p["dtype"]
    qmax = QMAX.get(p.get("precision") or p.get("prequant") or "", QMAX["fp8_e4m3"])
    a64 = _float_data(rng, (*batch, M, K), data, g, qmax)
    b64 = _float_data(rng, (K, N), "normal" if data == "cancel" else data, g, qmax)
    if data == "cancel" and K >= 2:  # a_i . b_j cancels to ~0 with large terms
        half = K // 2
        b64[half: 2 * half] = b64[:half]
        a64[..., half: 2 * half] = -a64[..., :half] * (1 + 2.0**-20)
    kwargs: dict[str, Any] = {"group_size": g}
    store = p.get("prequant")
    if store is not None:
        if data == "extreme":
            a, sa = _extreme_int8(rng, a64.shape), None
            b, sb = _extreme_int8(rng, b64.shape), None
        else:
            a, sa = _prequantized(a64, store, p.get("a_scale"), g, rows=True)
            b, sb = _prequantized(b64, store, p.get("b_scale"), g, rows=False)
        if sa is not None:
            kwargs["a_scale"] = sa
        if sb is not None:
            kwargs["b_scale"] = sb
        bias_dtype = "float32"
    else:
        a, b = _cast(a64, dtype), _cast(b64, dtype)
        bias_dtype = dtype
    for name in ("precision", "out_dtype", "tolerance", "candidates", "return_info"):
        if p.get(name) is not None:
            kwargs[name] = tuple(p[name]) if name == "candidates" else p[name]
    if p.get("bias"):
        kwargs["bias"] = _cast(_normal(rng, (N,)), bias_dtype)
    lay = p.get("layout", "contiguous")
    return Call((layout(a, lay), layout(b, lay)), kwargs)


# --- gated_channels ---------------------------------------------------------------------------


def gated(p: dict[str, Any], rng: np.random.Generator) -> Call:
    """x, gate logits, optional weight and bias, options; variants: normal, ties, big-logits,
    nan-closed (NaN/Inf in everything a closed channel owns)."""
    lead, c_in, c_out = tuple(p["lead"]), p["C"], p.get("Cout")
    dtype, data = p["dtype"], p.get("data", "normal")
    opts = dict(p.get("opts", {}))
    width = c_in if c_out is None else c_out
    gshape = (*lead, width) if p.get("row_gates") else (width,)
    logits = _normal(rng, gshape, 2.0)
    if data == "ties":  # repeated values and NaN
        logits = np.round(logits)
        logits.reshape(-1)[::7] = np.nan
    elif data == "big-logits":
        logits = np.sign(logits) * 1e4 + logits
    x = _normal(rng, (*lead, c_in))
    weight = None if c_out is None else _normal(rng, (c_out, c_in)) / math.sqrt(max(c_in, 1))
    bias = _normal(rng, (c_out,)) if c_out is not None and p.get("bias") else None
    logits = _cast(logits, p.get("logit_dtype", dtype))
    if data == "nan-closed":
        is_open = reference.gate_open(logits, mode=opts.get("mode", "hard"),
                                      threshold=opts.get("threshold", 0.0),
                                      keep=opts.get("keep"))
        closed_everywhere = ~is_open.reshape(-1, width).any(axis=0) if is_open.size else \
            np.ones(width, bool)
        if weight is not None:
            weight[closed_everywhere] = np.nan
            weight[closed_everywhere, ::2] = np.inf
            if bias is not None:
                bias[closed_everywhere] = np.nan
        else:
            x[..., closed_everywhere] = np.nan
    lay = p.get("layout", "contiguous")
    kwargs = dict(opts)
    if weight is not None:
        kwargs["weight"] = layout(_cast(weight, dtype), lay)
    if bias is not None:
        kwargs["bias"] = _cast(bias, dtype)
    return Call((layout(_cast(x, dtype), lay), logits), kwargs)


BUILDERS: dict[str, Callable[[dict[str, Any], np.random.Generator], Call]] = {
    "sparse_attention": attention,
    "quantize": quantize,
    "gemm": gemm,
    "gated_channels": gated,
    backward.OP: backward.build,
}

