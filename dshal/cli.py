"""The ``dshal`` command line: ``info``, ``explain`` and ``certify``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

from dshal.capabilities import DLPACK_DEVICE_TYPES

ARRAY_ARGS = {
    "sparse_attention": (("q", "k", "v"), ("indices",)),
    "gemm": (("a", "b"), ("bias", "a_scale", "b_scale")),
    "quantize": (("x",), ()),
    "gated_channels": (("x", "gate_logits"), ("weight", "bias")),
    "sparse_attention_backward": (("q", "k", "v", "out", "lse", "grad_out"),
                                  ("grad_lse", "indices")),
}
#: arguments whose dtype is fixed, whatever --dtype says for the others
FIXED_DTYPES = {"indices": "int64", "lse": "float32", "grad_lse": "float32"}


def _yes(flag: bool, detail: str = "") -> str:
    return ("yes" if flag else "no") + (f" ({detail})" if detail else "")


def info_rows() -> list[dict[str, Any]]:
    """One record per installed backend: what ``dshal info`` shows."""
    from dshal.registry import (
        AVAILABLE,
        BROKEN,
        CONFLICT,
        DISABLED,
        INCOMPATIBLE,
        NO_DEVICE,
        registry,
    )

    rows = []
    for name, b in sorted(registry.backends().items()):
        spec, dev = b.spec, b.device
        imported = b.status not in (DISABLED, CONFLICT) and \
            not (b.status == BROKEN and b.stage == "import")
        rows.append({
            "name": name,
            "distribution": b.distribution,
            "entry_point": b.entry_point,
            "status": b.status,
            "installed": True,
            "importable": imported if b.status not in (DISABLED, CONFLICT) else None,
            "api_compatible": (spec is not None and b.status != INCOMPATIBLE) if imported
            else None,
            "device_found": b.status == AVAILABLE if b.status in (AVAILABLE, NO_DEVICE)
            else None,
            "device": dev.name if dev else "",
            "driver": dev.driver if dev else "",
            "version": spec.version if spec else "",
            "priority": spec.priority if spec else None,
            "ops": {op: sorted(cap.dtypes) for op, cap in spec.capabilities.items()}
            if spec else {},
            "precisions": {op: sorted(cap.precisions) for op, cap in spec.capabilities.items()
                           if cap.precisions} if spec else {},
            "features": {op: sorted(cap.features) for op, cap in spec.capabilities.items()}
            if spec else {},
            "notes": list(b.notes),
            "error": b.unavailable_reason() if b.status != AVAILABLE else "",
            "details": dict(dev.details) if dev else {},
        })
    return rows


def backward_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Which available backends serve the backward of sparse_attention, per device type,
    highest priority first (plugin API 2; API-1 plugins serve none)."""
    from dshal.capabilities import device_type_name
    from dshal.registry import registry

    by_device: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        b = registry.backends().get(r["name"])
        if b is None or not b.available or "sparse_attention_backward" not in b.spec.capabilities:
            continue
        for code in b.spec.device_types:
            by_device.setdefault(device_type_name(code), []).append((-b.spec.priority, b.name))
    if not by_device:
        return ["sparse_attention backward: no available backend serves it"]
    return ["sparse_attention backward served by (first = automatic choice):"] + [
        f"  {device}: {', '.join(n for _, n in sorted(names))}"
        for device, names in sorted(by_device.items())]


def console():
    """A rich console; wide when the output is not a terminal (logs, pipes, CI)."""
    from rich.console import Console

    term = Console()
    return term if term.is_terminal else Console(width=160)


