"""Compiled or interpreted: how the triton backend runs its kernels, decided once per process.

Normally every kernel is a ``@triton.jit`` function compiled for the GPU the tensors live on.
With ``DSHAL_TRITON_INTERPRET=1`` the backend runs the *same* kernel sources under Triton's
interpreter on torch CPU tensors, and serves nothing else: this is how the kernels are
certified without a GPU. Triton decides at decoration time whether a ``@triton.jit`` function
(its own ``tl.zeros``, ``tl.max``... included) is interpreted, from ``TRITON_INTERPRET``, so
interpreter mode sets ``TRITON_INTERPRET=1`` before triton is first imported; when triton was
imported earlier without it, the probe reports the backend unusable and says why. CPU tensors
are never served in normal use: a torch CPU call goes to the numpy or torch backend.
"""

from __future__ import annotations

import os
import sys

#: the variable that turns interpreter mode on (``1``); anything else leaves it off
ENV = "DSHAL_TRITON_INTERPRET"


def interpreting() -> bool:
    """Whether this process runs the kernels under Triton's interpreter on CPU tensors."""
    return os.environ.get(ENV, "") == "1"


def prepare() -> str:
    """Make triton's import match the mode; ``""`` when it does, else why it cannot.

    Interpreter mode sets ``TRITON_INTERPRET=1`` when triton is not imported yet.
    """
    if not interpreting():
        return ""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return ""
    import triton

    if triton.knobs.runtime.interpret:
        return ""
    return (f"{ENV}=1 but triton was imported before dshal loaded its backends without "
            "TRITON_INTERPRET=1, so its kernels compile for a GPU: set TRITON_INTERPRET=1 too, "
            "or load dshal's backends first")
