"""The dshal plugin contract: every hook a backend plugin may implement.

A backend plugin is a module (or object) exposed through the entry-point group
``dshal.backends``; the entry-point name is the backend name::

    [project.entry-points."dshal.backends"]
    myaccel = "dshal_myaccel.plugin"

The module marks its hook functions with :data:`hookimpl`. Each plugin gets its own pluggy
``PluginManager`` validated against this module, so an implementation with an unknown hook name
or an argument the spec does not have is rejected at load time (implementations may accept a
subset of a hook's arguments, so the spec can grow without breaking plugins).

Required: :func:`dshal_backend_declare`, :func:`dshal_device_probe`, and one ``*_run`` hook per
operator the backend declares. Optional: :func:`dshal_call_check`.

Plugin API 2 added the backward of ``sparse_attention`` as an operator of its own
(:func:`dshal_sparse_attention_backward_run`, capability ``"sparse_attention_backward"``). A
plugin declaring ``plugin_api=(1, 1)`` keeps loading and simply does not serve it.

Array conventions: a run hook receives a validated call record from :mod:`dshal.calls` with
arrays of the backend's declared ``array_kind`` on its device, and returns arrays of that kind;
dshal converts them back to the caller's library and device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from dshal.calls import (
        AttentionBackwardCall,
        AttentionCall,
        GatedCall,
        GemmCall,
        QuantizeCall,
    )
    from dshal.capabilities import BackendSpec, DeviceInfo, Signature

PROJECT = "dshal"
hookspec = pluggy.HookspecMarker(PROJECT)
#: decorator for a plugin's hook implementations
hookimpl = pluggy.HookimplMarker(PROJECT)

# ---------------------------------------------------------------------------------------------
# Identity and lifecycle
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def dshal_backend_declare() -> BackendSpec:
    """Declare the backend: identity, plugin API range, devices served and capabilities.

    Called once when the plugin is loaded. Must be cheap and must not touch the device.

    :return: a :class:`dshal.capabilities.BackendSpec` whose ``name`` equals the entry-point
        name. A ``plugin_api`` range that excludes
        :data:`dshal.capabilities.PLUGIN_API_VERSION` makes dshal refuse the plugin with a
        message saying what to upgrade. Stops at the first non-None result.

    .. versionadded:: plugin API 1
    """


@hookspec(firstresult=True)
def dshal_device_probe() -> DeviceInfo:
    """Find the hardware this backend runs on.

    Called once, after a successful declaration. It must check that a device is really there
    (e.g. a runtime reports a device count > 0), not merely that a vendor package imports.
    Return ``DeviceInfo(present=False, reason=...)`` when there is none; an exception marks the
    plugin broken, with the error shown by ``dshal info``. Stops at the first non-None result.

    .. versionadded:: plugin API 1
    """


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


@hookspec
def dshal_call_check(signature: Signature, device: DeviceInfo) -> list[str] | None:
    """Refine the declared capabilities for one call (optional).

    Called only for calls the declared capabilities accept. Must be pure and fast: the result
    is cached per signature.

    :param signature: the call's :class:`dshal.capabilities.Signature`.
    :param device: what :func:`dshal_device_probe` returned.
    :return: human-readable reasons to refuse the call, each naming the actual value and the
        allowed one; empty or ``None`` to accept.

    .. versionadded:: plugin API 1
    """


# ---------------------------------------------------------------------------------------------
# Operators: each returns arrays of the backend's array_kind. Stop at the first non-None result.
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def dshal_sparse_attention_run(call: AttentionCall) -> tuple[Any, Any | None, Any | None]:
    """Compute ``sparse_attention`` as ``dshal.ops.sparse_attention`` documents.

    :return: ``(out, indices, lse)``: out [B,Hq,Lq,Dv] in q's dtype; indices [B,Hkv,Lq,n]
        int64 (sorted ascending, -1 padded) when ``call.return_indices`` else ``None``;
        lse [B,Hq,Lq] float32 when ``call.return_lse`` else ``None``.

    .. versionadded:: plugin API 1
    """


@hookspec(firstresult=True)
def dshal_quantize_run(call: QuantizeCall) -> tuple[Any, Any | None]:
    """Compute ``quantize`` as ``dshal.ops.quantize`` documents.

    :return: ``(values, scales)``; ``scales`` is ``None`` for the float precisions.

    .. versionadded:: plugin API 1
    """


@hookspec(firstresult=True)
def dshal_gemm_run(call: GemmCall) -> Any:
    """Compute ``gemm`` at ``call.precision`` (never ``"auto"``: dshal resolves it first).

    :return: out [..., M, N] in ``call.out_dtype``.

    .. versionadded:: plugin API 1
    """


@hookspec(firstresult=True)
def dshal_gated_channels_run(call: GatedCall) -> tuple[Any, Any | None]:
    """Compute ``gated_channels`` as ``dshal.ops.gated_channels`` documents.

    :return: ``(y, mask)``; ``mask`` (bool, shape of the gate logits) when
        ``call.return_mask`` else ``None``.

    .. versionadded:: plugin API 1
    """


# ---------------------------------------------------------------------------------------------
# Backward operators (plugin API 2)
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def dshal_sparse_attention_backward_run(call: AttentionBackwardCall) -> tuple[Any, Any, Any]:
    """Compute the gradients of ``sparse_attention`` as DESIGN.md 3.1b states.

    The selection is a constant: ``call.indices`` is the forward's selection (the blocks it
    returned, or the caller's indices), or ``None`` when the forward had none (window or dense
    attention). The gradients are those of softmax attention restricted to each query's allowed
    set: rows with nothing allowed get zero gradients, NaN/Inf in keys or values that are not
    allowed for a query reach none of its gradients, and the sums run in at least fp32.
    ``call.out`` and ``call.lse`` are the forward's output and log-sum-exp (probabilities are
    ``exp(scale q.k - lse)``);
    ``call.grad_lse`` is the gradient of lse when the caller used it, else ``None``.

    :return: ``(dq, dk, dv)`` shaped and typed as q, k and v; dk and dv sum over the g query
        heads of each kv head.

    .. versionadded:: plugin API 2
    """


#: the run hook of each operator
RUN_HOOKS = {
    "sparse_attention": "dshal_sparse_attention_run",
    "quantize": "dshal_quantize_run",
    "gemm": "dshal_gemm_run",
    "gated_channels": "dshal_gated_channels_run",
    "sparse_attention_backward": "dshal_sparse_attention_backward_run",
}

#: what each run hook returns: the names of its tuple's items (``None``: a single array)
RUN_RESULTS: dict[str, tuple[str, ...] | None] = {
    "sparse_attention": ("out", "indices", "lse"),
    "quantize": ("values", "scales"),
    "gemm": None,
    "gated_channels": ("y", "mask"),
    "sparse_attention_backward": ("dq", "dk", "dv"),
}
