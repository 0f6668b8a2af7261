"""From case results to the sections of a certificate: error statistics per operator and label,
capability declarations against results, coverage with denominators."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dshal.capabilities import FEATURES, OPS, BackendSpec, served_features
from dshal.dtypes import FLOAT_DTYPES, PRECISIONS, QUANT_DTYPES
from dshal_conformance.runner import FAIL, NOT_SUPPORTED, PASS, CaseResult

QUANTILES = (0.5, 0.9, 0.99)


def _sqnr(sq_ref: float, sq_err: float) -> float | None:
    """Signal-to-quantisation-noise ratio in dB (None: no error at all)."""
    if sq_err == 0.0:
        return None
    return 10.0 * math.log10(sq_ref / sq_err) if sq_ref > 0 else -math.inf


def statistics(results: Iterable[CaseResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per operator and label: case counts by status, worst element and aggregate ratios,
    quantiles of the element ratios and the SQNR over every measured output."""
    groups: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for res in results:
        groups[res.case.op, res.case.label].append(res)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (op, label), group in sorted(groups.items()):
        ms = [m for r in group for m in r.measurements]
        ratios = np.concatenate([m.sample for m in ms]) if ms else np.zeros(0)
        finite = ratios[np.isfinite(ratios)]
        row: dict[str, Any] = {
            "cases": len(group),
            **{s: sum(r.status == s for r in group) for s in (PASS, FAIL, NOT_SUPPORTED)},
            "max_ratio": max((m.max_ratio for m in ms), default=None),
            "max_aggregate_ratio": max((m.agg_ratio for m in ms), default=None),
            "quantiles": ({f"p{round(q * 100)}": float(np.quantile(finite, q))
                           for q in QUANTILES} if finite.size else {}),
            "sqnr_db": _sqnr(sum(m.sq_ref for m in ms), sum(m.sq_err for m in ms)) if ms
            else None,
        }
        table.setdefault(op, {})[label] = row
    return table


def _items(op: str) -> dict[str, Sequence[str]]:
    items: dict[str, Sequence[str]] = {
        "dtypes": FLOAT_DTYPES + (QUANT_DTYPES if op == "gemm" else ()),
        "features": sorted(FEATURES[op])}
    if op in ("gemm", "quantize"):
        items["precisions"] = PRECISIONS
    return items


def _declared(spec: BackendSpec, op: str, kind: str) -> set[str]:
    cap = spec.capabilities.get(op)
    if cap is None:
        return set()
    if kind == "features":  # the 3.1a forms only from plugin API 2 on
        return set(served_features(spec, op))
    return set(getattr(cap, kind))


def _used(res: CaseResult, kind: str) -> set[str]:
    if kind == "precisions":
        return {res.uses["precision"]} if res.uses.get("precision") else set()
    return set(res.uses.get(kind, ()))


def capabilities(results: Sequence[CaseResult], spec: BackendSpec
                 ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Every dtype, feature and precision of every operator: declared or not, the cases that
    used it by status, and a verdict.

    ``verified`` (declared, used by passing cases, never failed), ``FAILED`` (declared, and a
    case using it failed or was refused), ``untested`` (declared, no case used it),
    ``refused as declared`` (not declared, every case using it was refused), ``not declared``.
    """
    table: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    judged = [r for r in results if r.case.kind in ("fixed", "property")]
    for op in OPS:
        mine = [r for r in judged if r.case.op == op]
        for kind, names in _items(op).items():
            declared = _declared(spec, op, kind)
            for name in names:
                using = [r for r in mine if name in _used(r, kind)]
                counts = {s: sum(r.status == s for r in using) for s in (PASS, FAIL,
                                                                         NOT_SUPPORTED)}
                if name in declared:
                    verdict = ("FAILED" if counts[FAIL] else "verified" if counts[PASS]
                               else "untested")
                else:
                    verdict = ("FAILED" if counts[FAIL] else "refused as declared"
                               if counts[NOT_SUPPORTED] else "not declared")
                table.setdefault(op, {}).setdefault(kind, {})[name] = {
                    "declared": name in declared, "cases": len(using), **counts,
                    "verdict": verdict}
    return table


def coverage(caps: dict[str, dict[str, dict[str, dict[str, Any]]]],
             results: Sequence[CaseResult], spec: BackendSpec) -> dict[str, dict[str, str]]:
    """Per operator: verified / declared for each kind of capability, and cases by status."""
    cov: dict[str, dict[str, str]] = {}
    for op, kinds in caps.items():
        row = {"declared": "yes" if op in spec.capabilities else "no"}
        for kind, items in kinds.items():
            declared = [i for i in items.values() if i["declared"]]
            verified = [i for i in declared if i["verdict"] == "verified"]
            row[kind] = f"{len(verified)}/{len(declared)} verified" if declared else "-"
        mine = [r for r in results if r.case.op == op]
        ran = [r for r in mine if r.status != NOT_SUPPORTED]
        row["cases"] = (f"{sum(r.status == PASS for r in mine)}/{len(ran)} passed, "
                        f"{len(mine) - len(ran)}/{len(mine)} refused as not supported")
        cov[op] = row
    return cov


def capability_problems(caps: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> list[str]:
    """One line per operator whose declared capabilities failed in some case."""
    lines = []
    for op, kinds in caps.items():
        failed = [f"{kind[:-1]} {name}" for kind, items in kinds.items()
                  for name, item in items.items() if item["verdict"] == "FAILED"]
        if failed:
            lines.append(f"{op}: declared capabilities failed: {', '.join(failed)}")
    return lines
