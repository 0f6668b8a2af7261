"""Which backend runs a call, and why the others would not.

Selection order: the ``backend=`` argument, then ``with dshal.use_backend(name):``, then the
``DSHAL_BACKEND`` environment variable, then automatic selection: the available backends that
serve the inputs' device and accept the call, highest declared priority first. A forced backend
that cannot take the call raises :class:`~dshal.errors.UnsupportedError` with its reasons. When no
backend on the inputs' device accepts a call, ``DSHAL_FALLBACK`` decides: ``error`` raises,
``warn`` (default) runs on the host backend and warns once per reason, ``allow`` runs there
silently. Decisions are cached per (signature, forced backend, policy). The two environment
variables are read on first use; :func:`clear_cache` makes a running process read them again.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from dshal.capabilities import CPU, Signature, device_type_name
from dshal.errors import DshalValueError, NoBackendError, UnsupportedError
from dshal.registry import Backend, registry

HOST_BACKEND = "numpy"
FALLBACK_POLICIES = ("error", "warn", "allow")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dshal_backend", default=None)
_cache: dict[tuple, Decision] = {}
_warned: set[str] = set()
_env: tuple[str, str] | None = None
_epoch = 0  # bumped by clear_cache: per-plan memos keyed by an older epoch are stale
_MEMO_SIZE = 64


class FallbackWarning(UserWarning):
    """A call ran on the host backend because no backend on its device accepted it."""


@dataclass(frozen=True)
class Decision:
    """The outcome of selection for one call signature."""

    backend: str | None  # None: the call cannot run (see error)
    source: str  # "argument", "use_backend", "DSHAL_BACKEND", "automatic", "fallback"
    reasons: tuple[tuple[str, tuple[str, ...]], ...]  # every other backend's refusal
    error: str = ""
    fallback: bool = False  # inputs must be copied to the host backend's device
    unknown: bool = False  # the forced backend is not installed
    chosen: Backend | None = field(default=None, compare=False, repr=False)

    def explain(self, sig: Signature) -> str:
        """A human-readable account of the decision."""
        lines = [sig.describe()]
        if self.backend:
            how = "fallback to the host" if self.fallback else f"chosen by {self.source}"
            lines.append(f"  -> runs on {self.backend!r} ({how})")
        else:
            lines.append(f"  -> cannot run: {self.error}")
        for name, why in self.reasons:
            lines.append(f"  {name}: " + ("; ".join(why) if why else "accepts (lower priority)"))
        return "\n".join(lines)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for calls in this context (``None`` restores automatic selection)."""
    if name is not None:
        registry.get(name)  # unknown names fail here, not at the first call
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _environment() -> tuple[str, str]:
    """``(DSHAL_BACKEND, DSHAL_FALLBACK policy)``, read once: reading the environment costs
    about a µs per variable, a tenth of a call's budget. :func:`clear_cache` re-reads them."""
    global _env
    if _env is None:
        raw = os.environ.get("DSHAL_FALLBACK", "")
        policy = raw.strip().lower() or "warn"
        if policy not in FALLBACK_POLICIES:
            raise DshalValueError(
                f"DSHAL_FALLBACK={raw!r} (allowed: {', '.join(FALLBACK_POLICIES)})")
        _env = (os.environ.get("DSHAL_BACKEND", "").strip(), policy)
    return _env


def _policy() -> str:
    return _environment()[1]


def _forced_choice(backend: str | None, env: str) -> tuple[str | None, str]:
    if backend is not None:
        return backend, "argument"
    ctx = _forced.get()
    if ctx is not None:
        return ctx, "use_backend"
    return (env, "DSHAL_BACKEND") if env else (None, "automatic")


def decide(sig: Signature, backend: str | None = None,
           memo: dict[tuple, Decision] | None = None) -> Decision:
    """Select the backend for ``sig`` (cached); never raises for refusals, see ``Decision``.

    :param memo: a dict owned by the caller that holds decisions for this ``sig`` only (a
        validated plan's), consulted first: a hit skips hashing the whole signature.
    """
    env, policy = _environment()
    name, source = _forced_choice(backend, env)
    how = (name, source, policy, registry.generation, _epoch)
    if memo is not None:
        found = memo.get(how)
        if found is not None:
            return found
    key = (sig, *how)
    found = _cache.get(key)
    if found is None:
        found = _decide(sig, name, source, policy)
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = found
    if memo is not None:
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[how] = found
    return found


def _decide(sig: Signature, name: str | None, source: str, policy: str) -> Decision:
    backends = registry.backends()
    refusals = {n: tuple(b.reasons(sig)) for n, b in backends.items()}
    if name is not None:
        if name not in backends:
            label = "backend" if source in ("argument", "use_backend") else source
            known = ", ".join(sorted(backends)) or "none"
            return Decision(None, source, (), f"{label}={name!r} is not installed "
                            f"(installed: {known})", unknown=True)
        others = tuple((n, r) for n, r in refusals.items() if n != name)
        if refusals[name]:
            return Decision(None, source, ((name, refusals[name]), *others),
                            f"backend {name!r} ({source}) cannot take this call")
        return Decision(name, source, others, chosen=backends[name])
    ranked = sorted(backends.values(), key=lambda b: -(b.spec.priority if b.spec else 0))
    for b in ranked:
        if not refusals[b.name]:
            others = tuple((n, r) for n, r in refusals.items() if n != b.name)
            return Decision(b.name, "automatic", others, chosen=b)
    all_refusals = tuple(refusals.items())
    host = backends.get(HOST_BACKEND)
    if sig.device[0] != CPU and policy != "error" and host is not None:
        host_sig = Signature(sig.op, sig.library, (CPU, 0), sig.dtypes, sig.features,
                             sig.precision, sig.sizes)
        if not host.reasons(host_sig):
            return Decision(HOST_BACKEND, "fallback", all_refusals, fallback=True, chosen=host)
    where = f"{device_type_name(sig.device[0])}:{sig.device[1]}"
    return Decision(None, "automatic", all_refusals, f"no backend accepts this call on {where}")


def select(sig: Signature, backend: str | None = None,
           memo: dict[tuple, Decision] | None = None) -> tuple[Backend, Decision]:
    """The backend that runs ``sig``; raises with every backend's reasons when none can
    (``memo`` as for :func:`decide`)."""
    decision = decide(sig, backend, memo)
    if decision.unknown:
        raise DshalValueError(decision.error)
    if decision.backend is None:
        reasons = {n: list(r) for n, r in decision.reasons}
        cls = UnsupportedError if decision.source != "automatic" else NoBackendError
        raise cls(f"{decision.error}: {sig.describe()}", reasons)
    if decision.fallback and _policy() == "warn":
        _warn_fallback(sig, decision)
    return decision.chosen or registry.get(decision.backend), decision


def _warn_fallback(sig: Signature, decision: Decision) -> None:
    why = "; ".join(f"{n}: {', '.join(r)}" for n, r in decision.reasons if r)
    if why in _warned:
        return
    _warned.add(why)
    warnings.warn(
        f"{sig.describe()}: no backend on the inputs' device accepts it, running on the host "
        f"backend {HOST_BACKEND!r} (set DSHAL_FALLBACK=error to forbid, allow to silence). "
        f"Reasons: {why}",
        FallbackWarning,
        stacklevel=4,
    )


def clear_cache() -> None:
    """Forget cached decisions and fallback warnings, and re-read ``DSHAL_BACKEND`` and
    ``DSHAL_FALLBACK`` (call it after changing them, or plugins, in a running process)."""
    global _env, _epoch
    _cache.clear()
    _warned.clear()
    _env = None
    _epoch += 1
