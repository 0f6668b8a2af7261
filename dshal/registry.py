"""Plugin registry: discover backends through entry points, load them lazily, isolate failures.

Each entry point of the group ``dshal.backends`` becomes one :class:`Backend`. Loading runs, in
order: the allow-list ``DSHAL_PLUGINS``, the import, registration with a pluggy ``PluginManager``
validated against :mod:`dshal.hookspec`, the declaration, the plugin-API handshake and the device
probe. Any failure is recorded on that backend (status and error text) and never propagates:
dshal and every other backend keep working.
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from dshal import hookspec
from dshal.capabilities import (
    FEATURES,
    OLDEST_PLUGIN_API,
    OP_SINCE,
    OPS,
    PLUGIN_API_VERSION,
    BackendSpec,
    DeviceInfo,
    Signature,
    capability_reasons,
)
from dshal.errors import BackendRuntimeError, DshalError, PluginError

GROUP = "dshal.backends"

# statuses, in the order loading reaches them
DISABLED = "disabled"  # excluded by DSHAL_PLUGINS
BROKEN = "broken"  # failed to import, register, declare or probe
INCOMPATIBLE = "incompatible"  # plugin API range excludes ours
NO_DEVICE = "no-device"  # probe found no hardware
AVAILABLE = "available"


@dataclass
class Backend:
    """One installed backend plugin and what loading it found."""

    name: str
    entry_point: str
    distribution: str = ""
    status: str = BROKEN
    error: str = ""
    spec: BackendSpec | None = None
    device: DeviceInfo | None = None
    stage: str = ""  # the loading stage reached: import, register, declare, handshake, probe
    _hooks: Any = field(default=None, repr=False)
    # each plugin has its own PluginManager holding only itself, so a run hook has exactly one
    # implementation: call it directly and skip pluggy's per-call machinery (µs per call)
    _runners: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def available(self) -> bool:
        return self.status == AVAILABLE

    def unavailable_reason(self) -> str:
        """Why this backend cannot run anything (empty when available)."""
        if self.status == AVAILABLE:
            return ""
        if self.status == DISABLED:
            return "disabled by DSHAL_PLUGINS=" + os.environ.get("DSHAL_PLUGINS", "")
        if self.status == NO_DEVICE:
            return "no device: " + (self.device.reason if self.device else self.error)
        return f"{self.status} ({self.stage}): {self.error}"

    def reasons(self, sig: Signature) -> list[str]:
        """Why this backend refuses ``sig``: generic capability reasons, then its own check."""
        if not self.available:
            return [self.unavailable_reason()]
        assert self.spec is not None
        reasons = capability_reasons(self.spec, sig)
        if reasons:
            return reasons
        try:
            for extra in self._hooks.dshal_call_check(signature=sig, device=self.device):
                reasons.extend(extra or [])
        except Exception as exc:  # a buggy check refuses the call instead of crashing dispatch
            reasons.append(f"dshal_call_check raised {type(exc).__name__}: {exc}")
        return reasons

    def run(self, op: str, call: Any) -> Any:
        """Run ``op`` on this backend; backend faults become :class:`BackendRuntimeError`."""
        run = self._runners.get(op)
        if run is None:
            raise PluginError(f"backend {self.name!r} has no {hookspec.RUN_HOOKS[op]} hook")
        try:
            result = run(call=call)
        except (ValueError, TypeError, DshalError):
            raise
        except MemoryError as exc:
            raise BackendRuntimeError(
                f"backend {self.name!r} ran out of memory in {op}: {exc}") from exc
        except Exception as exc:
            raise BackendRuntimeError(
                f"backend {self.name!r} failed in {op}: {type(exc).__name__}: {exc}"
            ) from exc
        if result is None:
            raise PluginError(
                f"backend {self.name!r} returned nothing from {hookspec.RUN_HOOKS[op]}")
        return result


def _short_error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _check_spec(name: str, spec: Any) -> str:
    """Contract violations in a declaration ('' when it is well formed)."""
    if not isinstance(spec, BackendSpec):
        return f"dshal_backend_declare returned {type(spec).__name__}, expected BackendSpec"
    if spec.name != name:
        return f"declared name {spec.name!r} differs from its entry-point name {name!r}"
    if spec.array_kind not in ("numpy", "torch", "cupy"):
        return f"array_kind={spec.array_kind!r} (allowed: numpy, torch, cupy)"
    for op, cap in spec.capabilities.items():
        if op not in OPS:
            return f"capability for unknown op {op!r} (known: {', '.join(OPS)})"
        unknown = cap.features - FEATURES[op]
        if unknown:
            return f"{op}: unknown features {sorted(unknown)} (known: {sorted(FEATURES[op])})"
        since = OP_SINCE.get(op, 1)
        if spec.plugin_api[1] < since:
            return (f"declares {op}, which plugin API {since} introduced, but supports plugin "
                    f"API {spec.plugin_api[0]}..{spec.plugin_api[1]} only")
    return ""


def _handshake(spec: BackendSpec) -> str:
    """'' when this dshal can load a plugin supporting ``spec.plugin_api``: dshal provides API
    :data:`PLUGIN_API_VERSION` and still loads plugins written for every API back to
    :data:`OLDEST_PLUGIN_API` (they do not serve what later APIs added)."""
    low, high = spec.plugin_api
    if low <= PLUGIN_API_VERSION and high >= OLDEST_PLUGIN_API:
        return ""
    if low > PLUGIN_API_VERSION:
        return (f"needs dshal plugin API {low}..{high} but this dshal provides "
                f"{OLDEST_PLUGIN_API}..{PLUGIN_API_VERSION}: upgrade dshal (pip install -U dshal)")
    return (f"supports dshal plugin API {low}..{high} but this dshal provides "
            f"{OLDEST_PLUGIN_API}..{PLUGIN_API_VERSION}: upgrade the plugin (pip install -U "
            f"<its distribution>) or install an older dshal")


def _missing_run_hooks(pm: pluggy.PluginManager, spec: BackendSpec) -> list[str]:
    return [hookspec.RUN_HOOKS[op] for op in spec.capabilities
            if not getattr(pm.hook, hookspec.RUN_HOOKS[op]).get_hookimpls()]


def load(ep: EntryPoint, allowed: set[str] | None) -> Backend:
    """Load one entry point into a :class:`Backend`, recording (never raising) any failure."""
    dist = getattr(ep, "dist", None)
    b = Backend(name=ep.name, entry_point=ep.value,
                distribution=f"{dist.name} {dist.version}" if dist else "")
    if allowed is not None and ep.name not in allowed:
        b.status = DISABLED
        return b
    try:
        b.stage = "import"
        plugin = ep.load()
        b.stage = "register"
        pm = pluggy.PluginManager(hookspec.PROJECT)
        pm.add_hookspecs(hookspec)
        pm.register(plugin, name=ep.name)
        pm.check_pending()
        b._hooks = pm.hook
        b.stage = "declare"
        spec = pm.hook.dshal_backend_declare()
        problem = _check_spec(ep.name, spec)
        if not problem:
            missing = _missing_run_hooks(pm, spec)
            problem = f"declares ops without their run hooks: {missing}" if missing else ""
        if problem:
            b.error = problem
            return b
        b.spec = spec
        b._runners = {op: getattr(pm.hook, name).get_hookimpls()[0].function
                      for op, name in hookspec.RUN_HOOKS.items()
                      if getattr(pm.hook, name).get_hookimpls()}
        b.stage = "handshake"
        problem = _handshake(spec)
        if problem:
            b.status, b.error = INCOMPATIBLE, problem
            return b
        b.stage = "probe"
        device = pm.hook.dshal_device_probe()
        if not isinstance(device, DeviceInfo):
            b.error = f"dshal_device_probe returned {type(device).__name__}, expected DeviceInfo"
            return b
        b.device = device
        b.status = AVAILABLE if device.present else NO_DEVICE
        b.error = "" if device.present else device.reason
    except Exception as exc:  # isolation: a bad plugin is reported, never fatal
        b.status, b.error = BROKEN, _short_error(exc)
    return b


class Registry:
    """All backends found through entry points; loaded once, on first use, thread-safely."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, Backend] | None = None
        self.generation = 0

    def backends(self) -> dict[str, Backend]:
        """Every discovered backend by name (loading them on the first call)."""
        found = self._backends
        if found is None:
            with self._lock:
                if self._backends is None:
                    self._backends = self._discover()
                    self.generation += 1
                found = self._backends
        return found

    def get(self, name: str) -> Backend:
        """The backend called ``name``; unknown names raise ``ValueError`` listing the known."""
        found = self.backends()
        if name not in found:
            known = ", ".join(sorted(found)) or "none installed"
            raise ValueError(f"backend={name!r} is not installed (installed: {known})")
        return found[name]

    def reload(self) -> None:
        """Forget every loaded backend; the next use discovers them again (for tests/tools)."""
        with self._lock:
            self._backends = None
            self.generation += 1  # decisions cached before now name the forgotten backends

    @staticmethod
    def _discover() -> dict[str, Backend]:
        raw = os.environ.get("DSHAL_PLUGINS", "").strip()
        allowed = {n.strip() for n in raw.split(",") if n.strip()} if raw else None
        found: dict[str, Backend] = {}
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            if ep.name in found:  # the same name from two distributions: keep the first
                found[ep.name].error += f"; another distribution also provides {ep.value}"
                continue
            found[ep.name] = load(ep, allowed)
        return found


registry = Registry()
