"""Run cases against one backend: build inputs, call ``dshal.ops`` with the backend forced,
classify the outcome against the backend's declaration, check the result.

Outcomes (:class:`CaseResult`): ``pass``; ``fail``; ``not-supported`` — a call outside the
declared capabilities that the backend refused, as it must. A refusal of a declared call, an
undeclared call that computes, a wrong result, an exception, or an invalid call that does not
raise the documented error are failures.
"""

from __future__ import annotations

import hashlib
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dshal import reference
from dshal.capabilities import Signature, capability_reasons
from dshal.errors import UnsupportedError
from dshal.registry import Backend, registry
from dshal_conformance import data, invalid, limits, rules
from dshal_conformance.cases import Case, fixed_cases, select
from dshal_conformance.checks import CHECKS, FORM_CALLS, Verdict
from dshal_conformance.devices import Target
from dshal_conformance.gates import Measurement
from dshal_conformance.properties import property_cases

PASS, FAIL, NOT_SUPPORTED = "pass", "fail", "not-supported"
STATUSES = (PASS, FAIL, NOT_SUPPORTED)


@dataclass
class CaseResult:
    """The outcome of one case on one backend."""

    case: Case
    status: str
    message: str = ""
    declared: bool | None = None
    uses: dict[str, Any] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    digest: str = ""

    @property
    def ratio(self) -> float | None:
        """Largest element err/bound of the case (None when nothing was measured)."""
        return max((m.max_ratio for m in self.measurements), default=None)

    @property
    def agg_ratio(self) -> float | None:
        """Largest aggregate ratio of the case."""
        return max((m.agg_ratio for m in self.measurements), default=None)

    @property
    def worst(self) -> dict[str, Any] | None:
        """The worst element over the case's outputs, with the output's name."""
        if not self.measurements:
            return None
        m = max(self.measurements, key=lambda m: m.max_ratio)
        return None if m.worst is None else {"output": m.name, **m.worst}


def _canonical_nans(x: np.ndarray) -> np.ndarray:
    """``x`` with every NaN one canonical NaN (payloads and signs are not results)."""
    if x.dtype.kind in "biu":
        return x
    nan = np.isnan(x)
    return np.where(nan, np.array(np.nan, x.dtype), x) if nan.any() else x


def output_digest(result: Any) -> str:
    """sha256 of every output's dtype, shape and bytes, NaNs canonical (bitwise identity of
    reruns, in this process or another one)."""
    h = hashlib.sha256()
    for item in result if isinstance(result, tuple) else (result,):
        if isinstance(item, np.ndarray):
            h.update(f"{item.dtype}{item.shape}".encode())
            h.update(np.ascontiguousarray(_canonical_nans(item)).tobytes())
        elif isinstance(item, dict):
            h.update(repr(sorted(item.items())).encode())
    return h.hexdigest()


def _uses(sig: Signature) -> dict[str, Any]:
    return {"dtypes": sorted({d for _, d in sig.dtypes}), "features": sorted(sig.features),
            "precision": sig.precision}


def operator(op: str) -> Callable[..., Any]:
    """``dshal.ops.<op>``."""
    from dshal import ops

    return getattr(ops, op)


