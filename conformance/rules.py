"""Cases whose inputs and extra checks live outside the per-operator tables: the exact rules
(:mod:`.exact`) and NaN/Inf at mask edges (:mod:`.edges`).

Such a case carries ``params["rule"]``; :func:`build` makes its inputs and :func:`problems`
adds the rule's exact requirements to the operator's usual check (:mod:`.checks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dshal_conformance import edges, exact
from dshal_conformance.cases import Case
from dshal_conformance.data import Call

#: rule -> the module that builds and judges it
MODULES = {**{r: exact for r in ("round-output", "int8-exact", "topk-ties", "forms-topk-ties",
                                  "keep-ties")},
           **{r: edges for r in edges.RULES}}


def cases() -> list[Case]:
    """Every rule case (fixed, all part of ``--quick``)."""
    return [*exact.cases(), *edges.cases()]


def build(params: dict[str, Any], rng: np.random.Generator) -> Call:
    """The inputs of a rule case."""
    return MODULES[params["rule"]].build(params, rng)


def problems(params: dict[str, Any], call: Call, result: Any) -> list[str]:
    """What a rule case's result breaks beyond the operator's check."""
    return MODULES[params["rule"]].problems(params, call, result)
