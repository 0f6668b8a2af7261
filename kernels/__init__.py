"""dshal's portable kernel sources (the package ``dshal_kernels``, directory ``kernels/``).

One source per operator (``attention.cl``, ``gemm.cl``, ``quantize.cl``, ``gated.cl``) plus the
vendor header ``inc_vendor.h``; each compiles unchanged as OpenCL C, CUDA (NVRTC) and HIP. Every
device backend (opencl now, cuda/rocm later) gets the text from :func:`source` and its build
options from a :class:`Defines` dataclass, so the source list and the define builder exist once.

Shapes that size registers (head dims, tiles) and dtypes are compile-time defines; extents
(lengths, batch, M/N/K) are kernel arguments, so one program serves every size of a call shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["DTYPES", "KERNELS", "AttentionDefines", "Defines", "GatedDefines", "GemmDefines",
           "QuantizeDefines", "Target", "check_variants", "digest", "source"]

VENDOR_HEADER = "inc_vendor.h"
_INCLUDE = f'#include "{VENDOR_HEADER}"'

#: storage dtype -> (C type, load adapter to float32, store adapter from float32 or "")
DTYPES: dict[str, tuple[str, str, str]] = {
    "float32": ("float", "dshal_ld_f32", "dshal_st_f32"),
    "float16": ("ushort", "dshal_ld_f16", "dshal_st_f16"),
    "bfloat16": ("ushort", "dshal_ld_bf16", "dshal_st_bf16"),
    "float8_e4m3fn": ("uchar", "dshal_ld_e4m3", ""),
    "float8_e5m2": ("uchar", "dshal_ld_e5m2", ""),
    "int8": ("schar", "dshal_ld_i8", ""),
}
#: precision -> its rounding function of float32 (vendor header)
ROUNDING = {"fp32": "dshal_round_f32", "tf32": "dshal_round_tf32", "bf16": "dshal_round_bf16",
            "fp16": "dshal_round_f16"}


@dataclass(frozen=True)
class Defines:
    """Base of the per-kernel define records: each field becomes ``-DNAME=value``.

    Field names are the macro names; ``bool`` becomes 0/1. Subclasses set :attr:`kernel`, the
    source file they configure.
    """

    kernel = ""

    def items(self) -> list[tuple[str, str]]:
        """``(macro, value)`` pairs in field order."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out.append((f.name, str(int(value)) if isinstance(value, bool) else str(value)))
        return out

    def options(self) -> list[str]:
        """Compiler options, ``["-DNAME=value", ...]``, for any of the three compilers."""
        return [f"-D{name}={value}" for name, value in self.items()]


def _dtype_fields(prefix: str, dtype: str, store: bool = True) -> dict[str, str]:
    if dtype not in DTYPES:
        raise ValueError(f"{prefix} dtype {dtype!r} has no kernel type (known: {sorted(DTYPES)})")
    ctype, load, st = DTYPES[dtype]
    fields = {f"{prefix}_T": ctype, f"{prefix}_LOAD": load}
    if store:
        fields[f"{prefix}_STORE"] = st
    return fields


@dataclass(frozen=True)
class AttentionDefines(Defines):
    """``attention.cl``: head dims, heads per work-item, keys per chunk, the dtype of
    q/k/v/out, selection."""

    D: int = 64
    DV: int = 64
    HPW: int = 1
    KC: int = 16
    X_T: str = "float"
    X_LOAD: str = "dshal_ld_f32"
    X_STORE: str = "dshal_st_f32"
    HAS_SEL: bool = False
    kernel = "attention"

    @classmethod
    def make(cls, dtype: str, d: int, dv: int, hpw: int, has_sel: bool) -> AttentionDefines:
        return cls(D=d, DV=dv, HPW=hpw, HAS_SEL=has_sel, **_dtype_fields("X", dtype))


