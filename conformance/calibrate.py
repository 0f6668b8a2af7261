"""Measure the tolerance headroom of a backend: ``python -m dshal_conformance.calibrate``.

Runs the full suite on the numpy backend (or ``--backend``) for several seeds and prints, per
operator and gate, the largest err/bound ratio and the case that reached it, then the
:data:`~dshal_conformance.tolerance.CALIBRATION` record to paste into ``tolerance.py``. Every
ratio of the built-in backend must stay at or below ``1 / HEADROOM``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from dshal_conformance import tolerance as tol
from dshal_conformance.runner import PASS, CaseResult, Runner

GATES = ("element", "aggregate")


def _ratios(res: CaseResult) -> dict[str, float]:
    return {"element": res.ratio or 0.0, "aggregate": res.agg_ratio or 0.0}


def calibrate(backend: str, seeds: Sequence[int], mode: str = "full") -> dict[str, Any]:
    """Largest ratio per operator and gate over ``seeds``, with the case that reached it."""
    worst: dict[str, dict[str, list]] = {}
    failures = []
    for seed in seeds:
        runner = Runner(backend, seed=seed, mode=mode)
        for res in runner.run(runner.cases()):
            if res.status != PASS and res.status != "not-supported":
                failures.append((seed, res.case.id, res.message))
            for gate, ratio in _ratios(res).items():
                slot = worst.setdefault(res.case.op, {}).setdefault(gate, [0.0, "", seed])
                if ratio > slot[0]:
                    worst[res.case.op][gate] = [ratio, res.case.id, seed]
    return {"worst": worst, "failures": failures}


def record(worst: dict[str, dict[str, list]], backend: str, seeds: Sequence[int],
           mode: str) -> dict[str, Any]:
    """The CALIBRATION record of :mod:`.tolerance`."""
    return {"backend": backend, "mode": mode, "seeds": list(seeds),
            "max_ratio": {op: {gate: round(v[0], 4) for gate, v in gates.items()}
                          for op, gates in sorted(worst.items())}}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the calibration of a backend; exit 1 if a ratio is too close."""
    parser = argparse.ArgumentParser(prog="python -m dshal_conformance.calibrate",
                                     description=__doc__)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    found = calibrate(args.backend, args.seeds, mode)
    limit = 1 / tol.HEADROOM
    ok = not found["failures"]
    for seed, case, message in found["failures"]:
        print(f"FAIL seed {seed} {case}: {message}")
    for op, gates in sorted(found["worst"].items()):
        for gate, (ratio, case, seed) in gates.items():
            flag = "ok" if ratio <= limit else "TOO CLOSE"
            ok &= ratio <= limit
            print(f"{op:18} {gate:9} max err/bound {ratio:.4f} ({flag}; {case}, seed {seed})")
    print("CALIBRATION = " + json.dumps(record(found["worst"], args.backend, args.seeds, mode),
                                        indent=4))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
