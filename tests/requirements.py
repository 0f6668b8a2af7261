"""Module-level requirements of test files."""

from __future__ import annotations

import pytest

from dshal.registry import Backend, registry


def require_backend(name: str) -> Backend:
    """dshal's ``name`` backend; skips the calling test module unless it is installed and
    usable here (with the reason dshal gives)."""
    backend = registry.backends().get(name)
    if backend is None or not backend.available:
        why = backend.unavailable_reason() if backend else "not installed"
        pytest.skip(f"the {name} backend is not installed or has no usable device: {why}",
                    allow_module_level=True)
    return backend