@dataclass(frozen=True)
class GemmDefines(Defines):
    """``gemm.cl``: tile, mode (0 float, 1 fp8, 2 int8), operand storage, rounding, output."""

    TM: int = 4
    TN: int = 16
    MODE: int = 0
    A_T: str = "float"
    A_LOAD: str = "dshal_ld_f32"
    B_T: str = "float"
    B_LOAD: str = "dshal_ld_f32"
    ROUND: str = "dshal_round_f32"
    PK_T: str = "float"
    OUT_T: str = "float"
    OUT_STORE: str = "dshal_st_f32"
    BIAS_T: str = "float"
    BIAS_LOAD: str = "dshal_ld_f32"
    kernel = "gemm"

    @classmethod
    def make(cls, a: str, b: str, precision: str, out: str, bias: str = "float32",
             tm: int = 4, tn: int = 16) -> GemmDefines:
        mode = 2 if precision == "int8" else 1 if precision.startswith("fp8") else 0
        fa, fb = _dtype_fields("A", a, False), _dtype_fields("B", b, False)
        fo, fbias = _dtype_fields("OUT", out), _dtype_fields("BIAS", bias, False)
        return cls(TM=tm, TN=tn, MODE=mode, ROUND=ROUNDING.get(precision, "dshal_round_f32"),
                   PK_T="int" if mode == 2 else "float", OUT_T=fo["OUT_T"],
                   OUT_STORE=fo["OUT_STORE"], **fa, **fb, **fbias)


@dataclass(frozen=True)
class QuantizeDefines(Defines):
    """``quantize.cl``: input dtype, target code format, and the float-rounding output."""

    X_T: str = "float"
    X_LOAD: str = "dshal_ld_f32"
    QMAX: str = "448.0f"
    Q_KIND: int = 0
    Q_T: str = "uchar"
    R_T: str = "float"
    R_STORE: str = "dshal_st_f32"
    kernel = "quantize"

    @classmethod
    def make(cls, dtype: str, precision: str) -> QuantizeDefines:
        fx = _dtype_fields("X", dtype, False)
        kind = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}.get(precision, 0)
        qmax = {0: "448.0f", 1: "57344.0f", 2: "127.0f"}[kind]
        r_t, r_store = {"fp32": ("float", "dshal_st_f32"), "tf32": ("float", "dshal_round_tf32"),
                        "bf16": ("ushort", "dshal_st_bf16"),
                        "fp16": ("ushort", "dshal_st_f16")}.get(precision,
                                                                ("float", "dshal_st_f32"))
        return cls(QMAX=qmax, Q_KIND=kind, Q_T="schar" if kind == 2 else "uchar", R_T=r_t,
                   R_STORE=r_store, **fx)


@dataclass(frozen=True)
class GatedDefines(Defines):
    """``gated.cl``: the dtype of x/bias/y and of the logits, the gate mode, top-``keep``."""

    X_T: str = "float"
    X_LOAD: str = "dshal_ld_f32"
    X_STORE: str = "dshal_st_f32"
    L_T: str = "float"
    L_LOAD: str = "dshal_ld_f32"
    GATE: int = 0
    KEEP: bool = False
    kernel = "gated"

    @classmethod
    def make(cls, dtype: str, mode: str, keep: bool, logits: str | None = None
             ) -> GatedDefines:
        gate = {"hard": 0, "soft": 1, "soft_hard": 2}[mode]
        return cls(GATE=gate, KEEP=keep, **_dtype_fields("X", dtype),
                   **_dtype_fields("L", logits or dtype, False))


@dataclass(frozen=True)
class Target:
    """Host facts every kernel may test: ``HAS_CR_DIV`` (correctly rounded float32 division is
    available, so ``DIV_RN`` is a plain division)."""

    HAS_CR_DIV: bool = False

    def options(self) -> list[str]:
        return [f"-D{f.name}={int(getattr(self, f.name))}" for f in dataclasses.fields(self)]


