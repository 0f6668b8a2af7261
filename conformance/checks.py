"""One check per operator: a backend's result against the float64 reference.

Each check recomputes the case with :mod:`dshal.reference` from the inputs the backend saw
(its own rounded/quantised operands for gemm), derives the bound terms of
:mod:`.tolerance` and returns a :class:`Verdict`: the gates' measurements plus any exact-match
problems (selection validity, masks, quantised codes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dshal import reference
from dshal.dtypes import (
    DTYPE_UNIT_ROUNDOFF,
    FLOAT_DTYPES,
    QMAX,
    QUANT_DTYPES,
    QUANTIZED_PRECISIONS,
    STORAGE_DTYPE,
    numpy_dtype,
)
from dshal_conformance import backward, selection
from dshal_conformance import tolerance as tol
from dshal_conformance.data import Call
from dshal_conformance.gates import Bound, Measurement, finite_abs, first_index, measure

U32 = DTYPE_UNIT_ROUNDOFF["float32"]

#: quantize(x, precision, granularity, group_size) -> (values, scales) on the host, as the
#: backend under test computes it (or the reference's when it does not declare it)
Quantizer = Callable[[np.ndarray, str, str, int], tuple[np.ndarray, Any]]


@dataclass
class Verdict:
    """What a check found: gate measurements and exact-match problems."""

    measurements: list[Measurement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No problem and every gate passed."""
        return not self.problems and all(m.passed for m in self.measurements)

    def message(self) -> str:
        """The reasons of a failure, one per line."""
        lines = list(self.problems)
        lines += [m.describe() for m in self.measurements if not m.passed]
        return "; ".join(lines)


def _dtype(x: np.ndarray) -> str:
    return np.dtype(x.dtype).name


def exact_measurement(name: str, ratio: np.ndarray, got: np.ndarray, want: np.ndarray
                      ) -> Measurement:
    """A measurement of an exact comparison: ratio 0 for equal elements, in (0, 1] for
    accepted near-ties, inf for mismatches."""
    worst, top = None, 0.0
    if ratio.size:
        at = int(np.argmax(ratio))
        top = float(ratio.flat[at])
        if top > 0:
            worst = {"index": tuple(int(i) for i in np.unravel_index(at, ratio.shape)),
                     "value": float(got.flat[at]), "reference": float(want.flat[at]),
                     "err": abs(float(got.flat[at]) - float(want.flat[at])), "bound": 0.0,
                     "ratio": top}
    return Measurement(name, int(ratio.size), top, 0.0, worst, ratio.reshape(-1)[:1024].copy())


# --- sparse_attention -------------------------------------------------------------------------


def _unpack(result: Any, flags: tuple[bool, ...]) -> list[Any]:
    """A result tuple holding only the requested outputs -> one slot per possible output."""
    items = list(result) if sum(flags) else [result]
    slots: list[Any] = [items.pop(0)]
    for flag in flags:
        slots.append(items.pop(0) if flag else None)
    return [None if s is None else np.asarray(s) for s in slots]


def check_attention(call: Call, result: Any, rng: np.random.Generator,
                    quantizer: Quantizer | None = None) -> Verdict:
    """sparse_attention: the returned selection's validity, then out (and lse) against the
    reference computed with that selection. Calls in the varlen and paged forms are judged
    sequence by sequence (:mod:`.forms`)."""
    o = call.kwargs
    if any(o.get(n) is not None for n in FORM_CALLS):
        from dshal_conformance.forms import check_forms

        return check_forms(call, result, rng)
    q, k, v = (np.asarray(a) for a in call.args)
    out, sel, lse = _unpack(result, (bool(o.get("return_indices")), bool(o.get("return_lse"))))
    terms = attention_terms(q, k, v, o, sel)
    return attention_verdict(terms, out, lse, _dtype(q), rng)


#: keyword arguments that make a call varlen or paged
FORM_CALLS = ("cu_seqlens_q", "cu_seqlens_k", "block_table", "seqlens_k")