class Runner:
    """Runs cases against one available backend, forced by name."""

    def __init__(self, name: str, *, seed: int = 0, mode: str = "full",
                 device: int | None = None) -> None:
        self.backend: Backend = registry.get(name)
        if not self.backend.available:
            raise ValueError(f"backend {name!r} cannot be certified here: "
                             f"{self.backend.unavailable_reason()}")
        assert self.backend.spec is not None
        self.name, self.seed, self.mode, self.device = name, seed, mode, device
        self.spec = self.backend.spec
        self.target = Target.for_backend(self.spec, device)
        self.warnings: list[str] = []

    # --- cases --------------------------------------------------------------------------------

    def dtype_of(self, op: str) -> str:
        """A float dtype the backend declares for ``op`` (float32 when it declares none)."""
        cap = self.spec.capabilities.get(op)
        floats = [d for d in ("float32", "float16", "bfloat16", "float64")
                  if cap is not None and d in cap.dtypes]
        return floats[0] if floats else "float32"

    def cases(self) -> list[Case]:
        """Every case of this run's mode: invalid calls, limits, fixed, then property cases."""
        return [*invalid.invalid_cases(self.dtype_of), *limits.limit_cases(self.spec),
                *select([*fixed_cases(), *rules.cases()], self.mode),
                *property_cases(self.mode, self.seed)]

    def reproduce(self, case: Case) -> str:
        """The command that reruns one case."""
        extra = " --quick" if self.mode == "quick" and case.kind == "property" else ""
        extra += f" --device {self.device}" if self.device is not None else ""
        return f"dshal certify {self.name} --case {case.id} --seed {self.seed}{extra}"

    def build(self, case: Case) -> data.Call:
        """The host inputs of a case."""
        rng = data.case_rng(self.seed, case.id)
        if case.kind == "invalid":
            return invalid.build(case, rng)
        if case.kind == "limit":
            return limits.build(case)
        if "rule" in case.params:
            return rules.build(case.params, rng)
        return data.BUILDERS[case.op](dict(case.params), rng)

    # --- running ------------------------------------------------------------------------------

    def call(self, op: str, call: data.Call) -> Any:
        """Run ``dshal.ops.<op>`` on the target with this backend forced; host results.

        Warnings are recorded (in :attr:`warnings`), never raised, whatever filters the caller
        has installed, so that a run judges the same under ``dshal certify`` and pytest.
        """
        args = tuple(self.target.put(a) for a in call.args)
        kwargs = {k: self.target.put(v) for k, v in call.kwargs.items()}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = operator(op)(*args, backend=self.name, **kwargs)
        self.warnings += [f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:"
                          f"{w.lineno})" for w in seen]
        return self.target.get(result)

    def quantize(self, x: np.ndarray, precision: str, granularity: str, g: int
                 ) -> tuple[np.ndarray, Any]:
        """The backend's own quantisation (gemm's operands), or the reference's when the
        backend does not declare it."""
        call = data.Call((x, precision), {"granularity": granularity, "group_size": g})
        sig = self.signature("quantize", call)
        if capability_reasons(self.spec, sig):
            return reference.quantize(x, precision, granularity=granularity, group_size=g)
        return self.call("quantize", call)

    def signature(self, op: str, call: data.Call) -> Signature:
        """The dispatch signature of a call on this backend's target."""
        from dshal.ops import signature

        args = tuple(self.target.put(a) for a in call.args)
        kwargs = {k: self.target.put(v) for k, v in call.kwargs.items()}
        return signature(op, *args, **kwargs)

    def run_case(self, case: Case) -> CaseResult:
        """Run and judge one case (warnings the backend emits become notes)."""
        start = time.perf_counter()
        self.warnings = []
        try:
            result = self._run(case)
        except Exception as exc:  # a bug in a check must not hide the others
            result = CaseResult(case, FAIL, f"the suite could not judge the case: "
                                f"{type(exc).__name__}: {exc} ({_where(exc)})")
        result.notes += sorted(set(self.warnings))
        result.seconds = time.perf_counter() - start
        return result

    def _run(self, case: Case) -> CaseResult:
        call = self.build(case)
        if case.kind == "invalid":
            return self._run_invalid(case, call)
        sig = self.signature(case.op, call)
        declared = not capability_reasons(self.spec, sig)
        res = CaseResult(case, PASS, declared=declared, uses=_uses(sig))
        try:
            out = self.call(case.op, call)
        except UnsupportedError as exc:
            res.reasons = exc.reasons.get(self.name, [str(exc)])
            if declared:
                res.status = FAIL
                res.message = ("refused a call its declaration accepts: "
                               + "; ".join(res.reasons))
            else:
                res.status = NOT_SUPPORTED
            return res
        except Exception as exc:
            res.status = FAIL
            res.message = f"raised {type(exc).__name__}: {exc}"
            return res
        if not declared or case.kind == "limit":
            res.status = FAIL
            res.message = ("computed a call outside its declared capabilities ("
                           + "; ".join(capability_reasons(self.spec, sig)) + ")")
            return res
        res.digest = output_digest(out)
        verdict: Verdict = CHECKS[case.op](call, out, data.case_rng(self.seed + 1, case.id),
                                           self.quantize)
        if "rule" in case.params:
            verdict.problems += rules.problems(case.params, call, out)
        res.measurements, res.notes = verdict.measurements, verdict.notes
        if not verdict.passed:
            res.status, res.message = FAIL, verdict.message()
        return res

    def _run_invalid(self, case: Case, call: data.Call) -> CaseResult:
        error, word = invalid.expected(case)
        want = f"{error.__name__} naming {word!r}"
        try:
            self.call(case.op, call)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, error) and word in str(exc):
                return CaseResult(case, PASS, notes=[f"{type(exc).__name__}: {exc}"])
            return CaseResult(case, FAIL, f"raised {type(exc).__name__}: {exc} (expected {want})")
        except Exception as exc:
            return CaseResult(case, FAIL, f"raised {type(exc).__name__}: {exc} "
                                          f"(expected {want})")
        return CaseResult(case, FAIL, f"returned a result for an invalid call (expected {want})")

    def run(self, cases: Iterable[Case], *, on_result: Callable[[CaseResult], None] | None = None,
            stop_at_first_failure: bool = False) -> list[CaseResult]:
        """Run ``cases`` in order; ``on_result`` sees each result as it comes."""
        results = []
        for case in cases:
            res = self.run_case(case)
            results.append(res)
            if on_result is not None:
                on_result(res)
            if stop_at_first_failure and res.status == FAIL:
                break
        return results

    # --- determinism --------------------------------------------------------------------------

    def rerun_digest(self, case: Case) -> str:
        """The digest of a second run of a case."""
        return output_digest(self.call(case.op, self.build(case)))

    def batch_slices(self, case: Case) -> Iterator[bool]:
        """For a case with a leading batch axis (attention's B, a batched gemm's ``a``, the
        rows of gated_channels' ``x``): whether each of the first :data:`BATCH_SLICES` batch
        elements computed alone equals its slice of the batched output, bitwise."""
        call = self.build(case)
        first = call.args[0]
        if case.op not in BATCHED or first.ndim < BATCHED[case.op][0] or first.shape[0] < 2:
            return
        if any(n in call.kwargs for n in FORM_CALLS):  # sequences share pools or packed rows
            return
        whole = self.call(case.op, call)
        out = whole[0] if isinstance(whole, tuple) else whole
        names = BATCHED[case.op][1]

        def cut(name: str, x: Any, i: int) -> Any:
            batched = isinstance(x, np.ndarray) and name in names and x.ndim == first.ndim
            return x[i:i + 1] if batched else x

        positional = POSITIONAL[case.op]
        for i in range(min(first.shape[0], BATCH_SLICES)):
            part = data.Call(tuple(cut(n, a, i) for n, a in zip(positional, call.args)),
                             {k: cut(k, v, i) for k, v in call.kwargs.items()})
            alone = self.call(case.op, part)
            alone = alone[0] if isinstance(alone, tuple) else alone
            yield np.ascontiguousarray(alone[0]).tobytes() == np.ascontiguousarray(
                out[i]).tobytes()


#: per operator: minimum ndim of the first argument for a batch axis, and the arguments that
#: carry it
BATCHED = {"sparse_attention": (4, ("q", "k", "v", "indices", "block_keys")),
           "gemm": (3, ("a", "a_scale")), "gated_channels": (2, ("x", "gate_logits"))}
POSITIONAL = {"sparse_attention": ("q", "k", "v"), "gemm": ("a", "b"),
              "gated_channels": ("x", "gate_logits"), "quantize": ("x", "precision")}
#: batch elements recomputed alone per case
BATCH_SLICES = 4


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
