"""The dshal exception hierarchy.

Argument errors are plain :class:`ValueError` / :class:`TypeError` subclasses so that callers can
catch them the usual way; every message names the argument, what was given and what is allowed.
Dispatch and plugin failures derive from :class:`DshalError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class DshalError(Exception):
    """Base class of every error raised by dshal itself (not argument errors)."""


class DshalValueError(DshalError, ValueError):
    """An argument has a value that is not allowed."""


class DshalTypeError(DshalError, TypeError):
    """An argument has a type (array library, dtype, Python type) that is not allowed."""


class PluginError(DshalError):
    """A backend plugin failed to import, register, probe, or broke the plugin contract."""


class UnsupportedError(DshalError):
    """No backend (or the forced one) can take a call.

    ``reasons`` maps each backend name to the human-readable reasons it refused the call; an
    empty list means that backend accepts it (a forced backend refused, another would not).
    """

    def __init__(self, message: str, reasons: Mapping[str, Sequence[str]] | None = None):
        self.reasons = {name: list(r) for name, r in (reasons or {}).items()}
        lines = [message]
        for name, why in self.reasons.items():
            lines.append(f"  {name}: " + ("; ".join(why) if why else "accepts this call"))
        super().__init__("\n".join(lines))


class NoBackendError(UnsupportedError):
    """No installed backend serves the inputs' device and the fallback policy forbids the host."""


class BackendRuntimeError(DshalError, RuntimeError):
    """A backend accepted a call but failed while running it (device fault, out of memory...)."""