@dataclass
class AttentionTerms:
    """What the gates of one (contiguous) attention call are built from, [B, Hq, Lq(, Dv)]
    arrays; selection problems and notes found on the way."""

    ref_out: np.ndarray
    mag: np.ndarray
    pv2: np.ndarray
    n_keys: np.ndarray
    delta: np.ndarray
    p_max: np.ndarray
    ref_lse: np.ndarray
    ignore: np.ndarray | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def attention_terms(q: np.ndarray, k: np.ndarray, v: np.ndarray, o: dict[str, Any],
                    sel: np.ndarray | None) -> AttentionTerms:
    """The reference and bound terms of a contiguous call (``o``: its options; ``sel``: the
    indices it returned, or None), judged with the returned selection when it is valid."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv if Hkv else 1  # no heads: nothing is grouped
    bs, window, causal = o.get("block_size", 64), o.get("window", 0), o.get("causal", False)
    scale = o.get("scale")
    scale = (1.0 / math.sqrt(D) if D else 1.0) if scale is None else float(scale)
    dtype = _dtype(q)
    acc = "float64" if dtype == "float64" else "float32"
    u_acc, u_in = DTYPE_UNIT_ROUNDOFF[acc], DTYPE_UNIT_ROUNDOFF[dtype]
    problems: list[str] = []
    notes: list[str] = []
    blocks, ignore = o.get("indices"), None  # the selection the output is judged with
    nb = -(-Lk // bs)
    if o.get("top_k") is not None:
        geo = selection.geometry(q, k, o["top_k"], bs, scale, causal, u_in, u_acc,
                                 o.get("block_keys"))
        if sel is not None:
            problems += selection.problems(sel, geo)
            blocks = None if selection.format_problem(sel, nb) else sel
        if blocks is None:
            blocks = reference.select_blocks(geo.scores, o["top_k"], Lq, Lk, bs, causal)
            if sel is None:  # no returned selection: rows cut at a near-tie are not compared
                ignore = selection.ambiguous(blocks, geo)
                if ignore.any():
                    notes.append(f"{int(ignore.sum())} rows with a near-tie at the "
                                 "top-k cut not compared (no returned selection)")
    elif blocks is not None and sel is not None and selection.differs_from(sel, blocks, nb):
        problems.append("returned indices differ from the caller's indices "
                        "(sorted, deduplicated, -1 padded)")
    common = dict(indices=blocks, block_size=bs, window=window, causal=causal, scale=scale)
    ref_out, _, ref_lse = reference.sparse_attention(q, k, v, **common)
    v64 = v.astype(np.float64)
    mag = reference.sparse_attention(q, k, np.abs(v64), **common)[0]  # Σ P |v|
    pv2 = reference.sparse_attention(q, k, v64 ** 2, **common)[0]  # Σ P v^2
    allowed = reference.allowed_mask(Lq, Lk, B=B, Hkv=Hkv, block_size=bs, window=window,
                                     causal=causal, indices=blocks)
    n_keys = np.repeat(allowed.sum(axis=-1), g, axis=1)  # [B, Hq, Lq]
    size, top = _logit_stats(q, k, allowed, scale)
    delta = u_acc * (math.sqrt(D) + 3) * size
    with np.errstate(invalid="ignore", over="ignore"):
        p_max = np.where(np.isfinite(ref_lse), np.exp(top - ref_lse), 0.0)
    ignore_h = None if ignore is None else np.repeat(ignore, g, axis=1)
    return AttentionTerms(ref_out, mag, pv2, n_keys, delta, p_max, ref_lse, ignore_h,
                          problems, notes)


def attention_verdict(t: AttentionTerms, out: np.ndarray, lse: np.ndarray | None, dtype: str,
                      rng: np.random.Generator) -> Verdict:
    """Both gates on out (and lse) from the terms of :func:`attention_terms`."""
    acc = "float64" if dtype == "float64" else "float32"
    u_in = DTYPE_UNIT_ROUNDOFF[dtype]
    verdict = Verdict(problems=list(t.problems), notes=list(t.notes))
    p_max = t.p_max[..., None]
    verdict.measurements.append(measure(out, Bound(
        "out", t.ref_out, t.mag, t.n_keys[..., None], u_in, acc, dtype,
        rss=np.sqrt(p_max * t.pv2), extra=t.delta[..., None] * (t.mag + np.abs(t.ref_out)),
        extra_rss=t.delta[..., None] * np.sqrt(p_max * (t.pv2 + t.ref_out ** 2)),
        ignore=None if t.ignore is None else t.ignore[..., None]), rng))
    if lse is not None:
        verdict.measurements.append(measure(lse, Bound(
            "lse", t.ref_lse, 1.0, t.n_keys, 0.0, acc, "float32", rss=np.sqrt(t.p_max),
            extra=t.delta, extra_rss=t.delta, ignore=t.ignore), rng))
    return verdict


def _logit_stats(q: np.ndarray, k: np.ndarray, allowed: np.ndarray, scale: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """[B, Hq, Lq] twice: the largest |scale| Σ_d |q_id||k_jd| and the largest scaled logit
    over the allowed keys j (-inf where none is allowed)."""
    B, Hq, Lq, _ = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv if Hkv else 1
    qa, ka = finite_abs(q), finite_abs(k)
    q64, k64 = q.astype(np.float64), np.where(np.isfinite(k), k, 0).astype(np.float64)
    size, top = np.zeros((B, Hq, Lq)), np.full((B, Hq, Lq), -np.inf)
    for b in range(B):
        for t in range(Hkv):
            heads = slice(t * g, (t + 1) * g)
            keep = allowed[b, t]
            size[b, heads] = np.where(keep, qa[b, heads] @ ka[b, t].T, 0.0).max(
                axis=-1, initial=0.0)
            top[b, heads] = np.where(keep, scale * (q64[b, heads] @ k64[b, t].T), -np.inf).max(
                axis=-1, initial=-np.inf)
    return abs(scale) * size, top


# --- quantize ---------------------------------------------------------------------------------


def _code_table(precision: str) -> np.ndarray:
    """Every finite value of a quantised format, ascending (-qmax..qmax)."""
    if precision == "int8":
        return np.arange(-128, 128, dtype=np.float64)
    codes = np.arange(256, dtype=np.uint8).view(numpy_dtype(STORAGE_DTYPE[precision]))
    values = np.unique(codes.astype(np.float64))
    return values[np.isfinite(values)]


def _code_ratios(x: np.ndarray, scales_full: np.ndarray, got: np.ndarray, want: np.ndarray,
                 precision: str) -> np.ndarray:
    """0 where codes agree; |t - tie| / tolerance where the backend picked the neighbour of the
    reference's code across a rounding tie of t = x / scale (at a scale that is not a power of
    two, where computing t may round); inf otherwise."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t = np.asarray(x, np.float32).astype(np.float64) / scales_full
    table = _code_table(precision)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    pos_got = np.searchsorted(table, np.nan_to_num(got))
    pos_want = np.searchsorted(table, np.nan_to_num(want))
    # at a power-of-two scale x / scale and x * (1 / scale) are both exact: no tie tolerance,
    # an exact tie must round to nearest even
    inexact = np.frexp(scales_full)[0] != 0.5
    neighbour = np.isfinite(got) & (np.abs(pos_got - pos_want) == 1) & (np.abs(t) <= QMAX[
        precision]) & inexact
    with np.errstate(invalid="ignore", divide="ignore"):
        near = np.abs(t - (got + want) / 2) / (tol.C_TIE * U32 * np.abs(t))
    return np.where(same, 0.0, np.where(neighbour & (near <= 1), near, np.inf))


