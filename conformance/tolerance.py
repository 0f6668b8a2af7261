"""The tolerance policy: every constant the suite's bounds use, its derivation and calibration.

The reference recomputes each case in float64 from the backend's *own* rounded or quantised
inputs, so the only error left to bound is the backend's arithmetic. Notation: ``y`` the float64
reference, ``ŷ`` the backend's output, ``u_out`` / ``ulp_out`` the unit roundoff / ulp of the
output dtype, ``u_acc`` that of the accumulator (fp32; fp64 for float64 inputs), ``u_in`` that
of rounding the backend may apply to intermediate operands, ``K`` the accumulation length.

**Element gate.** A dot product of length ``K`` accumulated at precision ``u_acc`` errs by at
most ``γ_K Σ|a||b|``, ``γ_K ≈ K u_acc``, in the worst case; modelling rounding errors as
independent and mean-zero gives ``|err| <= λ sqrt(K) u_acc Σ|a||b|`` except with probability at
most ``2 exp(-λ²/2)`` (Higham & Mary, *A new approach to probabilistic rounding error
analysis*, SISC 2019). Rounding the result to the output dtype adds half an ulp. Per element::

    |ŷ - y| <= C_ULP ulp_out(|y|) + C_ELEM [(u_in + u_acc sqrt(K)) M + extra] + (K+1) η

with ``η`` the accumulator's smallest subnormal (gradual underflow), and

- gemm: ``M = Σ_k |â_ik||b̂_kj| + |bias_j|``, ``u_in = 3 u_acc`` (up to three roundings per
  product term: applying the scale to an fp8/int8 ``a`` value, to a ``b`` value, multiplying);
- attention: ``M = Σ_j P_ij |v_j|`` over the allowed keys (``P`` the float64 softmax),
  ``K`` = the number of allowed keys, ``u_in`` = the input dtype's roundoff (kernels may round
  ``P`` to the input dtype before ``P V``, as FlashAttention does). The logits ``s = scale q.k``
  carry an absolute error up to ``δ_i = u_acc (sqrt(D) + 3) L_i`` (scaling, a D-term dot
  product, subtracting the running max) with ``L_i`` the largest ``|scale| Σ_d |q_id||k_jd|``
  over allowed keys; it perturbs each ``P_ij`` relatively by ``δ_i``: ``extra = δ_i (M_i +
  |y_i|)``. The log-sum-exp gets ``M = 1`` (``u_acc sqrt(K)`` from the sum) and ``extra = δ_i``;
- gated_channels: ``M = |gate| (Σ|x||w| + |bias|)`` (or ``|gate x|``), ``u_in = C_SIGMOID
  u_acc`` for the sigmoid of the soft modes (``u_acc`` for hard); closed channels must be 0.

``C_ULP = 2.5`` gives a correctly rounded result 5x headroom; ``C_ELEM = λ = 6`` puts the
probability that a correct fp32 accumulation exceeds the bound below ``2e^-18 ≈ 3e-8`` per
element (a bug like an off-by-one mask or a wrong alignment misses it by orders of magnitude).

**Aggregate gate.** The element gate is a per-element worst case; a silent downgrade (fp32
computed as tf32 or bf16) shows in the *statistics* of the error. Random rounding errors add
in quadrature, so the error a correct kernel makes at the declared precision has the scale::

    σ_i = sqrt((u_out y_i)² + (u_in² + K u_acc²) R_i² + extra_rss_i²),   R_i = sqrt(Σ (a b)²)

(``R = sqrt(Σ_j P_ij² v_j²)``, bounded by ``sqrt(max_j P_ij Σ_j P_ij v_j²)``, for attention)
and the gate is ``||ŷ - y||_F <= C_AGG ||σ||_F``. A bf16 (tf32) downgrade of an fp32 gemm errs
by about ``2^-8 (2^-11) sqrt(2) R``, ``2^16 (2^13) sqrt(2/K)`` times ``σ``: at K = 4096 still
30x (4x) beyond the gate. ``C_AGG = 5`` leaves a correctly rounded output (error at most
``u_out |y|``) 5x headroom even on a single element.

**Top-k selection.** A returned selection is valid when no unselected candidate outscores a
selected one by more than ``C_SCORE (u_in + u_acc sqrt(D + g + block_size)) S`` with
``S = |scale| max_b Σ_d (Σ_h |q_hd|) mean_b |k_d|`` (the scores' magnitude in that row); rows
whose reference cut lies within that margin are *ambiguous* and are not compared element-wise
when a backend does not return its selection.

**Quantisation** is compared exactly: scales bit for bit, values bit for bit except that an
adjacent code is accepted where ``x / scale`` lies within ``C_TIE u_acc |x / scale|`` of the
rounding boundary between the two codes (a kernel may multiply by ``1 / scale``, which moves a
value across a tie by one float32 rounding). gemm's on-the-fly operands are the backend's own
quantisation (its ``quantize``) when that agrees with the reference's in this sense.

**Calibration.** :data:`CALIBRATION` records the largest err/bound ratios the built-in numpy
backend reached over seeds 0-4 of the full suite (``python -m dshal_conformance.calibrate``
re-measures them); every ratio must stay at or below ``1 / HEADROOM``. Each certificate
prints these constants, this calibration and its own measured ratios.
"""