def cmd_info(args: argparse.Namespace) -> int:
    rows = info_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    def cell(v: Any) -> str:
        return "-" if v is None else "[green]yes[/]" if v is True else "[red]no[/]" if v is False \
            else str(v)

    out = console()
    status = Table(title="dshal backends")
    for col in ("backend", "version", "installed", "importable", "API", "device found",
                "device", "driver"):
        status.add_column(col)
    for r in rows:
        status.add_row(r["name"], r["version"], cell(r["installed"]), cell(r["importable"]),
                       cell(r["api_compatible"]), cell(r["device_found"]), r["device"],
                       r["driver"])
    out.print(status)
    caps = Table(title="operators: dtypes, precisions and features")
    for col in ("backend", "op", "dtypes", "precisions", "features"):
        caps.add_column(col)
    for r in rows:
        for op, dtypes in r["ops"].items():
            caps.add_row(r["name"], op, ", ".join(dtypes),
                         ", ".join(r["precisions"].get(op, [])) or "-",
                         ", ".join(r["features"].get(op, [])) or "-")
    if caps.row_count:
        out.print(caps)
    for line in backward_lines(rows):
        out.print(line, highlight=False, markup=False)
    for r in rows:  # what each probe found (an OpenCL backend lists every platform/device)
        if r["details"]:
            out.print(f"[bold]{r['name']}[/] device details:", highlight=False)
            for key, value in r["details"].items():
                out.print(f"  {key}: {value}", highlight=False, markup=False)
    for r in rows:
        for note in r["notes"]:
            out.print(f"[bold]{r['name']}[/]: {escape(note)}", highlight=False)
    for r in rows:
        if r["error"]:
            # errors are plain text: "[cuda12]" in an install hint is not rich markup
            out.print(f"[bold]{r['name']}[/]: {escape(r['error'])}", highlight=False)
    if not rows:
        out.print("no backend installed (expected at least the built-in 'numpy')")
        return 1
    return 0


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_device(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    kind, _, index = text.partition(":")
    codes = {v: k for k, v in DLPACK_DEVICE_TYPES.items()}
    if kind not in codes:
        raise SystemExit(f"--device {text!r}: unknown device type (known: {', '.join(codes)})")
    return codes[kind], int(index or 0)


def cmd_explain(args: argparse.Namespace) -> int:
    import numpy as np

    import dshal
    from dshal.dtypes import numpy_dtype

    positional, keyword = ARRAY_ARGS[args.op]
    shapes: dict[str, tuple[int, ...]] = {}
    for item in args.shape:
        name, _, dims = item.partition("=")
        shapes[name] = tuple(int(d) for d in dims.split(",") if d.strip()) if dims else ()
    dtypes = {"*": "float32"}
    for item in args.dtype:
        name, sep, dt = item.partition("=")
        dtypes.update({name: dt} if sep else {"*": name})
    missing = [n for n in positional if n not in shapes]
    if missing:
        raise SystemExit(f"explain {args.op}: give --shape for {', '.join(missing)} "
                         f"(e.g. --shape {missing[0]}=1,8,128,64)")

    def array(name: str) -> Any:
        default = FIXED_DTYPES.get(name, dtypes["*"])
        return np.broadcast_to(np.zeros((), numpy_dtype(dtypes.get(name, default))), shapes[name])

    call_args = [array(n) for n in positional]
    kwargs = {n: array(n) for n in keyword if n in shapes}
    for item in args.option:
        name, _, value = item.partition("=")
        kwargs[name] = _parse_value(value)
    explanation = dshal.explain(args.op, *call_args, backend=args.backend,
                                device=_parse_device(args.device), **kwargs)
    print(explanation)
    return 0 if explanation.backend is not None else 1  # "cannot run" is a failure


def cmd_certify(args: argparse.Namespace) -> int:
    try:
        from dshal_conformance.cli import run_certify
    except ImportError as exc:
        if exc.name == "hypothesis":
            print("dshal certify needs hypothesis (its property-based cases): "
                  "pip install 'dshal[certify]'", file=sys.stderr)
        else:
            print(f"the conformance suite is not installed: {exc}", file=sys.stderr)
        return 2
    return run_certify(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dshal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="installed backends: status, devices, ops and dtypes")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
    ex = sub.add_parser("explain", help="which backend would run a call, and why not the "
                        "others (exit status 1 when the call cannot run)")
    ex.add_argument("op", choices=sorted(ARRAY_ARGS))
    ex.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...")
    ex.add_argument("--dtype", action="append", default=[], metavar="[NAME=]DTYPE")
    ex.add_argument("--option", "-o", action="append", default=[], metavar="NAME=VALUE",
                    help="operator keyword argument, e.g. top_k=8, causal=true")
    ex.add_argument("--backend", help="force a backend")
    ex.add_argument("--device", help="pretend the inputs are on DEVICE[:ID], e.g. cuda:0")
    ex.set_defaults(func=cmd_explain)
    about = ("certify backends against the float64 reference (needs hypothesis: pip install "
             "'dshal[certify]')")
    cert = sub.add_parser("certify", help=about, description=about)
    cert.add_argument("backends", nargs="*", help="backends to certify (default: all usable)")
    depth = cert.add_mutually_exclusive_group()
    depth.add_argument("--quick", action="store_true",
                       help="fewer cases and property examples (a smoke test: seconds on "
                            "the numpy backend)")
    depth.add_argument("--full", action="store_true", help="every case (the default)")
    cert.add_argument("--out", default="certificates",
                      help="directory the certificates are written to, one JSON and one "
                           "Markdown file per backend (default: ./certificates); {rank}, "
                           "{local_rank} and {host} are replaced (torchrun's RANK, "
                           "LOCAL_RANK; the host name)")
    cert.add_argument("--seed", type=int, default=0)
    cert.add_argument("--device", default=None,
                      help="device id passed to the backend ({local_rank} is replaced)")
    cert.add_argument("--case", action="append", metavar="ID",
                      help="run only this case (repeatable; reproduces a reported failure, "
                           "writes no certificate)")
    cert.add_argument("--verify", metavar="FILE.json",
                      help="check a certificate: structure, digest, consistency, signature")
    cert.add_argument("--trust", metavar="KEY.pub",
                      help="with --verify: require a signature by this ed25519 public key")
    cert.add_argument("--reproduce", type=int, nargs="?", const=20, default=None, metavar="N",
                      help="with --verify: rerun N recorded cases here (default 20) and compare "
                           "their output digests")
    cert.add_argument("--sign", metavar="KEY", help="sign the certificates with this ed25519 "
                                                    "private key (see --keygen)")
    cert.add_argument("--keygen", metavar="DIR",
                      help="write a new signing key pair into DIR and exit")
    cert.add_argument("--merge", nargs="+", metavar="FILE.json",
                      help="check a fleet's certificates (one per node) and print one row "
                           "per node; fails when any failed or same-version nodes disagree")
    cert.set_defaults(func=cmd_certify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dshal`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
