"""Plugin registry: discover backends through entry points, load them lazily, isolate failures.

Each entry point of the group ``dshal.backends`` becomes one :class:`Backend`. Loading runs, in
order: the allow-list ``DSHAL_PLUGINS``, the import, registration with a pluggy ``PluginManager``
validated against :mod:`dshal.hookspec`, the declaration, the plugin-API handshake and the device
probe, all under a time limit (:mod:`dshal.isolation`): any failure, ``BaseException`` and
overrunning the limit included, is recorded on that backend (status and error text) and never
propagates: dshal and every other backend keep working. Which entry point serves a name is the
rule of :mod:`dshal.plugin_names` (built-in names reserved, duplicates loaded from none).
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from dshal import hookspec, isolation, plugin_names
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
CONFLICT = "conflict"  # the name is registered by several distributions (none is loaded)
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
    notes: list[str] = field(default_factory=list)  # ignored claims on this name (dshal info)
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
        problem = _result_problem(op, result)
        if problem:
            raise PluginError(f"backend {self.name!r} broke the plugin contract: "
                              f"{hookspec.RUN_HOOKS[op]} {problem}")
        return result


def _result_problem(op: str, result: Any) -> str:
    """How a run hook's result breaks :data:`hookspec.RUN_RESULTS` ('' when it does not)."""
    items = hookspec.RUN_RESULTS[op]
    got = f"a {len(result)}-tuple" if isinstance(result, (tuple, list)) \
        else f"a {type(result).__name__}"
    if items is None:
        if isinstance(result, (tuple, list, str, bytes, int, float)):
            return f"must return one array (out), got {got}"
        return ""
    if not isinstance(result, (tuple, list)) or len(result) != len(items):
        return (f"must return a {len(items)}-tuple ({', '.join(items)}; None for results "
                f"not asked for), got {got}")
    return ""


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


def load(ep: EntryPoint, allowed: set[str] | None, limit: float | None = None) -> Backend:
    """Load one entry point into a :class:`Backend`, recording (never raising) any failure.

    :param limit: seconds the import, registration, declaration and probe may take together
        (``None``: no limit); see :mod:`dshal.isolation`.
    """
    dist = getattr(ep, "dist", None)
    b = Backend(name=ep.name, entry_point=ep.value,
                distribution=f"{dist.name} {dist.version}" if dist else "")
    if allowed is not None and ep.name not in allowed:
        b.status = DISABLED
        return b
    outcome = isolation.run_isolated(lambda: _load_stages(ep, b), ep.name, limit)
    if outcome.timed_out:  # the worker may still write to b: report on a fresh record
        stuck = Backend(name=b.name, entry_point=b.entry_point, distribution=b.distribution,
                        stage=b.stage)
        stuck.error = (f"did not finish loading within {limit:g} s (stuck in its {b.stage} "
                       f"stage); raise {isolation.ENV} if the plugin is merely slow")
        return stuck
    if outcome.error is not None:  # isolation: a bad plugin is reported, never fatal
        b.status, b.error = BROKEN, _short_error(outcome.error)
        if not isinstance(outcome.error, Exception):
            b.error += " (raised by the plugin; isolated)"
    return b


def _load_stages(ep: EntryPoint, b: Backend) -> None:
    """Import, register, declare, handshake and probe ``ep`` into ``b`` (may raise)."""
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
        return
    b.spec = spec
    b._runners = {op: getattr(pm.hook, name).get_hookimpls()[0].function
                  for op, name in hookspec.RUN_HOOKS.items()
                  if getattr(pm.hook, name).get_hookimpls()}
    b.stage = "handshake"
    problem = _handshake(spec)
    if problem:
        b.status, b.error = INCOMPATIBLE, problem
        return
    b.stage = "probe"
    device = pm.hook.dshal_device_probe()
    if not isinstance(device, DeviceInfo):
        b.error = f"dshal_device_probe returned {type(device).__name__}, expected DeviceInfo"
        return
    b.device = device
    b.status = AVAILABLE if device.present else NO_DEVICE
    b.error = "" if device.present else device.reason


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
        limit = isolation.timeout()
        found: dict[str, Backend] = {}
        for claim in plugin_names.resolve(entry_points(group=GROUP)):
            if claim.chosen is None:
                found[claim.name] = Backend(
                    name=claim.name, entry_point="; ".join(claim.claimants), status=CONFLICT,
                    stage="discover", error=claim.problem, notes=list(claim.notes))
                continue
            b = found[claim.name] = load(claim.chosen, allowed, limit)
            b.notes.extend(claim.notes)
        return found


registry = Registry()