def _full_scales(scales: np.ndarray, shape: tuple[int, ...], granularity: str, g: int
                 ) -> np.ndarray:
    s = np.asarray(scales, np.float64)
    if granularity == "tensor" or not len(shape):
        return np.broadcast_to(s, shape)
    if granularity == "row":
        return s[..., np.arange(shape[-1]) // g]
    return s[np.arange(shape[0]) // g][:, np.arange(shape[1]) // g]


def check_quantize(call: Call, result: Any, rng: np.random.Generator,
                   quantizer: Quantizer | None = None) -> Verdict:
    """quantize: scales bit for bit, values bit for bit up to neighbours across a tie."""
    x, precision = call.args
    x = np.asarray(x)
    granularity, g = call.kwargs.get("granularity", "row"), call.kwargs.get("group_size", 128)
    values, scales = result
    want_v, want_s = reference.quantize(x, precision, granularity=granularity, group_size=g)
    got = np.asarray(values).astype(np.float64)
    want = want_v.astype(np.float64)
    verdict = Verdict()
    if precision not in QUANTIZED_PRECISIONS:
        ratio = np.where((got == want) | (np.isnan(got) & np.isnan(want)), 0.0, np.inf)
        verdict.measurements.append(exact_measurement("values", ratio, got, want))
        return verdict
    got_s = np.asarray(scales, np.float32)
    if got_s.shape != want_s.shape or not np.array_equal(got_s, want_s):
        bad = (got_s != want_s) if got_s.shape == want_s.shape else np.ones(1, bool)
        verdict.problems.append(
            f"scales differ from amax / qmax in float32 (shape {list(got_s.shape)} vs "
            f"{list(want_s.shape)}, first difference at {first_index(bad)})")
        return verdict
    ratio = _code_ratios(x, _full_scales(want_s, x.shape, granularity, g), got, want,
                         precision)
    verdict.measurements.append(exact_measurement("values", ratio, got, want))
    accepted = int(((got != want) & np.isfinite(ratio)).sum())
    if accepted:
        verdict.notes.append(f"{accepted} values took the neighbouring code across a "
                             "rounding tie (accepted)")
    return verdict


# --- gemm -------------------------------------------------------------------------------------


def _own_quantized(x: np.ndarray, precision: str, granularity: str, g: int,
                   quantizer: Quantizer, notes: list[str]) -> tuple[np.ndarray, Any]:
    """The backend's own quantisation of a gemm operand when it agrees with the reference's
    up to rounding ties (as its quantize cases require), else the reference's."""
    own = quantizer(x, precision, granularity, g)
    call = Call((x, precision), {"granularity": granularity, "group_size": g})
    if check_quantize(call, own, np.random.default_rng(0)).passed:
        return own
    notes.append(f"the backend's {granularity} quantisation to {precision} disagrees with the "
                 "reference; judged against the reference's")
    return reference.quantize(x, precision, granularity=granularity, group_size=g)


def _operands(a: np.ndarray, b: np.ndarray, precision: str, kw: dict[str, Any],
              quantizer: Quantizer | None, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The float64 operands whose exact product the backend computes: as given (dequantised by
    their scales), or rounded/quantised on the fly by the backend's own quantize."""
    g = kw.get("group_size", 128)
    sa, sb = kw.get("a_scale"), kw.get("b_scale")
    if precision != "fp32" and quantizer is not None:
        if _dtype(a) in FLOAT_DTYPES:
            a, sa = _own_quantized(a, precision, "row", g, quantizer, notes)
        if _dtype(b) in FLOAT_DTYPES:
            b, sb = _own_quantized(b, precision, "block", g, quantizer, notes)
    return reference.gemm_operands(a, b, precision, a_scale=sa, b_scale=sb, group_size=g)


def _auto_problems(a: np.ndarray, b: np.ndarray, out: np.ndarray, info: Any,
                   kw: dict[str, Any]) -> list[str]:
    """The promise of precision='auto': the measured error never exceeds the tolerance."""
    if not isinstance(info, dict) or not {"precision", "estimated_error", "backend"} <= set(info):
        return [f"return_info gave {info!r}, expected a dict with precision, estimated_error "
                "and backend"]
    exact = a.astype(np.float64) @ b.astype(np.float64)
    if kw.get("bias") is not None:
        exact = exact + kw["bias"].astype(np.float64)
    budget = kw.get("tolerance", 1e-3)
    den = np.linalg.norm(exact)
    err = np.linalg.norm(out.astype(np.float64) - exact)
    rel = err / den if den else (0.0 if err == 0 else math.inf)
    if rel > budget:
        return [f"precision='auto' chose {info['precision']} whose measured error {rel:.3g} "
                f"exceeds tolerance={budget:g}"]
    return []


def check_gemm(call: Call, result: Any, rng: np.random.Generator,
               quantizer: Quantizer | None = None) -> Verdict:
    """gemm: out against the exact product of the backend's own operands (and the promise of
    ``auto``)."""
    a, b = (np.asarray(x) for x in call.args)
    kw = call.kwargs
    out, info = (result if kw.get("return_info") else (result, None))
    out = np.asarray(out)
    verdict = Verdict()
    precision = kw.get("precision")
    if precision == "auto":
        verdict.problems += _auto_problems(a, b, out, info, kw)
        if verdict.problems:
            return verdict
        precision = info["precision"]
        verdict.notes.append(f"auto chose {precision}")
    if precision is None:
        stored = [_dtype(x) for x in (a, b) if _dtype(x) in QUANT_DTYPES]
        precision = {v: p for p, v in STORAGE_DTYPE.items()}[stored[0]] if stored else "fp32"
    a_hat, b_hat = _operands(a, b, precision, kw, quantizer, verdict.notes)
    ref = a_hat @ b_hat
    mag = np.abs(a_hat) @ np.abs(b_hat)
    sq = a_hat ** 2 @ b_hat ** 2
    if kw.get("bias") is not None:
        bias = np.asarray(kw["bias"]).astype(np.float64)
        ref, mag, sq = ref + bias, mag + np.abs(bias), sq + bias ** 2
    out_dtype = kw.get("out_dtype") or (_dtype(a) if _dtype(a) in FLOAT_DTYPES else "float32")
    # up to three roundings per product: dequantising a, dequantising b, multiplying
    verdict.measurements.append(measure(out, Bound("out", ref, mag, a.shape[-1], 3 * U32,
                                                   "float32", str(out_dtype), rss=np.sqrt(sq)),
                                        rng))
    return verdict


# --- gated_channels ---------------------------------------------------------------------------


def check_gated(call: Call, result: Any, rng: np.random.Generator,
                quantizer: Quantizer | None = None) -> Verdict:
    """gated_channels: the mask exactly, closed channels exactly 0, open ones within bound."""
    x, logits = (np.asarray(z) for z in call.args)
    kw = call.kwargs
    weight, bias, mode = kw.get("weight"), kw.get("bias"), kw.get("mode", "hard")
    y, mask = (result if kw.get("return_mask") else (result, None))
    ref_y, is_open = reference.gated_channels(x, logits, weight=weight, bias=bias, mode=mode,
                                              threshold=kw.get("threshold", 0.0),
                                              keep=kw.get("keep"))
    verdict = Verdict()
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != is_open.shape or not np.array_equal(mask, is_open):
            bad = (mask != is_open) if mask.shape == is_open.shape else np.ones(1, bool)
            verdict.problems.append(f"mask differs from the open channels at {first_index(bad)}")
    gate = np.abs(reference.gate_values(logits, mode=mode, open_mask=is_open))
    if weight is None:
        mag = rss = gate * finite_abs(x)
        k = 1
    else:
        xa, wa = finite_abs(x), finite_abs(weight)
        ba = 0.0 if bias is None else finite_abs(bias)
        mag = gate * (xa @ wa.T + ba)
        rss = gate * np.sqrt(xa ** 2 @ (wa ** 2).T + ba ** 2)
        k = x.shape[-1]
    dtype = _dtype(x)
    acc = "float64" if dtype == "float64" else "float32"
    u = DTYPE_UNIT_ROUNDOFF[acc]
    u_in = u if mode == "hard" else tol.C_SIGMOID * u
    exact = np.broadcast_to(~is_open, ref_y.shape)
    verdict.measurements.append(measure(np.asarray(y), Bound("y", ref_y, mag, k, u_in, acc,
                                                             dtype, rss=rss, exact=exact), rng))
    return verdict


CHECKS: dict[str, Callable[..., Verdict]] = {
    "sparse_attention": check_attention,
    "quantize": check_quantize,
    "gemm": check_gemm,
    "gated_channels": check_gated,
    backward.OP: backward.check,
}
