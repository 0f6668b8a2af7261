"""``dshal certify``: certify backends and write their certificates, or verify one.

Called by :func:`dshal.cli.cmd_certify` with the parsed arguments: ``backends``, ``quick``,
``full``, ``out``, ``seed``, ``device``, ``case``, ``verify`` (with ``trust`` and
``reproduce``), ``sign``, ``keygen`` and ``merge`` (a fleet's certificates,
:mod:`dshal_conformance.fleet`). Exit status: 0 when every
certification passed (or the verified certificate is intact), 1 on any failure, 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dshal.cli import console as wide_console
from dshal_conformance import certificate, determinism, fleet, fresh, trust, verify
from dshal_conformance.report import SUMMARY_HEADER, failure_lines, summary_rows
from dshal_conformance.runner import CaseResult, Runner


def expand(text: str | None) -> str | None:
    """``text`` with ``{rank}``, ``{local_rank}`` and ``{host}`` replaced (torchrun's
    ``RANK`` and ``LOCAL_RANK``, 0 without them; the host name), so every rank of a fleet
    run writes its own certificate."""
    if text is None:
        return None
    env = os.environ
    return text.format(rank=env.get("RANK", "0"), local_rank=env.get("LOCAL_RANK", "0"),
                       host=socket.gethostname())


def merge_files(paths: list[str], console: Console) -> int:
    """``dshal certify --merge FILE...``: 0 when the fleet passes."""
    nodes, problems, kinds = fleet.merge(paths)
    table = Table(title=f"fleet: {len(nodes)} certificates: "
                        f"{'FAIL' if problems else 'PASS'}")
    columns = ("node", "certificate", "device", "backend", "result", "determinism")
    for col in columns:
        table.add_column(col)
    for n in nodes:
        row = n.row()
        table.add_row(*(row[c] for c in columns))
    console.print(table)
    compared = " and ".join(sorted(kinds)) or "nothing (no two nodes share a backend version)"
    note = "" if kinds != {"error ratios"} else \
        " (these certificates record no per-case output digests)"
    console.print(f"deterministic cases compared by {compared}{note}", highlight=False)
    for p in problems:
        console.print(f"[red]{escape(p)}[/]", highlight=False)
    return 1 if problems else 0


def _usable() -> list[str]:
    from dshal.registry import registry

    return sorted(n for n, b in registry.backends().items() if b.available)


def _device(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(str(text).rpartition(":")[2])
    except ValueError:
        raise ValueError(f"--device {text!r}: give a device index, e.g. 0 or cuda:1") from None


def verify_file(path: str, console: Console, trusted: str | None = None,
                reproduce: int | None = None) -> int:
    """``dshal certify --verify FILE.json [--trust KEY.pub] [--reproduce N]``: 0 when the
    certificate is intact, consistent (and signed by ``trusted``, and reproduced); 1 otherwise,
    with one line per problem (a malformed file is one line, never a traceback)."""
    try:
        cert = verify.load(path)
    except verify.CertificateError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return 1
    problems = certificate.verify(cert) + verify.consistency_problems(cert)
    try:
        signer = trust.check(cert, trusted)
    except trust.TrustError as exc:
        problems.append(str(exc))
        signer = ""
    for p in problems:
        console.print(f"[red]{p}[/]", highlight=False)
    if problems:
        return 1
    console.print(f"{path}: intact and consistent (sha256 {cert['digest']['value']}); "
                  f"{signer}; {cert['backend']['name']} verdict {cert['verdict']}; "
                  f"{verify.suite_note(cert)}", highlight=False)
    if reproduce is not None:
        try:
            n, differ = fresh.reproduce(cert, reproduce)
        except ValueError as exc:  # the backend is not usable here
            console.print(f"[red]cannot reproduce: {exc}[/]", highlight=False)
            return 1
        for line in differ:
            console.print(f"[red]not reproduced: {line}[/]", highlight=False)
        console.print(f"reproduced {n - len(differ)}/{n} recorded outputs bitwise on this "
                      "machine", highlight=False)
        if differ:
            return 1
    return 0


def _run(runner: Runner, ids: list[str] | None, console: Console) -> list[CaseResult]:
    cases = runner.cases()
    if ids:
        known = {c.id: c for c in cases}
        missing = [i for i in ids if i not in known]
        if missing:
            raise ValueError(f"unknown case id(s) {missing} for {runner.name} in "
                             f"{runner.mode} mode (ids look like {cases[-1].id})")
        cases = [known[i] for i in ids]
    columns = (TextColumn("[bold]{task.fields[backend]}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=len(cases), backend=runner.name)

        def advance(res: CaseResult) -> None:
            progress.update(task, advance=1, description=res.case.id)

        return runner.run(cases, on_result=advance)


def _print_summary(cert: dict, console: Console) -> None:
    table = Table(title=f"{cert['backend']['name']}: {cert['verdict'].upper()}")
    for col in SUMMARY_HEADER:
        table.add_column(col, justify="left" if col in ("op", "dtype") else "right")
    for row in summary_rows(cert):
        table.add_row(*row)
    console.print(table)
    for line in failure_lines(cert):
        console.print(f"[red]FAIL[/] {line}", highlight=False)


def certify(name: str, args: argparse.Namespace, console: Console) -> int:
    """Certify one backend; 0 when it passes."""
    mode = "quick" if args.quick else "full"
    runner = Runner(name, seed=args.seed, mode=mode, device=_device(args.device))
    start = time.perf_counter()
    ids = getattr(args, "case", None)
    results = _run(runner, ids, console)
    det = {"class": "not measured (--case)", "per_op": {}, "mismatches": [], "problems": []} \
        if ids else determinism.measure(runner, results)
    cert = certificate.build(runner, results, det, time.perf_counter() - start)
    if getattr(args, "sign", None):
        cert = trust.sign(cert, args.sign)
    _print_summary(cert, console)
    if ids:
        for rec in cert["cases"]:
            console.print_json(json.dumps(rec))
    else:
        paths = certificate.write(cert, Path(args.out))
        console.print(f"certificate: {paths[0]} and {paths[1]} "
                      f"({cert['summary']['seconds']} s)", highlight=False)
    return 0 if cert["verdict"] == "pass" else 1


def run_certify(args: argparse.Namespace) -> int:
    """Entry point of ``dshal certify``."""
    console = wide_console()
    if getattr(args, "keygen", None):
        try:
            key, pub = trust.keygen(args.keygen)
        except trust.TrustError as exc:
            console.print(f"[red]{exc}[/]", highlight=False)
            return 1
        console.print(f"private key {key} (keep it secret), public key {pub} (publish it)",
                      highlight=False)
        return 0
    if args.verify:
        return verify_file(args.verify, console, getattr(args, "trust", None),
                           getattr(args, "reproduce", None))
    if getattr(args, "trust", None) or getattr(args, "reproduce", None) is not None:
        console.print("--trust and --reproduce go with --verify FILE.json")
        return 2
    if getattr(args, "sign", None):
        try:  # a bad key fails before the run, not after it
            trust.sign({}, args.sign)
        except trust.TrustError as exc:
            console.print(f"[red]{exc}[/]", highlight=False)
            return 2
    if getattr(args, "merge", None):
        return merge_files(args.merge, console)
    args.out, args.device = expand(args.out), expand(args.device)
    names = list(args.backends) or _usable()
    if not names:
        console.print("no usable backend to certify (see dshal info)")
        return 1
    status = 0
    for name in names:
        try:
            status = max(status, certify(name, args, console))
        except ValueError as exc:  # unknown backend, unusable backend, unknown case id
            console.print(f"[red]{name}[/]: {exc}", highlight=False)
            status = max(status, 1)
    return status