from __future__ import annotations

from typing import Any

#: output rounding: ulps of the output dtype allowed (a correctly rounded result uses 1/2)
C_ULP = 2.5
#: λ of the probabilistic element bound (u_in + u_acc sqrt(K)) M
C_ELEM = 6.0
#: multiplier of the aggregate (Frobenius) gate at the declared precision
C_AGG = 5.0
#: multiplier of the selection-score tolerance that decides near-ties
C_SCORE = 4.0
#: float32 roundings allowed around a quantisation tie (units of u_acc |x / scale|)
C_TIE = 4.0
#: float32 roundings in a sigmoid (exp, add, divide, multiply)
C_SIGMOID = 4.0
#: the minimum margin the reference backend keeps below every bound
HEADROOM = 4.0

#: largest err/bound ratio per operator and gate measured on the numpy backend (full suite,
#: seeds 0-4); written by ``python -m dshal_conformance.calibrate``
CALIBRATION: dict[str, Any] = {
    "backend": "numpy",
    "mode": "full",
    "seeds": [0, 1, 2, 3, 4],
    "max_ratio": {
        "gated_channels": {"element": 0.2, "aggregate": 0.1811},
        "gemm": {"element": 0.2116, "aggregate": 0.1761},
        "quantize": {"element": 0.0, "aggregate": 0.0},
        "sparse_attention": {"element": 0.1998, "aggregate": 0.2097},
    },
    "note": "0.2 = 1/C_ULP x 1/2: correctly rounded outputs; quantize is compared exactly",
}


def constants() -> dict[str, float]:
    """The bound constants by name, as printed in certificates."""
    return {"C_ULP": C_ULP, "C_ELEM": C_ELEM, "C_AGG": C_AGG, "C_SCORE": C_SCORE,
            "C_TIE": C_TIE, "C_SIGMOID": C_SIGMOID, "HEADROOM": HEADROOM}


def policy() -> dict[str, Any]:
    """Constants and calibration record, the ``tolerance`` section of a certificate."""
    return {"constants": constants(), "calibration": CALIBRATION,
            "element_gate": "|err| <= C_ULP ulp_out(|y|) + C_ELEM ((u_in + u_acc sqrt(K)) M"
                            " + extra) + (K + 1) eta",
            "aggregate_gate": "||err||_F <= C_AGG ||sqrt((u_out y)^2 + (u_in^2 + K u_acc^2) R^2"
                              " + extra_rss^2)||_F, R = sqrt(sum (a b)^2)"}
