"""Human-readable views of a certificate: the Markdown file and the terminal summary table."""

from __future__ import annotations

from typing import Any

STATUS_COLUMNS = ("cases", "pass", "fail", "not-supported")


def _num(x: Any, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, fmt)


def summary_rows(cert: dict[str, Any]) -> list[list[str]]:
    """op, label, cases, pass, fail, not supported, worst err/bound, aggregate, SQNR."""
    rows = []
    for op, labels in cert["statistics"].items():
        for label, row in labels.items():
            rows.append([op, label, *(str(row[c]) for c in STATUS_COLUMNS),
                         _num(row["max_ratio"]), _num(row["max_aggregate_ratio"]),
                         "-" if row["max_ratio"] is None else "exact"
                         if row["sqnr_db"] is None else _num(row["sqnr_db"], ".1f")])
    return rows


SUMMARY_HEADER = ["op", "dtype", "cases", "pass", "fail", "unsupported", "err/bound",
                  "aggregate", "SQNR dB"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def failure_lines(cert: dict[str, Any]) -> list[str]:
    """One entry per failed case (message and reproduce command) and per other problem."""
    lines = []
    for c in cert["cases"]:
        if c["status"] == "fail":
            lines.append(f"{c['op']} case {c['id']}: {c['message']}\n    reproduce: "
                         f"{c['reproduce']}")
    lines += cert["failures"]["problems"]
    return lines


def markdown(cert: dict[str, Any]) -> str:
    """The certificate as a Markdown document."""
    b, d, s = cert["backend"], cert["device"], cert["summary"]
    out = [f"# dshal certificate: {b['name']} {b['version']}", "",
           f"**Verdict: {cert['verdict'].upper()}** — {s['pass']} passed, {s['fail']} failed, "
           f"{s['not-supported']} refused as not supported, of {s['cases']} cases "
           f"({cert['suite']['mode']} suite, seed {cert['seed']}, {s['seconds']} s).", "",
           "## Identity", "",
           _table(["", ""], [
               ["suite", f"{cert['suite']['name']} {cert['suite']['version']} (manifest "
                         f"sha256 {cert['suite']['manifest_sha256'][:16]}...)"],
               ["dshal", f"{cert['dshal']['version']} (plugin API "
                         f"{cert['dshal']['plugin_api']})"],
               ["backend", f"{b['name']} {b['version']} ({b['distribution'] or 'built in'}; "
                           f"{b['entry_point']})"],
               ["device", f"{d['name']}; driver: {d['driver']}; tested on {d['target']}"],
               ["host", f"{cert['host']['hostname']}, {cert['host']['platform']}, "
                        f"Python {cert['host']['python']}"],
               ["created", cert["created"]],
               ["seed", str(cert["seed"])]]), "",
           "## Results by operator and dtype", "",
           _table(SUMMARY_HEADER, summary_rows(cert)), "",
           "err/bound is the largest ratio of an element's error to its bound (pass <= 1); "
           "aggregate is ||err||_F against the declared precision's gate (pass <= 1).", ""]
    failures = failure_lines(cert)
    if failures:
        out += ["## Failures", "", *(f"- {line}" for line in failures), ""]
    out += ["## Coverage", "", _table(
        ["op", "declared", "dtypes", "features", "precisions", "cases"],
        [[op, row["declared"], row.get("dtypes", "-"), row.get("features", "-"),
          row.get("precisions", "-"), row["cases"]] for op, row in cert["coverage"].items()]),
        "", "## Determinism", "", f"Class: **{cert['determinism']['class']}**", "",
        _table(["op", "reruns", "bitwise identical", "batch slices", "declared deterministic",
                "class"],
               [[op, str(v["reruns"]), str(v["identical"]), v["batch_slices"],
                 str(v["declared_deterministic"]), v["class"]]
                for op, v in cert["determinism"]["per_op"].items()]), "",
        "## Tolerance policy", "", f"- element gate: `{cert['tolerance']['element_gate']}`",
        f"- aggregate gate: `{cert['tolerance']['aggregate_gate']}`",
        "- constants: " + ", ".join(f"{k} = {v}" for k, v in
                                    cert["tolerance"]["constants"].items()),
        f"- calibration ({cert['tolerance']['calibration']['backend']}, seeds "
        f"{cert['tolerance']['calibration']['seeds']}): largest err/bound per operator and "
        "gate: " + "; ".join(f"{op} {g}" for op, g in
                            cert["tolerance"]["calibration"]["max_ratio"].items()), "",
        "## Digest", "", f"{cert['digest']['algorithm']} `{cert['digest']['value']}` — check "
        f"with `dshal certify --verify certificate-{b['name']}.json`.", ""]
    return "\n".join(out)