#: source file stem -> (define record type, entry points)
KERNELS: dict[str, tuple[type[Defines], tuple[str, ...]]] = {
    "attention": (AttentionDefines, ("attn_block_means", "attn_scores", "attn_topk",
                                     "attn_idx_mask", "attn_compact", "attn_prep",
                                     "attn_fwd", "attn_seq_means", "attn_seq_scores",
                                     "attn_seq_topk", "attn_seq_prep", "attn_seq_fwd",
                                     "attn_bwd_delta", "attn_bwd_dq", "attn_bwd_dkv")),
    "gemm": (GemmDefines, ("gemm_pack_a", "gemm_pack_b", "gemm_pack_bt", "gemm_tile")),
    "quantize": (QuantizeDefines, ("quant_amax", "quant_scale", "quant_encode",
                                   "quant_round")),
    "gated": (GatedDefines, ("gated_mask", "gated_apply", "gated_finish")),
}


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@cache
def source(kernel: str) -> str:
    """The full text of ``kernels/<kernel>.cl`` with the vendor header inlined (so a compiler
    needs no include path and the text alone identifies the program)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} (known: {', '.join(KERNELS)})")
    lines = _read(f"{kernel}.cl").splitlines()
    if _INCLUDE not in lines:
        raise ValueError(f"kernels/{kernel}.cl does not include {VENDOR_HEADER}")
    at = lines.index(_INCLUDE)
    lines[at] = (f'#line 1 "{VENDOR_HEADER}"\n{_read(VENDOR_HEADER)}\n'
                 f'#line {at + 2} "{kernel}.cl"')
    return "\n".join(lines) + "\n"


def digest(text: str, options: list[str] | tuple[str, ...]) -> str:
    """sha256 of a source text and its build options (part of a program cache key)."""
    h = hashlib.sha256(text.encode())
    h.update("\0".join(options).encode())
    return h.hexdigest()


def check_variants() -> dict[str, list[Defines]]:
    """The define sets ``make kernels-check`` compiles for each kernel: every dtype/mode path
    (each #if branch) at least once."""
    return {
        "attention": [AttentionDefines.make("float32", 64, 64, 8, True),
                      AttentionDefines.make("float16", 160, 160, 1, False),
                      AttentionDefines.make("bfloat16", 3, 17, 1, True),
                      # the GPU backends' shape: one head per thread, D = 128
                      AttentionDefines.make("bfloat16", 128, 128, 1, True)],
        "gemm": [GemmDefines.make("float32", "float32", "fp32", "float32"),
                 GemmDefines.make("bfloat16", "bfloat16", "tf32", "bfloat16", "bfloat16"),
                 GemmDefines.make("float16", "float16", "fp16", "float16", "float16"),
                 GemmDefines.make("float8_e4m3fn", "float8_e4m3fn", "fp8_e4m3", "float32"),
                 GemmDefines.make("float8_e5m2", "float8_e5m2", "fp8_e5m2", "float32"),
                 GemmDefines.make("int8", "int8", "int8", "float32")],
        "quantize": [QuantizeDefines.make("float32", "fp8_e4m3"),
                     QuantizeDefines.make("float16", "fp8_e5m2"),
                     QuantizeDefines.make("bfloat16", "int8"),
                     QuantizeDefines.make("float32", "tf32"),
                     QuantizeDefines.make("float32", "bf16"),
                     QuantizeDefines.make("float16", "fp16"),
                     # the CuPy backends round BLAS operands from any float dtype
                     QuantizeDefines.make("bfloat16", "tf32"),
                     QuantizeDefines.make("float16", "bf16"),
                     QuantizeDefines.make("bfloat16", "fp32")],
        "gated": [GatedDefines.make("float32", "hard", False),
                  GatedDefines.make("float16", "soft", False),
                  GatedDefines.make("bfloat16", "soft_hard", True, "float32")],
    }
