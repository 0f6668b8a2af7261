"""Integrations of dshal's operators with model libraries and frameworks.

:mod:`dshal.integrations.transformers` registers sparse attention with Hugging Face
transformers; :mod:`dshal.jax` (top level, as :mod:`dshal.torch` is) gives JAX users the
operators with gradients. Each needs its framework, installed with an extra of the ``dshal``
distribution (``pip install 'dshal[transformers]'``, ``'dshal[jax]'``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, minimum: str | None = None) -> ModuleType:
    """Import ``module`` for a dshal integration, or raise an ``ImportError`` naming the extra.

    :param module: the framework's import name (``"transformers"``, ``"jax"``).
    :param extra: the ``dshal`` extra that installs it.
    :param minimum: the lowest major version the integration works with (``"5"``), if any.
    """
    hint = f"pip install 'dshal[{extra}]'"
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this dshal integration needs {module}, which is not installed: "
                          f"{hint}") from exc
    version = getattr(mod, "__version__", "0")
    if minimum is not None and int(version.split(".")[0]) < int(minimum):
        raise ImportError(f"this dshal integration needs {module}>={minimum}, found {version}: "
                          f"{hint}")
    return mod
