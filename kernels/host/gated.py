"""``gated_channels`` on a device (kernels/gated.cl, with gemm.cl for the weight product), for
any :class:`Session`.

The mask kernel decides the open channels. Without a weight, one kernel gates x. With a weight,
the mask comes back to the host (one byte per gate) to list the channels open in any row; only
those weight rows are packed (``gemm_pack_bt``) and multiplied (``gemm_tile``), and
``gated_finish`` writes gate * (product + bias) into the open positions of a zero-filled y.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dshal.calls import GatedCall, resolve_count
from dshal_kernels import GatedDefines, GemmDefines
from dshal_kernels.host.session import Program, Session

_I32, _F32 = np.int32, np.float32


def threshold32(t: float) -> np.float32:
    """The smallest float32 ``c`` with ``c > t``, so ``z >= c`` equals ``z > t`` for every
    float32 ``z`` (NaN when nothing exceeds ``t``: then no logit is open)."""
    if t == math.inf:
        return _F32(np.nan)
    with np.errstate(over="ignore"):
        c = _F32(t)
    if float(c) <= t:
        c = np.nextafter(c, _F32(np.inf))
    return _F32(c)


def gated_channels(s: Session, call: GatedCall) -> tuple[Any, Any]:
    """Run ``gated_channels`` (DESIGN 3.3) in session ``s``: ``(y, mask)``."""
    xp, x, logits, weight = s.xp, call.x, call.gate_logits, call.weight
    lead, c_in = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    c_out = c_in if weight is None else weight.shape[0]
    static = logits.ndim == 1
    mask_rows = 1 if static else rows
    y = xp.zeros((*lead, c_out), x.dtype)
    mask = (xp.ones if call.mode == "soft" else xp.zeros)(logits.shape, bool)
    if logits.size == 0:
        return y, (mask if call.return_mask else None)
    defines = GatedDefines.make(np.dtype(x.dtype).name, call.mode, call.keep is not None,
                                np.dtype(logits.dtype).name)
    prg = s.program(defines)
    take = int(resolve_count(call.keep, c_out)) if call.keep is not None else 0
    lb = s.upload(logits, "gate_logits")
    mb = s.alloc(logits.size, "mask")
    s.run(prg.gated_mask, (c_out, mask_rows), lb, mb, _I32(mask_rows), _I32(c_out),
          threshold32(call.threshold), _I32(take))
    if weight is not None or call.return_mask:
        mask = s.download(mb, logits.shape, np.uint8).astype(bool)
    if y.size:
        yb = s.alloc(y.nbytes, "y") if weight is None else s.zeros(y.nbytes, "y")
        xb = s.upload(x, "x")
        if weight is None:
            s.run(prg.gated_apply, (c_in, rows), xb, lb, mb, yb, _I32(rows), _I32(c_in),
                  _I32(static))
        else:
            open_any = s.host(mask).reshape(mask_rows, c_out).any(axis=0)
            cols = np.flatnonzero(open_any).astype(np.int32)
            _weighted(s, prg, call, xb, cols, lb, mb, yb, (rows, c_in, c_out, static))
        y = s.download(yb, y.shape, x.dtype)
    return y, (mask if call.return_mask else None)


def _weighted(s: Session, prg: Program, call: GatedCall, xb: Any, cols: np.ndarray, lb: Any,
              mb: Any, yb: Any, dims: tuple[int, int, int, bool]) -> None:
    """y at the open channels ``cols``: gate * (x . weight[c] + bias[c]); y is zero filled."""
    rows, K, c_out, static = dims
    n = cols.size
    if n == 0:
        return
    weight = call.weight
    dtype = np.dtype(weight.dtype).name
    gemm = s.program(GemmDefines.make(dtype, dtype, "fp32", "float32"))
    tm, tn = GemmDefines.TM, GemmDefines.TN
    Mp, Np = -(-rows // tm) * tm, -(-n // tn) * tn
    ones = s.upload(np.ones(1, _F32), "unit scale")
    unit = (ones, _I32(0), _I32(0), _I32(1), _I32(1))
    cb = s.upload(cols, "open channels")
    ap, bp = s.alloc(4 * Mp * K, "packed x"), s.alloc(4 * Np * K, "packed weight rows")
    s.run(gemm.gemm_pack_a, (K, Mp), xb, ap, *unit, _I32(rows), _I32(K), _I32(Mp))
    # only the open rows travel and are read: closed ones may hold anything, even NaN
    open_rows = s.upload(weight[s.xp.asarray(cols)], "open weight rows")
    s.run(gemm.gemm_pack_bt, (Np, K), open_rows, s.upload(np.arange(n, dtype=np.int32), "rows"),
          bp, _I32(K), _I32(n), _I32(Np))
    t = s.alloc(4 * Mp * Np, "products")  # [Mp, Np]: padded to whole tiles
    s.run(gemm.gemm_tile, (Np // tn, Mp // tm), ap, bp, t, ones, _I32(0), *unit, *unit,
          _I32(rows), _I32(n), _I32(K), _I32(max(K, 1)), _I32(Np))
    bias = s.upload(call.bias, "bias") if call.bias is not None else ones
    s.run(prg.gated_finish, (n, rows), t, _I32(Np), cb, lb, mb, bias,
          _I32(call.bias is not None), yb, _I32(rows), _I32(n), _I32(c_out), _I32(static))
